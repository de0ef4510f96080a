"""Soak: mixed load for minutes while the scaler and the rules keep changing; is RSS flat?

The demo's chain (demo/scenario.py: an embedded etcd and `tasklane up --actuator local`, the
rules of demo/rules.yaml, 2 online instances of fund-facade -> account-svc -> nav-pricing,
each a `tasklane run` with its Envoy sidecar, and a `tasklane gateway` as the entry), then
for `--duration` seconds, all at once:

- load: GETs through the gateway at a steady `--rate`; while a task run is open and its
  groups are ready, `--dyed-share` of them carry the run's dye (`fund-yield@<run id>`,
  trusted by the gateway's shared secret), the rest are online (every tenth with a spoofed
  dye that the gateway must strip). Counted from the apps' answers: sent, failed (non-2xx or
  no answer), leaked (an online request served by a task group at any hop, or a dyed one
  served outside the chain's `task` group);
- scaling: a run of the fund-yield task every `--task-period` seconds, reported with
  `tasklane task start|finish`, so the scaler (scale period 2 s, scale-down window 60 s)
  starts the task groups on demand and stops (parks) them after the run; its decisions are
  read back from GET /api/v1/profile/{service} and counted as scale events;
- rules: every `--rule-period` seconds one change, cycling through: the fund-yield
  nav-pricing rate limit 200 -> 300/s, a chain `soak-extra` added, its weight 0 -> 50 with
  the limit back at 200/s, the chain deleted;
- every 10 s: VmRSS of `tasklane up` (its own PID) and of its embedded etcd, the control
  plane's threads and open fds.

Prints the machine, one row per minute and a summary with the RSS trend (least-squares slope
after `--warmup`). Flat means: the fitted growth over 10 minutes is under 5 % of the fitted
RSS at the end of the warm-up; the summary also compares the highest RSS of the last 3
minutes with the highest before. (The first version of this bench found RSS climbing: the
garbage cycles of closed API connections waited minutes for a collection under the control
plane's GC threshold, until runtime/memory.py collect_young.)
Exit code 1 on a leak, a failure, growth or a process left behind. Every child is stopped on
exit, Ctrl-C included.

    .venv/bin/python bench/soak.py [--duration 600] [--rate 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from common import machine  # bench/ is the script's directory

from controlplane.errors import RuntimeFailure
from controlplane.model.load import load_files
from controlplane.model.rules import ScheduledTask
from demo.scenario import RULES, TRUST_HEADER, Demo, task_groups_ready
from demo.traffic import CHAIN, ENTRY, Tally

SAMPLE_PERIOD_S = 10.0
MINUTE_S = 60.0
WORKERS = 32  # in-flight requests at most; beyond, a tick is skipped (and counted)
REQUEST_TIMEOUT_S = 10.0
CAPACITY_WAIT_S = 90.0
FLAT_GROWTH = 0.05  # per 10 minutes, of the RSS at the end of the warm-up
LATE_S = 180.0  # a plateau sets no new high in the last minutes (GC runs every few minutes)
EXTRA_CHAIN = "soak-extra"
# What a `tasklane` client command (Demo.cli) may raise: an error exit, a timeout.
CLI_ERRORS = (RuntimeFailure, subprocess.SubprocessError, OSError)


@dataclass
class Bucket:
    """What happened in one minute of the soak."""

    sent: int = 0
    failed: int = 0
    leaked: int = 0
    dyed: int = 0
    skipped: int = 0  # load ticks not sent: every worker busy
    latencies_ms: list[float] = field(default_factory=list)
    scale_up: int = 0
    scale_down: int = 0
    rule_changes: int = 0
    task_ready_max: int = 0  # registered task-group instances over the chain, at most


@dataclass
class Sample:
    """One look at the control plane's process (t in seconds since the soak started)."""

    t: float
    cp_rss_kib: int
    etcd_rss_kib: int
    cp_threads: int
    cp_fds: int
    cp_cpu_s: float  # user + system CPU seconds so far
    sidecars: int
    nacks: int


