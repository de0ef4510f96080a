"""xDS push benchmark: N sidecar streams on a generated mesh; how long one chain change takes
to reach them all, and what they cost the server.

One process runs the real `AdsServer` (this file with `--serve`) fed by the real
`Translator` on the generated mesh of bench/mesh.py (default 1000 services x 3 groups, 200
chains, each service declaring ~4 callees); a few processes hold the N streams (`--client`,
grpc.aio); this controller drives them. Each stream plays one sidecar of a (service, group)
of the mesh, with the node metadata of templates/bootstrap.yaml, subscribes as a sidecar
does, and by default has its own TCP connection, as real sidecars do (`--per-channel 100`:
streams share connections, a labelled option only):
- `sotw`: the full view, the whole mesh (CDS and LDS wildcard, EDS of every group cluster,
  RDS `egress` and `inbound`), as every sidecar held it before scoping;
- `delta`: the role's scoped view (CDS, LDS and VHDS wildcard, RDS `egress` and `inbound`,
  and, as Envoy does, EDS of each cluster it is sent, asked before it ACKs the clusters).

A change is the weight of the first hop of the chain whose first hop most services call,
rebuilt by the translator and published with `SnapshotCache.set_snapshots`, as `Sync` does.
It reaches the streams whose role's snapshot it changes: every stream in `sotw`, the roles
holding that service in `delta` (the "reached" column). Every latency is measured inside
the server on one clock: from the changed rules (before the build) to the ACK that brings a
reached stream to its role's new versions of every type. A stream that has not got there
within --change-timeout did not converge: it counts as a failure in the table and as
infinitely late in the percentiles. Initial sync is the same measure from the first stream's
open to the last stream's full ACK.

    .venv/bin/python bench/xds_push.py --streams 1000 --modes sotw,delta --changes 3

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from common import machine  # bench/ is the script's directory
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from mesh import GROUPS, busiest_chain, change_weight, make_endpoints, make_rules, service_names

from controlplane.model.group import GroupKey
from controlplane.runtime.memory import collect_young, tune_gc
from controlplane.translate import Scopes, Translator
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.names import (
    EGRESS_ROUTE,
    INBOUND_ROUTE,
    META_GROUP,
    META_SERVICE,
    STATIC_CLUSTERS,
    cluster_name,
    full_view,
    view_role,
)
from controlplane.xds.server import AdsServer, Observer, serve
from controlplane.xds.snapshot import InconsistentSnapshot, Snapshot, state_version
from controlplane.xds.status import NodeStatus, StatusBoard
from controlplane.xds.stream import Push
from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST

ROOT = Path(__file__).resolve().parent.parent
# What a sidecar subscribes to (ECDS is the gateway's only), in the order it asks: the full
# view over SotW, the scoped one over Delta (EDS as its clusters come, see delta_stream).
SIDECAR_TYPES = {
    "sotw": (CLUSTER, LISTENER, ENDPOINT, ROUTE),
    "delta": (CLUSTER, LISTENER, ROUTE, VIRTUAL_HOST),
}
ACKED_TYPES = {"sotw": SIDECAR_TYPES["sotw"], "delta": (*SIDECAR_TYPES["delta"], ENDPOINT)}
TARGETS_P99_S = {1000: 0.300, 5000: 1.5}  # one-chain change reaches N sidecars, p99
TARGET_SYNC_S = {1000: 5.0}  # first sync of N sidecars
TARGET_KB_PER_STREAM = 64.0


def sidecar_role(index: int, services: Sequence[str]) -> tuple[str, str]:
    """The (service, group) stream `index` plays: consecutive streams differ in both, so N
    streams cover min(N, services) services and every group."""
    return services[index % len(services)], GROUPS[index % len(GROUPS)]


def raise_fd_limit() -> None:
    """A connection per stream: thousands of fds on each side. Take the hard limit so an fd
    shortage never masquerades as a server problem."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- server process -----------------------------------------------------------------------


