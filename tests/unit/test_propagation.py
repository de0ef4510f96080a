"""controlplane.propagation without a network: reading the dye (header, W3C baggage and its edge
cases), writing it without losing other baggage, the middlewares' context handling, and the
outbound hooks' install/uninstall bookkeeping."""

from __future__ import annotations

import asyncio
import email.message
import io
import random
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from controlplane import propagation
from controlplane.propagation import (
    AsgiMiddleware,
    UrllibHandler,
    WsgiMiddleware,
    current_dye,
    dye_scope,
    extract,
    httpx_event_hooks,
    inject,
    install_requests,
    install_urllib,
    uninstall_requests,
    uninstall_urllib,
    wrap,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _isolated_hooks() -> Iterator[None]:
    """Every test starts and ends with no hook installed and urllib's own global opener."""
    opener = urllib.request._opener
    yield
    uninstall_requests()
    uninstall_urllib()
    urllib.request.install_opener(opener)


# --- extract: the dye header ---------------------------------------------------------------


def test_extract_reads_the_dye_header_from_every_accepted_shape() -> None:
    message = email.message.Message()
    message["X-Task-Dye"] = "fund-yield@v2"
    assert extract({"x-task-dye": "fund-yield@v2"}) == "fund-yield@v2"
    assert extract({"X-TASK-DYE": " fund-yield@v2\t"}) == "fund-yield@v2"
    assert extract([("X-Task-Dye", "fund-yield@v2")]) == "fund-yield@v2"
    assert extract([(b"x-task-dye", b"fund-yield@v2")]) == "fund-yield@v2"
    assert extract(message) == "fund-yield@v2"


def test_extract_without_a_dye_is_none() -> None:
    assert extract({}) is None
    assert extract([]) is None
    assert extract({"baggage": "userId=1", "traceparent": "00-ab-cd-01"}) is None


def test_the_dye_header_wins_over_the_baggage_member() -> None:
    headers = [("baggage", "task-dye=from-baggage"), ("x-task-dye", "from-header")]
    assert extract(headers) == "from-header"


@pytest.mark.parametrize("bad", ["", "   ", "two words", "caf\u00e9", "a\x7fb"])
def test_an_empty_or_malformed_dye_header_counts_as_absent(bad: str) -> None:
    assert extract({"x-task-dye": bad}) is None
    assert extract({"x-task-dye": bad, "baggage": "task-dye=from-baggage"}) == "from-baggage"


def test_header_and_key_names_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    headers = {"x-dye": "a", "baggage": "dye=b", "x-task-dye": "c"}
    assert extract(headers, header="X-Dye") == "a"
    assert extract({"baggage": "dye=b,task-dye=c"}, baggage_key="dye") == "b"
    monkeypatch.setattr(propagation, "DYE_HEADER", "x-dye")
    monkeypatch.setattr(propagation, "BAGGAGE_KEY", "dye")
    assert extract(headers) == "a"
    assert extract({"baggage": "task-dye=c,dye=b"}) == "b"
    assert inject({}, "z") == {"x-dye": "z", "baggage": "dye=z"}


# --- extract: W3C baggage ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("baggage", "dye"),
    [
        ("task-dye=fund-yield@v2", "fund-yield@v2"),
        ("userId=1,task-dye=fund-yield@v2", "fund-yield@v2"),
        ("task-dye=fund;ttl=30;sticky", "fund"),  # properties are not part of the value
        ("task-dye=fund%40v2%2C%25", "fund@v2,%"),  # percent-decoded
        ("task-dye=fund%40v2%3Bsrc%3Dcron", "fund@v2"),  # properties as OpenTelemetry sends them
        ("task-dye=%66%75%6E%64", "fund"),
        (" \tuserId=1 ,\t task-dye \t=\t fund \t; p = 1 \t, x=2", "fund"),  # OWS anywhere
        ("userId=1,,, ,task-dye=fund,", "fund"),  # empty members
        ("TASK-DYE=upper,task-dye=lower", "lower"),  # keys are case-sensitive
        ("task-dye=first,task-dye=second", "first"),
    ],
)
def test_baggage_member_is_parsed_per_w3c(baggage: str, dye: str) -> None:
    assert extract({"baggage": baggage}) == dye


