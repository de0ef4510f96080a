"""The real ADS server on a free port, in a test's loop or in a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AdsServer, Observer, serve
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import StatusBoard


@dataclass
class RunningAds:
    cache: SnapshotCache
    ads: AdsServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_ads(
    port: int = 0, observer: Observer | None = None, static_clusters: frozenset[str] = frozenset()
) -> AsyncIterator[RunningAds]:
    cache = SnapshotCache(static_clusters)
    ads = AdsServer(cache, StatusBoard(), observer)
    server, bound = await serve(ads, f"127.0.0.1:{port}")
    try:
        yield RunningAds(cache, ads, bound)
    finally:
        await server.stop(grace=0)


class AdsThread:
    """The ADS server on its own event loop in a thread, for tests that block (HTTP calls
    through a real Envoy). Every call into the cache goes through the loop."""

    def __init__(
        self, observer: Observer | None = None, static_clusters: frozenset[str] = frozenset()
    ) -> None:
        self.observer = observer
        self.static_clusters = static_clusters
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stack: contextlib.AsyncExitStack | None = None
        self.running: RunningAds | None = None

    def __enter__(self) -> AdsThread:
        self._thread.start()
        self.running = self.call(self._start)
        return self

    def __exit__(self, *exc) -> None:
        self.call(self._stack.aclose)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _start(self) -> RunningAds:
        self._stack = contextlib.AsyncExitStack()
        return await self._stack.enter_async_context(
            running_ads(observer=self.observer, static_clusters=self.static_clusters)
        )

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the server's loop (awaiting it if it is a coroutine function)."""

        async def run():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    @property
    def port(self) -> int:
        return self.running.port

    def set_snapshot(self, role: str, messages: list) -> frozenset[str]:
        snapshot = Snapshot.of(messages)
        return self.call(self.running.cache.set_snapshot, role, snapshot)

    def status(self, node_id: str):
        return self.call(self.running.ads.status.get, node_id)
