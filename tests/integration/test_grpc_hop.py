"""gRPC through real Envoy sidecars: a `protocol: grpc` service is steered by the dye in gRPC
metadata exactly like HTTP is by headers, per call even when calls share one HTTP/2
connection, over two gRPC hops (the first app calls the second through its own sidecar).

Clients dial a sidecar's egress listener directly with the service as the authority and the
HTTP proxy off (grpcio would otherwise CONNECT-tunnel past the routing, DESIGN.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support.grpc_app import call, dial, grpc_chain_app
from tests.support.mesh import Instance, Mesh, served_by
from tests.support.rules import chain, service

pytestmark = pytest.mark.timeout(120)

RULES = (
    service("pricing-grpc", protocol="grpc")
    + service("quote-grpc", protocol="grpc")
    + chain(
        "pricing",
        "[{service: pricing-grpc, group: task}, {service: quote-grpc, group: task}]",
        dye='{values: [pricing-run, "pricing-run@*"]}',
    )
)

BOTH_TASK = [("pricing-grpc", "task"), ("quote-grpc", "task")]
BOTH_DEFAULT = [("pricing-grpc", "default"), ("quote-grpc", "default")]
WARM_UP_S = 10.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """pricing-grpc (default, task) -> quote-grpc (default, task), gRPC apps behind sidecars."""
    with Mesh(tmp_path_factory.mktemp("grpc-mesh"), RULES) as mesh:
        for group in ("default", "task"):
            mesh.add("quote-grpc", group, start_app=grpc_chain_app("quote-grpc", group))
            pricing = grpc_chain_app("pricing-grpc", group, ["quote-grpc"])
            mesh.add("pricing-grpc", group, start_app=pricing)
        _wait_until_served(mesh.instances[0])
        yield mesh
        assert mesh.nacks() == {}


@pytest.fixture
def channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    """To pricing-grpc through the egress listener of the first sidecar."""
    with dial(("127.0.0.1", mesh.instances[0].egress_port), "pricing-grpc") as channel:
        yield channel


def _wait_until_served(client: Instance) -> None:
    """Sidecars health-check each new endpoint before they send it calls: wait for both
    groups of both services to answer."""
    with dial(("127.0.0.1", client.egress_port), "pricing-grpc") as channel:
        for metadata in ((), (("x-task-dye", "pricing-run"),)):
            _retry(lambda m=metadata: call(channel, m, timeout=1))


def _retry(attempt: Callable[[], dict]) -> dict:
    """attempt() until it stops failing with a gRPC error, for WARM_UP_S at most."""
    deadline = time.monotonic() + WARM_UP_S
    while True:
        try:
            return attempt()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_dyed_calls_stay_in_the_task_group_at_every_hop(channel: grpc.Channel) -> None:
    answer = call(channel, [("x-task-dye", "pricing-run")])
    assert served_by(answer) == BOTH_TASK
    assert [hop["dye"] for hop in answer["hops"]] == ["pricing-run", "pricing-run"]


def test_undyed_calls_are_served_by_default(channel: grpc.Channel) -> None:
    answer = call(channel)
    assert served_by(answer) == BOTH_DEFAULT
    assert [hop["dye"] for hop in answer["hops"]] == [None, None]


def test_baggage_metadata_and_prefix_dyes_route_too(channel: grpc.Channel) -> None:
    answer = call(channel, [("baggage", "user=7,task-dye=pricing-run@2024-06-01")])
    assert served_by(answer) == BOTH_TASK
    assert answer["hops"][1]["dye"] == "pricing-run@2024-06-01"


def test_a_dye_of_no_chain_is_online_traffic(channel: grpc.Channel) -> None:
    assert served_by(call(channel, [("x-task-dye", "fund-yield")])) == BOTH_DEFAULT


def test_calls_multiplexed_on_one_connection_are_routed_one_by_one(
    channel: grpc.Channel,
) -> None:
    """One channel is one HTTP/2 connection to the egress listener: routing is per stream."""
    dyes = ["pricing-run" if i % 2 else None for i in range(40)]

    def one(dye: str | None) -> list[tuple[str, str]]:
        return served_by(call(channel, [("x-task-dye", dye)] if dye else []))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, dyes))
    assert results == [BOTH_TASK if dye else BOTH_DEFAULT for dye in dyes]


def test_task_group_refuses_undyed_calls_with_a_grpc_status(mesh: Mesh) -> None:
    """The inbound listener's 403 reaches a gRPC client as PERMISSION_DENIED, with the reason."""
    task = next(i for i in mesh.instances if (i.service, i.group) == ("pricing-grpc", "task"))
    with (
        dial(("127.0.0.1", task.inbound_port), "pricing-grpc") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        call(channel)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "serves only task traffic" in refused.value.details()
