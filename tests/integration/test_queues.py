"""Message-queue lanes on a real RabbitMQ (Debian's rabbitmq-server, one node per session):
dyed messages published from a dyed request carry the dye; each chain's lane consumers get only
that chain's messages, `default` only undyed ones; a strict chain's messages wait for their
group while a loose chain's go to `default`; broken dyes are stripped or, from a trusted
publisher, rejected, and never stop the consumer. Both pika and aio-pika."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from wsgiref.simple_server import make_server

import aio_pika
import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import propagation, queues
from controlplane.model import RuleSet, apply, load_text
from controlplane.model.queues import LOOSE_WAIT_MS, QueueLanes, plan_from_document, queue_plan
from testkit.rabbit import Broker
from tests.support.plane import Plane, api_opener
from tests.support.rabbit import rabbit  # noqa: F401 (the session fixture)
from tests.support.rules import chain, service
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def plan(fallback: str = "strict", queue: str | None = None) -> QueueLanes:
    """A queue `qNNNN` consumed by `ledger`; chain fund-yield's lane in `task` (its
    `fallback`), chain pricing's (loose) in `batch`. Unique names: the broker is shared."""
    queue = queue or f"q{uuid.uuid4().hex[:8]}"
    hop = "[{service: ledger, group: %s, queue: " + queue + "}]"
    text = (
        service("ledger", groups=("default", "task", "batch"))
        + chain("fund-yield", hop % "task", fallback=fallback)
        + chain("pricing", hop % "batch", fallback="loose", dye="{values: [pricing]}")
    )
    return queue_plan(apply(RuleSet.empty(), load_text(text, "test.yaml")))[queue]


class Consumer:
    """One group's consumer on its own connection: what it handled, with the dye current."""

    def __init__(
        self,
        broker: Broker,
        lanes: QueueLanes,
        group: str,
        forward: Callable[[queues.Delivery], None] | None = None,
        fail_on: frozenset[bytes] = frozenset(),
        **options: object,
    ):
        self.connection = pika.BlockingConnection(broker.parameters())
        self.handled: list[tuple[bytes, str | None]] = []
        self.deliveries: list[queues.Delivery] = []
        channel = self.connection.channel()
        queues.declare(channel, lanes)

        def handle(body: bytes) -> None:
            if body in fail_on:
                raise RuntimeError(f"cannot handle {body!r}")
            self.handled.append((body, propagation.current_dye()))

        def report(delivery: queues.Delivery) -> None:
            self.deliveries.append(delivery)
            if forward is not None:
                forward(delivery)

        queues.consume(channel, lanes, handle, group=group, report=report, **options)

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, seconds)

    def close(self) -> None:
        self.connection.close()


def publish_all(
    broker: Broker,
    lanes: QueueLanes,
    messages: list[tuple[bytes, str | None]],
    declare: bool = True,
):
    """Publish each body from a request carrying its dye (None: undyed), confirmed."""
    connection = pika.BlockingConnection(broker.parameters())
    channel = connection.channel()
    channel.confirm_delivery()
    if declare:
        queues.declare(channel, lanes)
    for body, dye in messages:
        with propagation.dye_scope(dye):
            queues.publish(channel, lanes, body)
    connection.close()


MIXED = [
    (b"online-1", None),
    (b"task-exact", "fund-yield"),
    (b"task-run", "fund-yield@r42"),  # claimed by prefix: routed by the chain header
    (b"batch", "pricing"),
    (b"unknown-dye", "no-chain"),  # a dye of no chain is online traffic, as over HTTP
    (b"online-2", None),
]


