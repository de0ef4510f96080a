"""A gRPC twin of demo/chain_app.py for routing tests, and a way to put any app behind a sidecar
of a Mesh.

The service needs no .proto and no codegen: one unary method, `/tasklane.test.Chain/Call`, whose
request and response are raw bytes (grpcio passes bytes through when no serializer is given);
the response is JSON, `{"hops": [{"service", "group", "instance", "dye", "metadata"}, ...]}`,
the same shape as the HTTP chain app's, so tests/support/mesh.served_by() reads both.

gRPC clients reach a service through a sidecar by dialing its egress listener directly with the
service as the channel's authority: with an HTTP proxy configured, grpcio would instead open a
CONNECT tunnel that hides every call from routing (DESIGN.md), so the proxy is switched off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from controlplane import propagation
from tests.support.mesh import AppStarter

SERVICE = "tasklane.test.Chain"
METHOD = f"/{SERVICE}/Call"
CALL_TIMEOUT_S = 10.0

Address = tuple[str, int]
Metadata = Sequence[tuple[str, str]]
# (instance name, egress address) -> (port the app serves on, stop)


def dial(address: Address, service: str) -> grpc.Channel:
    """A channel that reaches `service` through the egress listener at `address`."""
    return grpc.insecure_channel(
        f"{address[0]}:{address[1]}",
        options=[("grpc.default_authority", service), ("grpc.enable_http_proxy", 0)],
    )


def call(channel: grpc.Channel, metadata: Metadata = (), timeout: float = CALL_TIMEOUT_S) -> dict:
    """One Call; its JSON answer. A failed call raises grpc.RpcError."""
    stub = channel.unary_unary(METHOD)
    return json.loads(stub(b"{}", metadata=tuple(metadata), timeout=timeout))


class GrpcChainApp:
    """One instance: answers Call with who it is, after calling `next_services` (gRPC too)
    through its sidecar with the dye carried over as metadata."""

    def __init__(
        self, service: str, group: str, instance: str, next_services: Sequence[str], egress: Address
    ) -> None:
        self.service, self.group, self.instance = service, group, instance
        self.next_services = list(next_services)
        self.egress = egress

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        received = [(item.key, item.value) for item in context.invocation_metadata()]
        dye = propagation.extract(received)
        me = {
            "service": self.service,
            "group": self.group,
            "instance": self.instance,
            "dye": dye,
            "metadata": {k: v for k, v in received if isinstance(v, str)},
        }
        hops = [me]
        with propagation.dye_scope(dye):
            for service in self.next_services:
                with dial(self.egress, service) as channel:
                    try:
                        answer = call(channel, list(propagation.inject({}).items()))
                    except grpc.RpcError as exc:
                        context.abort(exc.code(), f"{service}: {exc.details()}")
                hops += answer["hops"]
        return json.dumps({"hops": hops}).encode()

    def start(self) -> tuple[int, Callable[[], None]]:
        """Serve on a free port of 127.0.0.1; returns (port, stop)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(self.handle)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return port, lambda: server.stop(grace=None).wait(5)


def grpc_chain_app(service: str, group: str, next_services: Sequence[str] = ()) -> AppStarter:
    """A Mesh.add start_app: a GrpcChainApp calling `next_services`."""
    return lambda name, egress: GrpcChainApp(service, group, name, next_services, egress).start()
