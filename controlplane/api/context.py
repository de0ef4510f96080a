"""What the API's handlers may use of a control plane: one narrow seam.

Handlers (HTTP and the TaskService) take an `ApiContext`, not the control plane itself, so
the api package never imports `app.py` (which builds the API from these modules), and a test
can serve the handlers from a small fake with no etcd behind it.
"""

from __future__ import annotations

from typing import Any, Protocol

from controlplane.model.rules import RuleSet
from controlplane.queues import Delivery
from controlplane.store.etcd import Store
from controlplane.telemetry.probe import Probes


class ApiContext(Protocol):
    @property
    def store(self) -> Store:
        """The etcd store; StoreError while the control plane is not connected."""
        ...

    def rules(self) -> RuleSet:
        """The rules of the last build published to the sidecars."""
        ...

    async def published(self, key: str, present: bool, timeout: float) -> bool:
        """Wait until a build with (present) or without the instance registry key is
        published; False when `timeout` seconds pass first."""
        ...

    def status(self) -> dict[str, Any]:
        """GET /api/v1/status: what the control plane serves and to whom."""
        ...

    def scaler_status(self) -> dict[str, Any] | None:
        """The scaler's part of the status (scaler/reconcile.py), None when this control plane
        runs no scaler."""
        ...

    def isolation(self) -> dict[str, Any]:
        """GET /api/v1/isolation: the isolation accounting (telemetry/accounting.py)."""
        ...

    def deliveries(self, deliveries: list[Delivery]) -> None:
        """POST /api/v1/deliveries: account what queue consumers received."""
        ...

    def metrics(self) -> tuple[bytes, str]:
        """GET /metrics: the Prometheus exposition and its content type."""
        ...

    def rollout(self) -> dict[str, Any] | None:
        """The rollout in progress as this replica judges it (canary.py), None without one."""
        ...

    @property
    def probes(self) -> Probes:
        """The propagation probes in flight and the last report per chain (api/probe.py)."""
        ...
