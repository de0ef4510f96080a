"""The dashboard's queue hops, in a real headless Chromium against a real control plane: the
deliveries a consumer reports through the real endpoint show as rows per queue, chain and
group, with a leak marked bad and a fallback as a warning."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.runtime.etcd import EmbeddedEtcd
from tests.support.plane import Plane
from tests.support.rules import chain, service

pytestmark = pytest.mark.timeout(120)

HOP = "[{service: ledger, group: %s, queue: ledger-entries}]"
RULES = (
    service("ledger")
    + chain("fund-yield", HOP % "task")
    + chain("pricing", HOP % "task", fallback="loose", dye="{values: [pricing]}")
)
BASE = {"queue": "ledger-entries", "service": "ledger", "fell_back": False}


def test_queue_hops_show_leaks_and_fallbacks(etcd_server: EmbeddedEtcd, browser: Any) -> None:
    plane = Plane(etcd_server.endpoint)
    try:
        assert plane.apply_files({"rules.yaml": RULES})[0] == 200
        deliveries = [
            {**BASE, "group": "task", "dye": None},  # online message in a task group: a leak
            {**BASE, "group": "default", "dye": "pricing", "fell_back": True},  # loose fallback
            {**BASE, "group": "task", "dye": "fund-yield@r1"},
        ]
        assert plane.request("POST", "/api/v1/deliveries", {"deliveries": deliveries})[0] == 200
        page = browser.new_context().new_page()
        page.set_default_timeout(15_000)
        page.goto(plane.url + "/")
        leak = page.locator('tr[data-queue-row="ledger-entries||task"] td.bad')
        leak.wait_for()
        assert leak.inner_text() == "1"
        fallback = page.locator('tr[data-queue-row="ledger-entries|pricing|default"] td.warn')
        assert fallback.first.inner_text() == "1"
        assert fallback.first.get_attribute("title") == "no_consumer: 1"
        lane = page.locator('tr[data-queue-row="ledger-entries|fund-yield|task"]')
        assert "bad" not in (lane.locator("td").last.get_attribute("class") or "")
        assert page.locator("#queues").is_visible()
    finally:
        plane.stop()
