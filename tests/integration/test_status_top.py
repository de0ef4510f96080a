"""`tasklane status` and `tasklane top`: the renderers on fixed answers of the API, then the
commands against a real control plane with real Envoy sidecars (SotW and Delta), one of which
is made to NACK; `top --watch` until Ctrl-C; a control plane without the endpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.cli.views import render_status, render_top, sync_state
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.types import CLUSTER, PUSH_ORDER, ROUTE
from testkit.resources import regex_route
from tests.support.plane import Plane
from tests.support.runs import plane_with_rules
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
TASKLANE = [sys.executable, "-m", "controlplane"]
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC

pytestmark = pytest.mark.timeout(120)


# --- the renderers on fixed answers --------------------------------------------------------


def xds(sent: str, acked: str, nack: dict | None = None) -> dict:
    """One type of a node in /api/v1/status."""
    return {
        "sent_version": sent,
        "sent_at": NOW - 30,
        "acked_version": acked,
        "acked_at": NOW - 29,
        "nacks": 0 if nack is None else 1,
        "last_nack": nack,
    }


STATUS = {
    "etcd": {"endpoint": "127.0.0.1:2379", "embedded": True},
    "xds": {"address": "127.0.0.1:18000"},
    "roles": ["fund-facade|default", "account-svc|task"],
    "nodes": [
        {
            "node_id": "account-svc|task|10.0.0.2-15006",
            "role": "account-svc|task",
            "protocol": "delta",
            "connected_at": NOW - 60,
            "stream_id": 2,
            "types": {
                "cds": xds("v7", "v7"),
                "eds": xds("v7", "v6"),
                "lds": xds("v7", "v7"),
                "rds": xds(
                    "v8",
                    "v7",
                    {"at": NOW - 125, "version": "v8", "message": "Invalid regex '(':\n missing )"},
                ),
            },
        },
        {
            "node_id": "fund-facade|default|10.0.0.1-15006",
            "role": "fund-facade|default",
            "protocol": "sotw",
            "connected_at": NOW - 90,
            "stream_id": 1,
            "types": {kind: xds("3", "3") for kind in ("cds", "lds", "rds")},
        },
    ],
    "sync": {"builds": 4, "last_build_at": NOW - 42, "last_build_ms": 1.25, "error": None},
    "leadership": {"name": "scaler", "id": "cp-a", "leader": True, "leader_id": "cp-a"},
    "scaler": None,
}


def test_sync_states() -> None:
    assert sync_state(None) == "-"
    assert sync_state(xds("", "")) == "-"
    assert sync_state(xds("v2", "v2")) == "SYNCED"
    assert sync_state(xds("v2", "v1")) == "STALE"
    nack = {"at": NOW, "version": "v2", "message": "bad"}
    assert sync_state(xds("v2", "v1", nack)) == "NACK"
    # A newer version is on its way after the NACK: not rejected (yet).
    assert sync_state(xds("v3", "v1", nack)) == "STALE"
    # The NACK was of an older version; the current one is ACKed.
    assert sync_state(xds("v3", "v3", nack)) == "SYNCED"


def test_render_status() -> None:
    assert render_status(STATUS, NOW).splitlines() == [
        "etcd 127.0.0.1:2379 (embedded), xDS 127.0.0.1:18000, leader cp-a (this control plane), "
        "last build 2023-11-14T22:12:38Z (42s ago, 1.25 ms)",
        "",
        "NODE                                 SERVICE       GROUP     PROTOCOL   CDS      EDS     "
        "LDS      RDS",
        "account-svc|task|10.0.0.2-15006      account-svc   task      delta      SYNCED   STALE   "
        "SYNCED   NACK",
        "fund-facade|default|10.0.0.1-15006   fund-facade   default   sotw       SYNCED   -       "
        "SYNCED   SYNCED",
        "",
        "account-svc|task|10.0.0.2-15006 RDS rejected version v8 2m05s ago: Invalid regex '(': "
        "missing )",
    ]


def test_render_status_without_sidecars_and_with_a_failed_build() -> None:
    status = {
        **STATUS,
        "nodes": [],
        "sync": {**STATUS["sync"], "error": "build failed: boom"},
        "leadership": {"name": "scaler", "id": "cp-b", "leader": False, "leader_id": None},
    }
    assert render_status(status, NOW).splitlines() == [
        "etcd 127.0.0.1:2379 (embedded), xDS 127.0.0.1:18000, leader none, last build "
        "2023-11-14T22:12:38Z (42s ago, 1.25 ms)",
        "build failed: boom (sidecars keep the config built before)",
        "",
        "no sidecar is connected",
    ]


def group(name: str, **counts: object) -> dict:
    """One group of a hop in /api/v1/isolation; zeros unless given."""
    base = {
        "group": name,
        "hop_group": name != "default",
        "requests": 0,
        "dyed": 0,
        "online": 0,
        "errors_5xx": 0,
        "p50_ms": None,
        "p99_ms": None,
        "rate_dyed": 0.0,
        "rate_online": 0.0,
        "leaks": 0,
        "fallbacks": {},
        "rate_limited": 0,
    }
    return base | counts


ISOLATION = {
    "chains": [
        {
            "name": "fund-yield",
            "dyes": ["fund-yield", "fund-yield-retry"],
            "fallback": "strict",
            "hops": [
                {
                    "service": "fund-facade",
                    "groups": [
                        group(
                            "task",
                            requests=300,
                            dyed=300,
                            p50_ms=1.234,
                            p99_ms=9.87,
                            rate_dyed=12.04,
                            rate_limited=4,
                        ),
                        group(
                            "default",
                            requests=500,
                            online=500,
                            rate_online=20.0,
                            p50_ms=0.5,
                            p99_ms=2.0,
                        ),
                    ],
                },
                {
                    "service": "account-svc",
                    "groups": [
                        group(
                            "debit",
                            requests=296,
                            dyed=295,
                            online=1,
                            errors_5xx=3,
                            leaks=1,
                            fallbacks={"no_instance": 3, "unhealthy": 0},
                            p50_ms=2.0,
                            p99_ms=5.5,
                            rate_dyed=11.9,
                        )
                    ],
                },
            ],
        }
    ],
    "uncovered": [
        {
            "chain": "fund-yield",
            "service": "audit-svc",
            "group": "default",
            "requests": 7,
            "rate": 0.25,
            "last_at": NOW,
        }
    ],
    "propagation_breaks": [
        {
            "chain": "fund-yield",
            "service": "account-svc",
            "group": "debit",
            "to": "nav-pricing",
            "count": 2,
            "last_request_id": "r-9",
            "last_at": NOW,
        }
    ],
    "totals": {
        "requests": 1103,
        "leaks": 1,
        "entries_by_direction": {"inbound": 1103},
        "errors_5xx": 3,
        "rate_dyed": 23.94,
    },
}


def test_render_top() -> None:
    assert render_top(ISOLATION).splitlines() == [
        "chain fund-yield: dyes fund-yield, fund-yield-retry; fallback strict",
        "HOP             GROUP     DYED/S   ONLINE/S   REQUESTS   5XX   P50 MS   P99 MS   LEAKS   "
        "FALLBACKS       RATE-LIMITED",
        "1 fund-facade   task      12.0     0.0        300        0     1.2      9.9      0       "
        "-               4",
        "                default   0.0      20.0       500        0     0.5      2.0      0       "
        "-               0",
        "2 account-svc   debit     11.9     0.0        296        3     2.0      5.5      1 !     "
        "no_instance:3   0",
        "",
        "uncovered (a chain's dyed requests reached a service that is not its hop):",
        "  fund-yield: audit-svc/default, 7 requests (0.2/s)",
        "",
        "propagation breaks:",
        "  fund-yield: account-svc/debit called nav-pricing without the dye 2 times (last request "
        "id r-9)",
        "",
        "totals: requests 1103, errors 5xx 3, leaks 1",
    ]


def test_render_top_without_chains() -> None:
    empty = {"chains": [], "uncovered": [], "propagation_breaks": [], "totals": {"requests": 0}}
    assert render_top(empty) == "no chain is defined\n\ntotals: requests 0"


# --- against a real control plane with real sidecars ----------------------------------------


def tasklane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKLANE, *args], capture_output=True, text=True, timeout=30, cwd=REPO, check=False
    )


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd) -> Iterator[Plane]:
    yield from plane_with_rules(etcd_server.endpoint)


def reject_a_route(plane: Plane, role: str) -> None:
    """Publish `role` a route config Envoy refuses (a regex that does not compile), straight
    into the cache as the sync would, so that role's sidecars NACK it."""
    cache = plane.control_plane.cache
    snapshot = cache.snapshot(role)
    name = sorted(snapshot.resources(ROUTE))[0]
    cluster = sorted(snapshot.resources(CLUSTER))[0]
    kept = [
        resource
        for type_url in PUSH_ORDER
        for resource in snapshot.resources(type_url).values()
        if (type_url, resource.name) != (ROUTE, name)
    ]
    cache.set_snapshot(role, Snapshot.of([*kept, regex_route(name, "(", cluster)]))