@pytest.mark.parametrize(
    "member",
    [
        "task-dye",  # no "="
        "task-dye;p=1",  # a property, not a value
        "=fund",
        "task-dye=",  # empty value
        'task-dye="fund"',  # DQUOTE is not a baggage-octet
        "task-dye=fu nd",  # nor is a space inside the value
        "task-dye=fu\\nd",  # nor a backslash
        "task-dye=%0D%0Ainjected: yes",  # would become CR LF
        "task-dye=%0D%0A",
        "task-dye=%20",
        "task-dye=%FF",  # not UTF-8: U+FFFD, not a dye
        "task-dye=caf%C3%A9",  # decodes, but is no header-safe dye
        "task-dye=caf\u00e9",
    ],
)
def test_malformed_members_are_ignored_not_fatal(member: str) -> None:
    assert extract({"baggage": member}) is None
    assert extract({"baggage": f"a=1,{member},task-dye=good,b=2"}) == "good"


def test_multiple_baggage_headers_form_one_list() -> None:
    headers = [("baggage", "userId=1"), ("Baggage", "a=b, task-dye=fund"), ("BAGGAGE", "c=d")]
    assert extract(headers) == "fund"
    assert extract([(b"baggage", b"userId=1"), (b"baggage", b"task-dye=fund")]) == "fund"


def test_members_past_the_w3c_count_limit_are_ignored() -> None:
    others = [f"k{i}=v" for i in range(propagation.MAX_BAGGAGE_MEMBERS - 1)]
    assert extract({"baggage": ",".join([*others, "task-dye=fund"])}) == "fund"
    assert extract({"baggage": ",".join([*others, "k=v", "task-dye=fund"])}) is None


def test_members_past_the_w3c_byte_limit_are_ignored() -> None:
    member = "task-dye=fund"
    filler = "k=" + "v" * (propagation.MAX_BAGGAGE_BYTES - len(member) - 3)  # 2 commas
    assert extract({"baggage": f"{filler},{member}"}) == "fund"
    assert extract({"baggage": f"{filler}v,{member}"}) is None
    assert extract({"baggage": f"{member},{filler}vvvv"}) == "fund"


def test_huge_baggage_is_ignored_rather_than_crashing() -> None:
    assert extract({"baggage": "k=" + "v" * 1_000_000 + ",task-dye=fund"}) is None
    assert extract({"baggage": "," * 1_000_000 + "task-dye=fund"}) == "fund"  # no members
    assert extract({"baggage": "x;" * 500_000}) is None


# --- inject --------------------------------------------------------------------------------


def test_inject_without_a_dye_changes_nothing() -> None:
    headers = {"baggage": "userId=1", "accept": "*/*"}
    assert inject(headers) is headers
    assert headers == {"baggage": "userId=1", "accept": "*/*"}


def test_inject_writes_the_current_dye_as_header_and_baggage_member() -> None:
    with dye_scope("fund-yield@v2"):
        headers = inject({"accept": "*/*"})
    assert headers == {
        "accept": "*/*",
        "x-task-dye": "fund-yield@v2",
        "baggage": "task-dye=fund-yield@v2",
    }


def test_inject_keeps_other_members_and_replaces_an_old_dye() -> None:
    headers = {
        "X-Task-Dye": "old",
        "Baggage": "userId=1, task-dye=old;ttl=3 ,span=a%2Cb;p;q=1,weird",
    }
    inject(headers, "new")
    assert headers == {
        "x-task-dye": "new",
        "Baggage": "task-dye=new,userId=1,span=a%2Cb;p;q=1,weird",
    }
    assert extract(headers) == "new"


def test_inject_merges_several_baggage_headers_into_one() -> None:
    headers = inject({"baggage": "a=1", "BAGGAGE": "task-dye=old,b=2"}, "new")
    assert headers == {"x-task-dye": "new", "BAGGAGE": "task-dye=new,a=1,b=2"}


# Not ';': it starts the properties, written or encoded (model.dye), so it never round-trips.
@pytest.mark.parametrize("dye", ["fund-yield@v2", 'a,b"d\\e%f', "%41", "~!#$&'()*+/:<>?[]^`{|}"])
def test_inject_percent_encodes_so_extract_round_trips(dye: str) -> None:
    headers = inject({}, dye)
    value = headers["baggage"].split("=", 1)[1]
    assert propagation._BAGGAGE_VALUE.fullmatch(value)
    assert extract({"baggage": headers["baggage"]}) == dye
    assert extract(headers) == dye


