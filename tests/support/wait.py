"""Bounded waiting for state observed from outside (HTTP answers, admin pages, etcd)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    check: Callable[[], Any], timeout: float = 15.0, what: str = "", interval: float = 0.05
) -> Any:
    """Poll check() until it returns something truthy and return that; a connection error
    counts as "not yet". Fails the test with `what` and the last result after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        if last and not isinstance(last, OSError):
            return last
        time.sleep(interval)
    raise AssertionError(f"not reached in {timeout:g}s: {what} (last: {last!r})")