def status_rows(output: str) -> dict[str, list[str]]:
    """NODE -> the other cells of `tasklane status`'s table."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NODE "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line:
            break
        node, *cells = line.split()
        rows[node] = cells
    return rows


def node_states(plane: Plane) -> dict[str, list[str]]:
    return {
        node["node_id"]: [sync_state(node["types"].get(kind)) for kind in ("cds", "lds", "rds")]
        for node in plane.status()["nodes"]
    }


def test_status_shows_synced_sidecars_and_the_one_that_nacks(plane: Plane, tmp_path: Path) -> None:
    facade, account = "fund-facade|default", "account-svc|debit"
    with (
        plane.sidecar(tmp_path / "a", facade, delta=False) as first,
        plane.sidecar(tmp_path / "b", account, delta=True) as second,
    ):
        first.wait_ready()
        second.wait_ready()
        synced = ["SYNCED"] * 3
        wait_until(
            lambda: node_states(plane) == {f"{facade}|test": synced, f"{account}|test": synced},
            what="both sidecars ACK CDS, LDS and RDS",
        )
        result = tasklane("status", "--server", plane.url)
        assert result.returncode == 0, result.stderr
        header = result.stdout.splitlines()[0]
        assert header.startswith(
            f"etcd {plane.control_plane.etcd_endpoint} (external), "
            f"xDS 127.0.0.1:{plane.control_plane.xds_port}, leader "
        )
        assert ", last build " in header and " ms)" in header
        rows = status_rows(result.stdout)
        assert rows[f"{facade}|test"][:3] == ["fund-facade", "default", "sotw"]
        assert rows[f"{account}|test"][:3] == ["account-svc", "debit", "delta"]
        for cells in rows.values():
            cds, eds, lds, rds = cells[3:]
            assert [cds, lds, rds] == synced and eds in ("SYNCED", "-"), cells
        assert "rejected" not in result.stdout

        plane.on_loop(reject_a_route, plane, account)
        wait_until(
            lambda: node_states(plane)[f"{account}|test"] == ["SYNCED", "SYNCED", "NACK"],
            what="the Delta sidecar NACKs the route",
        )
        result = tasklane("status", "--server", plane.url)
        assert result.returncode == 0, result.stderr
        rows = status_rows(result.stdout)
        assert rows[f"{account}|test"][3] == "SYNCED" and rows[f"{account}|test"][6] == "NACK"
        first_cells = rows[f"{facade}|test"][3:]
        assert [first_cells[0], *first_cells[2:]] == synced  # the other sidecar: unaffected
        [nack] = [line for line in result.stdout.splitlines() if " rejected version " in line]
        assert nack.startswith(f"{account}|test RDS rejected version ")
        assert "regex" in nack.lower() or "(" in nack.split(" ago: ", 1)[1], nack


def test_top_renders_the_isolation_of_the_control_plane(plane: Plane) -> None:
    result = tasklane("top", "--server", plane.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    chains = [line for line in lines if line.startswith("chain ")]
    assert len(chains) == 2
    assert chains[0].startswith("chain batch-debit: dyes batch-debit")
    assert chains[0].endswith("; fallback loose")
    assert chains[1].startswith("chain fund-yield: dyes fund-yield")
    assert chains[1].endswith("; fallback strict")
    header = lines.index(chains[1]) + 1
    assert lines[header].split()[:4] == ["HOP", "GROUP", "DYED/S", "ONLINE/S"]
    # No traffic yet: the hop's own group first, then default, counters at zero.
    assert lines[header + 1].split() == ["1", "fund-facade", "task", "0.0", "0.0", "0", "0"] + [
        "-", "-", "0", "-", "0"
    ]  # fmt: skip
    assert lines[header + 2].split()[0] == "default"
    assert lines[-1] == (
        "totals: requests 0, dyed 0, online 0, errors 5xx 0, leaks 0, fallbacks 0, rate limited 0, "
        "uncovered 0, propagation breaks 0, outside mesh 0"
    )


def test_top_watch_refreshes_until_ctrl_c(plane: Plane) -> None:
    proc = subprocess.Popen(
        [*TASKLANE, "top", "--watch", "--server", plane.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    frames: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("tasklane top at "):
                frames.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(frames) >= 2, timeout=20, what="two frames")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert "Traceback" not in proc.stderr.read()
    assert re.fullmatch(
        r"tasklane top at [-0-9T:]+Z, every 2s \(Ctrl-C to stop\)", frames[0].rstrip()
    ), frames[0]


class _NoIsolation(BaseHTTPRequestHandler):
    """An older control plane: every path is 404, in the API's error shape."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "Not Found"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_top_against_a_control_plane_without_the_endpoint_is_one_line() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoIsolation)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        for args in (["top"], ["top", "--watch"]):
            result = tasklane(*args, "--server", url)
            assert result.returncode == 2
            assert result.stdout == ""
            assert result.stderr == (
                f"tasklane: error: {url} has no isolation accounting "
                "(GET /api/v1/isolation: 404): is it an older control plane?\n"
            )
        assert time.monotonic() - started < 20
    finally:
        server.shutdown()
        server.server_close()