def test_inject_keeps_the_dye_first_and_within_the_w3c_limits() -> None:
    many = ",".join(f"k{i}=v" for i in range(200))
    members = inject({"baggage": many}, "fund")["baggage"].split(",")
    assert len(members) == propagation.MAX_BAGGAGE_MEMBERS
    assert members[:3] == ["task-dye=fund", "k0=v", "k1=v"]
    large = ",".join(f"k{i}=" + "v" * 1000 for i in range(20))
    baggage = inject({"baggage": large}, "fund")["baggage"]
    assert len(baggage) <= propagation.MAX_BAGGAGE_BYTES
    assert extract({"baggage": baggage}) == "fund"


@pytest.mark.parametrize("bad", ["", "two words", "line\r\nbreak", "caf\u00e9"])
def test_a_dye_that_cannot_travel_is_a_caller_error(bad: str) -> None:
    with pytest.raises(ValueError):
        inject({}, bad)
    with pytest.raises(ValueError), dye_scope(bad):
        pass


def test_inject_into_the_header_types_of_requests_and_httpx() -> None:
    import httpx
    from requests.structures import CaseInsensitiveDict

    session_headers = CaseInsensitiveDict({"Baggage": "a=1", "X-TASK-DYE": "old"})
    inject(session_headers, "fund")
    assert dict(session_headers) == {"Baggage": "task-dye=fund,a=1", "x-task-dye": "fund"}

    client_headers = httpx.Headers([("baggage", "a=1"), ("baggage", "task-dye=old, b=2")])
    inject(client_headers, "fund")
    assert client_headers.get_list("baggage") == ["task-dye=fund,a=1,b=2"]
    assert client_headers.get_list("x-task-dye") == ["fund"]


# --- context: scopes, asyncio tasks, threads ---------------------------------------------------


def test_dye_scope_sets_and_restores() -> None:
    assert current_dye() is None
    with dye_scope("outer"):
        assert current_dye() == "outer"
        with dye_scope(None):
            assert current_dye() is None
        with dye_scope("inner"):
            assert current_dye() == "inner"
        assert current_dye() == "outer"
    assert current_dye() is None


def test_concurrent_asyncio_tasks_never_see_each_others_dye() -> None:
    async def task(i: int) -> list[str | None]:
        seen = []
        with dye_scope(f"dye-{i}"):
            for _ in range(5):
                await asyncio.sleep(random.random() / 100)
                seen.append(current_dye())
            child = await asyncio.create_task(_later_dye())  # a task inherits its parent's dye
            seen.append(child)
        seen.append(current_dye())
        return seen

    async def main() -> list[list[str | None]]:
        with dye_scope("main"):
            results = await asyncio.gather(*(task(i) for i in range(100)))
            assert current_dye() == "main"
        return results

    for i, seen in enumerate(asyncio.run(main())):
        assert seen == [f"dye-{i}"] * 6 + ["main"]


async def _later_dye() -> str | None:
    await asyncio.sleep(0)
    return current_dye()


def test_wrap_carries_the_dye_into_a_thread_pool() -> None:
    def dye_after_a_while() -> str | None:
        threading.Event().wait(0.01)
        return current_dye()

    with ThreadPoolExecutor(8) as pool, dye_scope("fund"):
        assert pool.submit(dye_after_a_while).result() is None  # why wrap exists
        wrapped = wrap(dye_after_a_while)
        futures = [pool.submit(wrapped) for _ in range(32)]  # one wrapper, many threads at once
        assert [future.result() for future in futures] == ["fund"] * 32


def test_wrap_isolates_calls_from_each_other() -> None:
    def set_and_read(dye: str) -> str | None:
        before = current_dye()
        propagation.dye_var.set(dye)
        return before

    with dye_scope("fund"):
        wrapped = wrap(set_and_read)
    assert wrapped("a") == "fund"
    assert wrapped("b") == "fund"
    assert current_dye() is None


# --- middlewares ---------------------------------------------------------------------------


def _environ(**headers: str) -> dict[str, Any]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": io.BytesIO()}
    environ.update({"HTTP_" + name.upper(): value for name, value in headers.items()})
    return environ


def test_wsgi_middleware_sets_the_dye_for_the_call_and_the_streamed_body() -> None:
    seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append(current_dye())
        start_response("200 OK", [])
        return _body(seen)

    middleware = WsgiMiddleware(app)
    with dye_scope("server-thread"):
        body = middleware(_environ(x_task_dye="fund"), lambda *args: None)
        assert current_dye() == "server-thread"  # nothing leaks into the server's context
        assert next(iter(body)) == b"one"
        body.close()  # type: ignore[attr-defined]
        undyed = middleware(_environ(baggage="userId=1"), lambda *args: None)
        assert list(undyed) == [b"one", b"two"]
    assert seen == ["fund", "fund", "fund:closed", None, None, None]


