"""Carry the dye through a message queue and keep each chain's messages in its lane (RabbitMQ,
with `pika` or `aio-pika`). The plan and its design are in `controlplane.model.queues`.

    lanes = plan["ledger-entries"]                    # from /api/v1/queues
    queues.declare(channel, lanes)                    # idempotent; any app may call it
    queues.publish(channel, lanes, body)              # the current dye goes in the headers
    queues.consume(channel, lanes, handle)            # this group's queues; handle(body) runs
                                                      # with the message's dye current

Every delivery is judged from its headers before the handler runs (`receive`): a dye that is
not a dye (malformed, longer than a dye may be) is stripped, and the message is handled as
undyed, unless its publisher is trusted (its broker-checked `user_id` is in `trusted_users`),
whose message is rejected with the reason instead: a trusted publisher sending a broken dye is
a bug to see, not to route around. Nothing a header holds can crash the consumer. Each
delivery's facts go to `report` (e.g. a `DeliveryReporter` posting them to the control plane,
whose accounting judges leaks and fallbacks per queue hop).

The broker libraries are imported only by the functions that use them.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from controlplane import lanes as app_lanes
from controlplane import propagation
from controlplane.model.dye import value_problem
from controlplane.model.queues import CHAIN_HEADER, LOOSE_WAIT_MS, QueueLanes

__all__ = [
    "Delivery",
    "DeliveryReporter",
    "TopologyMismatch",
    "consume",
    "consume_async",
    "declare",
    "declare_async",
    "publish",
    "publish_async",
    "publish_headers",
    "receive",
]

log = logging.getLogger(__name__)
Report = Callable[["Delivery"], None]


@dataclass(frozen=True)
class Delivery:
    """What one consumer received: the facts the accounting judges."""

    queue: str  # the work queue (the hop's `queue`)
    service: str
    group: str  # the consumer's group
    dye: str | None  # a valid dye, or None
    fell_back: bool  # expired from its own loose lane to `default` after waiting (x-death)
    bad_dye: str | None = None  # why the dye header was dropped
    rejected: bool = False  # not handled: a trusted publisher's bad dye, or misrouted
    misrouted: bool = False  # in a lane its dye is not of, or refused there already
    failed: bool = False  # the handler raised: dead-lettered, not requeued


# ---------------------------------------------------------------- topology


class TopologyMismatch(RuntimeError):
    """The broker holds a queue or exchange of this name declared with other arguments (made
    by another version of this module, or by hand): RabbitMQ refuses to redeclare it."""


Operation = tuple[str, str, str | None, dict[str, Any]]  # (what, name, exchange or kind, args)


def _topology(lanes: QueueLanes) -> list[Operation]:
    """What `declare` makes, in order: the fallback fanout and the headers exchange, the default
    queue, the lane queues and their bindings. A lane's arguments are the same whatever its
    chain's fallback (a loose chain's messages carry their wait as a per-message TTL), so a
    chain going from strict to loose or back redeclares cleanly: RabbitMQ refuses to change a
    queue's arguments. Every lane dead-letters to `default` (a loose message that waited out its
    group; a refused one, which `default` then refuses too) and holds at most `max_waiting`
    messages, refusing more (publishers with confirms get a nack)."""
    default, headers = lanes.default_exchange, {"alternate-exchange": lanes.default_exchange}
    operations: list[Operation] = [
        ("exchange", default, "fanout", {}),
        ("exchange", lanes.queue, "headers", headers),
        ("queue", lanes.queue, None, {}),
        ("bind", lanes.queue, default, {}),
        ("queue", _record_queue(lanes), None, {"x-max-length": 1}),
    ]
    lane_arguments = {
        "x-dead-letter-exchange": default,
        "x-max-length": lanes.max_waiting,
        "x-overflow": "reject-publish",
    }
    for lane in lanes.lanes:
        queue = lanes.lane_queue(lane)
        operations.append(("queue", queue, None, lane_arguments))
        match = [{CHAIN_HEADER: lane.chain}] + [{lane.header: value} for value in lane.exact]
        operations += [
            ("bind", queue, lanes.queue, {"x-match": "all-with-x", **one}) for one in match
        ]
    return operations


def _record_queue(lanes: QueueLanes) -> str:
    """Where `declare` keeps the lane bindings it made (one message), so the next plan's
    declare knows what to unbind: AMQP cannot list bindings. `:` is in no chain's name."""
    return f"{lanes.queue}:bindings"


def _lane_bindings(lanes: QueueLanes) -> list[list[Any]]:
    """[lane queue, binding arguments] of every binding on the queue's headers exchange."""
    return [
        [name, arguments]
        for what, name, exchange, arguments in _topology(lanes)
        if what == "bind" and exchange == lanes.queue
    ]


def _left(record: bytes | None, lanes: QueueLanes) -> tuple[list[list[Any]], list[str]]:
    """The bindings an earlier plan's declare recorded that this plan has not (a chain that
    left the queue, a dye value that left a chain), and the lane queues no lane has now."""
    try:
        recorded = json.loads(record or b"[]")
        recorded = [[q, a] for q, a in recorded if isinstance(q, str) and isinstance(a, dict)]
    except (ValueError, TypeError):  # not ours: nothing known to unbind
        recorded = []
    current = _lane_bindings(lanes)
    lane_queues = {lanes.lane_queue(lane) for lane in lanes.lanes}
    stale = [binding for binding in recorded if binding not in current]
    retired = sorted({queue for queue, _ in stale} - lane_queues)
    return stale, retired


def _retire(channel: Any, lanes: QueueLanes) -> None:
    """Unbind what an earlier plan bound and this one has not, and drain the lanes it retired:
    their waiting messages are published again through the queue's exchange (routed by this
    plan: to another chain's lane, or `default`), confirmed before they are acked, and the
    emptied queue is deleted. On its own channel, so a queue deleted by hand (404) does not
    close the caller's."""
    import pika.exceptions

    work = channel.connection.channel()
    work.confirm_delivery()
    record = _record_queue(lanes)
    method, _, body = work.basic_get(record)
    stale, retired = _left(body, lanes)
    for queue, arguments in stale:
        try:
            work.queue_unbind(queue, lanes.queue, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:  # NOT_FOUND: the queue is gone already
                raise
            work = channel.connection.channel()
            work.confirm_delivery()
            method = None  # the record went back to its queue with the closed channel
    for queue in retired:
        try:
            while (got := work.basic_get(queue))[0] is not None:
                got_method, properties, message = got
                dye = receive(lanes, "", properties.headers).dye
                properties.expiration = None  # its wait is the new lane's
                properties.user_id = None  # the broker checks it against our own login
                with propagation.dye_scope(dye):
                    publish(work, lanes, message, properties)
                work.basic_ack(got_method.delivery_tag)
            work.queue_delete(queue, if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            work = channel.connection.channel()
            work.confirm_delivery()
            method = None
    work.basic_publish("", record, json.dumps(_lane_bindings(lanes)).encode(), _persistent())
    if method is not None:
        work.basic_ack(method.delivery_tag)
    work.close()


# What a drained message keeps when aio-pika publishes it again (user_id must be the new
# publisher's own login, expiration is the new lane's).
_KEPT = ("content_type", "content_encoding", "correlation_id", "message_id", "reply_to")
_KEPT += ("type", "app_id", "priority", "timestamp", "delivery_mode")


async def _retire_async(channel: Any, lanes: QueueLanes) -> None:
    """`_retire` on an aio-pika channel (the caller's: aio-pika opens no side channel; with
    publisher confirms, its default, a drained message is confirmed before it is acked)."""
    import aio_pika
    import aiormq.exceptions

    record_queue = await channel.get_queue(_record_queue(lanes), ensure=False)
    record = await record_queue.get(fail=False)
    stale, retired = _left(None if record is None else record.body, lanes)
    for queue, arguments in stale:
        try:
            lane = await channel.get_queue(queue, ensure=False)
            await lane.unbind(lanes.queue, arguments=arguments)
        except aiormq.exceptions.ChannelNotFoundEntity:  # the queue is gone already
            await channel.reopen()
            record = None  # went back to its queue with the closed channel
    for queue in retired:
        try:
            lane = await channel.get_queue(queue, ensure=False)
            while (message := await lane.get(fail=False)) is not None:
                dye = receive(lanes, "", message.headers).dye
                kept = {name: getattr(message, name) for name in _KEPT}
                with propagation.dye_scope(dye):
                    await publish_async(
                        channel, lanes, message.body, headers=message.headers, **kept
                    )
                await message.ack()
            await lane.delete(if_unused=False, if_empty=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await channel.reopen()
            record = None
    bindings = json.dumps(_lane_bindings(lanes)).encode()
    persistent = aio_pika.DeliveryMode.PERSISTENT
    await channel.default_exchange.publish(
        aio_pika.Message(bindings, delivery_mode=persistent), routing_key=_record_queue(lanes)
    )
    if record is not None:
        await record.ack()


def _persistent() -> Any:
    import pika

    return pika.BasicProperties(delivery_mode=2)


def _mismatch(what: str, name: str, reply: str) -> TopologyMismatch:
    return TopologyMismatch(
        f"{what} {name!r} exists on the broker with other arguments ({reply}); drain and "
        "delete it (e.g. rabbitmqctl delete_queue) so that declare can make it anew"
    )


def declare(channel: Any, lanes: QueueLanes) -> None:
    """Declare the queue's exchanges, default queue and lanes on a pika channel (durable);
    TopologyMismatch if one exists with other arguments (the channel is closed then). Then
    remove what an earlier plan bound and this one has not, and drain retired lanes
    (`_retire`)."""
    import pika.exceptions

    for what, name, other, arguments in _topology(lanes):
        try:
            if what == "exchange":
                channel.exchange_declare(name, other, durable=True, arguments=arguments)
            elif what == "queue":
                channel.queue_declare(name, durable=True, arguments=arguments)
            else:
                channel.queue_bind(name, other, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED
                raise
            raise _mismatch(what, name, exc.reply_text) from None
    _retire(channel, lanes)


async def declare_async(channel: Any, lanes: QueueLanes) -> None:
    """`declare` on an aio-pika channel, retiring what an earlier plan bound too."""
    import aiormq.exceptions

    made: dict[str, Any] = {}
    for what, name, other, arguments in _topology(lanes):
        try:
            if what == "exchange":
                await channel.declare_exchange(name, other, durable=True, arguments=arguments)
            elif what == "queue":
                made[name] = await channel.declare_queue(name, durable=True, arguments=arguments)
            else:
                await made[name].bind(other, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _mismatch(what, name, str(exc)) from None
    await _retire_async(channel, lanes)


# ---------------------------------------------------------------- publishing


# Headers RabbitMQ writes when it dead-letters a message: a republished message must not carry
# them, or it would look dead-lettered from a lane it never waited in.
_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


def _dye_headers(lanes: QueueLanes) -> set[str]:
    return {lane.header for lane in lanes.lanes} or {propagation.DYE_HEADER}


def publish_headers(
    lanes: QueueLanes, headers: Mapping[str, Any] | None = None, dye: str | None = None
) -> dict[str, Any]:
    """The message headers to publish with: `headers` without any dye, chain or dead-letter
    header they carried (the headers of a message being passed on, say), plus the dye (default:
    the current one) under each lane's dye header, and the chain it names when a lane claims it
    by prefix. So an undyed context never publishes into a lane."""
    dye_headers = _dye_headers(lanes)
    lane_headers = dye_headers | {CHAIN_HEADER}
    out = {
        name: value
        for name, value in (headers or {}).items()
        if name not in lane_headers and not name.startswith(_DEATH_HEADERS)
    }
    dye = propagation.current_dye() if dye is None else dye
    if dye is None:
        return out
    for header in dye_headers:
        out[header] = dye
    lane = lanes.lane_of(out)
    if lane is not None and dye not in lane.exact:
        out[CHAIN_HEADER] = lane.chain
    return out


def _wait_ms(lanes: QueueLanes, headers: Mapping[str, Any]) -> int | None:
    """How long a message with these headers may wait in its lane: a loose chain's wait, else
    None (a strict chain's waits for its group; an online one is not in a lane)."""
    lane = lanes.lane_of(headers)
    return LOOSE_WAIT_MS if lane is not None and lane.fallback == "loose" else None


def publish(
    channel: Any, lanes: QueueLanes, body: bytes, properties: Any = None, dye: str | None = None
) -> None:
    """Publish `body` to the queue's exchange with the dye in its headers (pika); persistent
    unless `properties` say otherwise. Use a confirming channel for no loss across restarts
    (and to hear of a full lane: pika.exceptions.NackError)."""
    properties = properties or _persistent()
    properties.headers = publish_headers(lanes, properties.headers, dye)
    wait = _wait_ms(lanes, properties.headers)
    if wait is not None:
        properties.expiration = str(wait)
    channel.basic_publish(lanes.queue, "", body, properties)


async def publish_async(
    channel: Any, lanes: QueueLanes, body: bytes, dye: str | None = None, **message: Any
) -> None:
    """`publish` on an aio-pika channel; `message` are `aio_pika.Message` arguments."""
    import aio_pika

    message.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    message["headers"] = publish_headers(lanes, message.get("headers"), dye)
    wait = _wait_ms(lanes, message["headers"])
    if wait is not None:
        message["expiration"] = wait / 1000  # seconds
    exchange = await channel.get_exchange(lanes.queue, ensure=False)
    await exchange.publish(aio_pika.Message(body, **message), routing_key="")


# ---------------------------------------------------------------- consuming


def _dye_problem(value: object) -> str | None:
    """Why a dye header's value cannot be a dye, by the rules' grammar; None if it can."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return "not ASCII"
    if not isinstance(value, str):
        return f"a {type(value).__name__}, not a string"
    return value_problem(value)


def _last_death(headers: Mapping[str, Any]) -> tuple[str, str] | None:
    """(queue, reason) of the message's latest dead-lettering (RabbitMQ's `x-death`, newest
    first), or None."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], Mapping):
        return None
    queue, reason = deaths[0].get("queue"), deaths[0].get("reason")
    return (queue, reason) if isinstance(queue, str) and isinstance(reason, str) else None


def receive(
    lanes: QueueLanes,
    group: str,
    headers: Mapping[str, Any] | None,
    user_id: str | None = None,
    trusted_users: frozenset[str] = frozenset(),
    source: str | None = None,
) -> Delivery:
    """Judge one delivery's headers (pure): its dye, fallback and what was wrong. `source` is
    the queue it was consumed from: a lane queue hands over only its own chain's dyes (a chain
    header alone, or stale next to another chain's dye, routes a message there too), and the
    default queue does not handle a lane's message its lane refused (dead-lettered for a reason
    other than waiting out a loose lane)."""
    headers = dict(headers or {})
    dye, problem = None, None
    for name in sorted(_dye_headers(lanes)):
        if name not in headers:
            continue
        problem = _dye_problem(headers[name])
        if problem is None:
            dye = headers[name]
            dye = headers[name] = dye.decode("ascii") if isinstance(dye, bytes) else dye
            break
        headers.pop(name)
    lane = lanes.lane_of(headers) if dye is not None else None
    own = None if lane is None else lanes.lane_queue(lane)
    death = _last_death(headers)
    lane_queues = {lanes.lane_queue(each) for each in lanes.lanes}
    misrouted = (source is not None and source != lanes.queue and source != own) or (
        death is not None and death[0] in lane_queues and death[1] != "expired"
    )
    rejected = dye is None and problem is not None and user_id in trusted_users
    return Delivery(
        queue=lanes.queue,
        service=lanes.service,
        group=group,
        dye=dye,
        fell_back=death is not None and death == (own, "expired"),
        bad_dye=problem if dye is None else None,
        rejected=rejected or misrouted,
        misrouted=misrouted,
    )


def _settle(delivery: Delivery, error: Exception | None, report: Report | None) -> bool:
    """Report a delivery once its fate is known; True to ack it, False to dead-letter it (not
    requeued: a message its handler cannot take would come back forever, and with prefetch
    full of them the consumer would stall)."""
    if error is not None:
        log.error("the handler failed on a message of %s", delivery.queue, exc_info=error)
        delivery = replace(delivery, failed=True)
    elif delivery.misrouted:
        log.warning(
            "rejected a message on %s: not its lane's (dye %s)", delivery.queue, delivery.dye
        )
    elif delivery.rejected:
        log.warning("rejected a message on %s: its dye is %s", delivery.queue, delivery.bad_dye)
    if report is not None:
        try:
            report(delivery)
        except Exception:  # the accounting must not stop the work
            log.exception("could not report a delivery")
    return not (delivery.rejected or delivery.failed)


def consume(
    channel: Any,
    lanes: QueueLanes,
    handler: Callable[[bytes], None],
    *,
    group: str | None = None,
    report: Report | None = None,
    trusted_users: frozenset[str] = frozenset(),
    prefetch: int = 50,
) -> list[str]:
    """Consume this group's queues on a pika channel (manual acks); returns the consumer tags.
    `group` defaults to the instance's own (`TASKLANE_GROUP`)."""
    group = group or app_lanes.current_group()
    channel.basic_qos(prefetch_count=prefetch)

    def on_message(source: str, ch: Any, method: Any, properties: Any, body: bytes) -> None:
        headers, user_id = properties.headers, properties.user_id
        delivery = receive(lanes, group, headers, user_id, trusted_users, source)
        error = None
        if not delivery.rejected:
            with propagation.dye_scope(delivery.dye):
                try:
                    handler(body)
                except Exception as exc:
                    error = exc
        if _settle(delivery, error, report):
            ch.basic_ack(method.delivery_tag)
        else:
            ch.basic_reject(method.delivery_tag, requeue=False)

    return [
        channel.basic_consume(queue, functools.partial(on_message, queue))
        for queue in lanes.queues_for(group)
    ]


async def consume_async(
    channel: Any,
    lanes: QueueLanes,
    handler: Callable[[bytes], Awaitable[None]],
    *,
    group: str | None = None,
    report: Report | None = None,
    trusted_users: frozenset[str] = frozenset(),
    prefetch: int = 50,
) -> list[str]:
    """`consume` on an aio-pika channel with an async handler."""
    group = group or app_lanes.current_group()
    await channel.set_qos(prefetch_count=prefetch)

    async def on_message(source: str, message: Any) -> None:
        headers, user_id = message.headers, message.user_id
        delivery = receive(lanes, group, headers, user_id, trusted_users, source)
        error = None
        if not delivery.rejected:
            with propagation.dye_scope(delivery.dye):
                try:
                    await handler(message.body)
                except Exception as exc:
                    error = exc
        if _settle(delivery, error, report):
            await message.ack()
        else:
            await message.reject(requeue=False)

    tags = []
    for name in lanes.queues_for(group):
        queue = await channel.get_queue(name, ensure=False)
        tags.append(await queue.consume(functools.partial(on_message, name)))
    return tags


# ---------------------------------------------------------------- reporting


class DeliveryReporter:
    """Sends deliveries to the control plane (`POST /api/v1/deliveries`) in batches from a
    background thread, so a consumer never waits on the accounting; `close()` flushes.

    What could not be sent (the control plane away) is kept and sent later, up to
    `max_pending` deliveries; beyond that, and reports the control plane refuses (4xx), are
    dropped and counted in `dropped`, so a long outage costs bounded memory, never the work."""

    BATCH = 5_000  # deliveries per request: under the API's MAX_DELIVERIES and body limit

    def __init__(
        self,
        api: str,
        interval: float = 0.5,
        token: str | None = None,
        max_pending: int = 100_000,
    ) -> None:
        self.url = api.rstrip("/") + "/api/v1/deliveries"
        self.token = token
        self.interval = interval
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def __call__(self, delivery: Delivery) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
            else:
                self._pending.append(asdict(delivery))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        """Send what is pending; on a failure the rest stays pending for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.BATCH):
            batch = pending[start : start + self.BATCH]
            try:
                self._send(batch)
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    return self._keep(pending[start:], exc)
                log.warning("%s refused %d deliveries: %s", self.url, len(batch), exc)
                with self._lock:
                    self.dropped += len(batch)
            except Exception as exc:  # away, or anything else: the thread must go on
                return self._keep(pending[start:], exc)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url, json.dumps({"deliveries": batch}).encode(), headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()

    def _keep(self, unsent: list[dict[str, Any]], error: Exception) -> None:
        log.warning("could not report %d deliveries to %s: %s", len(unsent), self.url, error)
        with self._lock:
            kept = (unsent + self._pending)[: self.max_pending]
            self.dropped += len(unsent) + len(self._pending) - len(kept)
            self._pending = kept

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
