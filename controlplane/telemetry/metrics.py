"""Prometheus metrics of the control plane, in a registry of its own (served at `/metrics`).

- isolation: the accounting's counters, read at scrape time (one bookkeeping, not two), with
  the labels chain, service, group; `chain=""` is online traffic; calls outside the mesh by
  the calling service and group;
- xDS: connected streams, pushes, ACKs and NACKs by type, and the push-to-ACK latency, from
  the ADS server's `Observer` hooks;
- scaler: desired replicas per group (the policy), actual ones (registered instances: what
  serves, whatever the actuator; cheap for every actuator, unlike asking Kubernetes).

Label values come from rules, node roles and registered groups, never from requests, so the
number of series stays bounded.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from controlplane.model.group import GroupKey
from controlplane.telemetry.accounting import Accounting
from controlplane.xds.server import Observer
from controlplane.xds.status import NodeStatus, StatusBoard
from controlplane.xds.stream import Push
from controlplane.xds.types import SHORT_NAME

# Push-to-ACK: a local sidecar ACKs in milliseconds; a stuck one in seconds or never.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Pushes awaiting their ACK that are remembered (a stream that closed never ACKs).
MAX_UNACKED = 100_000


class XdsMetrics(Observer):
    """ADS stream events as Prometheus counters and the push-to-ACK histogram."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "tasklane_xds_pushes", "xDS responses written, by type", ["type"], registry=registry
        )
        self.acks = Counter("tasklane_xds_acks", "xDS ACKs, by type", ["type"], registry=registry)
        self.nacks = Counter(
            "tasklane_xds_nacks", "xDS NACKs: config rejected, by type", ["type"], registry=registry
        )
        self.ack_latency = Histogram(
            "tasklane_xds_push_ack_seconds",
            "From writing an xDS response to the node's ACK of that version",
            ["type"],
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self._unacked: dict[tuple[int, str], tuple[str, float]] = {}

    def pushed(self, node: NodeStatus, push: Push) -> None:
        self.pushes.labels(SHORT_NAME.get(push.type_url, push.type_url)).inc()
        key = (node.stream_id, push.type_url)
        self._unacked.pop(key, None)  # re-inserted last: the oldest go first when full
        self._unacked[key] = (push.version, time.monotonic())
        while len(self._unacked) > MAX_UNACKED:
            del self._unacked[next(iter(self._unacked))]

    def acked(self, node: NodeStatus, type_url: str, version: str) -> None:
        short = SHORT_NAME.get(type_url, type_url)
        self.acks.labels(short).inc()
        sent = self._unacked.pop((node.stream_id, type_url), None)
        if sent is not None and sent[0] == version:
            self.ack_latency.labels(short).observe(time.monotonic() - sent[1])

    def nacked(self, node: NodeStatus, type_url: str, version: str, message: str) -> None:
        self.nacks.labels(SHORT_NAME.get(type_url, type_url)).inc()
        self._unacked.pop((node.stream_id, type_url), None)


_LABELS = ["chain", "service", "group"]
# (metric name, Stats attribute, help) of the accounting's per-key counters.
_COUNTERS = (
    ("requests", "requests", 'Requests per chain ("" = online), service and group'),
    ("responses_5xx", "errors_5xx", "5xx responses"),
    (
        "leaks",
        "leaks",
        "Requests served outside their lane: online by a task group, or dyed outside the "
        "chain's group without a fallback reason",
    ),
    ("rate_limited", "rate_limited", "Dyed requests refused by the hop's rate limit (429 RL)"),
    ("refused", "refused", "Requests a task group's inbound guard refused (403)"),
)


class _StateCollector(Collector):
    """Reads the accounting, the status board and the scaler at scrape time."""

    def __init__(
        self,
        accounting: Accounting,
        access_log_streams: Callable[[], int],
        status: StatusBoard,
        scaler_status: Callable[[], Mapping[str, Any] | None],
        registered: Callable[[], Mapping[GroupKey, int]],
    ) -> None:
        self.accounting, self.access_log_streams = accounting, access_log_streams
        self.status, self.scaler_status, self.registered = status, scaler_status, registered

    def collect(self) -> Iterator[Metric]:
        yield from self._isolation()
        yield from self._xds()
        yield from self._scaler()

    def _isolation(self) -> Iterator[Metric]:
        accounting = self.accounting
        accounting.settle()
        families = {
            name: CounterMetricFamily(f"tasklane_{name}", text, labels=_LABELS)
            for name, _, text in _COUNTERS
        }
        fallbacks = CounterMetricFamily(
            "tasklane_fallbacks",
            "Dyed requests that could not stay in their group, by reason",
            labels=[*_LABELS, "reason"],
        )
        for (chain, service, group), stats in sorted(accounting.stats.items()):
            labels = [chain, service, group]
            for name, attribute, _ in _COUNTERS:
                families[name].add_metric(labels, getattr(stats, attribute))
            for reason, count in sorted(stats.fallbacks.items()):
                fallbacks.add_metric([*labels, reason], count)
        yield from families.values()
        yield fallbacks
        uncovered = CounterMetricFamily(
            "tasklane_uncovered_requests",
            "A chain's dyed requests served by a service that is not a hop of the chain",
            labels=_LABELS,
        )
        for (chain, service, group), stats in sorted(accounting.uncovered.items()):
            uncovered.add_metric([chain, service, group], stats.requests)
        yield uncovered
        breaks = CounterMetricFamily(
            "tasklane_propagation_breaks",
            "Calls made undyed while serving a dyed request (same x-request-id)",
            labels=[*_LABELS, "to"],
        )
        for (chain, service, group, target), entry in sorted(accounting.breaks.items()):
            breaks.add_metric([chain, service, group, target], entry.count)
        yield breaks
        yield from _outside_mesh(accounting)
        entries = CounterMetricFamily(
            "tasklane_access_log_entries",
            'Access-log entries received, by listener ("" = untagged, ignored)',
            labels=["direction"],
        )
        for direction, count in sorted(accounting.entries.items()):
            entries.add_metric([direction], count)
        yield entries
        yield GaugeMetricFamily(
            "tasklane_access_log_streams",
            "Access-log streams open now (two per sidecar)",
            value=self.access_log_streams(),
        )

    def _xds(self) -> Iterator[Metric]:
        streams = GaugeMetricFamily(
            "tasklane_xds_streams", "Connected ADS streams", labels=["protocol"]
        )
        by_protocol = Tally(node.protocol for node in self.status.nodes())
        for protocol in ("sotw", "delta"):
            streams.add_metric([protocol], by_protocol[protocol])
        yield streams

    def _scaler(self) -> Iterator[Metric]:
        actual = GaugeMetricFamily(
            "tasklane_scaler_actual_replicas",
            "Registered instances per service and group",
            labels=["service", "group"],
        )
        for (service, group), count in sorted(self.registered().items()):
            actual.add_metric([service, group], count)
        yield actual
        status = self.scaler_status()
        if status is None:
            return
        desired = GaugeMetricFamily(
            "tasklane_scaler_desired_replicas",
            "Replicas the scaler's policy wants per service and group",
            labels=["service", "group"],
        )
        for role, replicas in sorted(status.get("desired", {}).items()):
            desired.add_metric(list(GroupKey.parse(role)), replicas)
        yield desired
        yield CounterMetricFamily(
            "tasklane_scaler_ticks", "Scaler periods run", value=status.get("ticks", 0)
        )


def _outside_mesh(accounting: Accounting) -> Iterator[Metric]:
    """Calls to hosts that are no service of the mesh, by calling service and group."""
    families = (
        ("requests", "requests", "Calls to hosts outside the mesh (PassthroughCluster)"),
        ("refused", "refused", "Calls outside the mesh refused by REGISTRY_ONLY (502)"),
        ("responses_5xx", "errors_5xx", "5xx answers of calls passed outside the mesh"),
    )
    for name, attribute, text in families:
        family = CounterMetricFamily(
            f"tasklane_outside_mesh_{name}", text, labels=["service", "group"]
        )
        for (service, group), stats in sorted(accounting.outside.items()):
            family.add_metric([service, group], getattr(stats, attribute))
        yield family


class Metrics:
    """The control plane's registry: `xds` is the ADS server's observer; render() the page."""

    def __init__(
        self,
        accounting: Accounting,
        access_log_streams: Callable[[], int],
        status: StatusBoard,
        scaler_status: Callable[[], Mapping[str, Any] | None],
        registered: Callable[[], Mapping[GroupKey, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        self.xds = XdsMetrics(self.registry)
        self.registry.register(
            _StateCollector(accounting, access_log_streams, status, scaler_status, registered)
        )

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
