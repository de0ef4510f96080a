"""One task group shared by thousands of chains, through real Envoy sidecars: its sidecar must
accept the generated config (no NACK) and serve the dyed requests of every chain, whether it
started before the rules grew or after (issue 11: the inbound 403 body listed every chain and
Envoy refused it past ~480 chains; dye trees nested per header name were refused past ~20)."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from controlplane.xds.types import ROUTE
from tests.support.mesh import Instance, Mesh, request, served_by
from tests.support.rules import chain, service
from tests.support.wait import wait_until

CHAINS = 2_000
OWN_CARRIER_EVERY = 50  # every 50th chain has its own dye header and baggage key: 40 of each
SERVICES = service("caller", groups=("default",)) + service("target-svc")
TASK = [("target-svc", "task")]


def name(index: int) -> str:
    return f"chain-{index:04d}"


def carriers(index: int) -> tuple[str, str]:
    """(dye header, baggage key) of chain `index`."""
    if index % OWN_CARRIER_EVERY:
        return "x-task-dye", "task-dye"
    return f"x-dye-{index:04d}", f"dye-{index:04d}"


def rules(count: int) -> str:
    """`count` chains, each with one hop into target-svc/task, an exact dye (its name) and a
    per-run prefix (`<name>@*`, sent as `<name>@<run id>`)."""
    text = SERVICES
    for index in range(count):
        header, key = carriers(index)
        dye = f'{{header: {header}, baggageKey: {key}, values: [{name(index)}, "{name(index)}@*"]}}'
        text += chain(name(index), "[{service: target-svc, group: task}]", dye=dye)
    return text


def dyes(index: int) -> list[dict[str, str]]:
    """The four ways a request of chain `index` carries its dye."""
    header, key = carriers(index)
    return [
        {header: name(index)},
        {header: f"{name(index)}@run-42"},
        {"baggage": f"userId=7, {key}={name(index)};p=1"},
        {"baggage": f"{key}={name(index)}@2026-12-03T01:00"},
    ]


def direct(port: int, headers: dict[str, str]) -> tuple[int, str]:
    """GET straight to an inbound listener, as a caller outside the mesh would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def route_status(mesh: Mesh, instance: Instance) -> tuple[str, str, str | None]:
    """(sent, ACKed, last NACK message) of the routes of `instance`'s sidecar."""
    nodes = {n.node_id: n for n in mesh.ads.call(mesh.ads.running.ads.status.nodes)}
    routes = nodes[instance.name].types[ROUTE]
    nack = routes.last_nack.message if routes.last_nack is not None else None
    return routes.sent_version, routes.acked_version, nack


def all_served(port: int, indexes: list[int]) -> bool:
    return all(
        served_by(request(port, "target-svc", headers=headers)[1]) == TASK
        for index in indexes
        for headers in dyes(index)
    )


@pytest.mark.parametrize("sidecar_started", ["after the rules", "before the rules"])
def test_a_group_serves_every_chain_that_shares_it(tmp_path: Path, sidecar_started: str) -> None:
    first_rules = rules(CHAINS if sidecar_started == "after the rules" else 1)
    with Mesh(tmp_path, first_rules) as mesh:
        task = mesh.add("target-svc", "task")
        mesh.add("target-svc", "default")
        port = mesh.add("caller", "default").egress_port
        if sidecar_started == "before the rules":
            wait_until(lambda: all_served(port, [0]), what="chain-0000 served by the task group")
            mesh.set_rules(rules(CHAINS))
        checked = [0, 1, OWN_CARRIER_EVERY, CHAINS - OWN_CARRIER_EVERY, CHAINS - 1]
        wait_until(
            lambda: all_served(port, checked), timeout=30, what="every dye reaches the task group"
        )
        # The callers' routes serving the dyes says nothing of the task sidecar's own ACK.
        acked = wait_until(
            lambda: (s := route_status(mesh, task))[0] == s[1] and s,
            what="the task sidecar ACKs its routes",
        )
        assert acked[2] is None  # and never NACKed them

        assert served_by(request(port, "target-svc")[1]) == [("target-svc", "default")]
        status, body = direct(task.inbound_port, {"x-task-dye": "chain-9999"})
        assert status == 403 and "serves only task traffic" in body, body
        assert f"{CHAINS} chains" in body and "x-task-dye" in body and "task-dye" in body
        assert len(body.encode()) <= 4096
        for headers in dyes(CHAINS - 1):
            assert direct(task.inbound_port, headers)[0] == 200, headers


def test_a_chain_with_many_long_dyes_routes_by_baggage(tmp_path: Path) -> None:
    """3,000 prefix dyes of 250 characters: ~800 KB of baggage regex, which RE2 refuses to
    compile as one pattern ("pattern too large")."""
    values = [f"{index:04d}-{'x' * 245}" for index in range(3_000)]
    listed = ", ".join(f'"{value}*"' for value in values)
    rules_yaml = SERVICES + chain(
        "long-dyes", "[{service: target-svc, group: task}]", dye=f"{{values: [{listed}]}}"
    )
    with Mesh(tmp_path, rules_yaml) as mesh:
        task = mesh.add("target-svc", "task")
        mesh.add("target-svc", "default")
        port = mesh.add("caller", "default").egress_port
        wanted = [{"baggage": f"task-dye={value}@run-7"} for value in (values[0], values[-1])] + [
            {"x-task-dye": f"{values[-1]}@run-7"}
        ]
        wait_until(
            lambda: all(
                served_by(request(port, "target-svc", headers=h)[1]) == TASK for h in wanted
            ),
            timeout=30,
            what="the first and last dyes reach the task group",
        )
        # The callers' routes serving the dyes says nothing of the task sidecar's own ACK.
        acked = wait_until(
            lambda: (s := route_status(mesh, task))[0] == s[1] and s,
            what="the task sidecar ACKs its routes",
        )
        assert acked[2] is None  # and never NACKed them
        assert direct(task.inbound_port, {"baggage": "task-dye=0000-y"})[0] == 403
