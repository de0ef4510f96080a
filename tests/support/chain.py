"""The fund-yield chain as real processes, for tests: `tasklane run` instances of demo.chain_app
(fund-facade -> account-svc -> nav-pricing) registered with a real `tasklane up`, requests
through a sidecar's egress, the hops that served them, a caller's endpoints (Envoy admin), and
a steady mixed load that counts failed and leaked requests from what really answered.

Shared by tests/integration (test_run), tests/faults and tests/browser, so that no test module
imports another."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.model.instance import Instance
from controlplane.runtime.process import dying_with_parent
from controlplane.store.etcd import PREFIX, Store
from controlplane.store.registry import list_instances
from tests.support.up import TASKLANE, Up, start_up, wait_ready
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
GOOD = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
NEXT = {"fund-facade": "account-svc", "account-svc": "nav-pricing", "nav-pricing": None}
STOP_TIMEOUT = 15.0
DYE = {"x-task-dye": "fund-yield"}
TASK = [(service, "task") for service in NEXT]
ONLINE = [(service, "default") for service in NEXT]
REQUEST_TIMEOUT = 10.0

# What every sidecar is sent on every stream (wildcards answer even when empty). The others
# count when they were sent: a Delta sidecar is sent endpoints only for the clusters of its
# scope, and after a reconnect only what changed (it says what it holds).
XDS_TYPES = ("cds", "lds")


@dataclass
class Run:
    """One `tasklane run` process and, once registered, its instance."""

    proc: subprocess.Popen[bytes]
    service: str
    group: str
    err: Path
    instance: Instance | None = None

    def stderr(self) -> str:
        return self.err.read_text()


@dataclass
class Plane:
    """A `tasklane up` seen from outside: its CLI, its etcd (through a Store) and its runs."""

    up: Up
    store: Store  # straight to etcd, to see what really is registered
    logs: Path

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.up.ports['http']}"

    def env(self) -> dict[str, str]:
        """The CLI's environment: writes need the control plane's API token."""
        return {**os.environ, "TASKLANE_TOKEN": self.up.token}

    def tasklane(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one `tasklane` client command against this control plane (bounded: 30 s)."""
        return subprocess.run(
            [*TASKLANE, command, "--server", self.server, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def launch(self, service: str, group: str, command: list[str]) -> Run:
        """Start `tasklane run` (not waiting for it); its stdout and stderr go to a file."""
        err = self.logs / f"run-{service}-{group}-{time.monotonic_ns()}.log"
        with err.open("wb") as log:
            proc = subprocess.Popen(
                # Killed with the test process even if the test dies without cleaning up.
                dying_with_parent(
                    [*TASKLANE, "run", "--server", self.server]
                    + ["--service", service, "--group", group, "--", *command]
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env(),
            )
        return Run(proc, service, group, err)

    def registered(self, run: Run, timeout: float = 30.0) -> Run:
        """Wait until the run's instance is in etcd (its app is a child of the run)."""

        def find() -> Instance | None:
            if run.proc.poll() is not None:
                raise AssertionError(f"tasklane run exited {run.proc.returncode}:\n{run.stderr()}")
            instances, _ = list_instances(self.store)
            mine = [i for i in instances if i.pid and parent_of(i.pid) == run.proc.pid]
            return mine[0] if mine else None

        what = f"{run.service}|{run.group} registered"
        run.instance = wait_until(find, timeout=timeout, what=what)
        return run

    def instance_keys(self) -> set[str]:
        return {instance.key for instance in list_instances(self.store)[0]}

    def lease_of(self, key: str) -> int:
        """The etcd lease a key is attached to (0: none or no key); not part of the Store API."""
        value, meta = self.store._client.get(PREFIX + key)
        return meta.lease_id if value is not None else 0

    def restart_up(self) -> None:
        """Stop `tasklane up` cleanly and start it again on the same ports and state."""
        self.up.proc.send_signal(signal.SIGTERM)
        assert self.up.proc.wait(timeout=STOP_TIMEOUT) == 0
        out, err = self.logs / "up-again.out", self.logs / "up-again.err"
        ports = self.up.ports
        with out.open("wb") as out_file, err.open("wb") as err_file:
            proc = subprocess.Popen(
                [*TASKLANE, "up", "--state-dir", str(self.up.state_dir)]
                + ["--xds-port", str(ports["xds"]), "--http-port", str(ports["http"])]
                + ["--etcd-client-port", str(ports["etcd_client"])]
                + ["--etcd-peer-port", str(ports["etcd_peer"])],
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
            )
        self.up = Up(proc, ports, self.up.state_dir, out, err)
        assert wait_ready(self.up), self.up.stderr()


def running_plane(
    tmp_path_factory: pytest.TempPathFactory, rules: Path, options: Sequence[str] = ()
) -> Iterator[Plane]:
    """A fixture's body: `tasklane up` (with `options`), `rules` applied by `tasklane
    apply`; stopped afterwards (the process restart_up() left, if any)."""
    up = start_up(tmp_path_factory.mktemp("up"), options=list(options))
    try:
        store = Store.connect(f"127.0.0.1:{up.ports['etcd_client']}")
    except BaseException:
        up.kill()
        raise
    running = Plane(up, store, tmp_path_factory.mktemp("runs"))
    try:
        applied = running.tasklane("apply", "-f", str(rules))
        assert applied.returncode == 0, applied.stderr
        yield running
    finally:
        store.close()
        running.up.proc.send_signal(signal.SIGTERM)
        try:
            assert running.up.proc.wait(timeout=STOP_TIMEOUT) == 0
        finally:
            running.up.kill()


def parent_of(pid: int) -> int | None:
    """The parent pid from /proc, or None once the process is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """The direct children of pid (a run's app and Envoy), to check they are gone later."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in pids if parent_of(child) == pid]


def chain_app(service: str, group: str) -> list[str]:
    """The command line of demo.chain_app for one hop of the chain, as `tasklane run` runs it."""
    command = (
        f'exec "$0" -m demo.chain_app --service {service} --group {group} '
        f'--instance "$TASKLANE_INSTANCE" --port "$PORT"'
    )
    if NEXT[service]:
        command += f" --next {NEXT[service]}"
    return ["sh", "-c", command, sys.executable]


def stop_run(run: Run) -> None:
    """SIGTERM (a clean stop: deregister first), SIGKILL if it does not end in time."""
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()


def _answer(status: int, body: bytes) -> tuple[int, dict]:
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"error": body.decode(errors="replace")}


def get(port: int, service: str, headers: dict[str, str]) -> tuple[int, dict]:
    """GET / on `service` through a sidecar's egress listener (a new connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", "/", headers={"Host": service, **headers})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return _answer(response.status, body)


def hops(answer: dict) -> list[tuple[str, str]]:
    """(service, group) of every hop that served a chain_app answer, in call order."""
    return [(hop["service"], hop["group"]) for hop in answer.get("hops", [])]


def cluster_hosts(admin_port: int, cluster: str) -> set[str]:
    """'host:port' of every endpoint an Envoy's admin /clusters lists for one cluster: what
    EDS gave that sidecar, as it routes by it."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/clusters")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    prefix = f"{cluster}::"
    return {
        line[len(prefix) :].split("::", 1)[0]
        for line in text.splitlines()
        if line.startswith(prefix) and line[len(prefix) :][:1].isdigit()
    }


# ---------------------------------------------------------------------------- load

# What a load sends: (kind, extra headers), cycled by every thread from its own offset.
MIXED = (("dyed", DYE), ("online", {}))
# A request's verdict from its kind and answer: "ok...", "rejected" (a 503 the rules call
# for), "leaked", "failed", or any other label, each counted on its own.
Judge = Callable[[str, int, dict], str]


def judge_isolation(kind: str, status: int, answer: dict) -> str:
    """200 and every hop in the task groups ("dyed") or in `default` (any other kind)."""
    if status != 200:
        return "failed"
    leaked = any((group == "task") != (kind == "dyed") for _, group in hops(answer))
    return "leaked" if leaked else "ok"


def _benign(verdict: str) -> bool:
    return verdict.startswith("ok") or verdict == "rejected"


@dataclass
class Load:
    """Steady mixed load on keep-alive connections through one listener (a sidecar's egress
    or the gateway): counts every verdict, keeps when each request started and what it got,
    and a few samples of the bad ones.

    Paced: `target` requests per second in all, each thread sending on its own fixed schedule
    (never faster, later when answers are slow), so the load does not depend on how fast the
    apps answer (the rules' rate limits are sized for it)."""

    port: int
    threads: int = 20
    target: float = 150.0
    service: str = "fund-facade"
    requests: Sequence[tuple[str, dict[str, str]]] = MIXED
    judge: Judge = judge_isolation
    counts: dict[str, int] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic start, verdict)
    samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _started: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def leaked(self) -> int:
        return self.counts.get("leaked", 0)

    def _request(
        self, conn: http.client.HTTPConnection, headers: dict[str, str]
    ) -> tuple[int, dict]:
        try:
            conn.request("GET", "/", headers={"Host": self.service, **headers})
            response = conn.getresponse()
            return _answer(response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # reconnects on the next request
            return -1, {"error": repr(exc)}

    def _count(self, kind: str, status: int, answer: dict, started: float) -> None:
        verdict = self.judge(kind, status, answer)
        took = time.monotonic() - started
        with self._lock:
            self.counts[verdict] = self.counts.get(verdict, 0) + 1
            self.events.append((started, verdict))
            self.latencies.append(took)
            if not _benign(verdict) and len(self.samples) < 5:
                self.samples.append(f"{verdict} {kind} {status} {str(answer)[:300]}")

    def _loop(self, offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        turn = offset
        interval = self.threads / self.target
        due = time.monotonic() + interval * offset / self.threads  # spread the threads' turns
        try:
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                kind, headers = self.requests[turn % len(self.requests)]
                started = time.monotonic()
                status, answer = self._request(conn, headers)
                self._count(kind, status, answer, started)
                turn += 1
                due = max(due + interval, time.monotonic())
        finally:
            conn.close()

    def wait_sent(self, count: int, timeout: float = 15.0) -> None:
        """Until `count` more requests were answered (the load really flows)."""
        target = self.sent + count
        wait_until(lambda: self.sent >= target, timeout=timeout, what=f"{count} requests answered")

    def between(self, start: float, end: float) -> dict[str, int]:
        """Verdicts of the requests started in [start, end) (monotonic times)."""
        found: dict[str, int] = {}
        with self._lock:
            for at, verdict in self.events:
                if start <= at < end:
                    found[verdict] = found.get(verdict, 0) + 1
        return found

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), daemon=True) for n in range(self.threads)
        ]
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)
        self.seconds = time.monotonic() - self._started

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def report(self) -> str:
        """One line: sent, rate, every verdict, latency p50/p99/max, the samples."""
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2] * 1000 if ordered else 0.0
        p99 = ordered[int(len(ordered) * 0.99)] * 1000 if ordered else 0.0
        top = ordered[-1] * 1000 if ordered else 0.0
        verdicts = ", ".join(
            f"{name} {self.counts.get(name, 0)}"
            for name in sorted({"failed", "leaked", *self.counts})
        )
        return (
            f"sent {self.sent} in {self.seconds:.1f}s ({self.rate:.0f}/s on {self.threads} "
            f"keep-alive connections): {verdicts}; latency p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
            f"max {top:.0f} ms" + (f"; samples {self.samples}" if self.samples else "")
        )
