"""Isolation accounting from real Envoy access logs: known numbers of dyed and online requests
through real sidecars give exactly those counters; an instance registered into the wrong
group by hand is a leak, a loose chain's fallback is not; an app that drops the dye is a
propagation break; `/metrics` parses with prometheus-client's own parser; and a real control
plane serves ALS on its xDS port and both endpoints on its HTTP port."""

from __future__ import annotations

import http.client
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.telemetry.accounting import RATE_WINDOW_S
from controlplane.xds.names import FALLBACK_HEADER, HEALTH_PATH
from demo.chain_app import serve_in_thread
from tests.support import dye_dropper
from tests.support.mesh import Mesh, request, served_by
from tests.support.plane import Plane, api_opener
from tests.support.rules import chain, service
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

SERVICES = service("fund-facade") + service("account-svc") + service("nav-pricing")
FUND_YIELD = chain(
    "fund-yield",
    "[{service: fund-facade, group: task}, {service: account-svc, group: task},"
    " {service: nav-pricing, group: task}]",
)
CHAIN = ("fund-facade", "account-svc", "nav-pricing")
DYED = {"x-task-dye": "fund-yield"}


def wait_healthy(mesh: Mesh) -> None:
    """Until every sidecar sees every registered instance of the services in its scope
    healthy: traffic sent after that is all the accounting may count (no warm-up requests)."""
    want = mesh.registered()

    def healthy() -> bool:
        for instance in mesh.instances:
            stats = instance.envoy.stats()
            for (svc, group), count in want.items():
                held = stats.get(f"cluster.{svc}|{group}.membership_healthy")
                if held is not None and held != count:
                    return False
        return True

    wait_until(healthy, timeout=20, what="every instance healthy in every sidecar")


def send(port: int, host: str, headers: dict[str, str], count: int) -> Counter:
    """`count` GETs through a sidecar's egress, 8 at a time: Counter of (status, hops)."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(port, host, headers=headers), range(count)))
    return Counter((status, tuple(served_by(answer))) for status, answer in answers)


def settled(mesh: Mesh, requests: int) -> dict:
    """The snapshot once `requests` hop-requests are accounted and nothing is pending; then
    checks that no more arrive (the counts are exact, not at least)."""
    snap = wait_until(
        lambda: (
            (s := mesh.isolation())["totals"]["requests"] >= requests
            and s["totals"]["pending"] == 0
            and s
        ),
        what=f"{requests} requests accounted",
    )
    time.sleep(0.6)  # three flush intervals: anything extra would have come
    again = mesh.isolation()
    assert again["totals"]["requests"] == snap["totals"]["requests"] == requests, again["totals"]
    return again


def groups(snap: dict, chain_name: str) -> dict[tuple[str, str], dict]:
    """(service, group) -> the chain's view of that group."""
    (found,) = (c for c in snap["chains"] if c["name"] == chain_name)
    return {(h["service"], g["group"]): g for h in found["hops"] for g in h["groups"]}


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, **labels: str) -> float:
    """Sum of a family's `_total` (or plain) samples whose labels include `labels`."""
    return sum(
        s.value
        for s in family.samples
        if not s.name.endswith("_created") and labels.items() <= s.labels.items()
    )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_counters_match_the_traffic_sent(tmp_path: Path, delta: bool) -> None:
    dyed_header, dyed_baggage, online = 30, 12, 25
    with Mesh(tmp_path, SERVICES + FUND_YIELD, delta=delta) as mesh:
        for group in ("default", "task"):
            mesh.add("nav-pricing", group)
            mesh.add("account-svc", group, ["nav-pricing"])
            mesh.add("fund-facade", group, ["account-svc"])
        client = mesh.instances[2]  # fund-facade/default: the app-side entry point
        wait_healthy(mesh)
        all_task = tuple((s, "task") for s in CHAIN)
        all_default = tuple((s, "default") for s in CHAIN)
        assert send(client.egress_port, "fund-facade", DYED, dyed_header) == {
            (200, all_task): dyed_header
        }
        baggage = {"baggage": "userId=7, task-dye=fund-yield@2026-11-27;p=1"}
        assert send(client.egress_port, "fund-facade", baggage, dyed_baggage) == {
            (200, all_task): dyed_baggage
        }
        dyed_sent = time.monotonic()
        assert send(client.egress_port, "fund-facade", {}, online) == {(200, all_default): online}

        dyed = dyed_header + dyed_baggage
        snap = settled(mesh, requests=len(CHAIN) * (dyed + online))
        # Rates cover the last RATE_WINDOW_S complete seconds of arrival: the second the logs
        # arrived in must be over, and on a loaded machine the dyed ones may be older than
        # the window by then.
        time.sleep(1.1)
        recent = time.monotonic() - dyed_sent < RATE_WINDOW_S - 2
        rates = groups(mesh.isolation(), "fund-yield")
        view = groups(snap, "fund-yield")
        for svc in CHAIN:
            task, default = view[svc, "task"], view[svc, "default"]
            assert (task["dyed"], task["online"], task["requests"]) == (dyed, 0, dyed), svc
            assert (default["dyed"], default["online"]) == (0, online), svc
            for entry in (task, default):
                assert entry["leaks"] == entry["errors_5xx"] == entry["rate_limited"] == 0
                assert entry["fallbacks"] == {}
                assert entry["p50_ms"] is not None and entry["p99_ms"] >= entry["p50_ms"]
            if recent:
                assert rates[svc, "task"]["rate_dyed"] > 0  # traffic of the last seconds
            assert snap["online"][svc]["default"]["online"] == online
        totals = snap["totals"]
        assert (totals["dyed"], totals["online"]) == (len(CHAIN) * dyed, len(CHAIN) * online)
        assert totals["leaks"] == totals["fallbacks"] == totals["uncovered"] == 0
        assert snap["uncovered"] == snap["propagation_breaks"] == []
        # Every hop is logged twice, by the caller's egress and the server's inbound.
        assert totals["entries_by_direction"] == {
            "egress": len(CHAIN) * (dyed + online),
            "inbound": len(CHAIN) * (dyed + online),
        }

        metrics = families(mesh.metrics_text())
        requests = metrics["tasklane_requests"]
        for svc in CHAIN:
            assert samples(requests, chain="fund-yield", service=svc, group="task") == dyed
            assert samples(requests, chain="", service=svc, group="default") == online
        assert samples(metrics["tasklane_leaks"]) == 0
        # A logger opens its stream with its first entry: nav-pricing's egress has none.
        streams = 2 * len(mesh.instances) - 2
        assert samples(metrics["tasklane_access_log_streams"]) == streams
        assert samples(metrics["tasklane_xds_streams"]) == len(mesh.instances)
        assert samples(metrics["tasklane_xds_pushes"], type="cds") >= len(mesh.instances)
        ack = metrics["tasklane_xds_push_ack_seconds"]
        assert samples(ack, type="rds") > 0  # _count, _sum and buckets of the histogram
        assert samples(metrics["tasklane_xds_nacks"]) == 0