def test_each_lane_gets_only_its_chains_messages(rabbit: Broker) -> None:  # noqa: F811
    lanes = plan()
    groups = {group: Consumer(rabbit, lanes, group) for group in ("default", "task", "batch")}
    publish_all(rabbit, lanes, MIXED)
    want = {
        "default": {(b"online-1", None), (b"online-2", None), (b"unknown-dye", "no-chain")},
        "task": {(b"task-exact", "fund-yield"), (b"task-run", "fund-yield@r42")},
        "batch": {(b"batch", "pricing")},
    }
    for group, consumer in groups.items():
        consumer.run_until(lambda c=consumer, g=group: len(c.handled) >= len(want[g]))
    for consumer in groups.values():
        consumer.run_for(0.3)  # nothing more arrives
    try:
        assert {group: set(c.handled) for group, c in groups.items()} == want
        task = groups["task"].deliveries
        assert not any(d.fell_back or d.rejected for d in task)
    finally:
        for consumer in groups.values():
            consumer.close()


def test_strict_messages_wait_and_loose_ones_fall_back(rabbit: Broker) -> None:  # noqa: F811
    lanes = plan(fallback="strict")
    online = Consumer(rabbit, lanes, "default")  # no task or batch consumer is up
    publish_all(rabbit, lanes, [(b"strict", "fund-yield@r1"), (b"loose", "pricing")])
    online.run_until(lambda: len(online.handled) >= 1, timeout=LOOSE_WAIT_MS / 1000 + 10)
    online.run_for(LOOSE_WAIT_MS / 1000 + 0.5)
    assert online.handled == [(b"loose", "pricing")]
    (delivery,) = online.deliveries
    assert (delivery.dye, delivery.fell_back, delivery.group) == ("pricing", True, "default")
    online.close()
    # the strict chain's message waited for its group, which now takes it
    task = Consumer(rabbit, lanes, "task")
    task.run_until(lambda: len(task.handled) >= 1)
    task.close()
    assert task.handled == [(b"strict", "fund-yield@r1")]


def test_broken_dyes_are_stripped_or_rejected_and_counted(rabbit: Broker) -> None:  # noqa: F811
    lanes = plan()
    broken = ["a b", "x" * 300, "café", 7, "50%"]
    connection = pika.BlockingConnection(rabbit.parameters())
    channel = connection.channel()
    channel.confirm_delivery()
    queues.declare(channel, lanes)
    for trusted in (False, True):
        for value in broken:
            # user_id is checked by the broker: it is the publisher's own login
            properties = pika.BasicProperties(
                headers={"x-task-dye": value}, user_id="guest" if trusted else None
            )
            channel.basic_publish(lanes.queue, "", f"{trusted}:{value}".encode(), properties)
    with propagation.dye_scope(None):
        queues.publish(channel, lanes, b"after")
    connection.close()
    online = Consumer(rabbit, lanes, "default", trusted_users=frozenset({"guest"}))
    online.run_until(lambda: len(online.deliveries) >= 2 * len(broken) + 1)
    online.close()
    # untrusted: handled as undyed; trusted: rejected with the reason; the consumer went on
    assert online.handled == [(f"False:{v}".encode(), None) for v in broken] + [(b"after", None)]
    rejected = [d for d in online.deliveries if d.rejected]
    assert len(rejected) == len(broken) and all(d.bad_dye for d in rejected)
    assert sum(1 for d in online.deliveries if d.bad_dye) == 2 * len(broken)


def waiting(broker: Broker, queue: str) -> int:
    """How many messages `queue` holds (ready), as the broker says."""
    connection = pika.BlockingConnection(broker.parameters())
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def test_a_failing_handler_dead_letters_its_message_and_goes_on(rabbit: Broker) -> None:  # noqa: F811
    """pika: the handler's exception does not escape the consume loop, the message is not
    redelivered (no poison loop), the next one is handled and the failure is reported."""
    lanes = plan()
    online = Consumer(rabbit, lanes, "default", fail_on=frozenset({b"poison"}))
    publish_all(rabbit, lanes, [(b"poison", None), (b"after", None)])
    online.run_until(lambda: len(online.deliveries) >= 2)
    online.run_for(0.3)  # a redelivery would show up here
    online.close()
    assert online.handled == [(b"after", None)]
    assert [(d.failed, d.rejected) for d in online.deliveries] == [(True, False), (False, False)]
    assert waiting(rabbit, lanes.queue) == 0


