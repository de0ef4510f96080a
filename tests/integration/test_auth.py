"""The API token on every write: HTTP and gRPC writes without this control plane's token (none,
a wrong one, another state dir's) are refused and change nothing in etcd, while reads stay
open; the token is made once per state dir, private, reused, shown on a terminal only once;
the CLI finds it (--token-file, $TASKLANE_TOKEN, .tasklane/api-token) and fails in one line
without it; and it never appears in the control plane's logs, etcd or `tasklane get`."""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.proto_gen.tasklane.v1 import task_pb2, task_pb2_grpc
from controlplane.api.token import TOKEN_FILE, ApiToken
from controlplane.errors import RuntimeFailure
from controlplane.model.instance import Instance
from controlplane.store.etcd import Store
from tests.support.plane import Plane as BasePlane
from tests.support.plane import api_opener
from tests.support.up import (
    READY_TIMEOUT,
    TASKLANE,
    assert_one_line_error,
    free_ports,
    start_up,
)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
TASK = "nightly-fund-yield"
# A token that is nobody's: it must not show up anywhere either, even when refused.
WRONG = "wrong-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a"

pytestmark = pytest.mark.timeout(120)


class Plane(BasePlane):
    def snapshot(self) -> dict[str, bytes]:
        """Everything tasklane keeps in etcd but the leader-election keys."""
        items, _ = self.store.get_prefix("")
        return {k: v for k, v in items.items() if not k.startswith("leader/")}


@pytest.fixture(scope="module")
def planes(etcd_endpoint_module: str) -> Iterator[tuple[Plane, Plane]]:
    """Two control planes on one etcd, each with a state dir and so a token of its own; the
    fund-yield rules applied and a run of TASK open."""
    mine = Plane(etcd_endpoint_module)
    try:
        other = Plane(etcd_endpoint_module)
    except BaseException:
        mine.stop()
        raise
    try:
        assert mine.apply_files({"rules.yaml": RULES.read_text()})[0] == 200
        assert mine.request("POST", f"/api/v1/tasks/{TASK}/runs", {"id": "open"})[0] == 201
        yield mine, other
    finally:
        other.stop()
        mine.stop()


def instance(service: str, port: int) -> dict[str, Any]:
    return Instance(
        id=f"127.0.0.1-{port}",
        service=service,
        group="default",
        host="127.0.0.1",
        inbound_port=port,
        app_port=port + 1,
        admin_port=port + 2,
        egress_port=port + 3,
        pid=0,
        started_at=time.time(),
    ).to_json()


@contextmanager
def registered(plane: Plane) -> Iterator[str]:
    """An instance registered through the API for the test's duration (its lease lives only
    seconds without keep-alives: deregistered at once, it cannot expire during a later test)."""
    body = instance("account-svc", 40001)
    assert plane.request("POST", "/api/v1/instances", body)[0] == 200
    try:
        yield body["id"]
    finally:
        plane.request("DELETE", f"/api/v1/instances/{body['id']}")


def writes(instance_id: str) -> list[tuple[str, str, object]]:
    """Every kind of write the HTTP API has, each of which would change etcd if accepted."""
    changed = RULES.read_text().replace("fallback: strict", "fallback: loose")
    return [
        ("POST", "/api/v1/apply", {"files": [{"name": "r.yaml", "text": changed}]}),
        ("DELETE", f"/api/v1/rules/task/{TASK}", None),
        ("POST", "/api/v1/instances", instance("nav-pricing", 40011)),
        ("POST", f"/api/v1/instances/{instance_id}/keepalive", None),
        ("DELETE", f"/api/v1/instances/{instance_id}", None),
        ("POST", f"/api/v1/tasks/{TASK}/runs", {"id": "refused"}),
        ("POST", f"/api/v1/tasks/{TASK}/runs/finish", {"id": "open"}),
        ("PUT", "/api/v1/apply", {}),  # a method no route has
        ("POST", "/api/v1/not-written-yet", {}),  # and anything added later
    ]


