"""xDS push benchmark: how long until N ADS streams have ACKed one changed route.

One process runs the real `AdsServer` (this file with `--serve`), two or more processes hold
the N streams (`--client`), and this controller drives them. The server is alone in its
process so that its RSS and CPU are its own; every latency is measured inside the server on
one clock: from just before `SnapshotCache.set_snapshot` to the arrival of each stream's ACK
of the new RDS version (the `Observer.acked` hook).

    .venv/bin/python bench/xds_push.py --streams 100,1000,5000 --modes sotw,delta --changes 3

Traffic stays on 127.0.0.1; every wait is bounded; every child is terminated on exit.
Diagnostics, none needed for the table: --verbose (server progress and stderr),
--server-option NAME=INT (extra grpc server option, to try a fix without editing serve()),
--gc-freeze (gc.freeze() in the server once settled), --cprofile and --py-spy BIN (profile
the server during the changes, into --profile-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.runtime.memory import collect_young, tune_gc
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AdsServer, Observer, serve
from controlplane.xds.snapshot import Resource, Snapshot, state_version
from controlplane.xds.status import NodeStatus, StatusBoard
from controlplane.xds.stream import Push
from controlplane.xds.types import ENDPOINT, PUSH_ORDER, ROUTE

ROOT = Path(__file__).resolve().parent.parent
ROUTE_NAME = "bench-routes"
LISTENER_NAME = "bench-http"
TARGETS_P99_S = {1000: 0.300, 5000: 1.5}  # p99 ACK latency targets by stream count
TARGET_KB_PER_STREAM = 64.0


def cluster_names(count: int) -> list[str]:
    """The cluster (and EDS) names of every role: clients subscribe by these names, so they
    never have to unpack a resource to learn them."""
    return [f"svc-{i:03d}" for i in range(count)]


def role_cluster(role: int) -> str:
    """node.cluster of the streams of one role; `role_of` makes it "bench-<r>|default"."""
    return f"bench-{role}"


def raise_fd_limit() -> None:
    """5000 streams on ~50 connections need few fds, but grpc and pipes add up: take the hard
    limit so an fd shortage never masquerades as a server problem."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- server process -----------------------------------------------------------------------


class AckRecorder(Observer):
    """Records, per stream, when the target RDS version was first written and ACKed. Runs on
    the server's event loop, so it does dict work only."""

    def __init__(self) -> None:
        self.target: dict[str, str] = {}  # role -> RDS version being measured
        self.pushes: dict[str, float] = {}
        self.acks: dict[str, float] = {}
        self.expected = 0
        self.done = asyncio.Event()

    def arm(self, target: dict[str, str], expected: int) -> None:
        self.target, self.expected = target, expected
        self.pushes, self.acks = {}, {}
        self.done.clear()

    def pushed(self, node: NodeStatus, push: Push) -> None:
        if push.type_url == ROUTE and self.target.get(node.role) == push.version:
            self.pushes.setdefault(node.node_id, time.time())

    def acked(self, node: NodeStatus, type_url: str, version: str) -> None:
        if (
            type_url == ROUTE
            and self.target.get(node.role) == version
            and node.node_id not in self.acks
        ):
            self.acks[node.node_id] = time.time()
            if len(self.acks) >= self.expected:
                self.done.set()


