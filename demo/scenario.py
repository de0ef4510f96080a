"""`tasklane demo`: the fund-yield chain end to end, every piece a real process.

An embedded etcd and the control plane with its scaler (`tasklane up --actuator local`), the
demo rules (`tasklane apply`), 2 online instances of each of fund-facade -> account-svc ->
nav-pricing (each `tasklane run`: the app plus its Envoy sidecar), an ingress
(`tasklane gateway`), then a scheduler that reports each run of the task (`tasklane task
start|finish`) and online users, with a live table per hop x group. The task groups are the
scaler's: started before each cron fire, stopped when the run is over.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from controlplane.errors import RuntimeFailure
from controlplane.model.cron import next_fire
from controlplane.model.load import load_files
from controlplane.model.rules import DEFAULT_GROUP, ScheduledTask
from controlplane.runtime.envoy import healthy_hosts
from controlplane.runtime.ports import free_port, port_in_use
from controlplane.runtime.process import dying_with_parent, stop_process
from controlplane.xds.names import cluster_name
from demo.traffic import CHAIN, ENTRY, Tally, online_users, run_task, send, wait_for

RULES = Path(__file__).with_name("rules.yaml")
NEXT = {"fund-facade": "account-svc", "account-svc": "nav-pricing"}
INSTANCES_PER_GROUP = 2
USERS_PER_RUN = 300
ONLINE_RATE = 20.0
TRUST_HEADER = "x-tasklane-trust"
SCALE_PERIOD_S = 2.0
SCALE_DOWN_WINDOW_S = 60.0  # short, so the demo shows the groups at 0 between runs
TASK_CAPACITY_WAIT_S = 90.0


class Demo:
    """The processes of the demo; stop() ends them all, whatever state start() reached."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.procs: list[subprocess.Popen] = []
        self.http_port = free_port()
        self.gateway_port = free_port()
        self.gateway_admin_port = free_port()
        self.server = f"http://127.0.0.1:{self.http_port}"
        self.secret = secrets.token_hex(16)

    def tasklane(self, *args: str, log: str) -> subprocess.Popen:
        """Start `tasklane ...` as a child that dies with us; output goes to a log file."""
        with (self.work_dir / log).open("ab") as out:
            proc = subprocess.Popen(
                dying_with_parent([sys.executable, "-m", "controlplane", *args]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        print(f"demo: logs in {self.work_dir}")
        self.tasklane(
            "up",
            "--state-dir", str(self.work_dir / "state"),
            "--xds-port", str(free_port()),
            "--http-port", str(self.http_port),
            "--etcd-client-port", str(free_port()),
            "--etcd-peer-port", str(free_port()),
            "--actuator", "local", "--scale-period", str(SCALE_PERIOD_S),
            "--scale-down-window", str(SCALE_DOWN_WINDOW_S),
            log="control-plane.log",
        )  # fmt: skip
        wait_for(self._healthy, 30, "control plane")
        # Open it now: it shows the chain come up (instances, sidecars), then its traffic.
        print(f"demo: dashboard on {self.server}/", flush=True)
        print("demo: " + self.cli("apply", "-f", str(RULES)).replace("\n", ", "))
        secret_file = self.work_dir / "trust-secret"
        secret_file.write_text(self.secret)
        self.tasklane(
            "gateway", "--port", str(self.gateway_port),
            "--trust-header", TRUST_HEADER, "--trust-secret-file", str(secret_file),
            "--admin-port", str(self.gateway_admin_port),
            log="gateway.log",
        )  # fmt: skip
        # Its ports are bound before the instances pick theirs, so none of them can take one.
        wait_for(self._gateway_listens, 30, "gateway")
        for service in CHAIN:
            for group in ("default",):  # the task groups are the scaler's
                for n in range(1, INSTANCES_PER_GROUP + 1):
                    app = ["-m", "demo.chain_app", "--service", service, "--group", group]
                    app += ["--instance", f"{service}/{group}/{n}"]
                    if service in NEXT:
                        app += ["--next", NEXT[service]]
                    self.tasklane(
                        "run", "--service", service, "--group", group, "--",
                        sys.executable, *app,
                        log=f"{service}-{group}-{n}.log",
                    )  # fmt: skip
        # No request before every caller has health-checked its callees: one sent earlier is
        # a 503 (no healthy upstream) in the control plane's accounting, in a healthy demo.
        wait_for(self._online_ready, 60, "instances and gateway")
        wait_for(self._chain_serves, 10, "the chain")
        print(f"demo: gateway on 127.0.0.1:{self.gateway_port}, API on {self.server}")

    def env(self) -> dict[str, str]:
        """The environment of `tasklane` children: where the API is and, once `tasklane up`
        has made it, the API token that writes (apply, run, task) need."""
        env = {**os.environ, "TASKLANE_SERVER": self.server}
        token = self.work_dir / "state" / "api-token"
        if token.exists():
            env["TASKLANE_TOKEN"] = token.read_text().strip()
        return env

    def cli(self, *args: str) -> str:
        """Run one `tasklane ...` client command; its output, or RuntimeFailure."""
        done = subprocess.run(
            [sys.executable, "-m", "controlplane", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeFailure(f"demo: tasklane {args[0]} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def replicas(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(ready, desired) per (service, group): registered instances, the scaler's target."""
        status = json.loads(self._get("/api/v1/status"))
        desired = (status.get("scaler") or {}).get("desired", {})
        ready: dict[tuple[str, str], int] = {}
        for instance in json.loads(self._get("/api/v1/instances"))["items"]:
            key = (instance["service"], instance["group"])
            ready[key] = ready.get(key, 0) + 1
        keys = set(ready) | {tuple(k.split("|")) for k in desired}
        return {k: (ready.get(k, 0), desired.get("|".join(k), ready.get(k, 0))) for k in keys}

    def groups_ready(self, group: str, replicas: dict[str, int]) -> bool:
        """Each service of the chain has `replicas[service]` instances of `group` registered,
        and every caller of the group (the gateway for the entry, the group's instances of the
        previous service) routes to all of them: its sidecar's first health check of each
        passed. Until then a request may be answered 503, no healthy upstream."""
        try:
            instances = json.loads(self._get("/api/v1/instances"))["items"]
            in_group = [i for i in instances if i["group"] == group]
            registered = Counter(i["service"] for i in in_group)
            if any(registered[service] < n for service, n in replicas.items()):
                return False
            callers = [(self.gateway_admin_port, ENTRY)]
            callers += [
                (i["admin_port"], NEXT[i["service"]]) for i in in_group if i["service"] in NEXT
            ]
            for admin_port, callee in callers:
                seen = healthy_hosts(json.loads(self._get("/clusters?format=json", admin_port)))
                if seen.get(cluster_name(callee, group), 0) < registered[callee]:
                    return False
            return True
        except (OSError, ValueError):
            return False

    def errors_5xx(self) -> int:
        """5xx answers at any hop, as the sidecars' access logs told the control plane (the
        dashboard's count): a healthy demo has none."""
        return json.loads(self._get("/api/v1/isolation"))["totals"]["errors_5xx"]

    def _get(self, path: str, port: int | None = None) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.http_port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def _chain_serves(self) -> bool:
        """Online requests through the gateway reach `default` at every hop (the task groups
        are the scaler's: they exist only around runs)."""
        self._check_alive()
        status, hops = send(self.gateway_port, "/", {})
        return status == 200 and [h["group"] for h in hops] == ["default"] * len(CHAIN)

    def _gateway_listens(self) -> bool:
        self._check_alive()
        return port_in_use(self.gateway_port) and port_in_use(self.gateway_admin_port)

    def _online_ready(self) -> bool:
        self._check_alive()
        online = {service: INSTANCES_PER_GROUP for service in CHAIN}
        return self.groups_ready(DEFAULT_GROUP, online)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(map(str, proc.args[-6:]))} exited ({proc.returncode})"
                )

    def stop(self) -> None:
        """SIGTERM everything (instances deregister first), newest first; then reap."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            stop_process(proc, timeout=10)


def run(duration: float | None = None, work_dir: Path | None = None) -> int:
    """Run the demo for `duration` seconds (forever when None, until Ctrl-C); prints the live
    table and a final summary (leaks, failed requests, the control plane's 5xx count). Exit
    code 1 if any leak was counted."""
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="tasklane-demo-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(work_dir)
    tally = Tally()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads: list[threading.Thread] = []
    try:
        demo.start()
        threads.append(
            threading.Thread(
                target=online_users, args=(demo.gateway_port, ONLINE_RATE, stop, tally)
            )
        )
        threads.append(threading.Thread(target=_scheduler, args=(demo, tally, stop)))
        for thread in threads:
            thread.start()
        ends = time.monotonic() + duration if duration else None
        while not stop.wait(2):
            table = tally.render(_replicas_or_none(demo))
            print(f"\n{datetime.now(UTC):%H:%M:%S} isolation per hop x group\n{table}")
            if ends is not None and time.monotonic() >= ends:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        errors = _errors_5xx_or_none(demo)
        demo.stop()
    leaks = tally.leaks()
    print(f"\nsummary\n{tally.render()}\nleaks: {leaks}\nfailures: {tally.failures()}")
    print(f"5xx in the control plane's accounting: {'unknown' if errors is None else errors}")
    return 1 if leaks else 0


def _errors_5xx_or_none(demo: Demo) -> int | None:
    try:
        return demo.errors_5xx()
    except (OSError, ValueError, KeyError):
        return None


def _replicas_or_none(demo: Demo) -> dict[tuple[str, str], tuple[int, int]] | None:
    try:
        return demo.replicas()
    except (OSError, ValueError):
        return None


def _scheduler(demo: Demo, tally: Tally, stop: threading.Event) -> None:
    """Run the task now (an extra run, so a short demo shows one: its capacity is started
    on demand), then on every tick of its cron (pre-warmed by the scaler). Each run is
    reported to the control plane: the scaler keeps the chain up while a run is open."""
    task = next(p.rule for p in load_files([RULES]) if isinstance(p.rule, ScheduledTask))
    trust = {TRUST_HEADER: demo.secret}
    fire = datetime.now(UTC)
    while not stop.is_set():
        if datetime.now(UTC) >= fire:
            try:
                _one_run(demo, task, f"{fire:%Y%m%dT%H%M}", tally, trust)
            except RuntimeFailure as exc:  # the demo goes on; the next fire is another try
                print(f"scheduler: {exc}")
            fire = next_fire(task.schedule, datetime.now(UTC), ZoneInfo(task.timezone))
        stop.wait(1)


def _one_run(
    demo: Demo, task: ScheduledTask, run_id: str, tally: Tally, trust: dict[str, str]
) -> None:
    demo.cli("task", "start", task.name, "--id", run_id)
    print(f"\nscheduler: {task.name} run {run_id} started ({USERS_PER_RUN} users)")
    try:
        wait_for(lambda: task_groups_ready(demo, task), TASK_CAPACITY_WAIT_S, "task capacity")
        run_task(demo.gateway_port, run_id, USERS_PER_RUN, tally, trust)
    finally:
        demo.cli("task", "finish", task.name, "--id", run_id)
        print(f"scheduler: {task.name} run {run_id} finished")


def task_groups_ready(demo: Demo, task: ScheduledTask) -> bool:
    """Every hop group the task needs has its replicas ready, seen healthy by its callers."""
    return demo.groups_ready(CHAIN[ENTRY], dict(task.replicas))
