"""The test control plane for task runs: tasks of a test's own added through the API, on the
chains of tests/rules/good/fund-yield.yaml (the runs, TaskService and CLI tests share it)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.plane import Plane as BasePlane

RULES = Path(__file__).resolve().parents[1] / "rules" / "good" / "fund-yield.yaml"

_names = itertools.count(1)


class Plane(BasePlane):
    """The control plane; tasks are added to the rules through the API."""

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        return self.request(method, path, body)

    def apply(self, text: str) -> None:
        status, body = self.apply_files({"t": text})
        assert status == 200, body

    def new_task(self, chain: str = "fund-yield", replicas: str = "{fund-facade: 1}") -> str:
        """A ScheduledTask of the test's own (tests share one etcd) on a chain of RULES."""
        name = f"task-{next(_names)}"
        self.apply(
            f"""apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {{name: {name}}}
spec:
  chain: {chain}
  schedule: "0 2 * * *"
  timezone: Asia/Shanghai
  expectedDuration: 1h
  replicas: {replicas}
"""
        )
        return name

    def stored(self, task: str) -> dict[str, dict]:
        """What etcd holds under the task's runs: key -> document."""
        items, _ = self.store.get_prefix(f"runs/{task}/")
        return {key: json.loads(value) for key, value in items.items()}


def plane_with_rules(etcd_endpoint: str) -> Iterator[Plane]:
    """A module fixture's body: the control plane with RULES applied, stopped afterwards."""
    plane = Plane(etcd_endpoint)
    try:
        plane.apply(RULES.read_text())
        yield plane
    finally:
        plane.stop()