class GcClock:
    """CPU time in the cyclic garbage collector (thread time, so comparable to process CPU
    whatever else runs on the machine): with thousands of streams each holding tasks, futures
    and dicts, a full collection walks all of them, and the pause lands on whichever stream
    allocated last."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds, self.collections = 0.0, [0, 0, 0]

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._start
            self.collections[info["generation"]] += 1


class BenchServer:
    """The ADS server plus a JSON-lines control channel on stdin/stdout."""

    def __init__(self, roles: int, clusters: int, endpoints: int, profile: str) -> None:
        sys.path.insert(0, str(ROOT))  # testkit is not an installed package
        from testkit import resources

        self._resources = resources
        self.roles = [f"{role_cluster(r)}|default" for r in range(roles)]
        self.clusters = cluster_names(clusters)
        self.base: dict[str, list[Resource]] = {}
        for role in self.roles:  # built per role: roles share no bytes, as in production
            items = [Resource.of(resources.listener(LISTENER_NAME, 10_000, ROUTE_NAME))]
            for i, name in enumerate(self.clusters):
                items.append(Resource.of(resources.cluster(name)))
                ports = [20_000 + i * endpoints + j for j in range(endpoints)]
                items.append(Resource.of(resources.endpoints(name, *ports)))
            self.base[role] = items
        self.cache = SnapshotCache()
        self.board = StatusBoard()
        self.recorder = AckRecorder()
        tune_gc()  # as ControlPlane.start does
        self.ads = AdsServer(self.cache, self.board, self.recorder)
        self.profile_path = profile
        self.gc_clock = GcClock()
        self.gc_freeze = False
        self.verbose = False
        self.profiler: Any = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()

    def snapshot(self, role: str, change: int) -> tuple[Snapshot, str]:
        """The role's snapshot after `change` edits: route /svc-000/ points at svc-000 at
        first, then at another cluster on every change (never the previous one), every other
        route at its own cluster. Returns it and its RDS version."""
        routes = {f"/{name}/": name for name in self.clusters}
        if change:
            other = 1 + (change - 1) % (len(self.clusters) - 1)
            routes[f"/{self.clusters[0]}/"] = self.clusters[other]
        route = Resource.of(self._resources.route(ROUTE_NAME, routes))
        return Snapshot.of([*self.base[role], route]), state_version([route])

    async def run(self) -> None:
        server, port = await serve(self.ads, "127.0.0.1:0")
        collector = asyncio.create_task(collect_young())  # as ControlPlane.start does
        for role in self.roles:
            self.cache.set_snapshot(role, self.snapshot(role, 0)[0])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._reply({"event": "ready", "port": port, "pid": os.getpid()})
        try:
            while line := await reader.readline():
                command = json.loads(line)
                if command["cmd"] == "quit":
                    break
                handler = getattr(self, "cmd_" + command["cmd"])
                self._reply(await handler(**command.get("args", {})))
        finally:
            collector.cancel()
            if self.profiler is not None:
                self.profiler.dump_stats(self.profile_path)
            await server.stop(grace=0)

    @staticmethod
    def _reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def _synced(self) -> tuple[int, int]:
        """(streams that ACKed every type of their role's current snapshot, streams)."""
        expected = {
            role: {t: state_version(snap.resources(t).values()) for t in PUSH_ORDER}
            for role in self.roles
            if (snap := self.cache.snapshot(role)) is not None
        }
        nodes = self.board.nodes()
        synced = 0
        for node in nodes:
            want = expected[node.role]
            if all(
                (s := node.types.get(t)) is not None and s.acked_version == want[t]
                for t in PUSH_ORDER
            ):
                synced += 1
        return synced, len(nodes)

    async def cmd_settle(self, streams: int, timeout: float) -> dict[str, Any]:
        """Wait until `streams` nodes are connected and have ACKed the whole snapshot."""
        start = last = time.time()
        synced, connected = self._synced()
        while synced < streams and time.time() - start < timeout:
            await asyncio.sleep(0.1)
            synced, connected = self._synced()
            if self.verbose and time.time() - last >= 1:
                last = time.time()
                print(
                    f"  t={last - start:.0f}s connected={connected} synced={synced}",
                    file=sys.stderr,
                    flush=True,
                )
        if self.gc_freeze:
            gc.freeze()  # diagnostics: the settled streams' objects leave the collector's walk
        return {"synced": synced, "connected": connected, "seconds": time.time() - start}

    async def cmd_change(self, change: int, streams: int, timeout: float) -> dict[str, Any]:
        """Publish one changed route to every role and wait for every stream's ACK of it."""
        built = {role: self.snapshot(role, change) for role in self.roles}
        self.recorder.arm({role: version for role, (_, version) in built.items()}, streams)
        cpu0 = time.process_time()
        self.gc_clock.reset()
        if self.profiler is not None:
            self.profiler.enable()
        t0 = time.time()
        for role, (snap, _) in built.items():
            self.cache.set_snapshot(role, snap)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.recorder.done.wait(), timeout)
        if self.profiler is not None:
            self.profiler.disable()
        return {
            "latencies": [round(at - t0, 6) for at in self.recorder.acks.values()],
            "last_push": max((at - t0 for at in self.recorder.pushes.values()), default=0.0),
            "cpu": time.process_time() - cpu0,
            "missing": streams - len(self.recorder.acks),
            "gc": self.gc_clock.seconds,
            "gc_collections": self.gc_clock.collections,
        }


