"""The control plane process's garbage collector: tuned for many long-lived objects.

Process wiring (`tasklane up`, benchmarks that run the server), not the xDS protocol: the
measurements behind both settings are in bench/xds_push.py and bench/soak.py.
"""

from __future__ import annotations

import asyncio
import gc


def tune_gc() -> None:
    """Collect young objects less often. A control plane holds many long-lived objects
    (resources, stream states); with CPython's default gen-0 threshold of 700 a push to 5000
    streams triggered full collections that took half the server's CPU (bench/xds_push.py)."""
    gc.set_threshold(50_000, 20, 20)


# With that threshold young garbage in reference cycles (e.g. each closed HTTP connection's
# asyncio transport: ~500 a minute from `tasklane run` keep-alives) waited minutes for a
# collection and RSS climbed meanwhile (bench/soak.py); a timed young collection frees it.
YOUNG_COLLECTION_INTERVAL = 10.0


async def collect_young(interval: float = YOUNG_COLLECTION_INTERVAL) -> None:
    """Collect generations 0 and 1 every `interval` seconds, until cancelled; with tune_gc."""
    while True:
        await asyncio.sleep(interval)
        gc.collect(1)
