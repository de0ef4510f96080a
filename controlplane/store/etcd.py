"""The one place that talks to etcd (through pyetcd): keys, prefixes, watches, transactions.

Everything else in tasklane sees relative keys ('rules/Service/foo'), `Change` events and
`StoreError`; the `/tasklane/v1/` prefix, pyetcd and gRPC stay behind this module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pyetcd
from pyetcd.events import DeleteEvent
from pyetcd.exceptions import Etcd3Exception, RevisionCompactedError

from controlplane.errors import StoreError

PREFIX = "/tasklane/v1/"
# etcd's defaults, which an external etcd may keep: --max-txn-ops 128 operations per
# transaction and --max-request-bytes 1.5 MiB per request. Batches stay under both (the byte
# budget leaves room for keys and framing).
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024

_log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    # Talk to etcd directly even when http_proxy is set in the environment.
    ("grpc.enable_http_proxy", 0),
    # A full listing of rules or instances can exceed gRPC's default 4 MiB.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Change:
    """One key change seen by a watch; value None means the key was deleted."""

    key: str
    value: bytes | None
    revision: int


class RevisionCompacted(StoreError):
    """A watch asked for history etcd has compacted away; re-read with get_prefix instead."""

    def __init__(self, message: str, compacted_revision: int) -> None:
        super().__init__(message)
        self.compacted_revision = compacted_revision


class Lease:
    """An etcd lease; keys put with it vanish when it is revoked or not refreshed in time."""

    def __init__(self, store: Store, lease: pyetcd.Lease) -> None:
        self._store = store
        self._lease = lease
        self.id: int = lease.id
        self.ttl: int = lease.ttl

    def refresh(self) -> int:
        """Send one keep-alive; returns the new TTL (0: the lease has already expired)."""
        with self._store._errors("lease refresh"):
            responses = self._lease.refresh()
        return responses[-1].TTL if responses else 0

    def revoke(self) -> None:
        with self._store._errors("lease revoke"):
            self._lease.revoke()


WatchCallback = Callable[[list[Change]], None]
ErrorCallback = Callable[[StoreError], None]


class Store:
    """A connection to etcd, scoped to the tasklane key prefix. Thread-safe."""

    def __init__(self, client: pyetcd.MultiEndpointEtcd3Client, endpoint: str) -> None:
        self._client = client
        self.endpoint = endpoint
        self._closed = threading.Event()

    @classmethod
    def connect(cls, endpoint: str, timeout: float = 5.0) -> Store:
        """Open a client to 'host:port' and check etcd answers; StoreError if it does not."""
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"invalid etcd endpoint {endpoint!r}; expected HOST:PORT")
        # time_retry=0: pyetcd otherwise marks the endpoint failed for 300 s after a single
        # UNAVAILABLE and refuses every call meanwhile, even once etcd is back.
        ep = pyetcd.Endpoint(host, int(port), secure=False, time_retry=0, opts=_GRPC_OPTIONS)
        client = pyetcd.MultiEndpointEtcd3Client(endpoints=[ep], timeout=timeout)
        store = cls(client, endpoint)
        try:
            client.status()
        except (Etcd3Exception, grpc.RpcError) as exc:
            client.close()
            raise StoreError(f"cannot reach etcd at {endpoint}: {_reason(exc)}") from exc
        return store

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn any pyetcd/gRPC failure into StoreError, the store's one exception family."""
        try:
            yield
        except (Etcd3Exception, grpc.RpcError) as exc:
            raise StoreError(f"etcd {action} at {self.endpoint} failed: {_reason(exc)}") from exc

    def put(self, key: str, value: bytes | str, lease: Lease | None = None) -> int:
        """Write one key; returns the store revision of the write."""
        with self._errors(f"put {key}"):
            resp = self._client.put(PREFIX + key, value, lease=lease)
        return resp.header.revision

    def get(self, key: str) -> bytes | None:
        with self._errors(f"get {key}"):
            value, _ = self._client.get(PREFIX + key)
        return value

    def mod_revision(self, key: str) -> int:
        """The revision of the key's last write (0 when absent): what a txn guard compares."""
        return self.get_versioned(key)[1]

    def get_versioned(self, key: str) -> tuple[bytes | None, int]:
        """The value and its mod revision (None, 0 when absent), read together, so a txn
        guarded by that revision changes the key only if it still holds what was read."""
        with self._errors(f"get {key}"):
            value, meta = self._client.get(PREFIX + key)
        return (value, meta.mod_revision) if value is not None else (None, 0)

    def entry(self, key: str) -> tuple[bytes | None, int, int]:
        """(value or None, its mod revision or 0, the revision the read was made at)."""
        with self._errors(f"get {key}"):
            resp = self._client.get_response(PREFIX + key)
        if not resp.kvs:
            return None, 0, resp.header.revision
        return resp.kvs[0].value, resp.kvs[0].mod_revision, resp.header.revision

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The values of the keys that exist, read MAX_TXN_OPS at a time (so not at one
        revision: for keys whose values never change, like content-addressed ones)."""
        tx = self._client.transactions
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), MAX_TXN_OPS):
            ops = [tx.get(PREFIX + key) for key in keys[start : start + MAX_TXN_OPS]]
            with self._errors(f"get {len(ops)} keys"):
                _, responses = self._client.transaction(compare=[], success=ops, failure=[])
            for kvs in responses:
                for value, meta in kvs:
                    found[_relative(meta.key)] = value
        return found

    def keys(self, prefix: str) -> list[str]:
        """The keys under prefix, without their values, in key order."""
        with self._errors(f"get {prefix}* keys"):
            resp = self._client.get_prefix_response(PREFIX + prefix, keys_only=True)
        return [_relative(kv.key) for kv in resp.kvs]

    def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """All keys under prefix, plus the revision they were read at (watch from rev + 1)."""
        with self._errors(f"get {prefix}*"):
            resp = self._client.get_prefix_response(PREFIX + prefix)
        items = {_relative(kv.key): kv.value for kv in resp.kvs}
        return items, resp.header.revision

    def delete(self, key: str) -> bool:
        """Delete one key; False if it did not exist."""
        with self._errors(f"delete {key}"):
            return bool(self._client.delete(PREFIX + key))

    def txn(
        self,
        puts: dict[str, bytes],
        deletes: list[str],
        expect_revisions: dict[str, int] | None = None,
    ) -> bool:
        """Apply all puts and deletes atomically, or nothing.

        expect_revisions maps key -> the mod revision it must still have (0: must not exist);
        if any differs the transaction changes nothing and returns False. etcd caps a
        transaction at --max-txn-ops operations (128 by default).
        """
        tx = self._client.transactions
        compare = [tx.mod(PREFIX + k) == rev for k, rev in (expect_revisions or {}).items()]
        ops = [tx.put(PREFIX + k, v) for k, v in puts.items()]
        ops += [tx.delete(PREFIX + k) for k in deletes]
        with self._errors("transaction"):
            succeeded, _ = self._client.transaction(compare=compare, success=ops, failure=[])
        return bool(succeeded)

    def txn_batches(
        self,
        puts: dict[str, bytes],
        deletes: list[str],
        expect_revisions: dict[str, int] | None = None,
    ) -> bool:
        """Write puts and deletes in as many transactions as etcd's limits need, each one
        guarded by expect_revisions: atomic per batch, not as a whole. False at the first
        batch whose guard failed (later batches are not sent)."""
        guard = expect_revisions or {}
        ops: list[tuple[str, bytes | None]] = [*puts.items(), *((key, None) for key in deletes)]
        batch: list[tuple[str, bytes | None]] = []
        size = 0
        for key, value in ops:
            cost = len(key) + len(value or b"")
            if batch and (len(batch) == MAX_TXN_OPS or size + cost > MAX_TXN_BYTES):
                if not self._txn_batch(batch, guard):
                    return False
                batch, size = [], 0
            batch.append((key, value))
            size += cost
        return not batch or self._txn_batch(batch, guard)

    def _txn_batch(self, batch: list[tuple[str, bytes | None]], guard: dict[str, int]) -> bool:
        puts = {key: value for key, value in batch if value is not None}
        return self.txn(puts, [key for key, value in batch if value is None], guard)

    def lease(self, ttl: int) -> Lease:
        """Grant a lease of ttl seconds (for instance registration and leader election)."""
        with self._errors("lease grant"):
            return Lease(self, self._client.lease(ttl))

    def watch_prefix(
        self,
        prefix: str,
        start_revision: int | None,
        callback: WatchCallback,
        on_error: ErrorCallback | None = None,
    ) -> Callable[[], None]:
        """Call callback with each batch of changes under prefix; returns a cancel function.

        start_revision replays history from that revision (use get_prefix's revision + 1 to
        miss nothing); None starts from now. Callbacks run on pyetcd's single watch thread,
        so keep them short. If the watch ends for any reason other than cancel (etcd gone,
        history compacted: RevisionCompacted), on_error is called once and no more changes
        follow; the caller re-reads and watches again.
        """
        ended = threading.Event()

        def fail(err: StoreError) -> None:
            if ended.is_set():
                return
            ended.set()
            if self._closed.is_set():
                return
            if on_error is not None:
                on_error(err)
            else:
                _log.warning("watch on %s%s ended: %s", PREFIX, prefix, err)

        def handle(resp: object) -> None:
            if ended.is_set():
                return
            if isinstance(resp, RevisionCompactedError):
                rev = resp.compacted_revision
                fail(RevisionCompacted(f"etcd history compacted up to revision {rev}", rev))
            elif isinstance(resp, BaseException):
                fail(StoreError(f"watch on {prefix} at {self.endpoint} broke: {_reason(resp)}"))
            elif resp is None:  # pyetcd closed the stream (store closed or a call failed)
                fail(StoreError(f"watch on {prefix} at {self.endpoint} was closed"))
            else:
                changes = [_change(ev) for ev in resp.events]
                if changes:
                    callback(changes)

        with self._errors(f"watch {prefix}*"):
            watch_id = self._client.add_watch_prefix_callback(
                PREFIX + prefix, handle, start_revision=start_revision
            )

        def cancel() -> None:
            if ended.is_set():
                return
            ended.set()
            with self._errors("cancel watch"):
                self._client.cancel_watch(watch_id)

        return cancel

    def close(self) -> None:
        """Close the gRPC channel; active watches end without calling on_error."""
        self._closed.set()
        with self._errors("close"):
            self._client.close()


def _relative(key: bytes) -> str:
    return key.decode()[len(PREFIX) :]


def _change(event: pyetcd.events.Event) -> Change:
    value = None if isinstance(event, DeleteEvent) else event.value
    return Change(key=_relative(event.key), value=value, revision=event.mod_revision)


def _reason(exc: BaseException) -> str:
    """A short, human reason: pyetcd hides the gRPC status in __context__, so look there."""
    for candidate in (exc, exc.__context__):
        if isinstance(candidate, grpc.RpcError) and hasattr(candidate, "code"):
            return f"{candidate.code().name.lower()}: {candidate.details()}"
    return str(exc) or type(exc).__name__
