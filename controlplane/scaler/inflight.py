"""The reactive half of the policy's input: requests in flight per instance of each group,
read from the sidecars themselves (their inbound listener's active requests, one stat of
Envoy's admin: xds/names.ACTIVE_REQUESTS_PATH, as Prometheus text).

Envoy's admin listens on the instance's loopback, so this reads the instances on the control
plane's host (the local actuator's) there. An injected pod's sidecar passes that one admin
URL on at its ready port, on the pod IP (templates/pod.yaml), where the Kubernetes actuator
reads it (podsignals). Both give per-instance `signals.Reading`s, which `signals.group_means`
averages per group; an instance whose stat cannot be read is left out, never read as 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.scaler.signals import Reading, Readings, read_gauges
from controlplane.xds.names import ACTIVE_REQUESTS_METRIC, ACTIVE_REQUESTS_PATH


def active_requests_url(host: str, port: int) -> str:
    """Where a sidecar shows its requests in flight: its admin port, or a pod's ready port."""
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{ACTIVE_REQUESTS_PATH}"


def in_flight(instances: Iterable[Instance], groups: set[GroupKey]) -> Readings:
    """The requests in flight of each instance of `groups` on this host whose sidecar
    answers, read at once (signals.read_gauges)."""
    local = [
        instance
        for instance in instances
        if (instance.service, instance.group) in groups
        and instance.host in ("127.0.0.1", "localhost", "::1")
    ]
    values = read_gauges(
        [(active_requests_url(i.host, i.admin_port), ACTIVE_REQUESTS_METRIC) for i in local]
    )
    return [
        ((instance.service, instance.group), Reading(in_flight=value))
        for instance, value in zip(local, values, strict=True)
        if value is not None
    ]