def _body(seen: list[str | None]) -> Iterator[bytes]:
    try:
        seen.append(current_dye())
        yield b"one"
        seen.append(current_dye())
        yield b"two"
    except GeneratorExit:
        seen.append(f"{current_dye()}:closed")
        raise


def test_wsgi_middleware_reads_baggage_and_configured_names() -> None:
    seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(current_dye())
        return []

    WsgiMiddleware(app)(_environ(baggage="userId=1, task-dye=fund%40v2"), lambda *a: None)
    WsgiMiddleware(app, header="x-dye")(_environ(x_dye="custom"), lambda *a: None)
    WsgiMiddleware(app, baggage_key="dye")(_environ(baggage="dye=key"), lambda *a: None)
    assert seen == ["fund@v2", "custom", "key"]


def test_inbound_baggage_members_go_on_with_every_outbound_call() -> None:
    """The served request's other members (`tenant=7`) go on, dyed or not; the app's own
    members come first and win over inbound ones of the same key."""
    seen: list[dict[str, str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(inject({"baggage": "hop=app, tenant=8"}))
        seen.append(inject({}))
        with dye_scope(None):  # the app's own undyed work
            seen.append(inject({}))
        seen.append(wrap(inject)({}))  # e.g. a thread pool
        return []

    inbound = "tenant=7, task-dye=fund;p=1 , userId=1;k=v"
    WsgiMiddleware(app)(_environ(baggage=inbound), lambda *a: None)
    dyed, others = {"x-task-dye": "fund"}, "tenant=7,userId=1;k=v"
    assert seen == [
        {**dyed, "baggage": "task-dye=fund,hop=app,tenant=8,userId=1;k=v"},
        {**dyed, "baggage": f"task-dye=fund,{others}"},
        {"baggage": others},
        {**dyed, "baggage": f"task-dye=fund,{others}"},
    ]
    seen.clear()
    WsgiMiddleware(app)(_environ(baggage="tenant=7"), lambda *a: None)
    assert seen == [{"baggage": "hop=app,tenant=8"}] + [{"baggage": "tenant=7"}] * 3
    assert inject({}) == {}  # nothing outside the request


def test_asgi_middleware_carries_inbound_baggage_members() -> None:
    seen: list[dict[str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(inject({}))

    headers = [(b"baggage", b"tenant=7,task-dye=fund%40r1%3Bsrc%3Dcron")]
    asyncio.run(AsgiMiddleware(app)(_scope("http", "/", headers), _no_receive, _nop))
    assert seen == [{"x-task-dye": "fund@r1", "baggage": "task-dye=fund@r1,tenant=7"}]
    assert inject({}) == {}


def test_asgi_middleware_isolates_concurrent_requests() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for _ in range(3):
            await asyncio.sleep(random.random() / 100)
            await send({"dye": current_dye(), "path": scope["path"]})

    async def main() -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        middleware = AsgiMiddleware(app)
        with dye_scope("server"):
            await asyncio.gather(
                *(
                    middleware(
                        _scope("http", f"/{i}", [(b"x-task-dye", f"d{i}".encode())]),
                        _no_receive,
                        send,
                    )
                    if i % 2
                    else middleware(_scope("http", f"/{i}", []), _no_receive, send)
                    for i in range(50)
                )
            )
            assert current_dye() == "server"
        return messages

    messages = asyncio.run(main())
    assert len(messages) == 150
    for message in messages:
        i = int(message["path"][1:])
        assert message["dye"] == (f"d{i}" if i % 2 else None)


def test_asgi_middleware_covers_websockets_and_passes_lifespan_through() -> None:
    seen: list[tuple[str, str | None]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["type"], current_dye()))
        assert receive is _no_receive

    async def main() -> None:
        middleware = AsgiMiddleware(app, baggage_key="dye")
        await middleware(_scope("websocket", "/ws", [(b"baggage", b"dye=ws")]), _no_receive, _nop)
        with dye_scope("outer"):
            await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, _no_receive, _nop)

    asyncio.run(main())
    assert seen == [("websocket", "ws"), ("lifespan", "outer")]


def _scope(kind: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": kind, "asgi": {"version": "3.0"}, "path": path, "headers": headers}


async def _no_receive() -> dict[str, Any]:
    raise AssertionError("the middleware must not consume the request")


async def _nop(message: dict[str, Any]) -> None:
    """An ASGI send that drops messages."""


# --- outbound hooks ------------------------------------------------------------------------


def test_httpx_hook_works_for_sync_and_async_clients() -> None:
    import httpx

    (hook,) = httpx_event_hooks()["request"]
    request = httpx.Request("GET", "http://127.0.0.1/", headers={"baggage": "a=1"})
    hook(request)  # sync Client: the return value is ignored
    assert "x-task-dye" not in request.headers
    with dye_scope("fund"):
        asyncio.run(_await(hook(request)))  # AsyncClient awaits it
    assert request.headers["x-task-dye"] == "fund"
    assert request.headers["baggage"] == "task-dye=fund,a=1"


async def _await(awaitable: Any) -> None:
    await awaitable


class _Recorder:
    """A requests transport adapter that answers locally and keeps the headers it was sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def send(self, request: Any, **kwargs: Any) -> Any:
        import requests

        self.sent.append(dict(request.headers))
        response = requests.Response()
        response.status_code = 200
        response.request = request
        return response

    def close(self) -> None:
        """Nothing to release."""


def _requests_sent(dye: str | None) -> dict[str, str]:
    import requests

    recorder = _Recorder()
    with requests.Session() as session:
        session.mount("http://", recorder)  # type: ignore[arg-type]
        with dye_scope(dye):
            session.get("http://downstream.test/", headers={"baggage": "userId=1"})
    return recorder.sent[0]


def test_install_requests_is_idempotent_and_reversible() -> None:
    import requests

    original = requests.Session.send
    install_requests()
    patched = requests.Session.send
    install_requests()
    assert requests.Session.send is patched is not original
    sent = _requests_sent("fund")
    assert sent["x-task-dye"] == "fund"
    assert sent["baggage"] == "task-dye=fund,userId=1"
    assert "x-task-dye" not in _requests_sent(None)
    uninstall_requests()
    uninstall_requests()
    assert requests.Session.send is original
    assert "x-task-dye" not in _requests_sent("fund")


def test_uninstall_requests_under_a_later_wrapper_leaves_it_but_goes_inert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import requests

    install_requests()
    ours = requests.Session.send

    def theirs(session: Any, request: Any, **kwargs: Any) -> Any:
        return ours(session, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", theirs)
    uninstall_requests()
    assert requests.Session.send is theirs
    assert "x-task-dye" not in _requests_sent("fund")
    install_requests()  # again, on top: one live wrapper
    assert _requests_sent("fund")["x-task-dye"] == "fund"


class _Answer(urllib.request.BaseHandler):
    """Answers http:// locally and keeps the headers urllib would have sent."""

    handler_order = 100  # before the real HTTPHandler

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def http_open(self, request: urllib.request.Request) -> Any:
        self.sent.append({name.lower(): value for name, value in request.header_items()})
        response = urllib.request.addinfourl(
            io.BytesIO(b""), email.message.Message(), request.full_url, 200
        )
        response.msg = "OK"
        return response


def test_install_urllib_is_idempotent_reversible_and_keeps_the_apps_opener() -> None:
    answer = _Answer()
    urllib.request.install_opener(urllib.request.build_opener(answer))
    install_urllib()
    install_urllib()
    opener = urllib.request._opener
    assert answer in opener.handlers
    assert sum(isinstance(handler, UrllibHandler) for handler in opener.handlers) == 1

    with dye_scope("fund"):
        urllib.request.urlopen("http://downstream.test/").close()
    with dye_scope(None):
        urllib.request.urlopen("http://downstream.test/").close()
    uninstall_urllib()
    uninstall_urllib()
    with dye_scope("fund"):
        urllib.request.urlopen("http://downstream.test/").close()

    dyed, undyed, uninstalled = answer.sent
    assert dyed["x-task-dye"] == "fund"
    assert dyed["baggage"] == "task-dye=fund"
    assert "x-task-dye" not in undyed and "baggage" not in undyed
    assert "x-task-dye" not in uninstalled


def test_install_urllib_builds_the_default_opener_when_none_is_installed() -> None:
    urllib.request.install_opener(None)
    install_urllib()
    opener = urllib.request._opener
    assert opener is not None
    assert any(isinstance(handler, urllib.request.HTTPHandler) for handler in opener.handlers)
    assert any(isinstance(handler, UrllibHandler) for handler in opener.handlers)


def test_urllib_handler_for_an_apps_own_opener() -> None:
    answer = _Answer()
    opener = urllib.request.build_opener(UrllibHandler(), answer)
    with dye_scope("fund"):
        opener.open("http://downstream.test/").close()
    assert answer.sent[0]["x-task-dye"] == "fund"