@dataclass
class Trend:
    """A least-squares line through RSS samples after the warm-up."""

    first_mib: float
    last_mib: float
    max_mib: float
    fit_start_mib: float
    slope_mib_per_10min: float

    @property
    def growth(self) -> float:
        return self.slope_mib_per_10min / self.fit_start_mib if self.fit_start_mib else 0.0

    @property
    def flat(self) -> bool:
        return self.growth < FLAT_GROWTH


class Soak:
    """The load, the task runs, the rule changes and the samples, around one `Demo`."""

    def __init__(self, demo: Demo, args: argparse.Namespace) -> None:
        self.demo = demo
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.buckets: dict[int, Bucket] = {}
        self.samples: list[Sample] = []
        self.tally = Tally()
        self.failures: Counter[str] = Counter()
        self.failure_examples: list[str] = []
        self.leak_examples: list[str] = []
        self.events: list[str] = []  # runs and rule changes, with their times
        self.run_dye: str | None = None  # set while a run is open and its groups are ready
        self.runs = 0
        self.run_failures = 0
        self.rule_failures = 0
        self.in_flight = 0
        self.decisions: dict[tuple[str, str, float], int] = {}
        self.last_replicas: dict[tuple[str, str], int] = {}
        self.task = next(p.rule for p in load_files([RULES]) if isinstance(p.rule, ScheduledTask))
        self.docs = list(yaml.safe_load_all(RULES.read_text()))

    # --- bookkeeping ------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the soak started (setup excluded)."""
        return time.monotonic() - self.t0

    def bucket(self, t: float | None = None) -> Bucket:
        """The minute `t` (default: now) falls in; call with the lock held."""
        minute = int((self.now() if t is None else t) // MINUTE_S)
        return self.buckets.setdefault(minute, Bucket())

    def event(self, text: str) -> None:
        with self.lock:
            self.events.append(f"{self.now():6.1f}s {text}")

    # --- load -------------------------------------------------------------------------------

    def load(self) -> None:
        """Ticks at `rate` per second, each handed to a worker; a stall is not made up for
        with a burst, and a tick finding every worker busy is skipped and counted."""
        interval = 1 / self.args.rate
        next_tick = time.monotonic()
        number = 0
        trust = {TRUST_HEADER: self.demo.secret}
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="load") as pool:
            while not self.stop.is_set():
                delay = next_tick - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)
                    continue
                next_tick = max(next_tick + interval, time.monotonic() - 1)
                with self.lock:
                    if self.in_flight >= WORKERS:
                        self.bucket().skipped += 1
                        continue
                    self.in_flight += 1
                dye = self.run_dye
                dyed = dye is not None and number % 100 < self.args.dyed_share * 100
                if dyed:
                    headers = {"x-task-dye": str(dye), **trust}
                elif number % 10 == 9:
                    headers = {"x-task-dye": "fund-yield"}  # spoofed: the gateway strips it
                else:
                    headers = {}
                pool.submit(self.one_request, number, dyed, headers)
                number += 1

    def one_request(self, number: int, dyed: bool, headers: dict[str, str]) -> None:
        """Send one request and count it in the minute it was sent in."""
        started = time.monotonic()
        try:
            status, hops, error = request(self.demo.gateway_port, f"/soak?n={number}", headers)
            latency_ms = (time.monotonic() - started) * 1000
            leaked = [
                f"{hop.get('service')}:{hop.get('group')}"
                for hop in hops
                if hop.get("group") != expected_group(dyed, hop.get("service", ""))
            ]
            self.tally.record(dyed, status, hops)
            kind = "dyed" if dyed else "online"
            with self.lock:
                bucket = self.bucket(started - self.t0)
                bucket.sent += 1
                bucket.dyed += dyed
                bucket.latencies_ms.append(latency_ms)
                if not 200 <= status < 300:
                    bucket.failed += 1
                    self.failures[f"{kind} {status}"] += 1
                    if len(self.failure_examples) < 20:
                        self.failure_examples.append(
                            f"{started - self.t0:6.1f}s {kind} {status}: {error}"
                        )
                if leaked:
                    bucket.leaked += 1
                    if len(self.leak_examples) < 20:
                        self.leak_examples.append(
                            f"{started - self.t0:6.1f}s {kind} served by {', '.join(leaked)}"
                        )
        finally:
            with self.lock:
                self.in_flight -= 1

    # --- task runs --------------------------------------------------------------------------

    def scheduler(self) -> None:
        """A run every `task_period` seconds (the first at once): started, dyed traffic once
        every hop group has its replicas, finished after `run_seconds` of it."""
        next_run = self.now()
        while not self.stop.is_set():
            if self.now() >= next_run:
                next_run += self.args.task_period
                try:
                    self.one_run(f"soak-{self.runs + 1}-{int(self.wall0)}")
                except CLI_ERRORS as exc:
                    self.run_failures += 1
                    self.event(f"run failed: {exc}")
            self.stop.wait(0.5)

    def one_run(self, run_id: str) -> None:
        """One reported run; finished even when the capacity never came (the scaler then
        takes it down again)."""
        self.demo.cli("task", "start", self.task.name, "--id", run_id)
        self.runs += 1
        self.event(f"run {run_id} started")
        try:
            deadline = time.monotonic() + CAPACITY_WAIT_S
            while not self.stop.is_set() and not self.task_groups_ready():
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"task capacity not ready after {CAPACITY_WAIT_S:g}s")
                self.stop.wait(0.2)
            self.event(f"run {run_id} capacity ready, dyed traffic on")
            self.run_dye = f"{self.task.name}@{run_id}"
            self.stop.wait(self.args.run_seconds)
        finally:
            self.run_dye = None
            time.sleep(0.5)  # requests already sent with the dye come back first
            self.demo.cli("task", "finish", self.task.name, "--id", run_id)
            self.event(f"run {run_id} finished")

    def task_groups_ready(self) -> bool:
        """demo.scenario's check; a failed read of the replicas is a "not yet"."""
        try:
            return task_groups_ready(self.demo, self.task)
        except (OSError, ValueError):
            return False

    # --- rule changes -----------------------------------------------------------------------

    def rule_changer(self) -> None:
        """One rule change every `rule_period` seconds, cycling through four."""
        step = 0
        while not self.stop.wait(self.args.rule_period):
            try:
                what = self.change_rules(step % 4)
            except CLI_ERRORS as exc:
                self.rule_failures += 1
                what = f"FAILED: {exc}"
            with self.lock:
                self.bucket().rule_changes += 1
            self.event(f"rules: {what}")
            step += 1

    def change_rules(self, step: int) -> str:
        """Apply (or delete) step `step` of the cycle; says what changed."""
        if step == 3:
            self.demo.cli("delete", "taskchain", EXTRA_CHAIN)
            return f"chain {EXTRA_CHAIN} deleted"
        rate, extra, what = {
            0: (300, None, "fund-yield nav-pricing rate limit 200 -> 300/s"),
            1: (300, 0, f"chain {EXTRA_CHAIN} added (account-svc task weight 0)"),
            2: (200, 50, f"{EXTRA_CHAIN} weight 0 -> 50, nav-pricing rate limit 300 -> 200/s"),
        }[step]
        path = self.demo.work_dir / f"rules-{step}.yaml"
        path.write_text(yaml.safe_dump_all(self.rules(rate, extra), sort_keys=False))
        self.demo.cli("apply", "-f", str(path))
        return what

    def rules(self, rate: int, extra_weight: int | None) -> list[dict[str, Any]]:
        """demo/rules.yaml with the fund-yield nav-pricing hop limited to `rate`/s, plus the
        `soak-extra` chain (a loose one, sent no traffic) when `extra_weight` is given."""
        docs = json.loads(json.dumps(self.docs))  # a deep copy of plain data
        for doc in docs:
            if doc["kind"] == "TaskChain" and doc["metadata"]["name"] == self.task.chain:
                for hop in doc["spec"]["hops"]:
                    if hop["service"] == "nav-pricing":
                        hop["rateLimit"] = {"requestsPerSecond": rate, "burst": rate}
        if extra_weight is not None:
            docs.append(
                {
                    "apiVersion": "tasklane.io/v1",
                    "kind": "TaskChain",
                    "metadata": {"name": EXTRA_CHAIN},
                    "spec": {
                        "dye": {"values": [EXTRA_CHAIN]},
                        "fallback": "loose",
                        "hops": [
                            {"service": "account-svc", "group": "task", "weight": extra_weight},
                            {
                                "service": "nav-pricing",
                                "group": "default",
                                "rateLimit": {"requestsPerSecond": 1000, "burst": 1000},
                            },
                        ],
                    },
                }
            )
        return docs

    # --- samples ----------------------------------------------------------------------------

    def sample(self) -> None:
        """RSS, threads and fds of the control plane, its etcd's RSS, the sidecars and NACKs
        it reports, the task instances registered, and new scaling decisions."""
        up = self.demo.procs[0].pid
        etcd = next((pid for pid in children(up) if "etcd" in comm(pid)), None)
        cp = proc_status(up)
        status = get_json(self.demo.http_port, "/api/v1/status") or {}
        nodes = status.get("nodes", [])
        nacks = sum(t.get("nacks", 0) for n in nodes for t in n.get("types", {}).values())
        t = self.now()
        sample = Sample(
            t=round(t, 1),
            cp_rss_kib=cp.get("VmRSS", 0),
            etcd_rss_kib=proc_status(etcd).get("VmRSS", 0) if etcd else 0,
            cp_threads=cp.get("Threads", 0),
            cp_fds=count_fds(up),
            cp_cpu_s=cpu_seconds(up),
            sidecars=len(nodes),
            nacks=nacks,
        )
        instances = (get_json(self.demo.http_port, "/api/v1/instances") or {}).get("items", [])
        ready = sum(1 for item in instances if item.get("group") == "task")
        with self.lock:
            self.samples.append(sample)
            bucket = self.bucket(t)
            bucket.task_ready_max = max(bucket.task_ready_max, ready)
        self.poll_decisions()

    def poll_decisions(self) -> None:
        """New scaler decisions of the chain's services, as up or down by their group's
        previous decision (those before the soak only set the starting point)."""
        found = []
        for service in CHAIN:
            body = get_json(self.demo.http_port, f"/api/v1/profile/{service}?minutes=1") or {}
            found += body.get("decisions", [])
        for decision in sorted(found, key=lambda d: d["at"]):
            key = (decision["service"], decision["group"], decision["at"])
            if key in self.decisions:
                continue
            self.decisions[key] = decision["replicas"]
            group = key[:2]
            before = self.last_replicas.get(group)
            self.last_replicas[group] = decision["replicas"]
            at = decision["at"] - self.wall0
            if at < 0 or before is None or before == decision["replicas"]:
                continue
            with self.lock:
                bucket = self.bucket(at)
                if decision["replicas"] > before:
                    bucket.scale_up += 1
                else:
                    bucket.scale_down += 1
                self.events.append(
                    f"{at:6.1f}s scale {group[0]}|{group[1]} {before} -> "
                    f"{decision['replicas']}: {decision['reason']}"
                )

    # --- report -----------------------------------------------------------------------------

    def row(self, minute: int) -> str:
        with self.lock:
            b = self.buckets.get(minute, Bucket())
            before = [s for s in self.samples if s.t < minute * MINUTE_S]
            rss = [s for s in self.samples if minute * MINUTE_S <= s.t < (minute + 1) * MINUTE_S]
        p99 = percentile(b.latencies_ms, 99)
        last = rss[-1] if rss else None
        start = before[-1] if before else (rss[0] if rss else None)
        cpu = "-"
        if last and start and last.t > start.t:
            cpu = f"{(last.cp_cpu_s - start.cp_cpu_s) / (last.t - start.t):.0%}"
        cp = f"{last.cp_rss_kib / 1024:.1f}" if last else "-"
        etcd = f"{last.etcd_rss_kib / 1024:.1f}" if last else "-"
        extra = f"{last.cp_threads:>4} {last.cp_fds:>4}" if last else f"{'-':>4} {'-':>4}"
        return (
            f"{minute + 1:>3} {b.sent:>6} {b.dyed:>5} {b.failed:>6} {b.leaked:>6} {b.skipped:>5}"
            f" {p99:>7.0f} {b.scale_up:>3}/{b.scale_down:<3} {b.rule_changes:>5}"
            f" {b.task_ready_max:>5} {cpu:>6} {cp:>7} {etcd:>7} {extra}"
        )

    @staticmethod
    def header() -> str:
        return (
            f"{'min':>3} {'sent':>6} {'dyed':>5} {'failed':>6} {'leaked':>6} {'skip':>5}"
            f" {'p99 ms':>7} {'up/down':<7} {'rules':>5} {'task':>5} {'cp CPU':>6} {'cp MiB':>7}"
            f" {'etcd MiB':>7} {'thr':>4} {'fds':>4}"
        )


def request(port: int, path: str, headers: dict[str, str]) -> tuple[int, list[dict], str]:
    """GET fund-facade through the gateway: status, the hops that served it, and what went
    wrong if it failed (demo.traffic.send drops the body, which names the failing hop)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", path, headers={"Host": ENTRY, **headers})
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return 599, [], f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    try:
        hops = json.loads(body).get("hops", [])
    except (ValueError, AttributeError):
        return resp.status, [], body[:120].decode(errors="replace")
    error = next((hop["error"] for hop in hops if "error" in hop), "")
    return resp.status, hops, error


def expected_group(dyed: bool, service: str) -> str:
    """The group that must serve a hop: the chain's (demo.traffic.CHAIN) for a dyed request,
    `default` for an online one."""
    return CHAIN.get(service, "default") if dyed else "default"


def get_json(port: int, path: str) -> Any:
    """GET a control plane API path; None when it does not answer 200 with JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def proc_status(pid: int) -> dict[str, int]:
    """The numeric kB/count fields of /proc/PID/status (VmRSS, Threads...); {} if gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` from /proc/PID/stat; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_fds(pid: int) -> int:
    """Open file descriptors of `pid`: sockets of streams that never close would pile up."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def comm(pid: int) -> str:
    """The process name (how the embedded etcd is told from other children)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/*/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def leftovers(marks: Sequence[str]) -> list[str]:
    """Processes (other than this one) whose command line or environment mentions one of
    `marks` (our API URL, our work dir): what the soak would have left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            if any(mark.encode() in cmdline + environ for mark in marks):
                command = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {command[:100]}")
    return found