def add_server_options(extra: list[str]) -> None:
    """Diagnostics only: append grpc options ("name=int") to the ones `serve()` passes, to
    test a server-side fix without editing the server."""
    if not extra:
        return
    pairs = [(name, int(value)) for name, _, value in (o.partition("=") for o in extra)]
    original = grpc.aio.server

    def patched(*args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> Any:
        return original(*args, options=[*options, *pairs], **kwargs)

    grpc.aio.server = patched  # type: ignore[assignment]


def server_main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    add_server_options(args.server_option)
    bench = BenchServer(args.roles, args.clusters, args.endpoints, args.cprofile_out)
    bench.gc_freeze, bench.verbose = args.gc_freeze, args.verbose
    asyncio.run(bench.run())


# --- client process -----------------------------------------------------------------------


class Counts:
    """What one client process saw, reported to the controller when it is stopped."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.examples: dict[str, str] = {}  # reason -> one detail message

    def failed(self, reason: str, detail: str = "") -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.examples.setdefault(reason, detail)


async def sotw_stream(
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub,
    node: base_pb2.Node,
    subscribed: dict[str, list[str]],
) -> int:
    """Envoy's SotW loop reduced to the wire: subscribe to all four types, then ACK every
    response by echoing version_info, nonce and the subscribed names. Resources stay packed.
    Returns the number of responses seen."""
    call = stub.StreamAggregatedResources()
    for i, type_url in enumerate(PUSH_ORDER):
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=subscribed.get(type_url, ())
        )
        if i == 0:
            request.node.CopyFrom(node)
        await call.write(request)
    seen = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        seen += 1
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=subscribed.get(response.type_url, ()),
            )
        )
    return seen


async def delta_stream(
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub,
    node: base_pb2.Node,
    subscribed: dict[str, list[str]],
) -> int:
    """The incremental variant: subscribe once (wildcard for CDS/LDS), ACK with the nonce."""
    call = stub.DeltaAggregatedResources()
    for i, type_url in enumerate(PUSH_ORDER):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribed.get(type_url, ())
        )
        if i == 0:
            request.node.CopyFrom(node)
        await call.write(request)
    seen = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        seen += 1
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce
            )
        )
    return seen


async def client_run(args: argparse.Namespace) -> None:
    """Hold `args.count` streams on channels of `args.per_channel` streams each, until
    SIGTERM; then print what failed as one JSON line. A failed stream is reopened after a
    jittered exponential backoff, as Envoy does (0.5 s base, 8 s cap here). A local
    subchannel pool per channel gives each its own TCP connection (grpc would otherwise
    share one connection among channels with equal arguments)."""
    subscribed = {ENDPOINT: cluster_names(args.clusters), ROUTE: [ROUTE_NAME]}
    run = delta_stream if args.mode == "delta" else sotw_stream
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(math.ceil(args.count / args.per_channel))
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    counts = Counts()

    async def one(index: int) -> None:
        node = base_pb2.Node(
            id=f"{args.mode}-{index:05d}", cluster=role_cluster(index % args.roles)
        )
        stub = stubs[(index - args.offset) // args.per_channel]
        backoff = 0.5
        while True:
            try:
                seen = await run(stub, node, subscribed)
                counts.failed("ended by server")
            except grpc.aio.AioRpcError as exc:
                seen = 0
                counts.failed(exc.code().name, exc.details() or "")
            except Exception as exc:  # whatever breaks one stream must not end its retries
                seen = 0
                counts.failed(type(exc).__name__, str(exc))
            backoff = 0.5 if seen else min(backoff * 2, 8.0)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    for index in range(args.offset, args.offset + args.count):
        tasks.append(asyncio.create_task(one(index)))
        if len(tasks) % 200 == 0:
            await asyncio.sleep(0.01)  # spread the connects a little
    await stop.wait()
    report = {"failures": counts.failures, "examples": counts.examples}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os._exit(0)  # tearing down thousands of streams politely only adds noise


def client_main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    asyncio.run(client_run(args))


# --- controller ---------------------------------------------------------------------------


@dataclass
class Row:
    """One (mode, N) result."""

    mode: str
    streams: int
    latencies: list[float] = field(default_factory=list)
    all_acked: list[float] = field(default_factory=list)
    last_push: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_gc: list[float] = field(default_factory=list)
    gc_full: int = 0  # most full (gen 2) collections in one change
    sync_s: float = 0.0
    load: float = 0.0  # 1-minute load average as the changes start: others share the CPUs
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    missing: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # client streams reopened, by why
    examples: dict[str, str] = field(default_factory=dict)  # why -> one grpc detail
    error: str = ""


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: p99 of 1000 samples is the 10th worst, never interpolated."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def rss_kb(pid: int) -> int:
    """VmRSS of a process, read from /proc (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerHandle:
    """The server child and its control channel; every reply is awaited with a timeout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"server exited (code {await self.proc.wait()})")
        return json.loads(line)

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command; the reply may take the command's own timeout plus a margin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read(args.get("timeout", 0) + 10)


async def stop(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """Terminate one child we started, then kill it if it lingers."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), grace)


async def start_py_spy(args: argparse.Namespace, pid: int, name: str) -> asyncio.subprocess.Process:
    """Sample the server (not the clients) while the changes run: collapsed stacks, one file
    per row, readable with any flamegraph tool or plain grep."""
    out = Path(args.profile_dir) / f"pyspy-{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = await asyncio.create_subprocess_exec(
        args.py_spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
        "--threads", "--nonblocking", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # attaching takes a moment
    return spy


async def run_case(mode: str, streams: int, args: argparse.Namespace) -> Row:
    """One row. The server's stderr goes to a file, shown only if the row fails: grpc logs
    every stream that the clients' exit cancels."""
    with tempfile.TemporaryFile("w+") as server_log:
        return await _run_case(mode, streams, args, server_log)


async def _run_case(mode: str, streams: int, args: argparse.Namespace, server_log: IO[str]) -> Row:
    """Fresh server, fresh clients: settle, measure RSS, then `args.changes` route changes."""
    row = Row(mode, streams)
    me = str(Path(__file__).resolve())
    common = ["--roles", str(args.roles), "--clusters", str(args.clusters)]
    server_cmd = [sys.executable, me, "--serve", *common, "--endpoints", str(args.endpoints)]
    server_cmd += ["--gc-freeze"] * args.gc_freeze + ["--verbose"] * args.verbose
    for option in args.server_option:
        server_cmd += ["--server-option", option]
    if args.cprofile:
        out = Path(args.profile_dir) / f"cprofile-{mode}-{streams}.prof"
        out.parent.mkdir(parents=True, exist_ok=True)
        server_cmd += ["--cprofile-out", str(out)]
    proc = await asyncio.create_subprocess_exec(
        *server_cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=None if args.verbose else server_log,
        cwd=ROOT,
        limit=1 << 24,  # a change's reply carries N latencies
    )
    server = ServerHandle(proc)
    clients: list[asyncio.subprocess.Process] = []
    spy: asyncio.subprocess.Process | None = None
    try:
        ready = await server.read(60)
        await asyncio.sleep(0.5)
        row.rss_before_kb = rss_kb(proc.pid)
        share = math.ceil(streams / args.clients)
        for offset in range(0, streams, share):
            clients.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, me, "--client", *common,
                    "--target", f"127.0.0.1:{ready['port']}", "--mode", mode,
                    "--offset", str(offset), "--count", str(min(share, streams - offset)),
                    "--per-channel", str(args.per_channel),
                    stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                )
            )  # fmt: skip
        timeout = 30 + streams * 0.02
        settled = await server.call("settle", streams=streams, timeout=timeout)
        row.sync_s = settled["seconds"]
        if settled["synced"] < streams:
            dead = [c.returncode for c in clients if c.returncode is not None]
            row.error = (
                f"only {settled['synced']}/{streams} streams synced "
                f"({settled['connected']} connected, client exits {dead})"
            )
            return row
        await asyncio.sleep(1.0)  # let the last ACK's follow-up work finish
        row.rss_after_kb = rss_kb(proc.pid)
        row.load = os.getloadavg()[0]
        if args.py_spy:
            spy = await start_py_spy(args, proc.pid, f"{mode}-{streams}")
        for change in range(1, args.changes + 1):
            before = sum(cpu_seconds(c.pid) for c in clients)
            result = await server.call(
                "change", change=change, streams=streams, timeout=args.change_timeout
            )
            row.client_cpu.append(sum(cpu_seconds(c.pid) for c in clients) - before)
            row.latencies += result["latencies"]
            row.missing += result["missing"]
            row.all_acked.append(max(result["latencies"], default=math.inf))
            row.last_push.append(result["last_push"])
            row.server_cpu.append(result["cpu"])
            row.server_gc.append(result["gc"])
            row.gc_full = max(row.gc_full, result["gc_collections"][2])
            await asyncio.sleep(0.5)
        return row
    except (TimeoutError, RuntimeError, OSError, ValueError) as exc:
        server_log.seek(0)
        tail = server_log.read()[-2000:]
        row.error = f"{type(exc).__name__}: {exc}" + (f"\nserver stderr:\n{tail}" if tail else "")
        return row
    finally:
        if spy is not None:  # SIGINT makes py-spy write what it sampled
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(spy.wait(), 30)
            await stop(spy)
        for client in clients:
            await stop(client)
            if client.stdout is not None:
                for line in (await client.stdout.read()).splitlines():
                    with contextlib.suppress(ValueError, KeyError):
                        report = json.loads(line)
                        for why, count in report["failures"].items():
                            row.failures[why] = row.failures.get(why, 0) + count
                        row.examples.update(report["examples"])
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                proc.stdin.write(b'{"cmd": "quit"}\n')
                await proc.stdin.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)  # the profile dump takes a moment
        await stop(proc)


