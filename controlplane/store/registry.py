"""The instance registry: one JSON document per running instance, kept alive by a lease.

An instance is at `instances/<service>/<group>/<id>` only while its lease is renewed, so a
process that dies without deregistering (SIGKILL, a lost host) disappears after the TTL
instead of receiving traffic forever. Callers learn the instances from `watch_instances`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from controlplane.errors import StoreError
from controlplane.model.instance import DEFAULT_TTL, INSTANCES, KEEPALIVE_INTERVAL, Instance
from controlplane.store.etcd import PREFIX, Lease, Store
from controlplane.store.follow import Follower, keyed_fold

_log = logging.getLogger(__name__)


def encode(instance: Instance) -> bytes:
    return json.dumps(instance.to_json(), separators=(",", ":")).encode()


class Registration:
    """An instance kept in the registry by a lease; `close()` removes it at once.

    With keepalive, a daemon thread renews the lease every KEEPALIVE_INTERVAL; without,
    the owner calls `renew()` (the HTTP API does, on each keep-alive of `tasklane run`) and the
    instance expires one TTL after the last renewal. Thread-safe: a renewal racing `close()`
    never brings the instance back.
    """

    def __init__(self, store: Store, instance: Instance, ttl: int) -> None:
        self.store, self.instance, self.ttl = store, instance, ttl
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewed_at = time.monotonic()
        self.lease = self._put()

    @property
    def lease_id(self) -> int:
        return self.lease.id

    def _put(self) -> Lease:
        lease = self.store.lease(self.ttl)
        self.store.put(self.instance.key, encode(self.instance), lease=lease)
        return lease

    def renew(self) -> bool:
        """Renew the lease; when it expired meanwhile (etcd unreachable for longer than the
        TTL), register again under a new one. False once closed. StoreError if etcd fails."""
        with self._lock:
            if self._closed:
                return False
            if self.lease.refresh() <= 0:
                _log.warning("lease of %s expired; registering it again", self.instance.key)
                self.lease = self._put()
            self.renewed_at = time.monotonic()
            return True

    def _start_keepalive(self) -> None:
        self._thread = threading.Thread(
            target=self._keepalive, name=f"keepalive {self.instance.key}", daemon=True
        )
        self._thread.start()

    def _keepalive(self) -> None:
        failing = False
        while not self._stop.wait(KEEPALIVE_INTERVAL):
            try:
                self.renew()
            except StoreError as exc:
                if not failing:
                    _log.warning("cannot renew %s (retrying): %s", self.instance.key, exc)
                failing = True
                continue
            if failing:
                _log.info("renewing %s again", self.instance.key)
            failing = False

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def abandon(self) -> None:
        """Stop renewing but leave the instance to expire one TTL later (its owner may
        register it again elsewhere meanwhile, under the same key)."""
        self._stop_renewing()
        with self._lock:
            self._closed = True

    def close(self) -> None:
        """Stop renewing and revoke the lease, which deletes the instance. Safe to call twice;
        StoreError if etcd does not answer (the instance then expires after the TTL)."""
        self._stop_renewing()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.lease.revoke()
            except StoreError:
                if self.lease.refresh() > 0:  # not merely expired already: report it
                    raise


def register(
    store: Store, instance: Instance, ttl: int = DEFAULT_TTL, keepalive: bool = True
) -> Registration:
    """Put `instance` in the registry under a new lease of `ttl` seconds."""
    registration = Registration(store, instance, ttl)
    if keepalive:
        registration._start_keepalive()
    return registration


def list_instances(store: Store) -> tuple[list[Instance], int]:
    """Every registered instance (by key), and the etcd revision they were read at."""
    items, revision = store.get_prefix(INSTANCES)
    decoded = (_decode(key, value) for key, value in sorted(items.items()))
    return [instance for instance in decoded if instance is not None], revision


InstancesCallback = Callable[[dict[str, Instance], int], None]


def watch_instances(store: Store, callback: InstancesCallback) -> Callable[[], None]:
    """Call `callback(instances by key, etcd revision)` now and after each change.

    Returns a cancel function. If the watch breaks (etcd restarted, history compacted) the
    instances are read again, passed to `callback`, and watched from there, retrying until
    etcd answers or the watch is cancelled. Callbacks come from one thread at a time and get
    a dict of their own. StoreError if etcd does not answer the first read.
    """
    return Follower(
        store,
        INSTANCES,
        _read_by_key,
        keyed_fold(_decode),
        lambda state, rev: callback(dict(state), rev),
    ).start()


def _read_by_key(store: Store) -> tuple[dict[str, Instance], int]:
    instances, revision = list_instances(store)
    return {instance.key: instance for instance in instances}, revision


def _decode(key: str, value: bytes) -> Instance | None:
    """The instance stored at `key`, or None (logged) when it holds something else: one bad
    key must not hide every other instance."""
    try:
        instance = Instance.from_json(json.loads(value))
    except ValueError as exc:
        _log.warning("ignoring etcd key %s%s: not an instance: %s", PREFIX, key, exc)
        return None
    if instance.key != key:
        _log.warning("ignoring etcd key %s%s: it holds %s", PREFIX, key, instance.key)
        return None
    return instance