def test_only_a_chains_own_dye_is_handled_in_its_lane(rabbit: Broker) -> None:  # noqa: F811
    """A lane message passed on from an undyed context goes to `default` undyed (the helper
    recomputes the headers); a chain header without that chain's dye, which the exchange routes
    into the lane, is refused there unhandled; a prefix dye published by hand without the
    chain header goes where the broker sends it, to the default queue."""
    lanes = plan()
    lane_message = {"x-task-dye": "fund-yield@r1", "x-tasklane-chain": "fund-yield"}
    connection = pika.BlockingConnection(rabbit.parameters())
    channel = connection.channel()
    channel.confirm_delivery()
    queues.declare(channel, lanes)
    with propagation.dye_scope(None):
        passed_on = pika.BasicProperties(headers=dict(lane_message), delivery_mode=2)
        queues.publish(channel, lanes, b"passed-on", passed_on)
    by_hand = {
        b"chain-only": {"x-tasklane-chain": "fund-yield"},
        b"stale-chain": {"x-task-dye": "pricing", "x-tasklane-chain": "fund-yield"},
        b"prefix-only": {"x-task-dye": "fund-yield@r2"},
    }
    for body, headers in by_hand.items():
        channel.basic_publish(lanes.queue, "", body, pika.BasicProperties(headers=headers))
    connection.close()
    groups = {group: Consumer(rabbit, lanes, group) for group in ("default", "task", "batch")}
    want = {"default": 2, "task": 2, "batch": 1}
    for group, consumer in groups.items():
        consumer.run_until(lambda c=consumer, n=want[group]: len(c.deliveries) >= n)
        consumer.run_for(0.3)
        consumer.close()
    assert sorted(groups["default"].handled) == [
        (b"passed-on", None),
        (b"prefix-only", "fund-yield@r2"),
    ]
    assert groups["task"].handled == [] and all(d.misrouted for d in groups["task"].deliveries)
    assert len(groups["task"].deliveries) == 2  # chain-only and stale-chain, both refused
    assert groups["batch"].handled == [(b"stale-chain", "pricing")]


def test_a_lanes_refused_message_is_no_fallback_in_default(rabbit: Broker) -> None:  # noqa: F811
    """A loose lane dead-letters what its consumer refused to `default` (RabbitMQ's x-death,
    reason `rejected`): `default` neither handles it nor counts it as a fallback."""
    lanes = plan()
    batch = Consumer(rabbit, lanes, "batch", fail_on=frozenset({b"pricing"}))
    online = Consumer(rabbit, lanes, "default")
    publish_all(rabbit, lanes, [(b"pricing", "pricing")])
    batch.run_until(lambda: len(batch.deliveries) >= 1)
    online.run_until(lambda: len(online.deliveries) >= 1)
    online.run_for(0.3)
    batch.close()
    online.close()
    assert [d.failed for d in batch.deliveries] == [True]
    assert online.handled == []
    assert [(d.fell_back, d.rejected) for d in online.deliveries] == [(False, True)]


def test_a_failing_async_handler_does_not_stall_the_consumer(rabbit: Broker) -> None:  # noqa: F811
    """aio-pika with prefetch 1: a handler that raised leaves no unacked message behind, so the
    next message is still delivered."""
    lanes = plan()
    reported: list[queues.Delivery] = []

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        async with await aio_pika.connect(rabbit.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await queues.declare_async(channel, lanes)

            async def handle(body: bytes) -> None:
                if body == b"poison":
                    raise RuntimeError("cannot handle it")
                got.append(body)

            await queues.consume_async(
                channel, lanes, handle, group="default", report=reported.append, prefetch=1
            )
            for body in (b"poison", b"after"):
                await queues.publish_async(channel, lanes, body)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.05)
        return got

    assert asyncio.run(scenario()) == [b"after"]
    assert [d.failed for d in reported] == [True, False]
    assert waiting(rabbit, lanes.queue) == 0


