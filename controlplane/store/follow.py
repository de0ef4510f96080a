"""Following an etcd prefix through outages: read it, watch from that revision, and when the
watch breaks (etcd restarted, history compacted) read again and watch again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from controlplane.errors import StoreError
from controlplane.store.etcd import Change, Store

_log = logging.getLogger(__name__)

State = TypeVar("State")
Value = TypeVar("Value")

RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 2.0


class Follower(Generic[State]):
    """Keeps a state derived from one prefix current and hands each new state to `callback`.

    `read(store) -> (state, revision read at)` builds it from scratch; `apply(state, batch)`
    folds a batch of watched changes into a new state. Callbacks come from one thread at a
    time; keep them short.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        read: Callable[[Store], tuple[State, int]],
        apply: Callable[[State, list[Change]], State],
        callback: Callable[[State, int], None],
    ) -> None:
        self._store, self._prefix = store, prefix
        self._read, self._apply, self._callback = read, apply, callback
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._state: State | None = None
        self._cancel_watch: Callable[[], None] | None = None

    def start(self) -> Callable[[], None]:
        """The first read and watch (their errors, and the callback's, reach the caller);
        returns the cancel function."""
        revision = self._reload()
        self._callback(self._state, revision)
        self._watch(revision)
        return self.cancel

    def cancel(self) -> None:
        with self._lock:
            self._stopped.set()
            cancel, self._cancel_watch = self._cancel_watch, None
        if cancel is not None:
            cancel()

    def _reload(self) -> int:
        self._state, revision = self._read(self._store)
        return revision

    def _watch(self, read_at: int) -> None:
        cancel = self._store.watch_prefix(self._prefix, read_at + 1, self._changed, self._broken)
        with self._lock:
            if not self._stopped.is_set():
                self._cancel_watch = cancel
                return
        cancel()  # cancelled meanwhile

    def _changed(self, batch: list[Change]) -> None:
        self._state = self._apply(self._state, batch)
        self._callback(self._state, batch[-1].revision)

    def _broken(self, error: StoreError) -> None:
        """Runs on the store's watch thread, which cannot start a watch (pyetcd deadlocks):
        restart from another thread."""
        _log.warning("watch of %s broke, reading it again: %s", self._prefix, error)
        threading.Thread(target=self._restart, name="watch-restart", daemon=True).start()

    def _restart(self) -> None:
        delay = RETRY_DELAY
        while not self._stopped.wait(delay):
            try:
                revision = self._reload()
                try:
                    self._callback(self._state, revision)
                except Exception:
                    _log.exception("watch callback of %s failed; the watch goes on", self._prefix)
                self._watch(revision)
            except StoreError as exc:
                _log.warning("watch of %s: %s; retrying in %.1fs", self._prefix, exc, delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            return


def keyed_fold(
    decode: Callable[[str, bytes], Value | None],
) -> Callable[[dict[str, Value], list[Change]], dict[str, Value]]:
    """The `apply` of a Follower whose state is {key: decoded value}: a put replaces the
    key's value, a delete (or a value `decode` rejects, as None) removes it."""

    def fold(state: dict[str, Value], batch: list[Change]) -> dict[str, Value]:
        state = dict(state)
        for change in batch:
            value = None if change.value is None else decode(change.key, change.value)
            if value is None:
                state.pop(change.key, None)
            else:
                state[change.key] = value
        return state

    return fold
