"""Headless Chromium for the dashboard tests, driven by Playwright.

The browser is Debian's `chromium` (Playwright's own browser download needs the internet,
which CI does not have): the test setup installs it with apt-get when it is missing and we
run as root (CI does), and Playwright starts it through `executable_path`. The `playwright`
Python package (test extras; installed here too when missing) carries its own driver, so
nothing else is downloaded.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.system import apt_install, missing, setup_lock

REPO = Path(__file__).resolve().parents[2]
# Screenshots are saved with the test output, in a gitignored folder.
OUTPUT = REPO / "test-output"
CHROMIUM_ENV = "TASKLANE_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser")
PIP_TIMEOUT = 300
# Keep Chromium off the network: this machine has none, and Chromium otherwise tries (and
# retries) Google's services at every start. A proxy from the environment must not catch
# the loopback requests either.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


def _find_chromium() -> str | None:
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The system Chromium, installed from Debian's packages when missing (as root)."""
    with setup_lock():
        path = _find_chromium()
        if path is None:
            if os.geteuid() != 0:
                missing(
                    "no chromium: run `apt-get install chromium` as root, or set $TASKLANE_CHROMIUM"
                )
            apt_install("chromium")
            path = _find_chromium()
            if path is None:
                missing("apt-get installed chromium, but no chromium command is on PATH")
    return path


def _playwright() -> Any:
    """playwright.sync_api, pip-installed into this interpreter when missing."""
    with setup_lock():
        try:
            return importlib.import_module("playwright.sync_api")
        except ImportError:
            pass
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "playwright>=1.40"],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
        )
        if done.returncode != 0:
            missing(f"pip install playwright failed:\n{done.stderr[-2000:]}")
        importlib.invalidate_caches()
        return importlib.import_module("playwright.sync_api")


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Any]:
    """A headless Chromium for one test (started in about a second).

    Not shared wider: Playwright's sync API runs an asyncio loop on the main thread while it
    is started, and every other test on the same worker that calls asyncio.run() would then
    fail with "cannot be called from a running event loop"."""
    sync_api = _playwright()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT
