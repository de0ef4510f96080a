"""The local actuator: a group's instances are `tasklane run` processes on this machine.

Each instance is `python -m controlplane run --server URL --service S --group G -- CMD`, CMD
being the Service's `spec.run.command` (with `spec.run.env`), so it gets a real Envoy sidecar
and registers through the control plane's API like any instance started by hand (with the
API token in $TASKLANE_TOKEN; `tasklane run` keeps it from CMD). An instance is ready once it
is registered (GET /api/v1/instances): `tasklane run` registers only after the sidecar sees
the app healthy, and the API answers only once callers were told.

Scaling down takes the newest instances first (the oldest have proven themselves and hold
warm caches). Up to `keep_alive` of them per group (or the policy's pool for the group, see
keep(), when larger) are parked instead of stopped (SIGUSR1: deregistered, then app and Envoy
SIGSTOPped, see runtime/sidecar.py) and scaling up resumes parked ones (SIGUSR2) before
starting new ones. A group whose pool is not full starts instances cold and parks them once
registered, so an extra run no cron announced finds them. The rest get SIGTERM: `tasklane run`
deregisters first, then stops its app and Envoy.

All processes are started, signalled and reaped by one worker thread that lives until
close(): the kernel's parent-death signal (PR_SET_PDEATHSIG, see runtime/process.py) follows
the *thread* that forked, so children started from a short-lived thread (an executor's, the
caller's of scale()) would be killed when that thread ends.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet, RunSpec, Service
from controlplane.runtime.process import dying_with_parent
from controlplane.scaler.actuators import (
    ActuatorError,
    GroupReplicas,
    check_replicas,
)
from controlplane.scaler.signals import Readings

log = logging.getLogger("tasklane.actuator.local")

# Start-to-ready durations kept per group for the policy's lead (its p95 needs a few).
DURATIONS_KEPT = 20
# How often the worker looks at its instances while some change state, and otherwise.
BUSY_POLL = 0.1
IDLE_POLL = 1.0
# `tasklane run` gets this long after SIGTERM (deregister, app, Envoy) before SIGKILL.
STOP_GRACE = 20.0
# After a start that exited before it was ready, the group waits this long before the next
# start, doubling up to the maximum: a broken command must not fork in a tight loop.
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
API_TIMEOUT = 5.0
# How each `tasklane run` child gets the API token it registers with (see api/auth.py).
TOKEN_ENV = "TASKLANE_TOKEN"

_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class State(enum.Enum):
    """Where one instance is, as far as this actuator has seen; the registry decides when a
    signalled change has taken effect."""

    STARTING = "starting"  # `tasklane run` started, not registered yet
    READY = "ready"  # registered: callers route to it
    PARKING = "parking"  # SIGUSR1 sent, still registered
    PARKED = "parked"  # deregistered; app and Envoy stopped (or about to be)
    RESUMING = "resuming"  # SIGUSR2 sent, not registered again yet
    STOPPING = "stopping"  # SIGTERM sent


_ACTIVE = (State.STARTING, State.READY, State.RESUMING)  # count towards the desired replicas
_WAITING = (State.STARTING, State.PARKING, State.RESUMING)  # wait for the registry to change


@dataclass
class _Instance:
    """One `tasklane run` process this actuator started."""

    seq: int  # start order: higher is newer
    key: GroupKey
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float  # monotonic
    state: State = State.STARTING
    since: float = field(default_factory=time.monotonic)  # when `state` was entered
    instance_id: str | None = None  # its registry id, once seen registered
    to_park: bool = False  # started to fill the group's pool: parked once registered

    def move(self, state: State, signum: int | None = None) -> None:
        if signum is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
        self.state, self.since = state, time.monotonic()


class LocalActuator:
    """Runs each group's instances as `tasklane run` children of this process.

    `rules_provider` gives the current rules (for each Service's `spec.run`); `work_dir`
    receives one log file per instance; `api_token` is the control plane's, for the writes
    (register, keep-alive) of the instances. Construct it from any thread; close() stops every
    instance it started, politely (SIGTERM, parked ones are resumed to exit cleanly).
    """

    name = "local"
    parks = True

    def __init__(
        self,
        server_url: str,
        rules_provider: Callable[[], RuleSet],
        work_dir: Path,
        keep_alive: int = 1,
        *,
        api_token: str,
    ) -> None:
        if keep_alive < 0:
            raise ActuatorError(f"keep_alive must not be negative, got {keep_alive}")
        self.server_url = server_url.rstrip("/")
        self.rules_provider = rules_provider
        self.work_dir = Path(work_dir)
        self.keep_alive = keep_alive
        self._pools: dict[GroupKey, int] = {}  # the policy's, per group, above keep_alive
        self._api_token = api_token
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._desired: dict[GroupKey, int] = {}
        self._instances: list[_Instance] = []
        self._durations: dict[GroupKey, deque[float]] = {}
        self._retry_at: dict[GroupKey, tuple[float, float]] = {}  # (not before, next delay)
        self._seq = 0
        self._worker = threading.Thread(target=self._work, name="local-actuator", daemon=True)
        self._worker.start()

    # --- the Actuator contract (any thread) ---------------------------------------------

    def observe(self) -> dict[GroupKey, GroupReplicas]:
        with self._lock:
            keys = set(self._desired) | {instance.key for instance in self._instances}
            counts = {key: {state: 0 for state in State} for key in keys}
            for instance in self._instances:
                counts[instance.key][instance.state] += 1
        return {
            key: GroupReplicas(
                ready=count[State.READY],
                starting=count[State.STARTING] + count[State.RESUMING],
                parked=count[State.PARKED] + count[State.PARKING],
            )
            for key, count in counts.items()
        }

    def scale(self, service: str, group: str, replicas: int, reason: str) -> None:
        """ActuatorError when the service or group is unknown or the service has no
        `spec.run` (nothing to start); the change itself happens in the worker thread."""
        check_replicas(replicas)
        if replicas > 0:
            self._run_spec(service, group)
        with self._lock:
            if self._closing:
                raise ActuatorError("the local actuator is closed")
            if self._desired.get((service, group)) != replicas:
                log.info("%s|%s -> %d replicas: %s", service, group, replicas, reason)
            self._desired[service, group] = replicas
        self._wake.set()

    def keep(self, pools: Mapping[GroupKey, int]) -> None:
        with self._lock:
            self._pools = dict(pools)

    def readings(self, groups: set[GroupKey], services: Mapping[str, Service]) -> Readings:
        """Its instances run on this host: signals.LocalSignals reads them."""
        return []

    def start_durations(self) -> dict[GroupKey, list[float]]:
        """Cold starts only (`tasklane run` started -> registered): a resume is far faster
        and would make the lead too short for the instances that must start cold."""
        with self._lock:
            return {key: list(durations) for key, durations in self._durations.items()}

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake.set()
        self._worker.join()

    # --- the worker thread --------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                self._wake.clear()  # before the step: a scale() during it wakes the next one
                try:
                    busy = self._step()
                except Exception:  # a bug or a failed fork must not end the actuator
                    log.exception("local actuator step failed; trying again")
                    busy = False
                self._wake.wait(BUSY_POLL if busy else IDLE_POLL)
        finally:
            self._stop_all()

    def _step(self) -> bool:
        """One look at the instances and one round of changes; True while something is in
        transition (poll again soon)."""
        self._reap()
        with self._lock:
            waiting = [i for i in self._instances if i.state in _WAITING]
        if waiting:
            self._follow_registry(waiting)
        now = time.monotonic()
        for instance in self._instances_in(State.STOPPING):
            if now - instance.since > STOP_GRACE:
                log.warning("%s did not stop in %gs: killing it", _label(instance), STOP_GRACE)
                instance.proc.kill()
        with self._lock:
            desired = dict(self._desired)
        for key, replicas in desired.items():
            self._reconcile(key, replicas)
        with self._lock:
            return any(i.state in (*_WAITING, State.STOPPING) for i in self._instances)

    def _instances_in(self, *states: State) -> list[_Instance]:
        with self._lock:
            return [instance for instance in self._instances if instance.state in states]

    def _reap(self) -> None:
        """Forget exited processes; an exit before ready delays the group's next start."""
        with self._lock:
            exited = [i for i in self._instances if i.proc.poll() is not None]
            self._instances = [i for i in self._instances if i not in exited]
        for instance in exited:
            code = instance.proc.returncode
            if instance.state is State.STOPPING:
                log.info("%s stopped (exit code %d)", _label(instance), code)
                continue
            delay = self._retry_delay(instance.key) if instance.state is State.STARTING else 0
            log.warning(
                "%s exited with code %d while %s%s; its log %s ends:\n%s",
                _label(instance),
                code,
                instance.state.value,
                f" (next start in {delay:g}s)" if delay else "",
                instance.log_path,
                _tail(instance.log_path),
            )

    def _retry_delay(self, key: GroupKey) -> float:
        with self._lock:
            _, delay = self._retry_at.get(key, (0.0, RETRY_FIRST))
            self._retry_at[key] = (time.monotonic() + delay, min(delay * 2, RETRY_MAX))
        return delay

    def _follow_registry(self, waiting: list[_Instance]) -> None:
        """Move instances whose registration changed as their signal asked."""
        try:
            registered = self._registered()
        except ActuatorError as exc:
            log.warning("%s", exc)
            return
        now = time.monotonic()
        for instance in waiting:
            if instance.instance_id is None:
                instance.instance_id = next(
                    (
                        item["id"]
                        for item in registered.values()
                        if (item["service"], item["group"]) == instance.key
                        and _parent_of(item["pid"]) == instance.proc.pid
                    ),
                    None,
                )
            is_registered = instance.instance_id in registered
            with self._lock:
                if instance.state is State.STARTING and is_registered:
                    self._durations.setdefault(instance.key, deque(maxlen=DURATIONS_KEPT)).append(
                        now - instance.started
                    )
                    self._retry_at.pop(instance.key, None)
                    log.info("%s ready in %.2fs", _label(instance), now - instance.started)
                    if instance.to_park:
                        log.info("%s: parking for the pool (SIGUSR1)", _label(instance))
                        instance.to_park = False
                        instance.move(State.PARKING, signal.SIGUSR1)
                    else:
                        instance.move(State.READY)
                elif instance.state is State.RESUMING and is_registered:
                    log.info("%s resumed in %.2fs", _label(instance), now - instance.since)
                    instance.move(State.READY)
                elif instance.state is State.PARKING and not is_registered:
                    instance.move(State.PARKED)

    def _registered(self) -> dict[str, dict]:
        """The registry's instances by id, as the control plane's API lists them."""
        url = f"{self.server_url}/api/v1/instances"
        try:
            with _direct.open(url, timeout=API_TIMEOUT) as response:
                items = json.loads(response.read())["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ActuatorError(f"cannot list instances at {url}: {exc}") from None
        return {item["id"]: item for item in items}

    def _reconcile(self, key: GroupKey, replicas: int) -> None:
        with self._lock:
            mine = sorted((i for i in self._instances if i.key == key), key=lambda i: i.seq)
        filling = [i for i in mine if i.to_park and i.state is State.STARTING]
        active = [i for i in mine if i.state in _ACTIVE and i not in filling]
        parked = [i for i in mine if i.state is State.PARKED]
        parking = [i for i in mine if i.state is State.PARKING]
        missing = replicas - len(active)
        parked_now = 0
        with self._lock:
            not_before, _ = self._retry_at.get(key, (0.0, 0.0))
            pool = self._pools.get(key, 0)
        if missing > 0:
            for instance in reversed(parked[-missing:]):  # the newest first
                log.info("%s: resuming (SIGUSR2)", _label(instance))
                instance.move(State.RESUMING, signal.SIGUSR2)
                parked.remove(instance)
                missing -= 1
            missing -= len(parking)  # resumed once their deregistration is seen
            for instance in filling[: max(0, missing)]:  # needed now: not parked after all
                instance.to_park = False
                filling.remove(instance)
                missing -= 1
            if missing > 0 and time.monotonic() >= not_before:
                for _ in range(missing):
                    self._start(key)
        elif missing < 0:
            kept = len(parked) + len(parking) + len(filling)
            limit = max(self.keep_alive, pool)
            for instance in reversed(active[missing:]):  # the newest first
                if instance.state is State.READY and kept < limit:
                    log.info("%s: parking (SIGUSR1)", _label(instance))
                    instance.move(State.PARKING, signal.SIGUSR1)
                    kept += 1
                    parked_now += 1
                else:
                    log.info("%s: stopping (SIGTERM)", _label(instance))
                    instance.move(State.STOPPING, signal.SIGTERM)
        short = pool - len(parked) - len(parking) - len(filling) - parked_now
        if missing <= 0 and short > 0 and time.monotonic() >= not_before:
            for _ in range(short):  # the pool is kept full: started cold, parked when ready
                self._start(key, to_park=True)

    def _run_spec(self, service: str, group: str) -> RunSpec:
        rule = self.rules_provider().services.get(service)
        if rule is None:
            raise ActuatorError(f"Service '{service}' not found")
        if rule.group(group) is None:
            raise ActuatorError(f"service {service} has no group '{group}'")
        if rule.run is None:
            raise ActuatorError(
                f"service {service} has no spec.run.command: the local actuator cannot start it"
            )
        return rule.run

    def _start(self, key: GroupKey, to_park: bool = False) -> None:
        service, group = key
        try:
            spec = self._run_spec(service, group)
        except ActuatorError as exc:  # the rules changed since scale()
            log.error("cannot start %s|%s: %s", service, group, exc)
            return
        with self._lock:
            self._seq += 1
            seq = self._seq
        log_path = self.work_dir / f"{service}-{group}-{seq}.log"
        command = [sys.executable, "-m", "controlplane", "run", "--server", self.server_url]
        command += ["--service", service, "--group", group, "--", *spec.command]
        # `python` in a Service's command is this interpreter, as in an activated venv.
        path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                dying_with_parent(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **dict(spec.env), "PATH": path, TOKEN_ENV: self._api_token},
                process_group=0,  # a terminal's Ctrl-C is ours to handle, not the instance's
            )
        instance = _Instance(seq, key, proc, log_path, started=time.monotonic(), to_park=to_park)
        with self._lock:
            self._instances.append(instance)
        log.info("%s: started (pid %d), log %s", _label(instance), proc.pid, log_path)

    def _stop_all(self) -> None:
        """SIGTERM every instance at once (parked ones too: `tasklane run` resumes them to
        stop), wait up to STOP_GRACE, then SIGKILL what is left."""
        with self._lock:
            instances, self._instances = self._instances, []
        for instance in instances:
            if instance.state is not State.STOPPING:
                instance.move(State.STOPPING, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for instance in instances:
            try:
                instance.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %gs: killing it", _label(instance), STOP_GRACE)
                instance.proc.kill()
                instance.proc.wait()


def _label(instance: _Instance) -> str:
    return f"{GroupKey(*instance.key)} #{instance.seq}"


def _parent_of(pid: object) -> int | None:
    """The parent pid of a local process (None if gone): a registered instance's pid is its
    app, whose parent is the `tasklane run` that registered it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
