"""The DeliveryReporter keeps what it could not send, within a bound, and its thread survives
any error (the control plane's side is tests/integration/test_queues.py)."""

from __future__ import annotations

import time

from controlplane.queues import Delivery, DeliveryReporter
from controlplane.runtime.ports import free_port

ONLINE = Delivery("entries", "ledger", "default", None, False)


def test_unsent_deliveries_are_kept_up_to_the_bound_and_drops_counted() -> None:
    reporter = DeliveryReporter(f"http://127.0.0.1:{free_port()}", interval=60, max_pending=5)
    for _ in range(3):
        reporter(ONLINE)
    reporter.flush()  # nobody listens: kept for the next flush
    for _ in range(5):
        reporter(ONLINE)
    reporter.close()
    assert (len(reporter._pending), reporter.dropped) == (5, 3)


def test_the_thread_survives_an_error_that_is_not_a_network_one() -> None:
    reporter = DeliveryReporter("http://127.0.0.1:notaport", interval=0.02)
    reporter(ONLINE)
    time.sleep(0.2)  # several flushes, each failing with a ValueError (InvalidURL)
    alive = reporter._thread.is_alive()
    reporter.close()
    assert alive and len(reporter._pending) == 1
