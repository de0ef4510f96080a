"""Helpers of the xDS protocol tests (the server and client doubles are in testkit/)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from controlplane.xds.snapshot import Snapshot
from testkit import resources as rs
from testkit.ads_client import AdsClient


def async_test(fn: Callable) -> Callable:
    """Run an async test function in a fresh event loop, bounded in time."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until predicate() holds (for state the server updates after a client's ACK)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# --- shared by the protocol tests -------------------------------------------------------------

ROLE = "fund-facade|default"
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


def snap(*messages) -> Snapshot:
    return Snapshot.of(messages)


def base(routes: dict[str, str] | None = None, clusters=("a", "b")) -> list:
    """A consistent snapshot: clusters with endpoints, one listener, one route config."""
    routes = routes or {"/": clusters[0]}
    return [
        *(rs.cluster(c) for c in clusters),
        *(rs.endpoints(c, 9000 + i) for i, c in enumerate(clusters)),
        rs.listener("egress", 15001, "egress"),
        rs.route("egress", routes),
    ]


def client(target: str, delta: bool, node: str = "n1", role: str = ROLE) -> AdsClient:
    return AdsClient(target, node, cluster=role, delta=delta)


async def quiet(c: AdsClient, seconds: float = 0.3) -> int:
    """How many responses arrive in the next `seconds` (expected: none)."""
    before = c.count()
    await asyncio.sleep(seconds)
    return c.count() - before
