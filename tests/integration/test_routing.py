"""Dye routing through real Envoy sidecars: isolation at every hop, weights, fallback, rate
limits and the inbound guard of task groups, counted from what the apps actually answered."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from controlplane.xds.names import BAGGAGE_DYE_HEADER, FALLBACK_HEADER
from tests.support.echo_app import start_echo
from tests.support.mesh import Mesh, request, served_by
from tests.support.rules import chain, service
from tests.support.wait import wait_until

SERVICES = (
    service("fund-facade")
    + service("account-svc", groups=("default", "task", "debit"))
    + service("nav-pricing")
)


FUND_YIELD = chain(
    "fund-yield",
    "[{service: fund-facade, group: task}, {service: account-svc, group: task},"
    " {service: nav-pricing, group: task}]",
)
BATCH_DEBIT = chain("batch-debit", "[{service: account-svc, group: debit}]")
ALL_DEFAULT = [("fund-facade", "default"), ("account-svc", "default"), ("nav-pricing", "default")]
ALL_TASK = [("fund-facade", "task"), ("account-svc", "task"), ("nav-pricing", "task")]
DYED = {"x-task-dye": "fund-yield"}


def start_chain(mesh: Mesh, debit: bool = True) -> int:
    """One instance per (service, group) of the fund-yield chain; returns a client egress port."""
    for group in ("default", "task"):
        mesh.add("nav-pricing", group)
        mesh.add("account-svc", group, ["nav-pricing"])
    if debit:
        mesh.add("account-svc", "debit", ["nav-pricing"])
    client = mesh.add("fund-facade", "default", ["account-svc"])
    mesh.add("fund-facade", "task", ["account-svc"])
    # New hosts start unhealthy until their first health check passes (interval 1 s).
    wait_until(
        lambda: all(
            served_by(request(client.egress_port, "fund-facade", headers=h)[1]) == want
            for h, want in ((DYED, ALL_TASK), ({}, ALL_DEFAULT))
        ),
        what="every instance healthy",
    )
    return client.egress_port


def many(port: int, headers: dict[str, str], count: int, service: str = "fund-facade") -> list:
    """`count` requests, 8 at a time; returns (status, [(service, group)...]) per request."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(port, service, headers=headers), range(count)))
    return [(status, served_by(answer)) for status, answer in answers]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_every_hop_stays_in_its_chain_group(tmp_path: Path, delta: bool) -> None:
    with Mesh(tmp_path, SERVICES + FUND_YIELD + BATCH_DEBIT, delta=delta) as mesh:
        port = start_chain(mesh)
        cases = [
            ({}, ALL_DEFAULT),
            ({"x-task-dye": "fund-yield"}, ALL_TASK),
            ({"baggage": "userId=7, task-dye=fund-yield;p=1"}, ALL_TASK),
            ({"x-task-dye": "fund-yield@v2"}, ALL_TASK),  # a per-iteration dye
            ({"baggage": "task-dye=fund-yield@2026-11-27"}, ALL_TASK),
            # The second chain shares account-svc (its own group) and nav-pricing (default).
            (
                {"x-task-dye": "batch-debit"},
                [("fund-facade", "default"), ("account-svc", "debit"), ("nav-pricing", "default")],
            ),
            # Dyes of no chain are online traffic.
            ({"x-task-dye": "fund-yieldx"}, ALL_DEFAULT),
            ({"baggage": "task-dye=other"}, ALL_DEFAULT),
            ({"baggage": "userId=7,sampled=1"}, ALL_DEFAULT),  # unrelated (OpenTelemetry) baggage
        ]
        for headers, expected in cases:
            results = Counter(
                (status, tuple(hops))
                for status, hops in many(port, headers, 200 if not delta else 50)
            )
            assert results == {(200, tuple(expected)): sum(results.values())}, headers