def test_a_chain_may_change_its_fallback(rabbit: Broker) -> None:  # noqa: F811
    """A strict chain turned loose: every app's declare still works (pika and aio-pika) and the
    chain's next message falls back to `default` after its wait."""
    strict = plan("strict")
    loose = plan("loose", strict.queue)
    connection = pika.BlockingConnection(rabbit.parameters())
    queues.declare(connection.channel(), strict)
    queues.declare(connection.channel(), loose)
    connection.close()

    async def declare_async() -> None:
        async with await aio_pika.connect(rabbit.url) as connection:
            await queues.declare_async(await connection.channel(), strict)

    asyncio.run(declare_async())
    online = Consumer(rabbit, loose, "default")
    publish_all(rabbit, loose, [(b"now-loose", "fund-yield@r1")])
    online.run_until(lambda: len(online.handled) >= 1, timeout=LOOSE_WAIT_MS / 1000 + 10)
    online.close()
    assert online.handled == [(b"now-loose", "fund-yield@r1")]
    assert [d.fell_back for d in online.deliveries] == [True]


def test_a_lane_made_otherwise_is_a_one_line_error(rabbit: Broker) -> None:  # noqa: F811
    lanes = plan()
    lane = lanes.lane_queue(lanes.lanes[0])
    connection = pika.BlockingConnection(rabbit.parameters())
    connection.channel().queue_declare(lane, durable=True, arguments={"x-max-length": 5})
    with pytest.raises(queues.TopologyMismatch) as mismatch:
        queues.declare(connection.channel(), lanes)
    connection.close()
    message = str(mismatch.value)
    assert message.startswith(f"queue '{lane}' exists on the broker with other arguments")
    assert "\n" not in message

    async def declare_async() -> None:
        async with await aio_pika.connect(rabbit.url) as connection:
            await queues.declare_async(await connection.channel(), lanes)

    with pytest.raises(queues.TopologyMismatch, match=f"queue '{lane}' exists"):
        asyncio.run(declare_async())


def declare_with(library: str, broker: Broker, lanes: QueueLanes) -> None:
    """Declare `lanes` with pika or aio-pika, on a connection of its own."""
    if library == "pika":
        connection = pika.BlockingConnection(broker.parameters())
        queues.declare(connection.channel(), lanes)
        connection.close()
        return

    async def declare() -> None:
        async with await aio_pika.connect(broker.url) as connection:
            await queues.declare_async(await connection.channel(), lanes)

    asyncio.run(declare())


