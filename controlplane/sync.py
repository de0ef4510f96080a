"""The loop that makes the snapshot cache follow etcd: rules + instances -> snapshots.

Watch threads only record the latest rules and instances and wake the loop; a burst of
changes (an apply, a scale-up of many instances) is coalesced into one build after DEBOUNCE.
The build is CPU work and runs in a worker thread; publishing touches the cache and the ADS
streams, so it runs on the event loop. A snapshot the cache refuses as inconsistent is logged
with its role and never reaches Envoy: that role's sidecars keep the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from controlplane.errors import StoreError
from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.model.rules import RuleSet
from controlplane.model.scope import Sighting, sighted_by_role
from controlplane.store.etcd import Store
from controlplane.store.registry import watch_instances
from controlplane.store.rules import Candidate, watch_rules
from controlplane.store.scope import watch_sightings
from controlplane.translate import Asked, Endpoints, Scopes, Translator
from controlplane.translate.unknown import unknown_role_snapshot
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.names import canary_view, split_canary, view_role
from controlplane.xds.snapshot import InconsistentSnapshot, Snapshot

log = logging.getLogger(__name__)

# Long enough to gather one apply's or one registration's events, short against a push.
DEBOUNCE = 0.03


def endpoints_of(instances: Iterable[Instance]) -> Endpoints:
    """The translator's endpoints: (service, group) -> addresses of the instances' sidecars."""
    out: dict[GroupKey, list[tuple[str, int]]] = {}
    for instance in instances:
        out.setdefault(instance.group_key, []).append(instance.address)
    return out


def full_views(cache: SnapshotCache) -> set[GroupKey]:
    """The roles whose state-of-the-world sidecars are connected: their full view is built."""
    out = set()
    for key in cache.watched():
        role, is_full = view_role(key)
        if is_full:
            out.add(GroupKey.parse(role))
    return out


class Sync:
    """Follows rules and instances in etcd and publishes every role's snapshot.

    Lives on the control plane's event loop: `start` and `stop` are called there, and
    `instance_keys` / `status()` describe the last build that was published.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        translator: Translator | None = None,
        debounce: float = DEBOUNCE,
        on_sighted: Callable[[GroupKey, str], None] | None = None,
        on_rollout: Callable[[Candidate | None, str], None] | None = None,
    ) -> None:
        """`on_sighted(role, service)`: a service joined a role's scope on demand; it is to
        be stored as a sighting (store/scope.py), which keeps it there from then on.
        `on_rollout(candidate, problem)` is told after each publish which rollout's candidate
        (or None) the published canary views hold, before the views of a rollout that ended
        go: the canary sidecars are moved then (canary.py). `problem` says why the candidate's
        views could not be built or were refused ("" when they were published): no sidecar
        is then to be moved to them, and the rollout is to be aborted."""
        self.cache = cache
        self.on_sighted = on_sighted
        self.on_rollout = on_rollout
        self.translator = translator or Translator()
        self.debounce = debounce
        self.instance_keys: frozenset[str] = frozenset()  # in the last published build
        self._rules: RuleSet | None = None
        self._candidate: Candidate | None = None  # a rollout's, built under canary views
        self._canary: tuple[str, Translator] | None = None  # (its generation, its translator)
        self._instances: dict[str, Instance] | None = None
        self._instances_revision = 0
        self._asked = Asked()  # hosts asked for on demand (translate/scope.py)
        self._sighted: dict[GroupKey, frozenset[str]] = {}  # from etcd (model/scope.py)
        self._roles: frozenset[str] = frozenset()
        self._dirty = asyncio.Event()
        self._published = asyncio.Condition()
        self._cancels: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._status: dict[str, Any] = {
            "builds": 0,
            "last_build_at": None,
            "last_build_ms": None,
            "roles": 0,
            "rules": 0,
            "instances": 0,
            "instances_revision": 0,
            "refused": {},
            "error": None,
        }

    async def start(self, store: Store) -> None:
        """Read the rules and instances, publish the first build, then follow changes.

        The first build is published before this returns, so a sidecar connecting as soon as
        the control plane serves gets its snapshot at once. StoreError if etcd does not answer.
        """
        self._loop = asyncio.get_running_loop()
        self.cache.on_new_watch = self._view_wanted
        try:
            self._cancels.append(await asyncio.to_thread(watch_rules, store, self._rules_changed))
            self._cancels.append(
                await asyncio.to_thread(watch_instances, store, self._instances_changed)
            )
            self._cancels.append(
                await asyncio.to_thread(watch_sightings, store, self._sightings_changed)
            )
        except BaseException:
            await self.stop()
            raise
        # The watches deliver their first read before returning; it was queued on this loop
        # ahead of the thread's completion, so both inputs are set now.
        await self._build_and_publish()
        self._task = asyncio.create_task(self._follow(), name="sync")

    async def stop(self) -> None:
        """Stop following etcd; the cache keeps the last published snapshots."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        cancels, self._cancels = self._cancels, []
        for cancel in cancels:
            try:
                await asyncio.to_thread(cancel)
            except StoreError as exc:  # etcd already gone: the watch is over anyway
                log.warning("%s", exc)

    @property
    def rules(self) -> RuleSet:
        """The rules as last read from etcd (what the last build used, or is about to)."""
        return self._rules if self._rules is not None else RuleSet.empty()

    @property
    def candidate(self) -> Candidate | None:
        """The candidate of the rollout in progress, as last read from etcd."""
        return self._candidate

    def status(self) -> dict[str, Any]:
        """The last build, for /api/v1/status."""
        return dict(self._status)

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait (bounded) until `condition` holds after a publish, e.g. until an instance is
        in or out of `instance_keys`; False on timeout."""
        async with self._published:
            try:
                await asyncio.wait_for(self._published.wait_for(condition), timeout)
            except TimeoutError:
                return False
        return True

    # --- the ADS server's OnDemand ----------------------------------------------------------

    def asked(self, node: str, role: str, authority: str) -> bool:
        """A Delta sidecar asked for `authority`, which its role's scope lacks: whether a host
        for it will come (with the next build)."""
        answer = self._asked.ask(self.rules, node, role, authority)
        if answer.joined is not None and self.on_sighted is not None:
            self.on_sighted(GroupKey.parse(role), answer.joined)
        if answer.changed:
            self._dirty.set()
        return answer.comes

    def gone(self, node: str) -> None:
        if self._asked.gone(node):
            self._dirty.set()

    def fallback(self, key: str) -> Snapshot | None:
        """What the streams of a snapshot key not built get: nothing yet for a role of the
        rules (its full view is on its way), else listeners that say the role is unknown."""
        role = view_role(key)[0]
        service, group = GroupKey.parse(role)
        known = self.rules.services.get(service)
        if known is not None and known.group(group) is not None:
            return None
        return unknown_role_snapshot(role)

    def _view_wanted(self, key: str) -> None:
        """A stream watches a snapshot not built yet: a full view is built for it."""
        if view_role(key)[1]:
            self._dirty.set()

    def _scopes(self) -> Scopes:
        return self._asked.scopes(self._sighted, full_views(self.cache))

    # --- called on watch threads -------------------------------------------------------------

    def _rules_changed(self, rules: RuleSet, candidate: Candidate | None) -> None:
        self._from_thread(self._set_rules, rules, candidate)

    def _instances_changed(self, instances: dict[str, Instance], revision: int) -> None:
        self._from_thread(self._set_instances, instances, revision)

    def _sightings_changed(self, sightings: list[Sighting]) -> None:
        self._from_thread(self._set_sightings, sighted_by_role(sightings))

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed while a watch was delivering
            log.debug("change arrived after the control plane stopped; ignored")

    # --- on the event loop -------------------------------------------------------------------

    def _set_rules(self, rules: RuleSet, candidate: Candidate | None) -> None:
        self._rules, self._candidate = rules, candidate
        self._dirty.set()

    def _set_sightings(self, sighted: dict[GroupKey, frozenset[str]]) -> None:
        self._sighted = sighted
        self._dirty.set()

    def _set_instances(self, instances: dict[str, Instance], revision: int) -> None:
        self._instances, self._instances_revision = instances, revision
        self._dirty.set()

    async def _follow(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)
            await self._build_and_publish()

    async def _build_and_publish(self) -> None:
        self._dirty.clear()
        rules, instances, candidate = self._rules, self._instances, self._candidate
        revision = self._instances_revision
        assert rules is not None and instances is not None, "both watches deliver a first read"
        started = time.monotonic()
        try:
            snapshots, canary_problem = await asyncio.to_thread(
                self._build, rules, candidate, endpoints_of(instances.values()), self._scopes()
            )
        except Exception as exc:  # a translator bug must not stop the sync
            log.exception("building the snapshots failed; the published ones stay")
            self._status["error"] = f"build failed: {exc}"
            return
        refused = self._publish(snapshots, candidate, canary_problem)
        self.instance_keys = frozenset(instances)
        self._status.update(
            builds=self._status["builds"] + 1,
            last_build_at=time.time(),
            last_build_ms=round((time.monotonic() - started) * 1000, 3),
            roles=len({view_role(key)[0] for key in snapshots}),
            rules=len(rules.all()),
            instances=len(instances),
            instances_revision=revision,
            refused=refused,
            error=None,
        )
        async with self._published:
            self._published.notify_all()

    def _build(
        self, rules: RuleSet, candidate: Candidate | None, endpoints: Endpoints, scopes: Scopes
    ) -> tuple[dict[str, Snapshot], str]:
        """Every view of the rules, and of a rollout's candidate under canary views (its own
        translator, so that each keeps what it built before); and why the candidate has no
        views ("" when it has them, or there is none)."""
        snapshots = self.translator.build(rules, endpoints, scopes)
        if candidate is None:
            self._canary = None
            return snapshots, ""
        generation = candidate.rollout.generation
        if self._canary is None or self._canary[0] != generation:
            self._canary = (generation, Translator(self.translator.outbound_policy))
        try:
            canary = self._canary[1].build(candidate.rules, endpoints, scopes)
        except Exception as exc:  # a translator bug on the candidate must not stop the rest
            log.exception("building the rollout's candidate failed")
            self._canary = None
            return snapshots, f"its build failed: {exc}"
        return snapshots | {canary_view(key): snapshot for key, snapshot in canary.items()}, ""

    def _publish(
        self, snapshots: dict[str, Snapshot], candidate: Candidate | None, canary_problem: str
    ) -> dict[str, str]:
        """Set every role's snapshot, forget roles that are gone; {role: why} of refusals.
        `canary_problem`: why the build has no views of the candidate."""
        refused: dict[str, str] = {}
        for role, outcome in self.cache.set_snapshots(snapshots).items():
            if isinstance(outcome, InconsistentSnapshot):
                log.error("snapshot of %s refused, its sidecars keep theirs: %s", role, outcome)
                refused[role] = str(outcome)
        problem = canary_problem or next(
            (f"its view {key} was refused: {why}" for key, why in refused.items()
             if split_canary(key)[1]),
            "",
        )  # fmt: skip
        if self.on_rollout is not None:
            self.on_rollout(candidate, problem)
        for role in self._roles - snapshots.keys():
            self.cache.clear_snapshot(role)
        self._roles = frozenset(snapshots)
        return refused