def expected_versions(snapshots: Mapping[str, Snapshot], mode: str) -> dict[str, dict[str, str]]:
    """role -> type -> the version a sidecar stream of the role ACKs once it holds the whole
    snapshot of its view (its subscriptions name every resource of it; a type the view has
    nothing of, such as EDS of a scope without clusters, is never asked). Roles share their
    maps, so each map's version is computed once."""
    memo: dict[int, str] = {}
    out = {}
    for key, snapshot in snapshots.items():
        role, full = view_role(key)
        if (mode == "sotw") != full:
            continue
        wanted = {}
        for type_url in ACKED_TYPES[mode]:
            resources = snapshot.resources(type_url)
            if type_url == ENDPOINT and not resources:
                continue
            if id(resources) not in memo:
                memo[id(resources)] = state_version(resources.values())
            wanted[type_url] = memo[id(resources)]
        out[role] = wanted
    return out


class AckRecorder(Observer):
    """Records, per stream, when it first held every type of its role's target snapshot, and
    the resource bytes written to it meanwhile. Runs on the server's event loop, so it does
    dict work only."""

    def __init__(self) -> None:
        self.expected: dict[str, dict[str, str]] = {}  # role -> type -> version
        self.roles: dict[str, str] = {}  # node id -> role, of the open streams
        self.acks: dict[str, float] = {}  # node id -> when it converged
        self.last_push = 0.0
        self.payload_bytes = 0  # resource payloads written since arm()
        self.first_open = 0.0
        self.wanted = 0
        self.done = asyncio.Event()

    def arm(self, expected: dict[str, dict[str, str]], streams: int | None = None) -> int:
        """Wait for `streams` (default: the open streams whose role's versions change) to
        reach `expected`; returns how many that is."""
        before, self.expected = self.expected, expected
        if streams is None:
            streams = sum(before.get(r) != expected.get(r) for r in self.roles.values())
        self.wanted = streams
        self.acks, self.last_push, self.payload_bytes = {}, 0.0, 0
        self.done.clear()
        if not streams:
            self.done.set()
        return streams

    def opened(self, node: NodeStatus, identity: base_pb2.Node) -> None:
        self.first_open = self.first_open or time.time()
        self.roles[node.node_id] = node.role

    def closed(self, node: NodeStatus) -> None:
        self.roles.pop(node.node_id, None)

    def pushed(self, node: NodeStatus, push: Push) -> None:
        self.payload_bytes += sum(len(r.payload) for r in push.resources)
        want = self.expected.get(node.role)
        if want is not None and want.get(push.type_url) == push.version:
            self.last_push = time.time()

    def acked(self, node: NodeStatus, type_url: str, version: str) -> None:
        want = self.expected.get(node.role)
        if want is None or want.get(type_url) != version or node.node_id in self.acks:
            return
        if all(
            (s := node.types.get(t)) is not None and s.acked_version == v for t, v in want.items()
        ):
            self.acks[node.node_id] = time.time()
            if len(self.acks) >= self.wanted:
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
    """The ADS server on the translator's snapshots, plus a JSON-lines control channel on
    stdin/stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rules = make_rules(args.services, args.chains, args.seed)
        self.endpoints = make_endpoints(self.rules, args.instances)
        self.chain = busiest_chain(self.rules)  # the one changed
        self.streams = args.count  # streams the bench holds
        self.mode = args.mode
        self.scopes = Scopes(
            full=frozenset(GroupKey(s, g) for s in self.rules.services for g in GROUPS)
            if args.mode == "sotw"
            else frozenset()
        )
        self.translator = Translator()
        self.cache = SnapshotCache(STATIC_CLUSTERS)
        self.board = StatusBoard()
        self.recorder = AckRecorder()
        tune_gc()  # as ControlPlane.start does
        self.ads = AdsServer(self.cache, self.board, self.recorder, sotw_view=full_view)
        self.profile_path = args.cprofile_out
        self.gc_clock = GcClock()
        self.gc_freeze = args.gc_freeze
        self.verbose = args.verbose
        self.profiler: Any = None
        if self.profile_path:
            import cProfile

            self.profiler = cProfile.Profile()

    async def publish(self, change: int) -> tuple[float, int, int]:
        """Build the rules after `change` edits (0: the base rules) and publish them, arming
        the recorder in between. Returns when the build started, the roles whose snapshot
        changed and the streams that are to converge (all of them for the first build)."""
        rules = change_weight(self.rules, self.chain, change) if change else self.rules
        started = time.time()
        snapshots = await asyncio.to_thread(
            self.translator.build, rules, self.endpoints, self.scopes
        )
        reached = self.recorder.arm(
            expected_versions(snapshots, self.mode), None if change else self.streams
        )
        changed = 0
        for role, outcome in self.cache.set_snapshots(snapshots).items():
            if isinstance(outcome, InconsistentSnapshot):
                raise RuntimeError(f"snapshot of {role} refused: {outcome}")
            changed += bool(outcome)
        return started, changed, reached

    async def run(self) -> None:
        server, port = await serve(self.ads, "127.0.0.1:0")
        collector = asyncio.create_task(collect_young())  # as ControlPlane.start does
        await self.publish(0)  # armed: the initial sync is measured like a change
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        hops = sum(len(c.hops) for c in self.rules.chains.values())
        self._reply(
            {"event": "ready", "port": port, "pid": os.getpid(), "chain": self.chain,
             "roles": len(self.cache.roles()), "hops": hops}
        )  # fmt: skip
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

    async def cmd_settle(self, timeout: float) -> dict[str, Any]:
        """Wait until every stream holds its role's whole first snapshot."""
        recorder, start = self.recorder, time.time()
        while not recorder.done.is_set() and time.time() - start < timeout:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorder.done.wait(), 1.0)
            if self.verbose:
                print(
                    f"  t={time.time() - start:.0f}s connected={len(self.board.nodes())} "
                    f"synced={len(recorder.acks)}",
                    file=sys.stderr,
                    flush=True,
                )
        if self.gc_freeze:
            gc.freeze()  # diagnostics: the settled streams' objects leave the collector's walk
        synced = len(recorder.acks)
        return {
            "synced": synced,
            "connected": len(self.board.nodes()),
            "seconds": max(recorder.acks.values(), default=start) - recorder.first_open,
            "payload_bytes": recorder.payload_bytes,
        }

    async def cmd_change(self, change: int, timeout: float) -> dict[str, Any]:
        """Change one hop's weight, rebuild, publish; wait for every stream to converge."""
        cpu0 = time.process_time()
        self.gc_clock.reset()
        if self.profiler is not None:
            self.profiler.enable()
        t0, roles_changed, reached = await self.publish(change)
        published = time.time()
        with contextlib.suppress(TimeoutError):  # the bound counts from the changed rules
            await asyncio.wait_for(self.recorder.done.wait(), max(0.0, t0 + timeout - published))
        if self.profiler is not None:
            self.profiler.disable()
        recorder = self.recorder
        latencies = [at - t0 for at in recorder.acks.values() if at - t0 <= timeout]
        return {
            "latencies": [round(s, 6) for s in latencies],
            "build_publish": published - t0,
            "roles_changed": roles_changed,
            "reached": reached,
            "last_push": max(recorder.last_push - t0, 0.0),
            "payload_bytes": recorder.payload_bytes,
            "cpu": time.process_time() - cpu0,
            "missing": reached - len(latencies),
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
    asyncio.run(BenchServer(args).run())


# --- client process -----------------------------------------------------------------------


class Counts:
    """What one client process saw, reported to the controller when it is stopped."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.examples: dict[str, str] = {}  # reason -> one detail message

    def failed(self, reason: str, detail: str = "") -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.examples.setdefault(reason, detail)


def sidecar_node(index: int, services: Sequence[str]) -> base_pb2.Node:
    """The node a sidecar's bootstrap declares (templates/bootstrap.yaml)."""
    service, group = sidecar_role(index, services)
    node = base_pb2.Node(id=f"{service}|{group}|bench-{index:05d}", cluster=service)
    node.metadata.update({META_SERVICE: service, META_GROUP: group})
    return node


async def sotw_stream(
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub,
    node: base_pb2.Node,
    subscribed: dict[str, list[str]],
) -> int:
    """Envoy's SotW loop reduced to the wire: subscribe to the sidecar's types, then ACK
    every response by echoing version_info, nonce and the subscribed names. Resources stay
    packed. Returns the number of responses seen."""
    call = stub.StreamAggregatedResources()
    for i, type_url in enumerate(SIDECAR_TYPES["sotw"]):
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=subscribed.get(type_url, ())
        )
        if i == 0:
            request.node.CopyFrom(node)
        await call.write(request)
    seen = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        seen += 1
        ack = discovery_pb2.DiscoveryRequest(
            type_url=response.type_url,
            version_info=response.version_info,
            response_nonce=response.nonce,
            resource_names=subscribed.get(response.type_url, ()),
        )
        del response  # a sidecar's config is megabytes: thousands of streams must not hold it
        await call.write(ack)
    return seen


