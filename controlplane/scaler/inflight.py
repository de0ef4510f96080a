"""The reactive half of the policy's input: requests in flight per instance of each group,
read from the sidecars themselves (their inbound listener's active requests).

Envoy's admin listens on the instance's loopback, so this sees instances on the control
plane's host (the local actuator's); elsewhere a group simply has no reading and the policy
runs on the predictive half alone.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable

from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.runtime.envoy import parse_stats

ACTIVE = "http.inbound.downstream_rq_active"


def active_requests(host: str, admin_port: int, timeout: float = 0.5) -> int | None:
    """In-flight requests on one sidecar's inbound listener, or None if it cannot be read."""
    conn = http.client.HTTPConnection(host, admin_port, timeout=timeout)
    try:
        conn.request("GET", f"/stats?format=json&filter=^{ACTIVE}$")
        response = conn.getresponse()
        if response.status != 200:
            return None
        return parse_stats(json.loads(response.read())).get(ACTIVE)
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def in_flight(instances: Iterable[Instance], groups: set[GroupKey]) -> dict[GroupKey, float]:
    """Mean in-flight requests per readable instance of each of `groups`."""
    readings: dict[GroupKey, list[int]] = {}
    for instance in instances:
        key = (instance.service, instance.group)
        if key in groups and instance.host in ("127.0.0.1", "localhost", "::1"):
            active = active_requests(instance.host, instance.admin_port)
            if active is not None:
                readings.setdefault(key, []).append(active)
    return {key: sum(values) / len(values) for key, values in readings.items()}