def test_a_baggage_dye_is_read_once_into_a_header_no_app_can_send(tmp_path: Path) -> None:
    """The `baggage` dye is looked up in the same maps as the dye header (no regex per chain),
    from the header the sidecar's baggage filter fills in: decoded as OpenTelemetry forwards
    it, other members untouched, and the header as an app sends it neither trusted nor
    passed on."""
    rules = SERVICES + chain("fund-yield", "[{service: nav-pricing, group: task}]")
    with Mesh(tmp_path, rules) as mesh:
        for group in ("default", "task"):
            mesh.add("nav-pricing", group, start_app=lambda name, _: start_echo(name))
        client = mesh.add("fund-facade", "default")

        def answer(headers: dict[str, str]) -> tuple[int, str, dict[str, str]]:
            status, echo = request(client.egress_port, "nav-pricing", headers=headers)
            return status, echo.get("name", "/?").split("/")[1], echo.get("headers", {})

        wait_until(lambda: answer(DYED)[1] == "task", what="the task group serves")
        run = "20261203T075400Z-a1b2c3"
        for baggage in (
            "task-dye=fund-yield",
            f"task-dye=fund-yield%40{run}",  # a per-run dye as OpenTelemetry forwards it
            f"tenant=7, task-dye = fund-yield%40{run}%3Bsrc%3Dcron,sampled=1",
            f"task-dye=fund-yield@{run};src=cron",
            "task-dye=bad dye,task-dye=fund-yield",  # the first member that holds a dye
        ):
            status, group, seen = answer({"baggage": baggage})
            assert (status, group) == (200, "task"), baggage
            assert seen.get("baggage") == baggage and BAGGAGE_DYE_HEADER not in seen, seen
        for headers in (
            {BAGGAGE_DYE_HEADER: "task-dye=fund-yield"},
            {BAGGAGE_DYE_HEADER: "task-dye=fund-yield", "baggage": "task-dye=other"},
            {"baggage": "task-dye=fund-yieldx,other=fund-yield"},
        ):
            status, group, seen = answer(headers)
            assert (status, group) == (200, "default"), headers
            assert BAGGAGE_DYE_HEADER not in seen, seen
        # The task group's own sidecar does not take the header as a dye either.
        task = next(i for i in mesh.instances if i.group == "task")
        status, body = request(
            task.inbound_port, "nav-pricing", headers={BAGGAGE_DYE_HEADER: "task-dye=fund-yield"}
        )
        assert status == 403, body
        assert "safe_regex" not in json.dumps(client.envoy.config_dump())
        assert not mesh.nacks()


def test_weight_steers_that_share_into_the_group(tmp_path: Path) -> None:
    rules = SERVICES + chain("fund-yield", "[{service: nav-pricing, group: task, weight: 30}]")
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        mesh.add("nav-pricing", "task")
        port = mesh.add("fund-facade", "default").egress_port
        wait_until(
            lambda: (
                {tuple(h) for _, h in many(port, DYED, 40, "nav-pricing")}
                == {(("nav-pricing", "task"),), (("nav-pricing", "default"),)}
            ),
            what="both groups serve",
        )
        results = many(port, DYED, 1000, "nav-pricing")
        groups = Counter(hops[0][1] for status, hops in results if status == 200)
        assert sum(groups.values()) == 1000
        assert 230 <= groups["task"] <= 370, groups
        online = Counter(hops[0][1] for _, hops in many(port, {}, 200, "nav-pricing"))
        assert online == {"default": 200}


