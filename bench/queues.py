"""Message-queue lanes on a real RabbitMQ: leaks over mixed messages, and what the lanes cost
against plain consumption on the same broker, side by side in one run.

One `rabbitmq-server` node (Debian's, testkit/rabbit.py) on this machine. Each round publishes
`--messages` persistent messages, a mix of undyed ones, a strict chain's (exact dye and per-run
dyes it claims by prefix), a loose chain's and dyes of no chain. Consumers are up before the
first message is published; a round's time runs from the first publish to the last message
handled (end to end), while the publisher's own rate is timed apart; publisher and consumers
share this one Python process. Modes:

* lanes: `controlplane.queues` (headers exchange, lane queue per chain, alternate exchange to
  the default queue); one consumer per group (default, task, batch), each on its own
  connection, judging every delivery and reporting it to the real accounting
  (telemetry/queues.py), which counts the leaks; each body also says which group must get it;
* plain: the same messages to one durable queue through a direct exchange, three consumers of
  that queue: what the app did before lanes.

Rounds alternate plain and lanes so a busy machine slows both alike; medians are printed.

    .venv/bin/python bench/queues.py [--messages 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # testkit

import pika  # noqa: E402
from common import machine  # noqa: E402 (bench/ is the script's directory)

from controlplane import propagation, queues  # noqa: E402
from controlplane.model import RuleSet, apply, load_text  # noqa: E402
from controlplane.model.queues import QueueLanes, queue_plan  # noqa: E402
from controlplane.telemetry.queues import QueueAccounting  # noqa: E402
from testkit.rabbit import SERVER, Broker  # noqa: E402

GROUPS = ("default", "task", "batch")
DRAIN_TIMEOUT = 300.0
PREFETCH = 100


def rules(queue: str) -> RuleSet:
    hop = "{service: ledger, group: %s, queue: " + queue + "}"
    text = f"""