@pytest.mark.parametrize("library", ["pika", "aio-pika"])
def test_a_new_plan_unbinds_what_left_and_drains_retired_lanes(
    rabbit: Broker,  # noqa: F811
    library: str,
) -> None:
    """Chain fund-yield leaves the queue and its dye value `fund-yield` moves to chain pricing:
    the next declare removes the old lane's bindings, publishes what waited in it again by the
    new plan (to `default`: no chain's dye now) and deletes it; a dye value that leaves a chain
    is unbound from its lane (its message goes to `default` at once, not after a loose wait)."""
    before = plan()
    text = service("ledger", groups=("default", "task", "batch")) + chain(
        "pricing",
        "[{service: ledger, group: batch, queue: " + before.queue + "}]",
        fallback="loose",
        dye="{values: [pricing, fund-yield]}",
    )
    after = queue_plan(apply(RuleSet.empty(), load_text(text, "test.yaml")))[before.queue]
    publish_all(rabbit, before, [(b"waiting", "fund-yield@r1")])  # no task consumer up
    declare_with(library, rabbit, after)
    connection = pika.BlockingConnection(rabbit.parameters())
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        connection.channel().queue_declare(before.lane_queue(before.lanes[0]), passive=True)
    connection.close()
    assert waiting(rabbit, before.queue) == 1  # drained to `default`
    publish_all(rabbit, after, [(b"moved", "fund-yield")], declare=False)
    batch = Consumer(rabbit, after, "batch")
    online = Consumer(rabbit, after, "default")
    batch.run_until(lambda: len(batch.handled) >= 1)
    online.run_until(lambda: len(online.handled) >= 1)
    for consumer in (batch, online):
        consumer.run_for(0.3)
        consumer.close()
    assert batch.handled == [(b"moved", "fund-yield")]
    assert online.handled == [(b"waiting", "fund-yield@r1")]
    # then the value `pricing` leaves chain pricing, whose lane stays: its binding goes
    later = dataclasses.replace(
        after, lanes=(dataclasses.replace(after.lanes[0], exact=("fund-yield",)),)
    )
    declare_with(library, rabbit, later)
    publish_all(rabbit, later, [(b"now-online", "pricing")], declare=False)
    online = Consumer(rabbit, later, "default")
    online.run_until(lambda: len(online.handled) >= 1, timeout=LOOSE_WAIT_MS / 1000 + 10)
    online.close()
    assert [(d.dye, d.fell_back) for d in online.deliveries] == [("pricing", False)]


@pytest.mark.parametrize("library", ["pika", "aio-pika"])
def test_a_retired_lane_deleted_by_hand_is_no_error(rabbit: Broker, library: str) -> None:  # noqa: F811
    before = plan()
    declare_with(library, rabbit, before)
    connection = pika.BlockingConnection(rabbit.parameters())
    connection.channel().queue_delete(before.lane_queue(before.lanes[0]))
    connection.close()
    after = dataclasses.replace(before, lanes=before.lanes[1:])  # fund-yield left the queue
    declare_with(library, rabbit, after)
    declare_with(library, rabbit, after)  # the record is the new plan's: nothing to retire
    publish_all(rabbit, after, [(b"pricing", "pricing")], declare=False)
    assert waiting(rabbit, after.lane_queue(after.lanes[0])) == 1


def test_a_full_lane_refuses_more(rabbit: Broker) -> None:  # noqa: F811
    """With no consumer a strict lane holds `max_waiting` messages; a confirming publisher is
    refused the next one, and `default`'s queue does not take it either."""
    lanes = dataclasses.replace(plan(), max_waiting=3)
    connection = pika.BlockingConnection(rabbit.parameters())
    channel = connection.channel()
    channel.confirm_delivery()
    queues.declare(channel, lanes)
    with propagation.dye_scope("fund-yield@r1"):
        for n in range(3):
            queues.publish(channel, lanes, str(n).encode())
        with pytest.raises(pika.exceptions.NackError):
            queues.publish(channel, lanes, b"one too many")
    connection.close()
    assert waiting(rabbit, lanes.lane_queue(lanes.lanes[0])) == 3
    assert waiting(rabbit, lanes.queue) == 0


def test_aio_pika_publishes_and_consumes_in_lanes(rabbit: Broker) -> None:  # noqa: F811
    lanes = plan()

    reported: list[queues.Delivery] = []

    async def scenario() -> list[tuple[str, bytes, str | None]]:
        connection = await aio_pika.connect(rabbit.url)
        got: list[tuple[str, bytes, str | None]] = []
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await queues.declare_async(channel, lanes)
            for group in ("default", "task"):

                async def handle(body: bytes, group: str = group) -> None:
                    got.append((group, body, propagation.current_dye()))

                await queues.consume_async(
                    channel, lanes, handle, group=group, report=reported.append
                )
            for body, dye in MIXED[:3]:
                with propagation.dye_scope(dye):
                    await queues.publish_async(channel, lanes, body)
            for _ in range(200):
                if len(got) >= 3:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        return got

    got = asyncio.run(scenario())
    assert sorted(got, key=repr) == sorted(
        [
            ("default", b"online-1", None),
            ("task", b"task-exact", "fund-yield"),
            ("task", b"task-run", "fund-yield@r42"),
        ],
        key=repr,
    )
    assert sorted((d.group, d.dye, d.rejected) for d in reported) == [
        ("default", None, False),
        ("task", "fund-yield", False),
        ("task", "fund-yield@r42", False),
    ]


