"""Actuators: what turns the scaler's decisions into running instances.

The policy decides *how many* instances each (service, group) needs; an actuator makes it so
and reports what is really there. One contract, three implementations:

- `DryRunActuator` (here): records the decisions and acts on nothing, for `--actuator
  dry-run`, the simulator's checks and tests;
- `LocalActuator` (`local`): `tasklane run` processes on this machine, with keep-alive
  (parked instances resume in a fraction of a cold start);
- `KubernetesActuator` (`kubernetes`): the scale subresource of one Deployment per group.

Every `scale()` is idempotent (the scaler repeats its decision each sync period) and
non-blocking (it returns once the change is under way; `observe()` shows its progress).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from controlplane.errors import TasklaneError
from controlplane.model.group import GroupKey
from controlplane.model.rules import Service
from controlplane.scaler.policy import Decision
from controlplane.scaler.signals import Readings

# The decisions a DryRunActuator keeps, newest last: a week of one decision a minute for a
# few groups, without growing forever in a long-running control plane.
DECISIONS_KEPT = 10_000


class ActuatorError(TasklaneError):
    """A decision cannot be carried out (unknown group, no way to start it, API refused)."""


@dataclass(frozen=True)
class GroupReplicas:
    """What an actuator sees of one group: serving, on the way, and parked (keep-alive:
    not serving, resumable much faster than a start)."""

    ready: int
    starting: int
    parked: int = 0


class Actuator(Protocol):
    """The contract between the scaler and whatever runs instances."""

    name: str
    parks: bool  # can keep instances parked (keep()); the policy then waits on resumes

    def observe(self) -> dict[GroupKey, GroupReplicas]:
        """The groups this actuator manages and their replicas now."""
        ...

    def scale(self, service: str, group: str, replicas: int, reason: str) -> None:
        """Make the group have `replicas` instances; idempotent, returns once under way.
        ActuatorError when it cannot be done at all."""
        ...

    def start_durations(self) -> dict[GroupKey, list[float]]:
        """Recent measured seconds from start to ready per group, oldest first (the
        policy's lead); groups without a measured start are absent."""
        ...

    def keep(self, pools: Mapping[GroupKey, int]) -> None:
        """How many instances each group may keep parked when it goes down, beyond the
        actuator's own keep-alive (the policy's pools for extra runs). Actuators that cannot
        park ignore it."""
        ...

    def readings(self, groups: set[GroupKey], services: Mapping[str, Service]) -> Readings:
        """Requests in flight, CPU, memory and saturation of the instances of `groups` that
        only this actuator can read (pods: their sidecars' ready ports, the Metrics API); []
        where the control plane's host reads them itself (inflight, signals.LocalSignals:
        its own processes)."""
        ...

    def close(self) -> None:
        """Stop everything this actuator started (a no-op where it owns nothing)."""
        ...


def check_replicas(replicas: int) -> None:
    """ActuatorError for a replica count no actuator can carry out."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ActuatorError(f"replicas must be a whole number >= 0, got {replicas!r}")


class DryRunActuator:
    """Records each scale() call as a policy Decision (`at` from its clock) and acts on
    nothing; each group is reported ready at the count it was last scaled to, as if every
    change took effect at once."""

    name = "dry-run"
    parks = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._replicas: dict[GroupKey, int] = {}

    @property
    def decisions(self) -> list[Decision]:
        """The recorded decisions, oldest first (at most DECISIONS_KEPT)."""
        with self._lock:
            return list(self._decisions)

    def observe(self) -> dict[GroupKey, GroupReplicas]:
        with self._lock:
            return {key: GroupReplicas(ready=n, starting=0) for key, n in self._replicas.items()}

    def scale(self, service: str, group: str, replicas: int, reason: str) -> None:
        check_replicas(replicas)
        with self._lock:
            self._decisions.append(Decision(service, group, replicas, reason, self._clock()))
            self._replicas[service, group] = replicas

    def start_durations(self) -> dict[GroupKey, list[float]]:
        return {}

    def keep(self, pools: Mapping[GroupKey, int]) -> None:
        """Nothing to park."""

    def readings(self, groups: set[GroupKey], services: Mapping[str, Service]) -> Readings:
        """Nothing runs."""
        return []

    def close(self) -> None:
        """Nothing was started."""
