"""`tasklane run`: one instance of a service group, i.e. an app behind a real Envoy sidecar,
registered with the control plane for exactly as long as it can serve.

Order matters at both ends. Starting: Envoy (ready with its config), then the app, and only
once the sidecar sees the app healthy is the instance registered, so callers never learn of
an instance that cannot answer. Stopping: deregister first (the control plane answers once
callers' snapshots no longer have it), wait DRAIN, then stop the app, then Envoy.

Keep-alive: SIGUSR1 parks the instance, SIGUSR2 resumes it. Parking deregisters (callers
drop the endpoint), waits DRAIN for requests already sent to finish, then SIGSTOPs Envoy
and the app's process group: they keep their memory, warm caches and sockets but use no CPU,
and `tasklane run` itself stays alive to resume them. Resuming sends SIGCONT, waits until the
sidecar reports the app healthy and registers again. A scaler resumes a parked instance much
faster than it starts a new one (no interpreter, Envoy or app start-up, no config fetch).

Everything goes through the control plane's HTTP API (see api/instances.py), never to etcd.
Children are started from the calling (main) thread: their parent-death signal follows the
thread that started them, and `tasklane run` killed hard must take its app and Envoy along.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.errors import RuntimeFailure, TasklaneError
from controlplane.model.group import GroupKey
from controlplane.model.instance import KEEPALIVE_INTERVAL, Instance, proxy_env
from controlplane.pki import TlsFiles
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port, port_in_use
from controlplane.runtime.process import dying_with_parent, stop_process
from controlplane.xds.names import HEALTH_PATH

log = logging.getLogger("tasklane.run")

# (method, path, JSON body or None) -> the JSON answer; TasklaneError with a one-line reason.
Api = Callable[[str, str, Any], Any]

# Envoy with its config, then the app accepting connections: each gets this long.
READY_TIMEOUT = 30.0
# The app gets this long to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
# Parking and stopping: the time between deregistering and SIGSTOP (or SIGTERM to the app),
# for callers to apply the endpoint change (a few ms here) and for requests already sent to
# the instance to be answered (measured: a 3 -> 0 scale-down under load failed a request
# without it).
DRAIN = 1.0
POLL_INTERVAL = 0.05
# The app's port is picked free, then bound by the app: another process may take it between
# the two (seen with parallel tests), so a run whose app could not bind it tries new ports.
PORT_ATTEMPTS = 3
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
# The API token `tasklane run` may be given in its environment (api/auth.py): the app has no
# business writing to the control plane, so it does not inherit it.
_TOKEN_ENV = "TASKLANE_TOKEN"


@dataclass(frozen=True)
class RunOptions:
    """What `tasklane run` was asked to run."""

    service: str
    group: str
    command: list[str]
    # The control plane replicas' xDS addresses (xds_addresses): Envoy spreads over them all.
    xds: tuple[tuple[str, int], ...]
    host: str = "127.0.0.1"  # where other sidecars reach this instance
    port: int | None = None  # the app's port; None picks a free one
    delta: bool = True  # False: state of the world, the whole mesh's config
    tls: TlsFiles | None = None  # the client files (pki.client_files) when xDS is TLS


class _Stopped(Exception):
    """A signal asked `tasklane run` to stop while it was still starting."""


@dataclass
class _Signals:
    """What signals asked for: handlers only record it, the main loop acts on it (a handler
    may interrupt the loop anywhere, e.g. half-way through a registration)."""

    stop: int = 0  # the signal that asked to stop; 0 while none did
    park: bool = False  # set by SIGUSR1, cleared by SIGUSR2: the last one wins


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_instance(options: RunOptions, api: Api) -> int:
    """Run the instance until the app exits or SIGTERM/SIGINT; returns the app's exit code.

    Call it from the main thread (signal handlers, and the children's parent-death signal).
    SIGUSR1 parks the instance and SIGUSR2 resumes it (see the module's docstring).
    TasklaneError (after stopping whatever had started) when the service or group is unknown,
    the command is not found, Envoy or the app do not become ready in time, or Envoy dies.
    The app gets SIGTERM alone, as PID 1 of a container would: a shell wrapper should `exec`
    it. Whatever else is left in its process group afterwards is killed.
    """
    if shutil.which(options.command[0]) is None:
        raise TasklaneError(f"command not found: {options.command[0]}")
    signals = _Signals()

    def on_stop(signum: int, frame: object) -> None:
        signals.stop = signals.stop or signum

    def on_park(signum: int, frame: object) -> None:
        signals.park = signum == signal.SIGUSR1

    handlers = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    handlers |= {sig: signal.signal(sig, on_park) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        return _Run(options, api, signals).run()
    except _Stopped:
        return 128 + signals.stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class _Ports:
    egress: int
    inbound: int
    admin: int
    app: int


class _Run:
    def __init__(self, options: RunOptions, api: Api, signals: _Signals) -> None:
        self.options, self.api, self.signals = options, api, signals

    def run(self) -> int:
        self._check_group()
        for _ in range(PORT_ATTEMPTS):
            code = self._run_on(self._pick_ports())
            if code is not None:
                return code
            log.warning("a port picked for this instance was taken first: trying others")
        raise RuntimeFailure(f"no free ports could be bound in {PORT_ATTEMPTS} attempts")

    def _pick_ports(self) -> _Ports:
        egress, inbound, admin = _distinct_ports(3, (self.options.port,))
        app_port = self.options.port or _distinct_ports(1, (egress, inbound, admin))[0]
        return _Ports(egress, inbound, admin, app_port)

    def _run_on(self, ports: _Ports) -> int | None:
        """Run the instance on these ports until it ends; its exit code, or None when Envoy
        or the app could not bind a port picked for them because another process took it."""
        instance_id = f"{self.options.host}-{ports.inbound}"
        with contextlib.ExitStack() as stack:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tasklane-")))
            envoy = self._start_envoy(stack, ports, instance_id, work_dir)
            if envoy is None:
                return None
            app = self._start_app(stack, ports, instance_id)
            if not self._app_ready(app, ports):
                log.error("the app exited with code %d before it was ready", app.returncode)
                if self.options.port is None and port_in_use(ports.app):
                    return None
                return exit_code(app.returncode)
            registration = _Registration(self.api, self._instance(instance_id, ports, app.pid))
            registration.register()
            frozen = False  # parked: app and Envoy SIGSTOPped
            try:
                while app.poll() is None and not self.signals.stop and envoy.running():
                    if self.signals.park and not frozen:
                        frozen = self._park(registration, app, envoy)
                    elif not self.signals.park and (frozen or not registration.registered):
                        self._resume(registration, app, envoy, ports, frozen)
                        frozen = False
                    time.sleep(POLL_INTERVAL)
            finally:
                if frozen:  # stopped processes would not act on SIGTERM
                    _signal_groups(signal.SIGCONT, app.pid, envoy.pid)
                drain = registration.registered and envoy.running()
                if drain:
                    log.info("deregistering %s, then stopping the app and Envoy", instance_id)
                registration.deregister()
            if app.poll() is None and not self.signals.stop:
                raise RuntimeFailure(
                    f"Envoy (admin :{ports.admin}) exited; the app is stopped too. Its log:\n"
                    + envoy.log_tail()
                )
            if drain and app.poll() is None:
                time.sleep(DRAIN)  # callers drop it; what they already sent is answered
            stop_process(app, STOP_TIMEOUT)
            return exit_code(app.returncode)

    def _start_envoy(
        self,
        stack: contextlib.ExitStack,
        ports: _Ports,
        instance_id: str,
        work_dir: Path,
    ) -> EnvoyProcess | None:
        """A sidecar with its config from the control plane (stopped when the stack closes);
        None when it exited because another process took one of its ports first.

        RuntimeFailure, one line, for any other reason it has no config: at once when its
        connection to the control plane names the cause (EnvoyProcess.config_failure, e.g. a
        certificate from another CA, nothing listening), else after READY_TIMEOUT. Other
        ports would not help then, so none are tried."""
        (xds_host, xds_port), *more_xds = self.options.xds
        envoy = EnvoyProcess(
            node_id=GroupKey(self.options.service, self.options.group).node_id(instance_id),
            service=self.options.service,
            group=self.options.group,
            xds_host=xds_host,
            xds_port=xds_port,
            more_xds=more_xds,
            admin_port=ports.admin,
            delta=self.options.delta,
            work_dir=work_dir,
            tls=self.options.tls,
            parts={
                "sidecar.yaml": {
                    "egress_port": ports.egress,
                    "inbound_host": self.options.host,
                    "inbound_port": ports.inbound,
                    "app_port": ports.app,
                    "health_path": HEALTH_PATH,
                }
            },
        )
        stack.callback(envoy.stop)
        envoy.start()
        try:
            self._wait(
                lambda: envoy.ready_state() == "LIVE",
                lambda: envoy.config_failure() if envoy.running() else "Envoy exited",
                f"Envoy (admin :{ports.admin}) got no config from the control plane at "
                + ", ".join(f"{host}:{port}" for host, port in self.options.xds),
                envoy.last_complaint,
            )
        except RuntimeFailure:
            if envoy.running():
                raise
            envoy.stop()  # reaped: its ports are free again, unless another process has one
            envoy_ports = (ports.egress, ports.admin)
            if port_in_use(ports.inbound, self.options.host) or any(
                port_in_use(port) for port in envoy_ports
            ):
                return None
            raise
        return envoy

    def _start_app(
        self, stack: contextlib.ExitStack, ports: _Ports, instance_id: str
    ) -> subprocess.Popen[bytes]:
        """CMD, told its port and its way out (stopped when the stack closes)."""
        env = {
            **{name: value for name, value in os.environ.items() if name != _TOKEN_ENV},
            "PORT": str(ports.app),
            "TASKLANE_SERVICE": self.options.service,
            "TASKLANE_GROUP": self.options.group,
            "TASKLANE_INSTANCE": instance_id,
            "TASKLANE_EGRESS": f"127.0.0.1:{ports.egress}",
            **proxy_env(f"127.0.0.1:{ports.egress}"),
        }
        # Its own process group: a terminal's Ctrl-C reaches `tasklane run` only, which
        # deregisters before it stops the app.
        app = subprocess.Popen(dying_with_parent(self.options.command), env=env, process_group=0)
        stack.callback(_kill_group, app.pid)  # what CMD left behind, once CMD is stopped
        stack.callback(stop_process, app, STOP_TIMEOUT)
        return app

    def _app_ready(self, app: subprocess.Popen[bytes], ports: _Ports) -> bool:
        """True once the sidecar sees the app healthy, i.e. callers' health checks will pass;
        False if the app exited first."""
        try:
            self._wait(
                lambda: _healthy(self.options.host, ports.inbound),
                lambda: None if app.poll() is None else "it exited",
                f"the app did not accept connections on port {ports.app}",
            )
        except RuntimeFailure:
            if app.poll() is None:
                raise
            return False
        return True

    def _park(
        self, registration: _Registration, app: subprocess.Popen[bytes], envoy: EnvoyProcess
    ) -> bool:
        """Deregister, drain, then SIGSTOP Envoy and the app's process group. False (nothing
        stopped, still deregistered) when a resume or stop arrives during the drain."""
        log.info("parking: deregistering, then stopping the app and Envoy (SIGSTOP)")
        registration.deregister()
        deadline = time.monotonic() + DRAIN
        while time.monotonic() < deadline:
            if self.signals.stop or not self.signals.park:
                return False
            time.sleep(POLL_INTERVAL)
        _signal_groups(signal.SIGSTOP, envoy.pid, app.pid)
        log.info("parked: app (pid %d) and Envoy (pid %s) stopped", app.pid, envoy.pid)
        return True

    def _resume(
        self,
        registration: _Registration,
        app: subprocess.Popen[bytes],
        envoy: EnvoyProcess,
        ports: _Ports,
        frozen: bool,
    ) -> None:
        """SIGCONT the app and Envoy (if parked), wait until the sidecar reports the app
        healthy, as callers' health checks will, and register again."""
        started = time.monotonic()
        if frozen:
            _signal_groups(signal.SIGCONT, app.pid, envoy.pid)
        self._wait(
            lambda: _healthy(self.options.host, ports.inbound),
            lambda: None if app.poll() is None and envoy.running() else "it exited",
            f"the app (port {ports.app}) or Envoy (admin :{ports.admin}) after resuming",
        )
        registration.register()
        log.info("resumed in %.0f ms", (time.monotonic() - started) * 1000)

    def _instance(self, instance_id: str, ports: _Ports, pid: int) -> Instance:
        return Instance(
            id=instance_id,
            service=self.options.service,
            group=self.options.group,
            host=self.options.host,
            inbound_port=ports.inbound,
            app_port=ports.app,
            admin_port=ports.admin,
            egress_port=ports.egress,
            pid=pid,
            started_at=time.time(),
        )

    def _check_group(self) -> None:
        name = urllib.parse.quote(self.options.service, safe="")
        service = self.api("GET", f"/api/v1/rules/service/{name}", None)
        groups = [group["name"] for group in service["spec"]["groups"]]
        if self.options.group not in groups:
            raise TasklaneError(
                f"service {self.options.service} has no group '{self.options.group}' "
                f"(groups: {', '.join(groups)})"
            )

    def _wait(
        self,
        ready: Callable[[], bool],
        died: Callable[[], str | None],
        what: str,
        details: Callable[[], str] = str,
    ) -> None:
        """Poll until ready; RuntimeFailure when `died` names a reason or on timeout, _Stopped
        on a signal."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            reason = died()
            if reason is None and time.monotonic() > deadline:
                reason = f"not ready after {READY_TIMEOUT:g}s"
            if reason is not None:
                said = details()
                raise RuntimeFailure(f"{what}: {reason}" + (f" ({said})" if said else ""))
            if self.signals.stop:
                raise _Stopped
            time.sleep(POLL_INTERVAL)


class _Registration:
    """The instance in the control plane's registry, kept alive by a thread, between
    register() and deregister(); both may be called again (a park, then a resume)."""

    def __init__(self, api: Api, instance: Instance) -> None:
        self.api, self.instance = api, instance
        self._done = threading.Event()
        self._keepalive: threading.Thread | None = None

    @property
    def registered(self) -> bool:
        return self._keepalive is not None

    def register(self) -> None:
        instance = self.instance
        self.api("POST", "/api/v1/instances", instance.to_json())
        log.info(
            "%s|%s instance %s registered: app :%d, inbound %s:%d, egress 127.0.0.1:%d, admin :%d",
            instance.service,
            instance.group,
            instance.id,
            instance.app_port,
            instance.host,
            instance.inbound_port,
            instance.egress_port,
            instance.admin_port,
        )
        self._done = threading.Event()
        self._keepalive = threading.Thread(
            target=self._renew, args=(self._done,), name="keepalive", daemon=True
        )
        self._keepalive.start()

    def deregister(self) -> None:
        """Stop the keep-alives (which would register it again), then deregister: the
        control plane answers once callers' snapshots no longer have the instance."""
        if self._keepalive is None:
            return
        self._done.set()
        self._keepalive.join()
        self._keepalive = None
        try:
            self.api("DELETE", f"/api/v1/instances/{self.instance.id}", None)
        except TasklaneError as exc:
            log.warning("cannot deregister (it expires by itself): %s", exc)

    def _renew(self, done: threading.Event) -> None:
        """Renew every KEEPALIVE_INTERVAL; when that fails (the control plane restarted and
        forgot us, or etcd is down) register again at once, which is idempotent."""
        instance = self.instance
        path = f"/api/v1/instances/{instance.id}/keepalive"
        while not done.wait(KEEPALIVE_INTERVAL):
            try:
                self.api("POST", path, None)
                continue
            except TasklaneError as exc:
                log.warning("keep-alive failed, registering again: %s", exc)
            try:
                self.api("POST", "/api/v1/instances", instance.to_json())
                log.info("registered again")
            except TasklaneError as exc:
                log.warning("cannot register again (retrying): %s", exc)


def xds_address(server: str, status: Any, tls: TlsFiles | None) -> tuple[str, int]:
    """Where Envoy reaches the control plane's ADS, from its /api/v1/status answer; a
    wildcard listen address is replaced by the host `server` (the HTTP URL) names.

    A TasklaneError when only one side uses TLS: Envoy would otherwise retry the handshake
    forever, never ready, with the reason only in its log."""
    try:
        host, _, port = status["xds"]["address"].rpartition(":")
        number = int(port)
        requires_tls = status["xds"].get("tls", False) is True
    except (KeyError, TypeError, AttributeError, ValueError):
        raise TasklaneError(f"{server} did not report its xDS address") from None
    if requires_tls and tls is None:
        raise TasklaneError(
            f"the control plane at {server} serves xDS over TLS only: "
            "give --tls-dir DIR (its CA and a client certificate)"
        )
    if tls is not None and not requires_tls:
        raise TasklaneError(
            f"--tls-dir is given but the control plane at {server} serves xDS in plaintext "
            "(started without --tls-dir)"
        )
    if host in _WILDCARDS:
        host = urllib.parse.urlsplit(server if "://" in server else f"http://{server}").hostname
    return (host or "127.0.0.1").strip("[]"), number


def xds_addresses(
    servers: Sequence[str], status_of: Callable[[str], Any], tls: TlsFiles | None
) -> tuple[tuple[str, int], ...]:
    """The xDS address of every control-plane replica in `servers` (HTTP URLs) that answers
    `status_of` (its /api/v1/status), in order: a sidecar spreads over them all, and when one
    dies its streams move to the others. A replica down now is left out with a warning (its
    sidecars would only fail over to it); TasklaneError when none answers."""
    found: dict[tuple[str, int], None] = {}
    unreachable: list[TasklaneError] = []
    for server in servers:
        try:
            status = status_of(server)
        except TasklaneError as exc:
            unreachable.append(exc)
            continue
        found[xds_address(server, status, tls)] = None
    if not found:
        raise unreachable[-1]
    for exc in unreachable:
        log.warning("left out of the xDS addresses: %s", exc)
    return tuple(found)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _signal_groups(signum: int, *pgids: int | None) -> None:
    """Send `signum` to each process group (the app's and Envoy's lead their own); groups
    already gone are skipped."""
    for pgid in pgids:
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)


def _distinct_ports(count: int, taken: tuple[int | None, ...]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port not in taken:
            ports.append(port)
    return ports


def _healthy(host: str, port: int) -> bool:
    """True when the sidecar's inbound listener reports the app healthy, as callers see it."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", HEALTH_PATH)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
