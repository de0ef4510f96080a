"""Data-plane benchmark: what routing dyed requests by chain costs inside one real sidecar.

One Envoy sidecar (templates/sidecar.yaml, `--concurrency 1`) is fed over ADS by the real
`Translator` with 1, 100 and 1000 chains, each with a hop on `target-svc`, so that service's
virtual host holds that many dyes in its matcher tree. The load (`x-task-dye: <the last
chain's dye>`, `Host: target-svc`) goes to its egress listener and on to a backend that is a
second Envoy answering with a `direct_response` (C++, not the bottleneck). Baselines: the same
sidecar serving a hand-built route config with one `/` route to the backend ("plain"), and the
backend without any proxy ("direct"). Also measured: the dye carried only in `baggage:
task-dye=<dye>` (read once by the sidecar's baggage filter into a header looked up in the
same maps: translate/baggage.py), a per-run dye `<chain>@<run id>` (each chain claims
`<chain>@*`: the prefix map) in the header and in `baggage` as OpenTelemetry forwards it
(`%40` for the `@`), and online requests that carry unrelated baggage.

Each case: fixed connections, a warm-up, then a fixed duration; the cases are interleaved
over `--rounds` rounds and the table shows the median round, so a burst of other load on the
machine moves one round, not one case. Every run is checked against the sidecar's stats:
its requests must have reached the cluster the case expects. Everything stays on 127.0.0.1;
every child is stopped on exit.

    .venv/bin/python bench/dataplane.py [--duration 5] [--connections 8] [--rounds 3]
        [--case NAME ...]   # only these cases, e.g. more rounds of `--case baggage`
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common import machine  # bench/ is the script's directory

from controlplane.model.dye import DEFAULT_BAGGAGE_KEY, DEFAULT_DYE_HEADER, Dye
from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import Group, Hop, RuleSet, Service, TaskChain
from controlplane.model.validate import check
from controlplane.runtime.envoy import EnvoyProcess, envoy_binary
from controlplane.runtime.ports import free_port
from controlplane.runtime.process import dying_with_parent, stop_process
from controlplane.translate import Translator
from controlplane.translate.scope import Scopes
from controlplane.xds.names import HEALTH_PATH, STATIC_CLUSTERS, cluster_name, full_view
from controlplane.xds.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # testkit (the ADS server double, resources) is not installed
from testkit import resources  # noqa: E402
from testkit.ads_server import AdsThread  # noqa: E402

CLIENT, TARGET, TASK_GROUP = "client-app", "target-svc", "task"
FILLERS = tuple(f"filler-{i}" for i in range(10))  # other hops, so chains look like chains
CHAIN_COUNTS = (1, 100, 1000)
PLAIN_CLUSTER = "backend"
TARGET_ADDED = 0.05  # p50 at 1000 chains may exceed p50 at 1 chain by at most 5 %
DYE_CASES = ("dye header", "dye in baggage only", "per-run dye header", "per-run dye in baggage")
UNRELATED_BAGGAGE = "userId=alice,sessionId=af3c9e1b,isProduction=false"

BACKEND_YAML = """\
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}
static_resources:
  listeners:
  - name: backend
    address: {socket_address: {address: 127.0.0.1, port_value: %(port)d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.\
http_connection_manager.v3.HttpConnectionManager
          stat_prefix: backend
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                direct_response: {status: 200, body: {inline_string: "ok\\n"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

WRK_REPORT_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


# --- configuration ------------------------------------------------------------------------


def chain_rules(count: int) -> RuleSet:
    """`count` chains with a hop on TARGET. Names and dyes carry `count`, so a probe with
    the last chain's dye reaches the task group only once this very config is active."""
    groups = (Group(DEFAULT_GROUP, 1, 4), Group(TASK_GROUP, 0, 4))
    services = [Service(name, "http", groups) for name in (CLIENT, TARGET, *FILLERS)]
    chains = [
        TaskChain(
            name=chain_name(count, i),
            dye=Dye(
                header=DEFAULT_DYE_HEADER,
                baggage_key=DEFAULT_BAGGAGE_KEY,
                exact=(last_dye(count, i),),
                prefixes=(f"{chain_name(count, i)}@",),
            ),
            fallback="strict",
            hops=(
                Hop(FILLERS[i % len(FILLERS)], TASK_GROUP, 100, None),
                Hop(TARGET, TASK_GROUP, 100, None),
            ),
        )
        for i in range(count)
    ]
    rules = RuleSet.empty().with_rules([*services, *chains])
    check(rules)
    return rules


def chain_name(count: int, index: int) -> str:
    return f"n{count}-chain-{index:04d}"


def run_dye(count: int) -> str:
    """A per-run dye of the last chain, `<chain>@<run id>`, as the task runner stamps it."""
    return f"{chain_name(count, count - 1)}@20261203T020000Z-7f3a9c"


def last_dye(count: int, index: int | None = None) -> str:
    """The exact dye of chain `index` (default: the last, by name) of the `count`-chain set."""
    return f"n{count}-task-{(count - 1 if index is None else index):04d}"


def translated(count: int, backend: int) -> Snapshot:
    """The sidecar's snapshot from the real translator; both target groups are the backend."""
    endpoints = {(TARGET, g): [("127.0.0.1", backend)] for g in (DEFAULT_GROUP, TASK_GROUP)}
    # The full view, which a state-of-the-world sidecar gets: every host inline, no VHDS.
    scopes = Scopes(full=frozenset({GroupKey(CLIENT, DEFAULT_GROUP)}))
    built = Translator().build(chain_rules(count), endpoints, scopes)
    return built[full_view(f"{CLIENT}|{DEFAULT_GROUP}")]


def plain(backend: int) -> Snapshot:
    """One `/` route to the backend, for any Host: what a sidecar without tasklane does."""
    return Snapshot.of(
        [
            resources.cluster(PLAIN_CLUSTER),
            resources.endpoints(PLAIN_CLUSTER, backend),
            resources.route("egress", {"/": PLAIN_CLUSTER}),
            resources.route("inbound", {"/": PLAIN_CLUSTER}),
        ]
    )


# --- processes ----------------------------------------------------------------------------


class Backend:
    """A static Envoy that answers 200 to everything: fast enough never to be the limit."""

    def __init__(self, work_dir: Path) -> None:
        self.port, self.admin = free_port(), free_port()
        self.config = work_dir / "backend.yaml"
        self.log = work_dir / "backend.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Backend:
        self.config.write_text(BACKEND_YAML % {"port": self.port, "admin": self.admin})
        command = [str(envoy_binary()), "-c", str(self.config), "--concurrency", "1",
                   "--disable-hot-restart", "-l", "warning"]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                dying_with_parent(command), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        wait_for(lambda: get(self.port, "/", {})[0] == 200, 10, "backend Envoy answers")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """One GET on 127.0.0.1 (http.client: an http_proxy in the environment is not used)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def wait_for(ok: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ok() (connection errors count as not yet) until true; RuntimeError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if ok():
                return
        time.sleep(0.05)
    raise RuntimeError(f"not reached in {timeout:g}s: {what}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """What one fixed-duration run measured."""

    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    errors: int  # socket errors + non-2xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Wrk:
    """wrk (C, epoll): one thread, a fixed set of keep-alive connections."""

    name = "wrk"

    def __init__(self, work_dir: Path, connections: int) -> None:
        self.script = work_dir / "report.lua"
        self.script.write_text(WRK_REPORT_LUA)
        self.connections = connections

    def run(self, port: int, headers: dict[str, str], seconds: int) -> Load:
        command = ["wrk", "-t1", f"-c{self.connections}", f"-d{seconds}s", "--timeout", "2s",
                   "-s", str(self.script)]  # fmt: skip
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        command.append(f"http://127.0.0.1:{port}/")
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
        line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
        out = json.loads(line.removeprefix("WRKJSON "))
        return Load(
            requests=out["requests"],
            seconds=out["duration_us"] / 1e6,
            p50_us=out["p50_us"],
            p99_us=out["p99_us"],
            errors=out["socket_errors"] + out["status_errors"],
        )


def _client_loop(
    port: int, request: bytes, seconds: float, ready: Any, go: Any, queue: Any
) -> None:
    """One keep-alive connection sending `request` back to back, from `go` for `seconds`;
    puts (latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    ready.release()
    go.wait(60)
    deadline = time.perf_counter() + seconds
    try:
        while (start := time.perf_counter()) < deadline:
            sock.sendall(request)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reader.read(length)
            latencies.append(time.perf_counter() - start)
            errors += not status.startswith(b"HTTP/1.1 2")
    except OSError:
        errors += 1
    finally:
        sock.close()
    queue.put((latencies, errors))


class PythonClient:
    """Fallback when wrk is missing: one process per connection. On two cores its own CPU
    is the limit, so its numbers are client-bound and only comparable with each other.
    Spawned, not forked: a fork of this process (gRPC threads running) hangs."""

    name = "python (client-bound)"

    def __init__(self, work_dir: Path, connections: int) -> None:
        self.connections = connections
        self.context = multiprocessing.get_context("spawn")

    def run(self, port: int, headers: dict[str, str], seconds: int) -> Load:
        lines = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "bench", **headers}.items())
        request = f"GET / HTTP/1.1\r\n{lines}\r\n".encode()
        ready, go, queue = self.context.Semaphore(0), self.context.Event(), self.context.Queue()
        procs = [
            self.context.Process(
                target=_client_loop, args=(port, request, seconds, ready, go, queue), daemon=True
            )
            for _ in range(self.connections)
        ]
        try:
            for proc in procs:
                proc.start()
            for _ in procs:  # every connection open before the clock starts
                if not ready.acquire(timeout=60):
                    raise RuntimeError("a python client process did not start")
            go.set()
            results = [queue.get(timeout=seconds + 30) for _ in procs]
        finally:
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
        latencies = sorted(x for lat, _ in results for x in lat)
        if not latencies:
            raise RuntimeError("the python client completed no request")
        return Load(
            requests=len(latencies),
            seconds=seconds,
            p50_us=latencies[len(latencies) // 2] * 1e6,
            p99_us=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
            errors=sum(err for _, err in results),
        )


# --- cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row: which config the sidecar runs, what the requests carry, where they must go."""

    name: str
    chains: int | None  # None: no translator config (plain / direct)
    headers: dict[str, str]
    expect_cluster: str | None  # None: no sidecar (direct)

    @property
    def config(self) -> str:
        if self.expect_cluster is None:
            return "direct"
        return "plain" if self.chains is None else f"chains-{self.chains}"


@dataclass
class Result:
    case: Case
    runs: list[Load] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # sidecar CPU per request

    def median_run(self) -> Load:
        """The run with the median p50: its p99 and throughput come from the same round."""
        return sorted(self.runs, key=lambda r: r.p50_us)[len(self.runs) // 2]


def cases() -> list[Case]:
    task, online = cluster_name(TARGET, TASK_GROUP), cluster_name(TARGET, DEFAULT_GROUP)
    host = {"Host": TARGET}
    out = [
        Case("direct (no proxy)", None, host, None),
        Case("plain Envoy, one / route", None, host, PLAIN_CLUSTER),
    ]
    for count in CHAIN_COUNTS:
        dye = last_dye(count)
        out.append(Case("dye header", count, {**host, DEFAULT_DYE_HEADER: dye}, task))
        baggage = f"{DEFAULT_BAGGAGE_KEY}={dye}"
        out.append(Case("dye in baggage only", count, {**host, "baggage": baggage}, task))
        run = run_dye(count)
        out.append(Case("per-run dye header", count, {**host, DEFAULT_DYE_HEADER: run}, task))
        forwarded = f"{DEFAULT_BAGGAGE_KEY}={quote(run, safe='')}"  # as OpenTelemetry sends it
        out.append(Case("per-run dye in baggage", count, {**host, "baggage": forwarded}, task))
    for count in (CHAIN_COUNTS[0], CHAIN_COUNTS[-1]):
        other = {**host, "baggage": UNRELATED_BAGGAGE}
        out.append(Case("online + other baggage", count, other, online))
    return out


class Bench:
    """The running pieces: ADS server, backend, sidecar, load tool."""

    def __init__(self, ads: AdsThread, backend: Backend, sidecar: EnvoyProcess, egress: int,
                 load: Wrk | PythonClient, args: argparse.Namespace) -> None:  # fmt: skip
        self.ads, self.backend, self.sidecar, self.egress = ads, backend, sidecar, egress
        self.load, self.args = load, args
        self.snapshots: dict[str, Snapshot] = {"plain": plain(backend.port)}
        for count in CHAIN_COUNTS:
            self.snapshots[f"chains-{count}"] = translated(count, backend.port)
        self.active = ""
        self.role = f"{CLIENT}|{DEFAULT_GROUP}"

    def use(self, case: Case) -> None:
        """Push the case's config and wait until a probe request is routed as expected."""
        if case.expect_cluster is None or self.active == case.config:
            return
        snapshot = self.snapshots[case.config]
        self.ads.call(self.ads.running.cache.set_snapshot, self.role, snapshot)

        def routed() -> bool:
            before = self.upstream(case.expect_cluster)
            status, _ = get(self.egress, "/", case.headers)
            return status == 200 and self.upstream(case.expect_cluster) > before

        wait_for(routed, 20, f"{case.config}: {case.name} reaches {case.expect_cluster}")
        self.active = case.config

    def upstream(self, cluster: str) -> int:
        return self.sidecar.stats().get(f"cluster.{cluster}.upstream_rq_total", 0)

    def measure(self, case: Case) -> tuple[Load, float]:
        """Warm-up, then one fixed-duration run; (load, sidecar CPU µs per request)."""
        self.use(case)
        port = self.backend.port if case.expect_cluster is None else self.egress
        self.load.run(port, case.headers, self.args.warmup)
        if case.expect_cluster is None:
            return self.load.run(port, case.headers, self.args.duration), 0.0
        before, cpu_before = self.upstream(case.expect_cluster), cpu_seconds(self.sidecar.pid)
        load = self.load.run(port, case.headers, self.args.duration)
        cpu = cpu_seconds(self.sidecar.pid) - cpu_before
        routed = self.upstream(case.expect_cluster) - before
        if load.errors or routed < load.requests:
            raise RuntimeError(
                f"{case.config} {case.name}: {load.errors} errors, {routed} of {load.requests} "
                f"requests reached {case.expect_cluster}"
            )
        return load, cpu / max(load.requests, 1) * 1e6


def print_table(results: list[Result], load_name: str) -> None:
    """The table; a row with chains is compared with the same request at 1 chain, by p50 and
    by the sidecar's CPU per request (the steadier of the two on a shared machine)."""
    by_key = {(r.case.name, r.case.chains): r for r in results}
    header = (
        f"{'case':<25}{'chains':>7}{'p50 µs':>8}{'p99 µs':>9}{'req/s':>8}"
        f"{'CPU µs/req':>11}  {'vs 1 chain: p50, CPU':<21}  target"
    )
    print(header)
    print("-" * (len(header) + 22))
    for result in results:
        run, case = result.median_run(), result.case
        chains = "-" if case.chains is None else str(case.chains)
        cpu = statistics.median(result.cpu_us) if case.expect_cluster else 0.0
        one = by_key.get((case.name, 1))
        vs, target = "-", "-"
        if case.chains and one is not None:
            added = run.p50_us / one.median_run().p50_us - 1
            added_cpu = cpu / statistics.median(one.cpu_us) - 1
            vs = f"{added:+.1%}, {added_cpu:+.1%}"
            if case.name in DYE_CASES and case.chains == max(CHAIN_COUNTS):
                target = f"p50 <= +5%: {'pass' if added <= TARGET_ADDED else 'MISS'}"
        print(
            f"{case.name:<25}{chains:>7}{run.p50_us:>8.0f}{run.p99_us:>9.0f}{run.rps:>8.0f}"
            f"{f'{cpu:.1f}' if cpu else '-':>11}  {vs:<21}  {target}"
        )
    print(f"\nload tool: {load_name}; each row is the round with the median p50 of its case")
    for result in results:
        chains = "" if result.case.chains is None else f" @{result.case.chains}"
        rounds = "  ".join(f"{r.p50_us:.0f}/{r.p99_us:.0f}/{r.rps:.0f}" for r in result.runs)
        cpus = "/".join(f"{c:.1f}" for c in result.cpu_us) if result.case.expect_cluster else "-"
        print(f"  {result.case.name + chains:<31} p50/p99/rps: {rounds}  CPU µs/req: {cpus}")


@contextlib.contextmanager
def terminated_on_signal() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit, so every `with` below stops its processes."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # wrk takes whole seconds.
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds before each run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all cases")
    parser.add_argument("--python-client", action="store_true", help="even if wrk is there")
    parser.add_argument(
        "--case", action="append", default=[], help="only cases whose name contains this"
    )
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminated_on_signal())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tasklane-dp-")))
        use_wrk = shutil.which("wrk") is not None and not args.python_client
        load: Wrk | PythonClient = (Wrk if use_wrk else PythonClient)(work, args.connections)
        backend = stack.enter_context(Backend(work))
        ads = stack.enter_context(AdsThread(static_clusters=STATIC_CLUSTERS))
        egress = free_port()
        sidecar = EnvoyProcess(
            node_id=f"{CLIENT}/bench",
            service=CLIENT,
            group=DEFAULT_GROUP,
            xds_host="127.0.0.1",
            xds_port=ads.port,
            admin_port=free_port(),
            delta=False,
            work_dir=work / "sidecar",
            parts={
                "sidecar.yaml": {
                    "egress_port": egress,
                    "inbound_host": "127.0.0.1",
                    "inbound_port": free_port(),
                    "app_port": free_port(),  # nothing listens: no case goes inbound
                    "health_path": HEALTH_PATH,
                }
            },
        )
        bench = Bench(ads, backend, sidecar, egress, load, args)
        # Something to start with: the sidecar stays not-ready until it has its config.
        ads.call(ads.running.cache.set_snapshot, bench.role, bench.snapshots["plain"])
        stack.enter_context(sidecar)
        sidecar.wait_ready(20)
        print(
            f"sidecar: Envoy --concurrency 1, egress :{egress}; backend: Envoy direct_response "
            f":{backend.port}; {args.connections} connections, {args.warmup:g} s warm-up + "
            f"{args.duration:g} s per run, {args.rounds} rounds; load tool: {load.name}"
        )
        wanted = [c for c in cases() if not args.case or any(w in c.name for w in args.case)]
        results = [Result(case) for case in wanted]
        for number in range(args.rounds):
            started = time.monotonic()
            for result in results:
                run, cpu = bench.measure(result.case)
                result.runs.append(run)
                result.cpu_us.append(cpu)
            print(f"  round {number + 1}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        print()
        print_table(results, load.name)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