def percentile(values: list[float], q: int) -> float:
    """Nearest-rank percentile (an observed value); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def trend(points: list[tuple[float, float]], warmup: float) -> Trend | None:
    """RSS first/last/max over the whole soak and a least-squares line after `warmup`
    (seconds, KiB -> MiB); None with fewer than 3 samples after the warm-up."""
    if not points:
        return None
    values = [kib / 1024 for _, kib in points]
    after = [(t, kib / 1024) for t, kib in points if t >= warmup]
    if len(after) < 3:
        return None
    slope, intercept = statistics.linear_regression([t for t, _ in after], [v for _, v in after])
    return Trend(
        first_mib=values[0],
        last_mib=values[-1],
        max_mib=max(values),
        fit_start_mib=intercept + slope * after[0][0],
        slope_mib_per_10min=slope * 600,
    )


def run(args: argparse.Namespace) -> int:
    """Set up, soak, tear down, report; the exit code says whether it passed."""
    print(f"machine: {machine()}", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="tasklane-soak-"))
    demo = Demo(work_dir)
    soak: Soak | None = None
    threads: list[threading.Thread] = []
    interrupted = setup_failed = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.start()
        soak = Soak(demo, args)
        soak.poll_decisions()  # the decisions taken while starting: the starting point
        print(
            f"\nsoak: {args.duration:g}s at {args.rate:g} req/s ({args.dyed_share:.0%} dyed"
            f" during runs), a run every {args.task_period:g}s for {args.run_seconds:g}s,"
            f" a rule change every {args.rule_period:g}s\n"
        )
        print(Soak.header(), flush=True)
        for target in (soak.load, soak.scheduler, soak.rule_changer):
            threads.append(threading.Thread(target=target, daemon=True))
            threads[-1].start()
        next_sample, printed = 0.0, 0
        while soak.now() < args.duration:
            time.sleep(min(1.0, max(0.0, next_sample - soak.now())))
            if soak.now() >= next_sample:
                soak.sample()
                next_sample += SAMPLE_PERIOD_S
            while soak.now() >= (printed + 1) * MINUTE_S + 2:  # 2 s for answers in flight
                print(soak.row(printed), flush=True)
                printed += 1
        soak.stop.set()
        for thread in threads:
            thread.join(30)
        soak.sample()
        time.sleep(3)  # the scaler's last decisions
        soak.poll_decisions()
        while printed * MINUTE_S < args.duration:
            print(soak.row(printed), flush=True)
            printed += 1
        isolation = get_json(demo.http_port, "/api/v1/isolation") or {}
    except KeyboardInterrupt:
        interrupted = True
        isolation = {}
    except (RuntimeFailure, RuntimeError) as exc:  # a process of the demo failed to start
        print(f"soak: {exc} (logs in {work_dir})", file=sys.stderr)
        setup_failed = True
        isolation = {}
    finally:
        # A second Ctrl-C must not cut the teardown short (it is bounded by stop timeouts).
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if soak is not None:
            soak.stop.set()
            for thread in threads:
                thread.join(30)
        demo.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    left = leftovers([demo.server, str(work_dir)])
    for _ in range(50):  # children killed with their parent may take a moment to go
        if not left:
            break
        time.sleep(0.1)
        left = leftovers([demo.server, str(work_dir)])
    if soak is None or setup_failed or not soak.samples:
        for line in left:
            print(f"left behind: {line}")
        return 2
    code = report(soak, args, isolation, left)
    if code == 0 and not interrupted:
        shutil.rmtree(work_dir, ignore_errors=True)  # etcd's WAL alone is ~60 MiB
    else:
        print(f"logs kept in {work_dir}")
    return 130 if interrupted else code


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the soak like Ctrl-C: through the same teardown."""
    raise KeyboardInterrupt