@pytest.mark.parametrize(
    "authorization",
    [None, "", f"Bearer {WRONG}", "other", "bare", "Basic dXNlcjpwYXNz"],
    ids=["none", "empty", "wrong", "another-state-dir", "no-scheme", "basic"],
)
def test_http_writes_without_the_token_are_refused_and_change_nothing(
    planes: tuple[Plane, Plane], authorization: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    mine, other = planes
    if authorization == "other":
        authorization = f"Bearer {other.token}"  # valid, but for another control plane
    elif authorization == "bare":
        authorization = mine.token  # the right token without its scheme
    headers = {} if authorization is None else {"Authorization": authorization}
    caplog.set_level(logging.DEBUG)
    with registered(mine) as instance_id:
        before = mine.snapshot()
        for method, path, body in writes(instance_id):
            status, answer = mine.request(method, path, body, headers)
            assert status == 401, (method, path, answer)
            assert list(answer) == ["error"] and "API token" in answer["error"], answer
        assert mine.snapshot() == before
    assert "refused POST /api/v1/apply" in caplog.text
    for secret in (mine.token, other.token, WRONG):
        assert secret not in caplog.text


def test_401_says_how_to_authenticate(planes: tuple[Plane, Plane]) -> None:
    mine, _ = planes
    request = urllib.request.Request(f"{mine.url}/api/v1/rules/task/{TASK}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        api_opener.open(request, timeout=10)
    assert caught.value.code == 401
    assert caught.value.headers["WWW-Authenticate"] == 'Bearer realm="tasklane"'
    assert json.loads(caught.value.read()) == {
        "error": "this write needs the API token: send 'Authorization: Bearer <token>' "
        "(the token is in the control plane's state dir, file api-token)"
    }
    wrong = mine.request(
        "DELETE", f"/api/v1/rules/task/{TASK}", None, {"Authorization": "Bearer x"}
    )
    assert wrong == (
        401,
        {"error": "the API token is not this control plane's (see api-token in its state dir)"},
    )


def test_writes_with_the_token_pass_and_reads_need_none(planes: tuple[Plane, Plane]) -> None:
    mine, _ = planes
    for path in (
        "/healthz",
        "/",  # the dashboard
        "/api/v1/isolation",
        "/api/v1/status",
        "/api/v1/rules/svc",
        "/api/v1/rules/svc/fund-facade",
        "/api/v1/instances",
        f"/api/v1/tasks/{TASK}/runs",
        "/api/v1/profile/fund-facade",
    ):
        with api_opener.open(mine.url + path, timeout=10) as response:  # no token
            assert response.status == 200, path
    with registered(mine) as instance_id:
        keepalive = f"/api/v1/instances/{instance_id}/keepalive"
        lowercase = {"Authorization": f"bearer {mine.token}"}
        assert mine.request("POST", keepalive, None, lowercase)[0] == 200
        assert mine.request("POST", keepalive)[0] == 200  # the plane's own: Bearer <token>


def test_task_service_writes_need_the_token(planes: tuple[Plane, Plane]) -> None:
    mine, other = planes
    channel = grpc.insecure_channel(
        f"127.0.0.1:{mine.control_plane.xds_port}", options=[("grpc.enable_http_proxy", 0)]
    )
    stub = task_pb2_grpc.TaskServiceStub(channel)
    before = mine.snapshot()
    try:
        for metadata in (
            None,
            (("authorization", f"Bearer {WRONG}"),),
            (("authorization", f"Bearer {other.token}"),),
            (("authorization", mine.token),),
        ):
            for call, request in (
                (stub.StartRun, task_pb2.StartRunRequest(task=TASK, id="grpc")),
                (stub.FinishRun, task_pb2.FinishRunRequest(task=TASK, id="open")),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "API token" in caught.value.details()
        assert mine.snapshot() == before
        # Reads need no token.
        runs = stub.ListRuns(task_pb2.ListRunsRequest(task=TASK), timeout=10).runs
        assert [run.id for run in runs] == ["open"]
        assert stub.GetProfile(task_pb2.GetProfileRequest(service="fund-facade"), timeout=10)
    finally:
        channel.close()
    # With it, the write goes through.
    authorized = mine.grpc_channel()
    try:
        started = task_pb2_grpc.TaskServiceStub(authorized).StartRun(
            task_pb2.StartRunRequest(task=TASK, id="grpc"), timeout=10
        )
    finally:
        authorized.close()
    assert started.id == "grpc"


# --- the token file ----------------------------------------------------------------------------


def test_token_is_made_once_per_state_dir_private_and_reused(tmp_path: Path) -> None:
    first = ApiToken(tmp_path / "state")
    assert not first.accepts(None) and not first.accepts("Bearer anything")  # before load()
    first.load()
    path = tmp_path / "state" / TOKEN_FILE
    assert first.created and first.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == first.value + "\n" and len(first.value) >= 43
    assert first.value not in repr(first)
    assert [p.name for p in path.parent.iterdir()] == [TOKEN_FILE]  # no temporary left

    again = ApiToken(tmp_path / "state")
    again.load()
    assert not again.created and again.value == first.value
    elsewhere = ApiToken(tmp_path / "elsewhere")
    elsewhere.load()
    assert elsewhere.created and elsewhere.value != first.value
    assert again.accepts(f"Bearer {first.value}") and again.accepts(f"bearer  {first.value} ")
    assert not again.accepts(f"Bearer {elsewhere.value}")
    assert not again.accepts(first.value) and not again.accepts(f"Bearer {first.value}x")


@pytest.mark.parametrize("content", ["", "\n", "two words\n", "tab\there"])
def test_an_unusable_token_file_stops_the_start(tmp_path: Path, content: str) -> None:
    (tmp_path / TOKEN_FILE).write_text(content)
    with pytest.raises(RuntimeFailure, match="holds no API token .* delete it"):
        ApiToken(tmp_path).load()


# --- the CLI ------------------------------------------------------------------------------------


def cli(
    plane: Plane, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`tasklane ARGS` against `plane`, with no API token but what `env` gives."""
    clean = {k: v for k, v in os.environ.items() if k != "TASKLANE_TOKEN"}
    return subprocess.run(
        [*TASKLANE, *args],
        env={**clean, "TASKLANE_SERVER": plane.url, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("apply", "-f", str(RULES)),
        ("delete", "task", TASK),
        ("task", "start", TASK),
        ("task", "finish", TASK),
    ],
    ids=lambda args: args[0] if args[0] != "task" else f"task-{args[1]}",
)
def test_cli_writes_without_a_token_fail_in_one_line(
    planes: tuple[Plane, Plane], tmp_path: Path, args: tuple[str, ...]
) -> None:
    mine, other = planes
    before = mine.snapshot()
    missing = cli(mine, tmp_path, *args)
    assert missing.returncode == 2 and missing.stdout == ""
    assert_one_line_error(
        missing.stderr,
        "this command writes, and needs the API token: no .tasklane/api-token here; give "
        "--token-file FILE (the api-token in `tasklane up`'s state dir) or set $TASKLANE_TOKEN",
    )
    wrong = cli(mine, tmp_path, *args, env={"TASKLANE_TOKEN": other.token})
    assert wrong.returncode == 2
    assert_one_line_error(wrong.stderr, "the API token is not this control plane's")
    gone = cli(mine, tmp_path, *args, "--token-file", str(tmp_path / "nope"))
    assert_one_line_error(gone.stderr, f"cannot read the API token: {tmp_path / 'nope'}: ")
    assert mine.snapshot() == before


def test_a_dry_run_needs_no_token_and_a_real_apply_still_does(
    planes: tuple[Plane, Plane],
) -> None:
    """A read-only or CI user diffs; the same request without dryRun is refused, unwritten."""
    mine, _ = planes
    changed = RULES.read_text().replace("fallback: strict", "fallback: loose")
    files = [{"name": "r.yaml", "text": changed}]
    before = mine.snapshot()
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
        status, answer = mine.request("POST", "/api/v1/apply", {"files": files, "dryRun": True},
                                      headers)  # fmt: skip
        assert status == 200, answer
        assert "-  fallback: strict\n+  fallback: loose" in answer["diff"]
        status, answer = mine.request("POST", "/api/v1/apply", {"files": files}, headers)
        assert status == 401 and "API token" in answer["error"], answer
    assert mine.snapshot() == before


def test_cli_diff_and_dry_run_need_no_token(planes: tuple[Plane, Plane], tmp_path: Path) -> None:
    mine, _ = planes
    changed = tmp_path / "rules.yaml"
    changed.write_text(RULES.read_text().replace("fallback: strict", "fallback: loose"))
    before = mine.snapshot()
    diff = cli(mine, tmp_path, "diff", "-f", str(changed))
    assert diff.returncode == 1, diff.stderr
    assert "+  fallback: loose" in diff.stdout
    dry = cli(mine, tmp_path, "apply", "--dry-run", "-f", str(changed))
    assert dry.returncode == 0, dry.stderr
    assert "taskchain/fund-yield configured (dry run)" in dry.stdout
    assert mine.snapshot() == before


def test_run_without_the_token_fails_before_starting_and_with_a_wrong_one_at_registration(
    planes: tuple[Plane, Plane], tmp_path: Path
) -> None:
    mine, other = planes
    app = 'exec "$0" -m demo.chain_app --service nav-pricing --group default --instance x'
    args = ("run", "--service", "nav-pricing", "--", "sh", "-c", f'{app} --port "$PORT"')
    started = time.monotonic()
    missing = cli(mine, tmp_path, *args, sys.executable)
    assert missing.returncode == 2 and time.monotonic() - started < 10
    assert_one_line_error(missing.stderr, "this command writes, and needs the API token")
    # The sidecar and the app start (reads need no token); registering is refused, and
    # `tasklane run` stops them and exits with the refusal.
    wrong = cli(mine, REPO, *args, sys.executable, env={"TASKLANE_TOKEN": other.token})
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.splitlines()[-1] == (
        "tasklane: error: the API token is not this control plane's "
        "(see api-token in its state dir)"
    )
    assert mine.store.get_prefix("instances/")[0] == {}


def test_cli_finds_the_token(planes: tuple[Plane, Plane], tmp_path: Path) -> None:
    mine, other = planes
    token_file = mine.control_plane.api_token.path
    unchanged = "service/fund-facade unchanged\n"
    given = cli(mine, tmp_path, "apply", "-f", str(RULES), "--token-file", str(token_file))
    assert given.returncode == 0 and given.stdout.startswith(unchanged), given.stderr
    from_env = cli(mine, tmp_path, "apply", "-f", str(RULES), env={"TASKLANE_TOKEN": mine.token})
    assert from_env.returncode == 0 and from_env.stdout.startswith(unchanged), from_env.stderr
    # --token-file wins over the environment.
    both = cli(
        mine,
        tmp_path,
        *("apply", "-f", str(RULES), "--token-file", str(token_file)),
        env={"TASKLANE_TOKEN": other.token},
    )
    assert both.returncode == 0, both.stderr
    # `tasklane up`'s default state dir, in the working directory.
    (tmp_path / ".tasklane").mkdir()
    shutil.copy(token_file, tmp_path / ".tasklane" / TOKEN_FILE)
    default = cli(mine, tmp_path, "apply", "-f", str(RULES))
    assert default.returncode == 0 and default.stdout.startswith(unchanged), default.stderr
    spaced = cli(mine, tmp_path, "apply", "-f", str(RULES), env={"TASKLANE_TOKEN": "a b"})
    assert_one_line_error(spaced.stderr, "$TASKLANE_TOKEN holds no API token")
    # Reads need no token at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(mine, empty, "get", "svc").returncode == 0


# --- `tasklane up`: shown once, never logged ----------------------------------------------------


def test_no_secret_in_logs_etcd_or_get_output(tmp_path: Path) -> None:
    up = start_up(tmp_path)
    try:
        token = up.token
        env = {
            **os.environ,
            "TASKLANE_SERVER": f"http://127.0.0.1:{up.ports['http']}",
            "TASKLANE_TOKEN": token,
        }

        def tasklane(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*TASKLANE, *args],
                env={**env, **extra},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=30,
            )

        outputs = [tasklane("apply", "-f", str(RULES)), tasklane("task", "start", TASK)]
        refused = tasklane("delete", "task", TASK, TASKLANE_TOKEN=WRONG)
        assert refused.returncode == 2
        outputs += [
            tasklane("get", kind, "-o", output)
            for kind in ("svc", "chain", "task")
            for output in ("table", "yaml", "json")
        ]
        outputs += [
            tasklane("get", "profile", "fund-facade"),
            tasklane("task", "runs", TASK),
            tasklane("status"),
            tasklane("top"),
        ]
        for result in outputs:
            assert result.returncode == 0, (result.args, result.stderr)
            assert token not in result.stdout + result.stderr
        store = Store.connect(f"127.0.0.1:{up.ports['etcd_client']}")
        try:
            items, _ = store.get_prefix("")
        finally:
            store.close()
        assert items and not [key for key, value in items.items() if token.encode() in value]
    finally:
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(timeout=10)
    log = up.stdout() + up.stderr()
    assert "refused DELETE /api/v1/rules/task/nightly-fund-yield" in log
    assert f"API token written to {up.state_dir / TOKEN_FILE}" in up.stdout()
    assert token not in log and WRONG not in log
    assert token not in (up.state_dir / "etcd" / "etcd.log").read_text()


def read_terminal(fd: int, proc: subprocess.Popen[bytes], until: str) -> str:
    """What the process wrote to its terminal until `until` and a pause after it, or its exit."""
    seen = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        found = until.encode() in seen
        ready, _, _ = select.select([fd], [], [], 0.3 if found else 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the process exited and closed the terminal
                break
        elif found or proc.poll() is not None:
            break
    return seen.decode().replace("\r\n", "\n")


def up_on_terminal(state_dir: Path) -> str:
    """Run `tasklane up` with its stdout on a terminal until ready; what it printed there."""
    ports = free_ports()
    controller, terminal = pty.openpty()
    args = [*TASKLANE, "up", "--state-dir", str(state_dir)]
    args += ["--xds-port", str(ports["xds"]), "--http-port", str(ports["http"])]
    args += ["--etcd-client-port", str(ports["etcd_client"])]
    args += ["--etcd-peer-port", str(ports["etcd_peer"])]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.DEVNULL
    )
    os.close(terminal)
    try:
        # The token lines come with the ready line, in one write.
        printed = read_terminal(controller, proc, "tasklane up: ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    return printed


def test_token_is_shown_on_a_terminal_once(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = up_on_terminal(state_dir).splitlines()
    token = (state_dir / TOKEN_FILE).read_text().strip()
    assert first[0].startswith("tasklane up: ")
    assert first[1:] == [
        f"API token written to {state_dir / TOKEN_FILE}",
        f"API token (shown once; writes send it as a Bearer token): {token}",
    ]
    second = up_on_terminal(state_dir).splitlines()
    assert len(second) == 1 and second[0].startswith("tasklane up: ")
    assert (state_dir / TOKEN_FILE).read_text().strip() == token


def test_up_with_an_unusable_token_file_fails_in_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / TOKEN_FILE).write_text("")
    result = subprocess.run(
        [*TASKLANE, "up", "--state-dir", str(state_dir), "--xds-port", "0", "--http-port", "0"]
        + ["--etcd", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"{state_dir / TOKEN_FILE} holds no API token")