def verdict(value: float, limit: float | None) -> str:
    if limit is None:
        return "-"
    return "pass" if value <= limit else "MISS"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def print_table(rows: list[Row]) -> None:
    """The required columns first, then the ones that say where the time went."""
    header = (
        f"{'mode':<6}{'N':>6}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}  {'all ACKed ms':<16}"
        f"{'KB/stream':>10}  {'p99 target':<16}{'mem target':<12}|"
        f"{'last push':>10}{'srv CPU':>8}{'srv GC':>7}{'full GC':>8}{'cli CPU':>8}"
        f"{'sync s':>7}{'reopen':>7}{'load':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.error or not row.latencies:
            print(f"{row.mode:<6}{row.streams:>6}  FAILED: {row.error or 'no samples'}")
            continue
        p99 = percentile(row.latencies, 99)
        kb = (row.rss_after_kb - row.rss_before_kb) / row.streams
        limit = TARGETS_P99_S.get(row.streams)
        p99_target = f"<= {ms(limit)} {verdict(p99, limit)}" if limit else "-"
        acked = "/".join(ms(s) for s in row.all_acked)
        if row.missing:
            acked += f" ({row.missing} missing)"
        print(
            f"{row.mode:<6}{row.streams:>6}{ms(percentile(row.latencies, 50)):>8}{ms(p99):>8}"
            f"{ms(max(row.latencies)):>8}  {acked:<16}{kb:>10.1f}  {p99_target:<16}"
            f"{'<= 64 ' + verdict(kb, TARGET_KB_PER_STREAM):<12}|"
            f"{ms(statistics.median(row.last_push)):>10}"
            f"{statistics.median(row.server_cpu):>8.2f}{statistics.median(row.server_gc):>7.2f}"
            f"{row.gc_full:>8}{statistics.median(row.client_cpu):>8.2f}"
            f"{row.sync_s:>7.1f}{sum(row.failures.values()):>7}{row.load:>6.1f}"
        )
    for row in rows:
        if row.failures:
            why = ", ".join(
                f"{reason} x{count} ({row.examples.get(reason) or 'no detail'!r})"
                for reason, count in sorted(row.failures.items())
            )
            print(f"{row.mode} N={row.streams}: client streams failed and were reopened: {why}")


async def controller(args: argparse.Namespace) -> int:
    raise_fd_limit()
    import google.protobuf
    from google.protobuf.internal import api_implementation

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}; "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"grpcio {grpc.__version__}, protobuf {google.protobuf.__version__} "
        f"({api_implementation.Type()})"
    )
    roles = (
        "1 role shared by all streams (its encoded bytes are shared)"
        if args.roles == 1
        else f"streams spread round-robin over {args.roles} roles (bytes shared within a role)"
    )
    print(
        f"per role: 1 listener, 1 route config of {args.clusters} routes, {args.clusters} EDS "
        f"clusters x {args.endpoints} endpoints; {roles}; {args.clients} client processes, "
        f"{args.per_channel} streams per channel; {args.changes} changes of one route per row"
    )
    print(
        "latency: server-side ACK arrival - set_snapshot() call, one clock; all ACKed: each "
        "change; last push: last RDS response written (ms, median); srv CPU / srv GC / cli "
        "CPU: seconds per change (median); full GC: most gen-2 collections in one change; "
        "sync: s to connect and ACK the first snapshot; reopen: client streams the server "
        "refused or cut; load: 1-min load average (others share the CPUs)"
    )
    print(flush=True)
    rows = []
    for mode in args.modes.split(","):
        for streams in (int(n) for n in args.streams.split(",")):
            started = time.time()
            row = await run_case(mode, streams, args)
            took = time.time() - started
            print(f"  {mode} N={streams}: {took:.0f} s", file=sys.stderr, flush=True)
            rows.append(row)
    print_table(rows)
    sys.stdout.flush()
    return 1 if any(r.error for r in rows) else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="100,1000,5000")
    parser.add_argument("--modes", default="sotw,delta")
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--per-channel", type=int, default=100, help="streams per channel")
    parser.add_argument("--roles", type=int, default=1)
    parser.add_argument("--clusters", type=int, default=50, help="clusters = routes per role")
    parser.add_argument("--endpoints", type=int, default=3, help="endpoints per cluster")
    parser.add_argument("--change-timeout", type=float, default=30.0)
    parser.add_argument("--profile-dir", default="bench-profiles", help="where profiles go")
    parser.add_argument(
        "--cprofile", action="store_true", help="cProfile the server during the changes (slow)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="server progress and stderr on this terminal"
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="diagnostics: gc.freeze() in the server once the streams have settled",
    )
    parser.add_argument("--py-spy", default="", help="py-spy binary: sample the server's changes")
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="diagnostics: extra grpc server option on top of serve()'s (repeatable)",
    )
    # internal roles of this same file
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--cprofile-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clusters < 2:
        parser.error("--clusters must be at least 2: a change moves a route to another cluster")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve:
        server_main(args)
        return 0
    if args.client:
        client_main(args)
        return 0
    return asyncio.run(controller(args))


if __name__ == "__main__":
    sys.exit(main())