@pytest.mark.parametrize("fallback", ["strict", "loose"])
def test_instance_registered_into_the_wrong_group_is_a_leak(tmp_path: Path, fallback: str) -> None:
    """A `default` app registered by hand as nav-pricing's task endpoint: the mesh sends the
    chain's requests there, the instance (node group `default`) serves them. On a loose
    chain too, where a request served by `default` can also be a fallback: the caller's
    egress log says the router picked the task cluster."""
    rules = SERVICES + chain(
        "fund-yield", "[{service: nav-pricing, group: task}]", fallback=fallback
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        wrong = mesh.add("nav-pricing", "default")
        wrong.group = "task"  # registered into the wrong group
        mesh.publish()
        client = mesh.add("fund-facade", "default")
        wait_healthy(mesh)
        count = 10
        assert send(client.egress_port, "nav-pricing", DYED, count) == {
            (200, (("nav-pricing", "default"),)): count
        }
        snap = settled(mesh, requests=count)
        view = groups(snap, "fund-yield")
        assert view["nav-pricing", "default"]["leaks"] == count
        assert view["nav-pricing", "default"]["dyed"] == count
        assert view["nav-pricing", "task"]["fallbacks"] == {}
        assert snap["totals"]["leaks"] == count
        leaks = families(mesh.metrics_text())["tasklane_leaks"]
        assert samples(leaks, chain="fund-yield", service="nav-pricing", group="default") == count


def test_loose_fallback_is_counted_as_a_fallback_not_a_leak(tmp_path: Path) -> None:
    rules = SERVICES + chain(
        "fund-yield", "[{service: nav-pricing, group: task}]", fallback="loose"
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        client = mesh.add("fund-facade", "default")
        wait_healthy(mesh)
        count = 8
        assert send(client.egress_port, "nav-pricing", DYED, count) == {
            (200, (("nav-pricing", "default"),)): count
        }
        snap = settled(mesh, requests=count)
        view = groups(snap, "fund-yield")
        assert view["nav-pricing", "task"]["fallbacks"] == {"no_instance": count}
        assert (view["nav-pricing", "default"]["dyed"], snap["totals"]["leaks"]) == (count, 0)
        fallbacks = families(mesh.metrics_text())["tasklane_fallbacks"]
        assert (
            samples(fallbacks, service="nav-pricing", group="task", reason="no_instance") == count
        )


def test_fallbacks_counted_are_those_the_callers_were_told(tmp_path: Path) -> None:
    """A loose hop with a weight under 100 and no task instance: its own share to `default`
    is no fallback, the group's share is; the accounting counts exactly the responses that
    said so (x-tasklane-fallback, from the egress access log)."""
    rules = SERVICES + chain(
        "fund-yield", "[{service: nav-pricing, group: task, weight: 50}]", fallback="loose"
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        client = mesh.add("fund-facade", "default")
        wait_healthy(mesh)
        told: Counter[str | None] = Counter()
        for _ in range(count := 40):
            conn = http.client.HTTPConnection("127.0.0.1", client.egress_port, timeout=10)
            conn.request("GET", "/", headers={"Host": "nav-pricing", **DYED})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            assert resp.status == 200
            told[resp.getheader(FALLBACK_HEADER)] += 1
        assert set(told) == {None, "no_instance"} and told["no_instance"] >= 5, told
        snap = settled(mesh, requests=count)
        view = groups(snap, "fund-yield")
        assert view["nav-pricing", "task"]["fallbacks"] == {"no_instance": told["no_instance"]}
        assert (view["nav-pricing", "default"]["dyed"], snap["totals"]["leaks"]) == (count, 0)


def _dye_dropper(name: str, egress: tuple[str, int]) -> tuple[int, Callable[[], None]]:
    return serve_in_thread(dye_dropper.make_server("account-svc", egress))


def test_dyed_request_called_on_undyed_is_a_propagation_break(tmp_path: Path) -> None:
    rules = SERVICES + chain(
        "fund-yield", "[{service: fund-facade, group: task}, {service: account-svc, group: task}]"
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("account-svc", "default")
        mesh.add("fund-facade", "task", start_app=_dye_dropper)
        client = mesh.add("nav-pricing", "default")
        wait_healthy(mesh)
        count = 5
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: request(client.egress_port, "fund-facade", headers=DYED)[0],
                    range(count),
                )
            )
        assert statuses == [200] * count
        snap = settled(mesh, requests=2 * count)
        (found,) = snap["propagation_breaks"]
        assert (found["chain"], found["service"], found["group"], found["to"]) == (
            "fund-yield",
            "fund-facade",
            "task",
            "account-svc",
        )
        assert found["count"] == count
        assert groups(snap, "fund-yield")["account-svc", "default"]["online"] == count


def test_control_plane_serves_access_logs_isolation_and_metrics(
    tmp_path: Path, etcd_endpoint_module: str
) -> None:
    """`tasklane up`'s ControlPlane: a real sidecar streams its logs to the xDS port; a call
    to a service with no instance is accounted; /metrics and /api/v1/isolation answer."""
    plane = Plane(etcd_endpoint_module)
    envoy = None
    try:
        code, body = plane.apply_files({"rules.yaml": SERVICES + FUND_YIELD})
        assert code == 200, body
        envoy = EnvoyProcess(
            node_id="fund-facade|default|t1",
            service="fund-facade",
            group="default",
            xds_host="127.0.0.1",
            xds_port=plane.control_plane.xds_port,
            admin_port=free_port(),
            delta=False,
            work_dir=tmp_path / "sidecar",
            parts={
                "sidecar.yaml": {
                    "egress_port": (egress := free_port()),
                    "inbound_host": "127.0.0.1",
                    "inbound_port": free_port(),
                    "app_port": free_port(),
                    "health_path": HEALTH_PATH,
                }
            },
        ).start()
        envoy.wait_ready(timeout=20)
        wait_until(
            lambda: envoy.versions()["routes"].get("egress"), what="the egress routes arrived"
        )
        for headers in ({}, {}, DYED):
            assert request(egress, "nav-pricing", headers=headers)[0] == 503  # no instance

        def isolation() -> dict:
            code, snap = plane.request("GET", "/api/v1/isolation")
            assert code == 200
            return snap

        snap = wait_until(lambda: (s := isolation())["totals"]["requests"] >= 3 and s)
        assert snap["online"]["nav-pricing"]["default"]["errors_5xx"] == 2
        assert snap["online"]["nav-pricing"]["default"]["flags"] == {"UH": 2}
        (fund_yield,) = snap["chains"]
        nav = groups(snap, "fund-yield")["nav-pricing", "task"]
        assert nav["fallbacks"] == {"strict_reject": 1} and nav["dyed"] == 1

        with api_opener.open(plane.url + "/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            metrics = families(response.read().decode())
        assert samples(metrics["tasklane_requests"], chain="", service="nav-pricing") == 2
        assert samples(metrics["tasklane_fallbacks"], reason="strict_reject") == 1
        assert samples(metrics["tasklane_xds_streams"], protocol="sotw") == 1
        assert samples(metrics["tasklane_access_log_streams"]) >= 1
        assert samples(metrics["tasklane_xds_push_ack_seconds"], type="cds") > 0
        assert "tasklane_scaler_actual_replicas" in metrics
    finally:
        if envoy is not None:
            envoy.stop()
        plane.stop()