def test_queue_hops_are_accounted_by_the_control_plane(
    rabbit: Broker,  # noqa: F811
    etcd_endpoint_module: str,
) -> None:
    """A real control plane serves the plan from the applied TaskChain, takes the consumers'
    reports and shows leaks, fallbacks, broken dyes and rates per queue hop."""
    queue = f"q{uuid.uuid4().hex[:8]}"
    hop = "[{service: ledger, group: %s, queue: " + queue + "}]"
    text = (
        service("ledger", groups=("default", "task", "batch"))
        + chain("fund-yield", hop % "task")
        + chain("pricing", hop % "batch", fallback="loose", dye="{values: [pricing]}")
    )
    plane = Plane(etcd_endpoint_module)
    try:
        assert plane.apply_files({"rules.yaml": text})[0] == 200
        status, document = wait_until(
            lambda: (answer := plane.request("GET", "/api/v1/queues"))[1]["queues"] and answer,
            timeout=10,
            what="the plan served",
        )
        lanes = plan_from_document(document)[queue]
        # a malformed report is refused whole, in one line, and counts nothing
        bad = {"deliveries": [{"queue": queue, "service": "ledger", "group": "task"}, {"queue": 5}]}
        assert plane.request("POST", "/api/v1/deliveries", bad) == (
            400,
            {"error": "deliveries[0].fell_back: missing required field"},
        )
        assert plane.request("POST", "/api/v1/deliveries", bad, headers={})[0] == 401
        reporter = queues.DeliveryReporter(plane.url, interval=0.1, token=plane.token)
        task = Consumer(rabbit, lanes, "task", reporter)
        online = Consumer(rabbit, lanes, "default", reporter)
        messages = [*MIXED, (b"loose", "pricing")]  # no batch consumer: pricing falls back
        publish_all(rabbit, lanes, messages)
        channel = online.connection.channel()
        channel.basic_publish(
            queue, "", b"bad", pika.BasicProperties(headers={"x-task-dye": "a b"})
        )
        want_online = 3 + 2 + 1  # undyed and no-chain, pricing twice, the bad one
        deadline = time.monotonic() + LOOSE_WAIT_MS / 1000 + 10
        while time.monotonic() < deadline and (
            len(task.handled) < 2 or len(online.handled) < want_online
        ):
            task.run_for(0.05)
            online.run_for(0.05)
        task.close()
        online.close()
        # a task-group consumer wired to the default queue by hand: its online message leaks
        publish_all(rabbit, lanes, [(b"online-3", None)])
        connection = pika.BlockingConnection(rabbit.parameters())
        _, properties, _ = wait_until(
            lambda: (got := connection.channel().basic_get(queue, auto_ack=True))[0] and got,
            timeout=10,
            what="the online message",
        )
        connection.close()
        reporter(queues.receive(lanes, "task", properties.headers))
        reporter.close()
        report = wait_until(
            lambda: (
                (r := plane.request("GET", "/api/v1/isolation")[1])["totals"]["queue_messages"] >= 9
                and r
            ),
            timeout=10,
            what="every delivery accounted",
        )
        with api_opener.open(plane.url + "/metrics", timeout=10) as answer:
            metrics = {
                (sample.name, sample.labels.get("chain"), sample.labels.get("group")): sample.value
                for family in text_string_to_metric_families(answer.read().decode())
                for sample in family.samples
                if sample.labels.get("queue") == queue
            }
    finally:
        plane.stop()
    rows = {(r["chain"], r["group"]): r for r in report["queues"] if r["queue"] == queue}
    assert rows[("fund-yield", "task")]["messages"] == 2
    assert rows[("fund-yield", "task")]["leaks"] == 0
    assert rows[("pricing", "default")]["fallbacks"] == {"no_consumer": 2}
    assert rows[("pricing", "default")]["leaks"] == 0
    assert rows[("", "task")]["leaks"] == 1
    assert rows[("", "default")]["bad_dyes"] == 1
    totals = report["totals"]
    assert (totals["queue_leaks"], totals["queue_fallbacks"], totals["queue_bad_dyes"]) == (1, 2, 1)
    assert metrics[("tasklane_queue_leaks_total", "", "task")] == 1
    assert metrics[("tasklane_queue_fallbacks_total", "pricing", "default")] == 2
    assert metrics[("tasklane_queue_messages_total", "fund-yield", "task")] == 2


