"""Leader election among control-plane replicas through etcd leases: only the leader scales.

The recipe of etcd's own election (clientv3/concurrency): each candidate puts
`leader/<name>/<candidate id>` under a lease of its own, and the candidate whose key has the
lowest revision leads; the others wait in line, watching the prefix. A leader that dies stops
renewing its lease, etcd deletes its key one TTL later, and the next in line leads. A
candidate whose key is gone (lease expired, resigned, deleted by hand) puts it again, at the
back of the line.

Why not a single key created with "create_revision == 0": Store.txn cannot attach a lease to
a put, and a leader key without a lease would outlive a dead leader forever. Candidate keys
are only ever created, never rewritten, so the mod revision Store reports is their create
revision, which is what orders the line.

A leader also steps down by itself the moment it cannot be sure its lease is alive: etcd
receives each renewal after the client sent it, so the lease lives at least until
`sent + TTL`; past that without a newer renewal the key may be gone and another leader up.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from controlplane.errors import StoreError
from controlplane.store.etcd import Change, Lease, Store
from controlplane.store.follow import Follower

LEADER = "leader/"
DEFAULT_TTL = 5
# Renewals per TTL: three survive one lost or slow renewal without losing the lease.
RENEWALS_PER_TTL = 3

_log = logging.getLogger(__name__)

# key -> (revision, candidate id) of every candidate in line.
Candidates = dict[str, tuple[int, str]]


def candidate_id() -> str:
    """hostname:pid:random: says where a leader runs, and is unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Leadership:
    """One candidate for the leadership `name`; `start()` joins the line, `stop()` leaves it.

    `is_leader` is True only while this candidate's key is first in line and its lease surely
    alive. Callbacks given to `on_change` get the new value on every change, in order, from a
    background thread and under this object's lock: keep them short (set a flag, wake a
    task), and never call `resign()` or `stop()` from one.
    """

    def __init__(self, store: Store, name: str = "scaler", ttl: int = DEFAULT_TTL) -> None:
        self.store, self.name, self.ttl = store, name, ttl
        self.id = candidate_id()
        self.prefix = f"{LEADER}{name}/"
        self.key = self.prefix + self.id
        self._interval = ttl / RENEWALS_PER_TTL
        self._lock = threading.RLock()  # state below, and callbacks in order
        self._campaigning = threading.Lock()  # one lease/key writer at a time
        self._candidates: Candidates = {}
        self._lease: Lease | None = None
        self._revision: int | None = None  # of our key's latest put; None: not in line
        self._alive_until = 0.0  # monotonic time up to which our lease surely lives
        self._leader = False
        self._leader_id: str | None = None
        self._callbacks: list[Callable[[bool], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cancel_watch: Callable[[], None] | None = None

    @property
    def is_leader(self) -> bool:
        with self._lock:
            return self._leader and time.monotonic() < self._alive_until

    @property
    def leader_id(self) -> str | None:
        """The id of the candidate first in line (None: nobody), as this one last saw it."""
        with self._lock:
            return self._leader_id

    def to_json(self) -> dict:
        """For the status API: who this is and who leads."""
        return {
            "name": self.name,
            "id": self.id,
            "leader": self.is_leader,
            "leader_id": self.leader_id,
        }

    def on_change(self, callback: Callable[[bool], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def start(self) -> None:
        """Join the line and follow it; StoreError if etcd fails (nothing is left running)."""
        self._campaign()
        try:
            self._cancel_watch = Follower(
                self.store, self.prefix, self._read, _fold, self._seen
            ).start()
        except StoreError:
            self._leave()
            raise
        for target, label in ((self._keep_alive, "keepalive"), (self._watchdog, "watchdog")):
            thread = threading.Thread(target=target, name=f"leader {label} {self.name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def resign(self) -> None:
        """Hand over: step down now and delete our key, so the next in line leads. This
        candidate then joins the back of the line again (and leads if it is alone)."""
        with self._campaigning:
            with self._lock:
                self._revision = None
                self._evaluate()
            self.store.delete(self.key)
        self._wake.set()

    def stop(self) -> None:
        """Step down and leave the line; the next candidate leads at once. StoreError if etcd
        fails (our key then leaves with the lease, one TTL later)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._cancel_watch is not None:
            try:
                self._cancel_watch()
            except StoreError as exc:
                _log.warning("%s", exc)
            self._cancel_watch = None
        self._leave()

    def _leave(self) -> None:
        with self._lock:
            self._revision = None
            self._evaluate()
            lease, self._lease = self._lease, None
        if lease is not None:
            lease.revoke()  # deletes our key

    def _campaign(self, lease: Lease | None = None) -> None:
        """Put our key (under `lease`, or a fresh one): join the line at its back."""
        with self._campaigning:
            if self._stop.is_set():
                return
            sent = time.monotonic()
            if lease is None:
                lease = self.store.lease(self.ttl)
                alive_until = sent + lease.ttl
            else:
                alive_until = self._alive_until
            revision = self.store.put(self.key, self.id, lease=lease)
            with self._lock:
                self._lease, self._revision = lease, revision
                self._alive_until = alive_until
                self._evaluate()

    def _renew(self) -> None:
        """Refresh the lease; join the line again when it expired or our key is gone."""
        with self._campaigning:
            lease = self._lease
            if lease is None or self._stop.is_set():
                return
            sent = time.monotonic()
            ttl = lease.refresh()
            if ttl <= 0:
                _log.info("lease of %s expired; joining the line again", self.key)
                lease = None
            else:
                with self._lock:
                    self._alive_until = sent + ttl
                    self._evaluate()
                if self.store.mod_revision(self.key) != 0:
                    return
                _log.info("leader key %s is gone; joining the line again", self.key)
        self._campaign(lease)

    def _keep_alive(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._renew()
            except StoreError as exc:
                if not failing:
                    _log.warning("cannot renew leadership lease of %s (retrying): %s", self.id, exc)
                failing = True
                continue
            if failing:
                _log.info("leadership lease of %s renewed again", self.id)
            failing = False

    def _watchdog(self) -> None:
        """Step down when the lease may have expired, even while a renewal hangs on etcd."""
        while True:
            with self._lock:
                self._evaluate()
                left = self._alive_until - time.monotonic()
            wait = min(self._interval, left) if left > 0 else self._interval
            if self._stop.wait(max(wait, 0.01)):
                return

    def _read(self, store: Store) -> tuple[Candidates, int]:
        items, read_at = store.get_prefix(self.prefix)
        candidates: Candidates = {}
        for key, value in items.items():
            revision = store.mod_revision(key)  # 0: gone since the listing
            if revision:
                candidates[key] = (revision, value.decode(errors="replace"))
        return candidates, read_at

    def _seen(self, candidates: Candidates, _revision: int) -> None:
        with self._lock:
            self._candidates = candidates
            self._evaluate()
            missing = self._revision is not None and self.key not in candidates
        if missing:
            self._wake.set()  # the keep-alive checks etcd and puts our key back if it is gone

    def _evaluate(self) -> None:
        """Recompute who leads; call the callbacks when our own leadership changed.
        Holds self._lock."""
        # Our key counts only at the revision we last put it: an older sighting is a key
        # we have since resigned or lost.
        line = {
            key: entry
            for key, entry in self._candidates.items()
            if key != self.key or entry[0] == self._revision
        }
        first = min(line.values(), default=None)
        self._leader_id = None if first is None else first[1]
        leading = (
            first is not None
            and line.get(self.key) == first
            and time.monotonic() < self._alive_until
            and not self._stop.is_set()
        )
        if leading == self._leader:
            return
        self._leader = leading
        _log.info("%s %s leader of %s", self.id, "is now" if leading else "is no longer", self.name)
        for callback in list(self._callbacks):
            try:
                callback(leading)
            except Exception:
                _log.exception("leadership callback failed")


def _fold(candidates: Candidates, batch: list[Change]) -> Candidates:
    candidates = dict(candidates)
    for change in batch:
        if change.value is None:
            candidates.pop(change.key, None)
        else:
            candidates[change.key] = (change.revision, change.value.decode(errors="replace"))
    return candidates
