"""Telemetry: Envoy access logs (als) -> isolation accounting -> /api/v1/isolation and
Prometheus /metrics. `Telemetry` bundles the three so the control plane and the test mesh
wire them the same way: its `access_logs.handler()` joins the xDS gRPC server, its
`metrics.xds` is the ADS server's observer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.telemetry.accounting import Accounting
from controlplane.telemetry.als import AccessLogServer
from controlplane.telemetry.metrics import Metrics
from controlplane.xds.status import StatusBoard


class Telemetry:
    """Access-log server, accounting and metrics of one control plane."""

    def __init__(
        self,
        rules: Callable[[], RuleSet],
        registered: Callable[[], Mapping[GroupKey, int]],
        status: StatusBoard,
        scaler_status: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        """`registered` counts the registered instances per (service, group)."""
        self.accounting = Accounting(rules, registered)
        self.access_logs = AccessLogServer(self.accounting.ingest)
        self.metrics = Metrics(
            self.accounting, lambda: self.access_logs.streams, status, scaler_status, registered
        )