def test_a_large_report_is_accounted_whole(etcd_endpoint_module: str) -> None:
    """12,000 deliveries (over aiohttp's 1 MiB default body and MAX_DELIVERIES) from one
    reporter flush all reach the accounting; a body that is not JSON gets the API's one
    message for it."""
    queue = f"q{uuid.uuid4().hex[:8]}"
    text = service("ledger", groups=("default", "task", "batch")) + chain(
        "fund-yield", "[{service: ledger, group: task, queue: " + queue + "}]"
    )
    plane = Plane(etcd_endpoint_module)
    try:
        assert plane.apply_files({"rules.yaml": text})[0] == 200
        request = urllib.request.Request(
            plane.url + "/api/v1/deliveries", b"{", plane.auth_headers(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            api_opener.open(request, timeout=10)
        error = json.loads(refused.value.read())["error"]
        assert (refused.value.code, error.split(":")[0]) == (400, "request body is not JSON")
        reporter = queues.DeliveryReporter(plane.url, interval=60, token=plane.token)
        dye = "fund-yield@" + "r" * 200  # long dyes: a big body
        for _ in range(12_000):
            reporter(queues.Delivery(queue, "ledger", "task", dye, False))
        reporter.close()
        totals = plane.request("GET", "/api/v1/isolation")[1]["totals"]
    finally:
        plane.stop()
    assert (totals["queue_messages"], reporter.dropped, reporter._pending) == (12_000, 0, [])


def test_a_dyed_request_publishes_a_dyed_message(rabbit: Broker) -> None:  # noqa: F811
    """An HTTP app behind the propagation middleware publishes while serving: the request's
    dye reaches the message headers and the lane, an undyed request's message the default
    queue."""
    lanes = plan()
    publisher = pika.BlockingConnection(rabbit.parameters())
    channel = publisher.channel()
    channel.confirm_delivery()
    queues.declare(channel, lanes)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        queues.publish(channel, lanes, environ["PATH_INFO"].encode())
        start_response("204 No Content", [])
        return []

    server = make_server("127.0.0.1", 0, propagation.WsgiMiddleware(app))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for path, headers in (("/dyed", {"x-task-dye": "fund-yield@r7"}), ("/online", {})):
            request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}{path}")
            for name, value in headers.items():
                request.add_header(name, value)
            with api_opener.open(request, timeout=10) as answer:
                assert answer.status == 204
    finally:
        server.shutdown()
        server.server_close()
        publisher.close()
    groups = {group: Consumer(rabbit, lanes, group) for group in ("default", "task")}
    for consumer in groups.values():
        consumer.run_until(lambda c=consumer: len(c.handled) >= 1)
        consumer.run_for(0.2)
        consumer.close()
    assert groups["task"].handled == [(b"/dyed", "fund-yield@r7")]
    assert groups["default"].handled == [(b"/online", None)]
