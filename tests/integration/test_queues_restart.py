"""A RabbitMQ node restarted under a bounded load of dyed and undyed messages loses none and
leaks none: the lanes are durable queues, messages persistent, publishes confirmed (the
publisher republishes what was not confirmed when the connection broke) and consumers ack
after handling (a delivery cut short comes again). Both a clean stop (SIGTERM: the node shuts
down in order) and a crash (SIGKILL of the node's whole process group: nothing is flushed on
the way out, so what survives is what was on disk when it was confirmed), with a strict and a
loose chain (whose messages that waited out the restart fall back to `default`, marked).
Its own node: the restart must not touch the other tests' broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pika
import pika.exceptions
import pytest

from controlplane import propagation, queues
from controlplane.model import RuleSet, apply, load_text
from controlplane.model.queues import QueueLanes, queue_plan
from testkit.rabbit import Broker
from tests.support.rabbit import install
from tests.support.rules import chain, service

pytestmark = pytest.mark.timeout(180)

MESSAGES = 1500
RESTART_AT = 500  # published messages before the restart
PUBLISH_PER_S = 300.0  # bounded: the load a batch shard might put on one queue
DONE_TIMEOUT = 90.0
BROKEN = (pika.exceptions.AMQPError, OSError)  # the connection or channel went away


def lanes() -> QueueLanes:
    hop = "[{service: ledger, group: %s, queue: entries}]"
    text = (
        service("ledger", groups=("default", "task", "batch"))
        + chain("fund-yield", hop % "task")
        + chain("pricing", hop % "batch", fallback="loose", dye="{values: [pricing]}")
    )
    return queue_plan(apply(RuleSet.empty(), load_text(text, "test.yaml")))["entries"]


def dye_of(n: int) -> str | None:
    """Message n's dye: odd ones the strict chain's, every fourth the loose chain's."""
    return f"fund-yield@{n}" if n % 2 else "pricing" if n % 4 == 2 else None


class Publisher(threading.Thread):
    """Publishes message n with `dye_of(n)`, confirmed one by one; a publish cut short by the
    restart is made again on a new connection once the broker is back."""

    def __init__(self, broker: Broker, plan: QueueLanes) -> None:
        super().__init__(daemon=True)
        self.broker, self.plan = broker, plan
        self.sent = 0
        self.retries = 0
        self.stop = threading.Event()

    def run(self) -> None:
        channel = None
        while self.sent < MESSAGES and not self.stop.is_set():
            try:
                if channel is None:
                    channel = pika.BlockingConnection(self.broker.parameters()).channel()
                    channel.confirm_delivery()
                n = self.sent
                with propagation.dye_scope(dye_of(n)):
                    queues.publish(channel, self.plan, str(n).encode())
                self.sent += 1
                time.sleep(1 / PUBLISH_PER_S)
            except BROKEN:
                channel = None
                self.retries += 1
                time.sleep(0.2)


class Consumer(threading.Thread):
    """Consumes `group`'s lanes, reconnecting while the broker is away."""

    def __init__(self, broker: Broker, plan: QueueLanes, group: str) -> None:
        super().__init__(daemon=True)
        self.broker, self.plan, self.group = broker, plan, group
        self.received: list[tuple[int, str | None, bool]] = []  # n, dye, fell back
        self.stop = threading.Event()
        self._handled: int | None = None

    def handle(self, body: bytes) -> None:
        self._handled = int(body)

    def report(self, delivery: queues.Delivery) -> None:  # right after `handle`
        if self._handled is not None:
            self.received.append((self._handled, delivery.dye, delivery.fell_back))
        self._handled = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                connection = pika.BlockingConnection(self.broker.parameters())
                channel = connection.channel()
                queues.consume(
                    channel, self.plan, self.handle, group=self.group, report=self.report
                )
                while not self.stop.is_set():
                    connection.process_data_events(time_limit=0.05)
                connection.close()
            except BROKEN:
                time.sleep(0.2)


@pytest.mark.parametrize("crash", [False, True], ids=["SIGTERM", "SIGKILL"])
def test_a_restart_under_load_loses_and_leaks_nothing(tmp_path: Path, crash: bool) -> None:
    install()
    broker = Broker(tmp_path / "rabbit")
    broker.start()
    plan = lanes()
    setup = pika.BlockingConnection(broker.parameters())
    queues.declare(setup.channel(), plan)
    setup.close()
    consumers = {group: Consumer(broker, plan, group) for group in ("default", "task", "batch")}
    publisher = Publisher(broker, plan)
    try:
        for thread in (*consumers.values(), publisher):
            thread.start()
        deadline = time.monotonic() + DONE_TIMEOUT
        while publisher.sent < RESTART_AT and time.monotonic() < deadline:
            time.sleep(0.02)
        broker.stop(crash)  # under load: publisher and consumers are connected
        broker.start()  # the same node: same name, ports and data

        def seen() -> set[int]:
            return {n for c in consumers.values() for n, _, _ in c.received}

        while len(seen()) < MESSAGES and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for thread in (*consumers.values(), publisher):
            thread.stop.set()
        for thread in (*consumers.values(), publisher):
            thread.join(10)
        broker.stop()
    assert publisher.retries > 0  # the restart really cut the load
    assert seen() == set(range(MESSAGES))  # nothing lost (a redelivery may come twice)
    # online: undyed ones, and loose ones only as fallbacks; each lane: its own chain's only
    assert all(dye is None or fell for _, dye, fell in consumers["default"].received)
    assert all(dye == dye_of(n) for c in consumers.values() for n, dye, _ in c.received)
    assert {n % 2 for n, _, _ in consumers["task"].received} == {1}
    assert {n % 4 for n, _, _ in consumers["batch"].received} == {2}