apiVersion: tasklane.io/v1
kind: Service
metadata: {{name: ledger}}
spec: {{groups: [{{name: default}}, {{name: task}}, {{name: batch}}]}}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {{name: fund-yield}}
spec: {{dye: {{values: [fund-yield, "fund-yield@*"]}}, fallback: strict, hops: [{hop % "task"}]}}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {{name: pricing}}
spec: {{dye: {{values: [pricing]}}, fallback: loose, hops: [{hop % "batch"}]}}
"""
    return apply(RuleSet.empty(), load_text(text, "bench.yaml"))


def mixed(count: int) -> list[tuple[str | None, str]]:
    """(dye, the group that must consume it) for `count` messages, in a fixed mix."""
    kinds: list[tuple[str | None, str]] = [
        (None, "default"),
        (None, "default"),
        (None, "default"),
        ("fund-yield", "task"),
        ("fund-yield@run-{n}", "task"),
        ("fund-yield@run-{n}", "task"),
        ("pricing", "batch"),
        ("pricing", "batch"),
        ("other-task-{n}", "default"),  # a dye of no chain: online traffic
        (None, "default"),
    ]
    out = []
    for n in range(count):
        dye, group = kinds[n % len(kinds)]
        out.append((None if dye is None else dye.format(n=n % 7), group))
    return out


def publish(
    broker: Broker,
    send: Callable[[pika.channel.Channel, bytes, str | None], None],
    messages: list[tuple[str | None, str]],
) -> float:
    """Publish every message (confirmed at the end); its seconds."""
    connection = pika.BlockingConnection(broker.parameters())
    channel = connection.channel()
    start = time.perf_counter()
    for n, (dye, group) in enumerate(messages):
        send(channel, f"{group}:{n}".encode(), dye)
    channel.confirm_delivery()  # waits for everything sent before it
    elapsed = time.perf_counter() - start
    connection.close()
    return elapsed


class Drain:
    """Consumers on their own connections until `count` messages are handled in all."""

    def __init__(self, count: int) -> None:
        self.count, self.handled, self.wrong = count, 0, 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def handled_one(self, body: bytes, group: str | None) -> None:
        with self.lock:
            self.handled += 1
            self.wrong += group is not None and not body.startswith(group.encode() + b":")
            if self.handled >= self.count:
                self.done.set()

    def run(
        self,
        broker: Broker,
        starts: list[Callable[[pika.channel.Channel], None]],
        produce: Callable[[], float],
    ) -> tuple[float, float]:
        """Start the consumers, then `produce` (its seconds); (those, seconds until the last
        message was handled)."""
        ready = threading.Barrier(len(starts) + 1)

        def consumer(start: Callable[[pika.channel.Channel], None]) -> None:
            connection = pika.BlockingConnection(broker.parameters())
            channel = connection.channel()
            start(channel)
            ready.wait()
            while not self.done.is_set():
                connection.process_data_events(time_limit=0.05)
            connection.close()

        threads = [threading.Thread(target=consumer, args=(s,)) for s in starts]
        for thread in threads:
            thread.start()
        ready.wait()
        begin = time.perf_counter()
        produced = produce()
        finished = self.done.wait(DRAIN_TIMEOUT)
        elapsed = time.perf_counter() - begin
        for thread in threads:
            thread.join()
        if not finished:
            raise SystemExit(f"drained {self.handled} of {self.count} in {DRAIN_TIMEOUT:g} s")
        return produced, elapsed


def lanes_round(broker: Broker, messages: list[tuple[str | None, str]]) -> dict[str, float]:
    queue = f"lanes-{uuid.uuid4().hex[:8]}"
    ruleset = rules(queue)
    lanes: QueueLanes = queue_plan(ruleset)[queue]
    accounting = QueueAccounting(lambda: ruleset, time.time)
    setup = pika.BlockingConnection(broker.parameters())
    queues.declare(setup.channel(), lanes)
    setup.close()

    def send(channel: pika.channel.Channel, body: bytes, dye: str | None) -> None:
        with propagation.dye_scope(dye):
            queues.publish(channel, lanes, body)

    drain = Drain(len(messages))
    report_lock = threading.Lock()

    def report(delivery: queues.Delivery) -> None:
        with report_lock:
            accounting.ingest([delivery])

    def start(group: str) -> Callable[[pika.channel.Channel], None]:
        def begin(channel: pika.channel.Channel) -> None:
            queues.consume(
                channel,
                lanes,
                lambda body: drain.handled_one(body, group),
                group=group,
                report=report,
                prefetch=PREFETCH,
            )

        return begin

    published, consumed = drain.run(
        broker, [start(group) for group in GROUPS], lambda: publish(broker, send, messages)
    )
    totals = accounting.totals()
    return {
        "published_s": published,
        "consumed_s": consumed,
        "leaks": totals["queue_leaks"],
        "fallbacks": totals["queue_fallbacks"],
        "wrong_group": drain.wrong,
        "messages": totals["queue_messages"],
    }


def plain_round(broker: Broker, messages: list[tuple[str | None, str]]) -> dict[str, float]:
    queue = f"plain-{uuid.uuid4().hex[:8]}"
    setup = pika.BlockingConnection(broker.parameters())
    channel = setup.channel()
    channel.exchange_declare(queue, "direct", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, queue, routing_key=queue)
    setup.close()

    def send(channel: pika.channel.Channel, body: bytes, dye: str | None) -> None:
        headers = {propagation.DYE_HEADER: dye} if dye else None
        properties = pika.BasicProperties(delivery_mode=2, headers=headers)
        channel.basic_publish(queue, queue, body, properties)

    drain = Drain(len(messages))

    def begin(channel: pika.channel.Channel) -> None:
        channel.basic_qos(prefetch_count=PREFETCH)

        def on_message(ch: pika.channel.Channel, method: object, _: object, body: bytes) -> None:
            drain.handled_one(body, None)
            ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

        channel.basic_consume(queue, on_message)

    published, consumed = drain.run(
        broker, [begin] * len(GROUPS), lambda: publish(broker, send, messages)
    )
    return {"published_s": published, "consumed_s": consumed}


def helper_cost(count: int = 20_000) -> tuple[float, float]:
    """µs of CPU per message the helpers add, without the broker: the publisher's headers (a
    per-run dye, resolved by prefix) and the consumer's judging of them."""
    queue = "cost"
    lanes = queue_plan(rules(queue))[queue]
    start = time.process_time()
    for n in range(count):
        headers = queues.publish_headers(lanes, None, f"fund-yield@run-{n % 7}")
    published = time.process_time() - start
    start = time.process_time()
    for _ in range(count):
        queues.receive(lanes, "task", headers)
    received = time.process_time() - start
    return published / count * 1e6, received / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not SERVER.exists():
        raise SystemExit(f"no {SERVER}: apt-get install rabbitmq-server (as root)")
    messages = mixed(args.messages)
    print(f"# message-queue lanes: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tasklane-bench-rabbit-") as home:
        broker = Broker(Path(home))
        broker.start()
        try:
            version = broker.version()
            plain, lanes = [], []
            for _ in range(args.rounds):
                plain.append(plain_round(broker, messages))
                lanes.append(lanes_round(broker, messages))
        finally:
            broker.stop()
    n = args.messages
    print(
        f"# RabbitMQ {version}, {n:,} persistent messages per round, {args.rounds} rounds "
        f"(medians); 3 consumers, prefetch {PREFETCH}, manual acks"
    )
    print("| | publish msg/s | end-to-end msg/s | leaks | wrong group | fallbacks |")
    print("|---|---|---|---|---|---|")
    for name, runs in (("plain (one queue)", plain), ("lanes", lanes)):
        publish_rate = statistics.median(n / r["published_s"] for r in runs)
        consume_rate = statistics.median(n / r["consumed_s"] for r in runs)
        leaks = sum(r.get("leaks", 0) for r in runs) if name == "lanes" else "–"
        wrong = sum(r.get("wrong_group", 0) for r in runs) if name == "lanes" else "–"
        fallbacks = sum(r.get("fallbacks", 0) for r in runs) if name == "lanes" else "–"
        print(
            f"| {name} | {publish_rate:,.0f} | {consume_rate:,.0f} | {leaks} | {wrong} | "
            f"{fallbacks} |"
        )
    accounted = sum(r["messages"] for r in lanes)
    print(f"# lanes: {accounted:,} deliveries judged by the accounting over all rounds")
    publish_us, receive_us = helper_cost()
    print(
        f"# helper CPU per message (no broker): publish headers {publish_us:.1f} µs, "
        f"judging a delivery {receive_us:.1f} µs"
    )


if __name__ == "__main__":
    main()
