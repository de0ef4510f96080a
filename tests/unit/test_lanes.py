"""controlplane.lanes: an app learns its service and group from the environment `tasklane run`
gives it, and online-only work starts only in `default` (checked on the demo app as a real
process too)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane import lanes
from controlplane.runtime.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_outside_the_mesh_an_app_is_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKLANE_GROUP", raising=False)
    monkeypatch.delenv("TASKLANE_SERVICE", raising=False)
    assert (lanes.current_group(), lanes.current_service()) == ("default", None)
    assert not lanes.is_task_group()


def test_online_only_work_is_skipped_in_a_task_group(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    @lanes.online_only
    def listen(queue: str) -> str:
        started.append(queue)
        return queue

    monkeypatch.setenv("TASKLANE_SERVICE", "ledger")
    monkeypatch.setenv("TASKLANE_GROUP", "task")
    assert (lanes.current_service(), lanes.is_task_group()) == ("ledger", True)
    assert listen("orders") is None
    monkeypatch.setenv("TASKLANE_GROUP", "default")
    assert listen("orders") == "orders"
    assert started == ["orders"]


def test_online_only_guards_async_work_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @lanes.online_only
    async def consume(queue: str) -> str:
        return queue

    monkeypatch.setenv("TASKLANE_GROUP", "task")
    with caplog.at_level(logging.INFO, logger="controlplane.lanes"):
        assert asyncio.run(consume("orders")) is None
        assert asyncio.run(consume("orders")) is None
    assert [r.getMessage() for r in caplog.records] == [
        "test_online_only_guards_async_work_and_says_so_once.<locals>.consume not started: "
        "group task serves task traffic only"
    ]
    monkeypatch.setenv("TASKLANE_GROUP", "default")
    assert asyncio.run(consume("orders")) == "orders"


@pytest.mark.parametrize(("group", "online"), [("task", False), ("default", True)])
def test_the_demo_app_starts_online_work_only_in_default(group: str, online: bool) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TASKLANE_SERVICE": "nav-pricing",
        "TASKLANE_GROUP": group,
        "PORT": str(port),
    }
    app = subprocess.Popen([sys.executable, "-m", "demo.chain_app"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                    (hop,) = json.load(answer)["hops"]
                break
            except OSError:
                if time.monotonic() > deadline or app.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        app.terminate()
        app.wait(5)
    assert (hop["service"], hop["group"], hop["onlineWork"]) == ("nav-pricing", group, online)
