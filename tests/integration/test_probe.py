"""`tasklane probe CHAIN` against a real `tasklane up` and real `tasklane run` instances (real
Envoys, real apps): the control plane sends one dyed request into the chain's first hop and
reads the sidecars' access logs. A healthy chain passes with each hop's group; an app at hop 2
that forwards x-request-id but drops the dye is named, and the probe exits non-zero."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.chain import (
    DYE,
    GOOD,
    NEXT,
    Plane,
    Run,
    chain_app,
    get,
    running_plane,
    stop_run,
)
from tests.support.rules import chain, service
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

EXIT_PROBLEM = 1
# Straight to the API even when http_proxy is set in the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DROPPER = [
    "sh",
    "-c",
    'exec "$0" -m tests.support.dye_dropper --next nav-pricing',
    sys.executable,
]


@pytest.fixture
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """`tasklane up` with the fund-yield rules (fund-facade -> account-svc -> nav-pricing)."""
    yield from running_plane(tmp_path_factory, GOOD)


def started(plane: Plane, runs: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], Run]:
    """`tasklane run` of each (service, group) with its command, all registered."""
    launched = {key: plane.launch(*key, command) for key, command in runs.items()}
    with ThreadPoolExecutor(len(launched)) as pool:
        list(pool.map(plane.registered, launched.values()))
    return launched


def stopped(runs: dict[tuple[str, str], Run]) -> None:
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(stop_run, runs.values()))


def probe(plane: Plane, *options: str) -> tuple[int, dict]:
    done = plane.tasklane("probe", "fund-yield", "-o", "json", *options)
    assert done.returncode in (0, EXIT_PROBLEM), done.stderr
    return done.returncode, json.loads(done.stdout)


def rows(report: dict) -> list[tuple[str, str | None, bool | None, str]]:
    return [(h["service"], h["servedBy"], h["dyed"], h["verdict"]) for h in report["hops"]]


def test_probe_of_a_healthy_chain_names_each_hops_group(plane: Plane) -> None:
    runs = started(plane, {(s, "task"): chain_app(s, "task") for s in NEXT})
    try:
        facade = runs["fund-facade", "task"].instance
        # Callers route to an instance once their first health check of it passed.
        wait_until(lambda: get(facade.egress_port, "account-svc", DYE)[0] == 200, 20, "chain up")
        code, report = probe(plane)
        assert code == 0, report
        assert rows(report) == [
            ("fund-facade", "task", True, "ok"),
            ("account-svc", "task", True, "ok"),
            ("nav-pricing", "task", True, "ok"),
        ]
        assert report["sentTo"]["instance"] == facade.key
        assert [h["node"] for h in report["hops"]] == [
            run.instance.group_key.node_id(run.instance.id) for run in runs.values()
        ]
        table = plane.tasklane("probe", "fund-yield")
        assert table.returncode == 0, table.stderr
        assert "ok: the dye reached every hop" in table.stdout
    finally:
        stopped(runs)
    bad_path = plane.tasklane("probe", "fund-yield", "--path", "no-slash")
    assert bad_path.returncode == 2
    (line,) = bad_path.stderr.splitlines()
    assert "path: 'no-slash' is not a URL path" in line, line
    unknown = plane.tasklane("probe", "fund-yeild")
    assert unknown.returncode == 2
    (line,) = unknown.stderr.splitlines()
    assert "TaskChain" in line and "fund-yeild" in line and "not found" in line, line


def api(plane: Plane, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(plane.server + path, data=body, method=method)
    request.add_header("Authorization", f"Bearer {plane.up.token}")
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BAD_BODIES = (
    (b"{not json", "the probe's body is not JSON"),
    (b"[]", "the probe's body must be a JSON object"),
    (b'{"path": 5}', "path: '5' is not a URL path"),
    (b'{"path": "/a b"}', "path: '/a b' is not a URL path"),
    (b'{"path": "/", "via": "x"}', "unknown field 'via' in the probe's body"),
)


def test_bad_probe_requests_are_refused_and_send_nothing(plane: Plane, tmp_path: Path) -> None:
    for body, error in BAD_BODIES:
        code, answer = api(plane, "POST", "/api/v1/probe/fund-yield", body)
        assert (code, answer["error"].startswith(error)) == (400, True), (body, answer)
    # A chain entered through a queue: the probe's request would be HTTP, with no id to follow.
    queued = tmp_path / "queued.yaml"
    queued.write_text(
        service("ledger") + chain("entries", "[{service: ledger, group: task, queue: q}]")
    )
    assert plane.tasklane("apply", "-f", str(queued)).returncode == 0
    refused = plane.tasklane("probe", "entries")
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert "TaskChain entries starts with a queue hop (queue q)" in line, line
    assert api(plane, "GET", "/api/v1/probe/fund-yield")[0] == 404  # no probe was sent
    assert api(plane, "GET", "/api/v1/probe") == (200, {"probes": []})


def test_probe_names_the_hop_that_lost_the_dye(plane: Plane) -> None:
    runs = started(
        plane,
        {
            ("fund-facade", "task"): chain_app("fund-facade", "task"),
            ("account-svc", "task"): DROPPER,  # forwards x-request-id, not the dye
            ("nav-pricing", "default"): chain_app("nav-pricing", "default"),
        },
    )
    try:
        facade = runs["fund-facade", "task"].instance
        dropper = runs["account-svc", "task"].instance
        wait_until(
            lambda: (
                get(facade.egress_port, "account-svc", DYE)[0] == 200
                and get(dropper.egress_port, "nav-pricing", {})[0] == 200
            ),
            20,
            "chain up",
        )
        code, report = probe(plane)
        assert code == EXIT_PROBLEM, report
        assert rows(report) == [
            ("fund-facade", "task", True, "ok"),
            ("account-svc", "task", True, "ok"),
            ("nav-pricing", "default", False, "dye lost"),
        ]
        assert report["problem"] == "dye lost between hop 2 (account-svc) and hop 3 (nav-pricing)"
        table = plane.tasklane("probe", "fund-yield")
        assert table.returncode == EXIT_PROBLEM
        assert table.stdout.rstrip().endswith(report["problem"]), table.stdout
    finally:
        stopped(runs)
