"""What the README asks of apps that carry the dye with OpenTelemetry alone, checked against
the real OpenTelemetry libraries: its client instrumentations write the baggage of the current
context, which a thread pool's worker does not have unless the threading instrumentation (or
`contextvars.copy_context`, as `controlplane.propagation.wrap` does) hands it over."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import baggage, context, propagate
from opentelemetry.instrumentation.threading import ThreadingInstrumentor

FORWARDED = "task-dye=fund-yield%40r1"  # what OpenTelemetry writes for fund-yield@r1


def _outbound_baggage() -> str | None:
    """The baggage header an instrumented client would send from here."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the global propagators: tracecontext and baggage by default
    return carrier.get("baggage")


def test_a_thread_pool_carries_baggage_only_when_the_context_is_handed_over() -> None:
    token = context.attach(baggage.set_baggage("task-dye", "fund-yield@r1"))
    try:
        assert _outbound_baggage() == FORWARDED
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(_outbound_baggage).result() is None
            copied = contextvars.copy_context()
            assert pool.submit(copied.run, _outbound_baggage).result() == FORWARDED
        instrumentor = ThreadingInstrumentor()
        instrumentor.instrument()
        try:
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(_outbound_baggage).result() == FORWARDED
        finally:
            instrumentor.uninstrument()
    finally:
        context.detach(token)
