"""Telemetry: Envoy access logs (als) -> isolation accounting -> /api/v1/isolation and
Prometheus /metrics, and -> the learned scopes (learn.py). `Telemetry` bundles them so the
control plane and the test mesh wire them the same way: its `access_logs.handler()` joins the
xDS gRPC server, its `metrics.xds` is the ADS server's observer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.telemetry.accounting import Accounting, LogEntry
from controlplane.telemetry.als import AccessLogServer
from controlplane.telemetry.canary import CanaryTallies
from controlplane.telemetry.learn import Learner, Sink
from controlplane.telemetry.metrics import Metrics
from controlplane.telemetry.probe import Probes
from controlplane.telemetry.queues import QueueAccounting
from controlplane.xds.status import StatusBoard


class Telemetry:
    """Access-log server, accounting and metrics of one control plane."""

    def __init__(
        self,
        rules: Callable[[], RuleSet],
        registered: Callable[[], Mapping[GroupKey, int]],
        status: StatusBoard,
        scaler_status: Callable[[], Mapping[str, Any] | None] = lambda: None,
        learned: Sink | None = None,
    ) -> None:
        """`registered` counts the registered instances per (service, group); `learned`
        is handed each (role, callee) the egress logs show (learn.py)."""
        self.accounting = Accounting(rules)
        self.canary = CanaryTallies()  # a rollout's cohorts (controlplane/canary.py)
        self.probes = Probes()  # the propagation probes in flight (api/probe.py)
        self.learner = None if learned is None else Learner(rules, learned)
        self.access_logs = AccessLogServer(self._ingest)
        self.metrics = Metrics(
            self.accounting, lambda: self.access_logs.streams, status, scaler_status, registered
        )
        # Queue hops: deliveries the consumers report (POST /api/v1/deliveries).
        self.queues = QueueAccounting(rules, time.time)
        self.metrics.registry.register(self.queues)

    def _ingest(self, entries: Sequence[LogEntry]) -> None:
        if self.learner is not None:
            self.learner.ingest(entries)
        self.accounting.ingest(entries)
        self.canary.ingest(entries)
        self.probes.ingest(entries)
