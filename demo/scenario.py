"""`tasklane demo`: the fund-yield chain end to end, every piece a real process.

An embedded etcd and the control plane (`tasklane up`), the demo rules (`tasklane apply`),
2 instances of each group of fund-facade -> account-svc -> nav-pricing (each `tasklane run`:
the app plus its Envoy sidecar), an ingress (`tasklane gateway`), then a scheduler that fires
the task on its cron and online users, with a live isolation table per hop x group.
"""

from __future__ import annotations

import http.client
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from controlplane.errors import RuntimeFailure
from controlplane.model.cron import next_fire
from controlplane.model.load import load_files
from controlplane.model.rules import ScheduledTask
from controlplane.runtime.ports import free_port
from controlplane.runtime.process import dying_with_parent, stop_process
from demo.traffic import CHAIN, Tally, online_users, run_task, send, wait_for

RULES = Path(__file__).with_name("rules.yaml")
NEXT = {"fund-facade": "account-svc", "account-svc": "nav-pricing"}
INSTANCES_PER_GROUP = 2
USERS_PER_RUN = 300
ONLINE_RATE = 20.0
TRUST_HEADER = "x-tasklane-trust"


class Demo:
    """The processes of the demo; stop() ends them all, whatever state start() reached."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.procs: list[subprocess.Popen] = []
        self.http_port = free_port()
        self.gateway_port = free_port()
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
                env={**os.environ, "TASKLANE_SERVER": self.server},
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
            log="control-plane.log",
        )  # fmt: skip
        wait_for(self._healthy, 30, "control plane")
        applied = subprocess.run(
            [sys.executable, "-m", "controlplane", "apply", "-f", str(RULES)],
            env={**os.environ, "TASKLANE_SERVER": self.server},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if applied.returncode != 0:
            raise RuntimeFailure(f"demo: apply failed: {applied.stderr.strip()}")
        print("demo: " + applied.stdout.strip().replace("\n", ", "))
        for service in CHAIN:
            for group in ("default", "task"):
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
        secret_file = self.work_dir / "trust-secret"
        secret_file.write_text(self.secret)
        self.tasklane(
            "gateway", "--port", str(self.gateway_port),
            "--trust-header", TRUST_HEADER, "--trust-secret-file", str(secret_file),
            log="gateway.log",
        )  # fmt: skip
        wait_for(self._chain_serves, 60, "instances and gateway")
        print(f"demo: gateway on 127.0.0.1:{self.gateway_port}, API on {self.server}")

    def _healthy(self) -> bool:
        self._check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def _chain_serves(self) -> bool:
        self._check_alive()
        trusted = {"x-task-dye": "fund-yield", TRUST_HEADER: self.secret}
        want = {"task": list(CHAIN.values()), "online": ["default"] * len(CHAIN)}
        for kind, headers in (("task", trusted), ("online", {})):
            status, hops = send(self.gateway_port, "/", headers)
            if status != 200 or [h["group"] for h in hops] != want[kind]:
                return False
        return True

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
    table and a final summary. Exit code 1 if any leak was counted."""
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="tasklane-demo-"))
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
            print(f"\n{datetime.now(UTC):%H:%M:%S} isolation per hop x group\n{tally.render()}")
            if ends is not None and time.monotonic() >= ends:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        demo.stop()
    leaks = tally.leaks()
    print(f"\nsummary\n{tally.render()}\nleaks: {leaks}")
    return 1 if leaks else 0


def _scheduler(demo: Demo, tally: Tally, stop: threading.Event) -> None:
    """Fire the task now (so a short demo shows a run), then on every tick of its cron."""
    task = next(p.rule for p in load_files([RULES]) if isinstance(p.rule, ScheduledTask))
    trust = {TRUST_HEADER: demo.secret}
    fire = datetime.now(UTC)
    while not stop.is_set():
        if datetime.now(UTC) >= fire:
            run_id = f"{fire:%Y%m%dT%H%M}"
            print(f"\nscheduler: fund-yield run {run_id} ({USERS_PER_RUN} users)")
            run_task(demo.gateway_port, run_id, USERS_PER_RUN, tally, trust)
            fire = next_fire(task.schedule, datetime.now(UTC), ZoneInfo(task.timezone))
        stop.wait(1)