def report(soak: Soak, args: argparse.Namespace, isolation: dict, left: list[str]) -> int:
    """The summary table; 0 when nothing failed, leaked, grew or was left behind."""
    buckets = soak.buckets.values()
    sent = sum(b.sent for b in buckets)
    failed = sum(b.failed for b in buckets)
    leaked = sum(b.leaked for b in buckets)
    latencies = [v for b in buckets for v in b.latencies_ms]
    elapsed = max((s.t for s in soak.samples), default=args.duration) or 1
    warmup = min(args.warmup, args.duration / 3)
    cp = trend([(s.t, s.cp_rss_kib) for s in soak.samples], warmup)
    etcd = trend([(s.t, s.etcd_rss_kib) for s in soak.samples], warmup)
    totals = isolation.get("totals", {})
    ups = sum(b.scale_up for b in buckets)
    downs = sum(b.scale_down for b in buckets)
    first, last = soak.samples[0], soak.samples[-1]

    def rss(name: str, t: Trend | None, field: str) -> list[tuple[str, str]]:
        if t is None:
            return [(f"{name} RSS", "too few samples after the warm-up")]
        verdict = "flat" if t.flat else "GROWING"
        late = [getattr(s, field) / 1024 for s in soak.samples if s.t >= elapsed - LATE_S]
        early = [getattr(s, field) / 1024 for s in soak.samples if s.t < elapsed - LATE_S]
        return [
            (f"{name} RSS first / last / max", f"{t.first_mib:.1f} / {t.last_mib:.1f} / "
             f"{t.max_mib:.1f} MiB"),
            (f"{name} RSS slope after {warmup:g}s", f"{t.slope_mib_per_10min:+.2f} MiB per 10 min"
             f" ({t.growth:+.1%} of {t.fit_start_mib:.1f} MiB): {verdict}"),
            (f"{name} RSS max, last {LATE_S:g}s / before", f"{max(late, default=math.nan):.1f}"
             f" / {max(early, default=math.nan):.1f} MiB"),
        ]  # fmt: skip

    rows = [
        ("requests sent", f"{sent} ({sent / elapsed:.1f}/s; {sum(b.dyed for b in buckets)} dyed)"),
        ("ticks skipped (all workers busy)", str(sum(b.skipped for b in buckets))),
        ("failed (non-2xx or no answer)", f"{failed} {dict(soak.failures)}" if failed else "0"),
        ("leaked (apps' answers)", str(leaked)),
        ("leaks counted by the control plane", str(totals.get("leaks", "-"))),
        ("latency p50 / p99 / max", f"{percentile(latencies, 50):.0f} / "
         f"{percentile(latencies, 99):.0f} / {max(latencies, default=math.nan):.0f} ms"),
        ("task runs (failed)", f"{soak.runs} ({soak.run_failures})"),
        ("scale events (up / down)", f"{ups + downs} ({ups} / {downs})"),
        ("rule changes (failed)", f"{sum(b.rule_changes for b in buckets)} ({soak.rule_failures})"),
        ("sidecars connected (first / last)", f"{first.sidecars} / {last.sidecars}"),
        ("xDS NACKs", str(last.nacks)),
        *rss("control plane", cp, "cp_rss_kib"),
        *rss("etcd", etcd, "etcd_rss_kib"),
        ("control plane threads (first / last)", f"{first.cp_threads} / {last.cp_threads}"),
        ("control plane fds (first / last)", f"{first.cp_fds} / {last.cp_fds}"),
        ("processes left behind", str(len(left))),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print("\nsummary")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nserved per hop x group (apps' answers)\n{soak.tally.render()}")
    print("\nevents")
    for line in sorted(soak.events, key=lambda e: float(e.split("s", 1)[0])):
        print(f"  {line}")
    for title, examples in (("failures", soak.failure_examples), ("leaks", soak.leak_examples)):
        if examples:
            print(f"\nfirst {title}")
            for line in examples:
                print(f"  {line}")
    for line in left:
        print(f"left behind: {line}")
    print(f"\nflat: fitted growth over 10 min < {FLAT_GROWTH:.0%} of the RSS at the warm-up end")
    if args.json:
        per_minute = sorted(soak.buckets.items())
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "minutes": {m: asdict(b) | {"latencies_ms": None} for m, b in per_minute},
                    "samples": [asdict(s) for s in soak.samples],
                    "control_plane_rss": asdict(cp) if cp else None,
                    "etcd_rss": asdict(etcd) if etcd else None,
                    "events": soak.events,
                    "failures": dict(soak.failures),
                    "isolation_totals": totals,
                    "left_behind": left,
                },
                indent=1,
            )
        )
    ok = not (failed or leaked or left or soak.run_failures or soak.rule_failures)
    ok = ok and (cp is None or cp.flat)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of soak (600)")
    parser.add_argument("--rate", type=float, default=100, help="requests per second (100)")
    parser.add_argument(
        "--dyed-share", type=float, default=0.3, help="share of dyed requests during a run (0.3)"
    )
    parser.add_argument("--task-period", type=float, default=90, help="a run every ... s (90)")
    parser.add_argument("--run-seconds", type=float, default=30, help="dyed traffic per run (30)")
    parser.add_argument(
        "--rule-period", type=float, default=45, help="a rule change every ... s (45)"
    )
    parser.add_argument("--warmup", type=float, default=120, help="s before the RSS fit (120)")
    parser.add_argument("--json", help="also write the samples and the summary to this file")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