async def delta_stream(
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub,
    node: base_pb2.Node,
    subscribed: dict[str, list[str]],
) -> int:
    """The incremental variant: subscribe once (wildcard for CDS, LDS and VHDS), then, as
    Envoy does, ask for the endpoints of each cluster it is sent (an aggregate has none)
    before ACKing the clusters; ACK with the nonce."""
    call = stub.DeltaAggregatedResources()
    for i, type_url in enumerate(SIDECAR_TYPES["delta"]):
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribed.get(type_url, ())
        )
        if i == 0:
            request.node.CopyFrom(node)
        await call.write(request)
    seen = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        seen += 1
        if response.type_url == CLUSTER:
            added = [r.name for r in response.resources if not r.name.endswith("|loose")]
            gone = [n for n in response.removed_resources if not n.endswith("|loose")]
            if added or gone:
                await call.write(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=ENDPOINT,
                        resource_names_subscribe=added,
                        resource_names_unsubscribe=gone,
                    )
                )
        ack = discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce
        )
        del response  # as in sotw_stream
        await call.write(ack)
    return seen


async def client_run(args: argparse.Namespace) -> None:
    """Hold `args.count` sidecar streams on channels of `args.per_channel` streams each,
    until SIGTERM; then print what failed as one JSON line. A failed stream is reopened after
    a jittered exponential backoff, as Envoy does (0.5 s base, 8 s cap here). A local
    subchannel pool per channel gives each its own TCP connection (grpc would otherwise
    share one connection among channels with equal arguments)."""
    services = service_names(args.services)
    eds = [cluster_name(s, g) for s in services for g in GROUPS] if args.mode == "sotw" else []
    subscribed = {ENDPOINT: eds, ROUTE: [EGRESS_ROUTE, INBOUND_ROUTE]}
    run = delta_stream if args.mode == "delta" else sotw_stream
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(math.ceil(args.count / args.per_channel))
    ]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    counts = Counts()

    async def one(index: int) -> None:
        node = sidecar_node(index, services)
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
    per_channel: int
    latencies: list[float] = field(default_factory=list)  # every converged stream, every change
    all_acked: list[float] = field(default_factory=list)
    build_publish: list[float] = field(default_factory=list)
    last_push: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_gc: list[float] = field(default_factory=list)
    change_bytes: list[int] = field(default_factory=list)  # payload bytes written per change
    reached: list[int] = field(default_factory=list)  # streams each change is to reach
    roles_changed: int = 0
    mesh: dict[str, Any] = field(default_factory=dict)  # the server's "ready": roles, chain
    gc_full: int = 0  # most full (gen 2) collections in one change
    sync_s: float = 0.0
    unsynced: int = 0  # streams that never held their first snapshot within the bound
    config_bytes: int = 0  # payload bytes written during the initial sync, all streams
    load: float = 0.0  # 1-minute load average as the changes start: others share the CPUs
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    missing: int = 0  # (stream, change) pairs that never converged within the bound
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
        return await self.read(args.get("timeout", 0) + 60)


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