def told(port: int, service: str, headers: dict[str, str]) -> tuple[int, tuple, str | None, str]:
    """(status, hops that served, x-tasklane-fallback, body) of one request via `port`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": service, **headers})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    finally:
        conn.close()
    hops = tuple(served_by(json.loads(body))) if resp.status == 200 else ()
    return resp.status, hops, resp.getheader(FALLBACK_HEADER), body


@pytest.mark.parametrize("fallback", ["strict", "loose"])
def test_fallback_when_the_group_is_empty_or_unhealthy(tmp_path: Path, fallback: str) -> None:
    """The caller is told: a loose fallback's reason in x-tasklane-fallback, a strict chain's
    503 naming the chain, hop and group."""
    rules = SERVICES + chain(
        "fund-yield", "[{service: nav-pricing, group: task}]", fallback=fallback
    )
    rejected = "tasklane: chain fund-yield, hop nav-pricing, group task: no healthy instance"
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        port = mesh.add("fund-facade", "default").egress_port

        def outcome() -> tuple:
            status, hops, header, body = told(port, "nav-pricing", DYED)
            return (status, hops, header, body if status != 200 else "")

        def degraded(reason: str) -> tuple:
            if fallback == "strict":
                return (503, (), "strict_reject", f"{rejected} (strict_reject)\n")
            return (200, (("nav-pricing", "default"),), reason, "")

        isolated = (200, (("nav-pricing", "task"),), None, "")
        # No instance in the group at all.
        wait_until(lambda: outcome() == degraded("no_instance"), what="no instance")
        assert Counter(outcome() for _ in range(20)) == {degraded("no_instance"): 20}

        # Instances exist and serve; then all of them die (their sidecars stay up).
        tasks = [mesh.add("nav-pricing", "task") for _ in range(2)]
        wait_until(lambda: outcome() == isolated, what="group serves")
        for instance in tasks:
            instance.kill_app()
        unhealthy = degraded("unhealthy")
        wait_until(lambda: all(outcome() == unhealthy for _ in range(5)), what="all unhealthy")
        assert Counter(outcome() for _ in range(20)) == {unhealthy: 20}

        # Isolation returns with the instances.
        for instance in tasks:
            mesh.remove(instance)
        mesh.add("nav-pricing", "task")
        wait_until(lambda: all(outcome() == isolated for _ in range(5)), what="isolation back")
        online = told(port, "nav-pricing", {})
        assert online[:3] == (200, (("nav-pricing", "default"),), None)


def test_a_loose_weight_tells_only_its_share_that_fell_back(tmp_path: Path) -> None:
    """With a weight under 100 the chain's own share to `default` is no fallback: only the
    group's share, served by `default` for want of a task instance, says so."""
    rules = SERVICES + chain(
        "fund-yield", "[{service: nav-pricing, group: task, weight: 50}]", fallback="loose"
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        port = mesh.add("fund-facade", "default").egress_port
        wait_until(lambda: told(port, "nav-pricing", DYED)[0] == 200, what="default serves")
        with ThreadPoolExecutor(8) as pool:
            seen = Counter(pool.map(lambda _: told(port, "nav-pricing", DYED)[:3], range(400)))
        served = (200, (("nav-pricing", "default"),))
        assert set(seen) == {(*served, None), (*served, "no_instance")}, seen
        assert 140 <= seen[(*served, "no_instance")] <= 260, seen
        # Envoy's own 503 (no instance of an online route's group) stays as it was.
        mesh.remove(next(i for i in mesh.instances if i.service == "nav-pricing"))
        wait_until(lambda: told(port, "nav-pricing", {})[0] == 503, what="default gone")
        status, _, header, body = told(port, "nav-pricing", {})
        assert (status, header, body) == (503, None, "no healthy upstream")
        status, _, header, body = told(port, "nav-pricing", DYED)
        assert (status, header) == (503, "unavailable"), body
        assert "chain fund-yield, hop nav-pricing, group task (50 %) or default" in body


def test_rate_limited_hop_limits_only_the_chain(tmp_path: Path) -> None:
    rules = SERVICES + chain(
        "fund-yield",
        "[{service: nav-pricing, group: task, rateLimit: {requestsPerSecond: 2, burst: 5}}]",
    )
    with Mesh(tmp_path, rules) as mesh:
        mesh.add("nav-pricing", "default")
        mesh.add("nav-pricing", "task")
        port = mesh.add("fund-facade", "default").egress_port
        wait_until(lambda: request(port, "nav-pricing", headers=DYED)[0] == 200, what="ready")
        time.sleep(3)  # refill the bucket
        dyed = Counter(status for status, _ in many(port, DYED, 40, "nav-pricing"))
        # 5 of burst plus at most ~2/s of refill while the 40 requests run.
        assert dyed[429] >= 25 and 5 <= dyed[200] <= 12, dyed
        online = Counter(status for status, _ in many(port, {}, 40, "nav-pricing"))
        assert online == {200: 40}


def test_task_group_refuses_undyed_requests(tmp_path: Path) -> None:
    with Mesh(tmp_path, SERVICES + FUND_YIELD + BATCH_DEBIT) as mesh:
        task = mesh.add("nav-pricing", "task")
        default = mesh.add("nav-pricing", "default")

        def direct(port: int, headers: dict[str, str]) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            finally:
                conn.close()

        status, body = direct(task.inbound_port, {})
        assert status == 403 and "serves only task traffic" in body and "fund-yield" in body
        assert direct(task.inbound_port, {"x-task-dye": "batch-debit"})[0] == 403
        assert direct(task.inbound_port, {"baggage": "task-dye=other"})[0] == 403
        assert direct(task.inbound_port, DYED)[0] == 200
        assert direct(task.inbound_port, {"baggage": "task-dye=fund-yield@3"})[0] == 200
        assert direct(default.inbound_port, {})[0] == 200
        assert direct(default.inbound_port, DYED)[0] == 200
