"""Pieces every part of the translation shares: addresses, a chain's hop, protobuf helpers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import (
    config_source_pb2,
)
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from google.protobuf import any_pb2, duration_pb2

from controlplane.model.group import GroupKey
from controlplane.model.rules import Hop, Service, TaskChain

Address = tuple[str, int]


# (service, group) -> addresses of the registered instances (their inbound listeners).
Endpoints = Mapping[GroupKey, Sequence[Address]]


@dataclass(frozen=True)
class ChainHop:
    """A chain's hop on one service, with what routing it needs from the chain."""

    chain: TaskChain
    hop: Hop


def packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def named_route(
    name: str, action: route_pb2.RouteAction | None = None, **fields
) -> route_pb2.Route:
    route = route_pb2.Route(name=name, match=route_pb2.RouteMatch(prefix="/"), **fields)
    if action is not None:
        route.route.CopyFrom(action)
    return route


def service_action(service: Service) -> route_pb2.RouteAction:
    # gRPC streams may outlive Envoy's 15 s default route timeout.
    return route_pb2.RouteAction(timeout=duration(0) if service.protocol == "grpc" else None)