def sync_timeout(args: argparse.Namespace, streams: int) -> float:
    return args.sync_timeout if args.sync_timeout else 30 + streams * 0.05


async def run_case(mode: str, streams: int, args: argparse.Namespace) -> Row:
    """One row. The server's stderr goes to a file, shown only if the row fails: grpc logs
    every stream that the clients' exit cancels."""
    with tempfile.TemporaryFile("w+") as server_log:
        return await _run_case(mode, streams, args, server_log)


async def _run_case(mode: str, streams: int, args: argparse.Namespace, server_log: IO[str]) -> Row:
    """Fresh server, fresh clients: settle, measure RSS, then `args.changes` chain changes."""
    row = Row(mode, streams, args.per_channel)
    me = str(Path(__file__).resolve())
    mesh = ["--services", str(args.services)]
    server_cmd = [sys.executable, me, "--serve", *mesh, "--chains", str(args.chains)]
    server_cmd += ["--instances", str(args.instances), "--seed", str(args.seed)]
    server_cmd += ["--count", str(streams), "--mode", mode]
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
        ready = await server.read(120)
        row.mesh = ready
        await asyncio.sleep(0.5)
        row.rss_before_kb = rss_kb(proc.pid)
        share = math.ceil(streams / args.clients)
        for offset in range(0, streams, share):
            clients.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, me, "--client", *mesh,
                    "--target", f"127.0.0.1:{ready['port']}", "--mode", mode,
                    "--offset", str(offset), "--count", str(min(share, streams - offset)),
                    "--per-channel", str(args.per_channel),
                    stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                )
            )  # fmt: skip
        settled = await server.call("settle", timeout=sync_timeout(args, streams))
        row.sync_s = settled["seconds"]
        row.unsynced = streams - settled["synced"]
        row.config_bytes = settled["payload_bytes"]
        if settled["synced"] == 0:
            dead = [c.returncode for c in clients if c.returncode is not None]
            row.error = f"no stream synced ({settled['connected']} connected, client exits {dead})"
            return row
        await asyncio.sleep(1.0)  # let the last ACK's follow-up work finish
        row.rss_after_kb = rss_kb(proc.pid)
        row.load = os.getloadavg()[0]
        if args.py_spy:
            spy = await start_py_spy(args, proc.pid, f"{mode}-{streams}")
        for change in range(1, args.changes + 1):
            before = sum(cpu_seconds(c.pid) for c in clients)
            result = await server.call("change", change=change, timeout=args.change_timeout)
            row.client_cpu.append(sum(cpu_seconds(c.pid) for c in clients) - before)
            row.latencies += result["latencies"]
            row.missing += result["missing"]
            row.all_acked.append(
                max(result["latencies"]) if result["latencies"] and not result["missing"]
                else math.inf
            )  # fmt: skip
            row.build_publish.append(result["build_publish"])
            row.last_push.append(result["last_push"])
            row.change_bytes.append(result["payload_bytes"])
            row.roles_changed = result["roles_changed"]
            row.reached.append(result["reached"])
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
    return f"{seconds * 1000:.0f}" if math.isfinite(seconds) else "never"


def connection(per_channel: int) -> str:
    return "own" if per_channel == 1 else f"{per_channel}/conn"


def print_table(rows: list[Row], changes: int, change_timeout: float) -> None:
    """The required columns first (with the targets), then the ones that say where the time
    went."""
    header = (
        f"{'mode':<6}{'conn':<9}{'N':>6}{'reached':>8}{'sync s':>8}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'max ms':>8}"
        f"{'FAILED':>8}{'KB/stream':>10}{'config KB':>10}  {'sync tgt':<10}{'p99 tgt':<12}"
        f"{'mem tgt':<10}|{'all ACKed ms':>20}{'build+pub':>10}{'last push':>10}{'change KB':>10}"
        f"{'srv CPU':>8}{'srv GC':>7}{'cli CPU':>8}{'reopen':>7}{'RSS MB':>7}{'load':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.error:
            where = f"{row.mode:<6}{connection(row.per_channel):<9}{row.streams:>6}"
            print(f"{where}  FAILED: {row.error}")
            continue
        # Every (stream, change): a stream that never converged is infinitely late.
        samples = row.latencies + [math.inf] * row.missing
        p99 = percentile(samples, 99)
        kb = (row.rss_after_kb - row.rss_before_kb) / row.streams
        sync_limit, p99_limit = TARGET_SYNC_S.get(row.streams), TARGETS_P99_S.get(row.streams)
        sync_ok = row.sync_s if not row.unsynced else math.inf
        sync_target = f"<=5s {verdict(sync_ok, sync_limit)}" if sync_limit else "-"
        p99_target = f"<={ms(p99_limit)} {verdict(p99, p99_limit)}" if p99_limit else "-"
        failed = row.unsynced + row.missing
        per_sidecar = row.config_bytes / 1024 / max(1, row.streams - row.unsynced)
        reached = statistics.median(row.reached)
        change_kb = statistics.median(row.change_bytes) / 1024 / max(1, reached)
        print(
            f"{row.mode:<6}{connection(row.per_channel):<9}{row.streams:>6}{reached:>8.0f}"
            f"{row.sync_s:>8.1f}"
            f"{ms(percentile(samples, 50)):>8}{ms(p99):>8}{ms(max(samples)):>8}{failed:>8}"
            f"{kb:>10.0f}{per_sidecar:>10.0f}  {sync_target:<10}{p99_target:<12}"
            f"{'<=64 ' + verdict(kb, TARGET_KB_PER_STREAM):<10}|"
            f"{'/'.join(ms(s) for s in row.all_acked):>20}"
            f"{ms(statistics.median(row.build_publish)):>10}"
            f"{ms(statistics.median(row.last_push)):>10}{change_kb:>10.0f}"
            f"{statistics.median(row.server_cpu):>8.2f}{statistics.median(row.server_gc):>7.2f}"
            f"{statistics.median(row.client_cpu):>8.2f}{sum(row.failures.values()):>7}"
            f"{row.rss_after_kb / 1024:>7.0f}{row.load:>6.1f}"
        )
    print(
        f"FAILED: streams that did not hold their first snapshot within the sync bound, plus "
        f"(stream, change) pairs not converged within {change_timeout:g} s, of {changes} "
        "changes; they count as 'never' in p50/p99/max"
    )
    for row in rows:
        if not row.error:
            print(
                f"{row.mode} N={row.streams}: {row.mesh['roles']} roles ({row.mesh['hops']} "
                f"hops); changing {row.mesh['chain']} changed {row.roles_changed} roles' "
                f"snapshots; {row.unsynced} streams never synced, {row.missing} "
                "(stream, change) pairs never converged"
            )
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
        f"machine: {machine()}; Python {platform.python_version()} "
        f"({platform.python_implementation()}), grpcio {grpc.__version__}, protobuf "
        f"{google.protobuf.__version__} ({api_implementation.Type()})"
    )
    sharing = (
        "each stream on its own TCP connection (as real sidecars)"
        if args.per_channel == 1
        else f"SHARED CONNECTIONS: {args.per_channel} streams per HTTP/2 connection (not as "
        "real sidecars)"
    )
    print(
        f"mesh (bench/mesh.py, seed {args.seed}): {args.services} services x {len(GROUPS)} "
        f"groups, {args.chains} chains of 3-6 hops, {args.instances} instances per group; "
        f"snapshots by the real Translator; stream i plays a sidecar of "
        f"(svc i mod {args.services}, group i mod {len(GROUPS)}); {args.clients} grpc.aio "
        f"client processes, {sharing}; {args.changes} changes of one chain's hop weight per row"
    )
    print(
        "latency: server-side, from the changed rules (before the build) to the ACK that "
        "brings a stream to its role's new versions, one clock; sync s: first stream opened -> "
        "last stream holds its whole first snapshot; KB/stream: server RSS growth / N; "
        "config KB: resource bytes one sidecar receives at sync; reached: streams whose "
        "role's snapshot a change changes (median), the ones the percentiles are over; "
        "change KB: resource bytes one reached sidecar receives per change; all ACKed: each "
        "change; build+pub, last push "
        "(median ms); srv CPU / srv GC / cli CPU: s per change (median); reopen: client "
        "streams the server refused or cut; RSS MB: server after sync; load: 1-min load"
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
    print_table(rows, args.changes, args.change_timeout)
    sys.stdout.flush()
    return 1 if any(r.error or r.unsynced or r.missing for r in rows) else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1000", help="comma-separated stream counts")
    parser.add_argument("--modes", default="sotw,delta")
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--per-channel",
        type=int,
        default=1,
        help="streams per connection: 1 (default) as real sidecars; more shares connections",
    )
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--instances", type=int, default=2, help="registered per group")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--sync-timeout", type=float, default=0.0, help="seconds; default 30 + 0.05 per stream"
    )
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
    if min(args.services, args.chains, args.per_channel, args.clients, args.changes) < 1:
        parser.error(
            "--services, --chains, --per-channel, --clients and --changes must be at least 1"
        )
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
