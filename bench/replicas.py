"""Replicas benchmark: does each `tasklane up` replica on one etcd serve its own sidecars as
fast as a lone one? One chain change's convergence over every stream, for one replica serving
N streams and for R replicas serving N streams each, side by side in one run.

Everything is real but the sidecars: one etcd, R `tasklane up --etcd` processes sharing a state
dir (so one API token), the generated mesh of bench/mesh.py applied through the API. The
sidecars are grpc.aio ADS streams (bench/xds_push.py's sotw_stream/delta_stream: the node and
subscriptions of templates/bootstrap.yaml), each on its own TCP connection, N per replica,
from --clients processes per replica. A change is one chain's first hop weight, applied
through the API like `tasklane apply`; each replica sees it through its own etcd watch.

Latency, per stream and change: from just before the apply to the last xDS response the stream
received (it ACKs at once); a change is over once responses have stopped for --quiet seconds.
The streams the change is for are those whose node the replicas' /api/v1/status shows sent
new versions (every one in SotW, which holds the whole mesh; in Delta only the roles whose
scope holds the changed chain). One of them that received nothing within --change-timeout did
not converge: it counts as a failure and as infinitely late in the percentiles. Clock:
time.time() of this machine, shared by all processes.

    .venv/bin/python bench/replicas.py --streams 2500 --replicas 2

On a small machine every replica and client process shares the same cores: R replicas serving
R x N streams then compete for CPU, which a deployment over several nodes would not.
Traffic stays on 127.0.0.1; every wait is bounded; every child is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from common import machine  # bench/ is the script's directory
from envoy.service.discovery.v3 import ads_pb2_grpc
from mesh import GROUPS, busiest_chain, change_weight, make_rules, service_names
from xds_push import (
    cpu_seconds,
    delta_stream,
    percentile,
    raise_fd_limit,
    sidecar_node,
    sotw_stream,
    stop,
)

from controlplane.model.rules import Rule, to_document
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port
from controlplane.xds.names import EGRESS_ROUTE, INBOUND_ROUTE, cluster_name
from controlplane.xds.types import ENDPOINT, ROUTE

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 120.0  # a replica's start: etcd read, first build of the mesh
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- client process -----------------------------------------------------------------------


class _Timed:
    """An ADS stub whose streams note when each response arrives (xds_push's stream loops
    then run unchanged on it)."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, seen: Any) -> None:
        self._stub, self._seen = stub, seen

    def StreamAggregatedResources(self) -> _TimedCall:  # noqa: N802 (grpc's name)
        return _TimedCall(self._stub.StreamAggregatedResources(), self._seen)

    def DeltaAggregatedResources(self) -> _TimedCall:  # noqa: N802 (grpc's name)
        return _TimedCall(self._stub.DeltaAggregatedResources(), self._seen)


class _TimedCall:
    def __init__(self, call: Any, seen: Any) -> None:
        self._call, self._seen = call, seen

    async def write(self, message: Any) -> None:
        await self._call.write(message)

    async def read(self) -> Any:
        response = await self._call.read()
        if response is not grpc.aio.EOF:
            self._seen(response.type_url)
        return response


async def client_run(args: argparse.Namespace) -> None:
    """Hold `args.count` streams to `args.target`, each on its own connection, reopened with
    Envoy-like backoff when they fail; answer `{"since": T, "full": bool}` lines on stdin
    with how many streams got a response at or after T and the latest, the failures, and with
    `full` each stream's last response at or after T."""
    services = service_names(args.services)
    subscribed = {  # a Delta stream asks for endpoints as its clusters come (delta_stream)
        ENDPOINT: [cluster_name(s, g) for s in services for g in GROUPS]
        if args.mode == "sotw"
        else [],
        ROUTE: [EGRESS_ROUTE, INBOUND_ROUTE],
    }
    run = delta_stream if args.mode == "delta" else sotw_stream
    last = [0.0] * args.count
    failures: dict[str, int] = {}

    async def one(slot: int) -> None:
        def seen(type_url: str) -> None:
            last[slot] = time.time()

        channel = grpc.aio.insecure_channel(
            args.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = _Timed(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), seen)
        node = sidecar_node(args.offset + slot, services)
        backoff = 0.5
        while True:
            try:
                got = await run(stub, node, subscribed)  # type: ignore[arg-type]
                why = "ended by server"
            except grpc.aio.AioRpcError as exc:
                got, why = 0, exc.code().name
            failures[why] = failures.get(why, 0) + 1
            backoff = 0.5 if got else min(backoff * 2, 8.0)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    tasks = []
    for slot in range(args.count):
        tasks.append(asyncio.create_task(one(slot)))
        if len(tasks) % 200 == 0:
            await asyncio.sleep(0.01)  # spread the connects a little
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        ask = json.loads(line)
        got = [at for at in last if at >= ask["since"]]
        report = {
            "got": len(got),
            "latest": max(got, default=None),
            "failures": failures,
        }
        if ask["full"]:
            report["last"] = [at if at >= ask["since"] else None for at in last]
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
    os._exit(0)  # tearing down thousands of streams politely only adds noise


# --- controller ---------------------------------------------------------------------------


@dataclass
class Row:
    """One case: `replicas` replicas, `streams` streams on each."""

    replicas: int
    streams: int
    latencies: list[float] = field(default_factory=list)  # every (stream, change) converged
    missing: int = 0  # (stream, change) pairs with no response within the bound
    meant: list[int] = field(default_factory=list)  # streams each change was sent to
    unsynced: int = 0
    sync_s: float = 0.0
    replica_cpu: list[float] = field(default_factory=list)  # s per change, busiest replica
    reopened: dict[str, int] = field(default_factory=dict)
    load: float = 0.0
    error: str = ""


class Client:
    """A client child, its control channel, and the node ids of its streams, in order."""

    def __init__(self, proc: asyncio.subprocess.Process, nodes: list[str]) -> None:
        self.proc, self.nodes = proc, nodes

    async def state(self, since: float, full: bool = False) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"since": since, "full": full}).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"a client exited (code {await self.proc.wait()})")
        return json.loads(line)


def documents(rules: Iterable[Rule]) -> str:
    """Rules as the YAML `tasklane apply` reads."""
    return yaml.safe_dump_all([to_document(rule) for rule in rules], sort_keys=False)


def api_apply(http_port: int, token: str, text: str) -> None:
    body = json.dumps({"files": [{"name": "mesh.yaml", "text": text}]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/api/v1/apply",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with _direct.open(request, timeout=120) as response:
        response.read()


async def start_replica(etcd: EmbeddedEtcd, state: Path, log: Path) -> tuple[Any, int, int]:
    """`tasklane up --etcd` on free ports; (process, xDS port, HTTP port) once it is ready."""
    xds, http = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "up", "--etcd", etcd.endpoint,
        "--state-dir", str(state), "--xds-port", str(xds), "--http-port", str(http),
        "--log-level", "warning",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=log.open("ab"), cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
    if not line.startswith(b"tasklane up: "):
        await stop(proc)
        raise RuntimeError(f"a replica did not start; see {log}")
    return proc, xds, http


async def converged(
    clients: list[Client], since: float, quiet: float, timeout: float
) -> dict[str, float | None]:
    """{node id: its stream's last response after `since`, None if it got none}, once
    responses came and then stopped for `quiet` s, or at `since + timeout`."""
    while True:
        states = [await client.state(since) for client in clients]
        latest = max((s["latest"] for s in states if s["latest"] is not None), default=None)
        now = time.time()
        if (latest is not None and now - latest >= quiet) or now >= since + timeout:
            break
        await asyncio.sleep(0.25)
    last: dict[str, float | None] = {}
    for client in clients:
        state = await client.state(since, full=True)
        last.update(zip(client.nodes, state["last"], strict=True))
    return last


def sent_versions(http_ports: Sequence[int]) -> dict[str, dict[str, str]]:
    """{node id: {xDS type: version sent}} of every stream of every replica."""
    out = {}
    for port in http_ports:
        url = f"http://127.0.0.1:{port}/api/v1/status"
        with _direct.open(url, timeout=60) as response:
            status = json.loads(response.read())
        for node in status["nodes"]:
            types = node["types"].items()
            out[node["node_id"]] = {kind: state["sent_version"] for kind, state in types}
    return out


async def run_case(
    replicas: int, first_change: int, etcd: EmbeddedEtcd, work: Path, args: argparse.Namespace
) -> Row:
    """Fresh replicas and clients on the etcd that holds the mesh: settle, then the changes
    (numbered from `first_change`, so that each sets a weight the last one did not)."""
    row = Row(replicas, args.streams)
    total = replicas * args.streams
    procs: list[Any] = []
    clients: list[Client] = []
    me = str(Path(__file__).resolve())
    try:
        ports = []
        for n in range(replicas):
            proc, xds, http = await start_replica(etcd, work / "state", work / f"up-{n}.log")
            procs.append(proc)
            ports.append((xds, http))
        token = (work / "state" / "api-token").read_text().strip()
        share = math.ceil(args.streams / args.clients)
        names = service_names(args.services)
        for n, (xds, _) in enumerate(ports):
            for first in range(n * args.streams, (n + 1) * args.streams, share):
                count = min(share, (n + 1) * args.streams - first)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, me, "--client", "--services", str(args.services),
                    "--target", f"127.0.0.1:{xds}", "--mode", args.mode,
                    "--offset", str(first), "--count", str(count),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                    limit=1 << 24,
                )  # fmt: skip
                nodes = [sidecar_node(i, names).id for i in range(first, first + count)]
                clients.append(Client(proc, nodes))
        opened = time.time()
        last = await converged(clients, opened, args.quiet, 30 + 0.05 * total)
        row.sync_s = max((at for at in last.values() if at is not None), default=opened) - opened
        row.unsynced = sum(at is None for at in last.values())
        await asyncio.sleep(1.0)
        row.load = os.getloadavg()[0]
        rules = make_rules(args.services, args.chains, args.seed)
        chain = busiest_chain(rules)  # the one whose change reaches the most scoped sidecars
        for change in range(first_change, first_change + args.changes):
            changed = change_weight(rules, chain, change).chains[chain]
            http_ports = [http for _, http in ports]
            before = await asyncio.to_thread(sent_versions, http_ports)
            cpu = [cpu_seconds(p.pid) for p in procs]
            since = time.time()
            await asyncio.to_thread(api_apply, ports[0][1], token, documents([changed]))
            last = await converged(clients, since, args.quiet, args.change_timeout)
            row.replica_cpu.append(
                max(cpu_seconds(p.pid) - c for p, c in zip(procs, cpu, strict=True))
            )
            after = await asyncio.to_thread(sent_versions, http_ports)
            meant = [node for node, sent in after.items() if sent != before.get(node)]
            row.meant.append(len(meant))
            row.latencies += [at - since for node in meant if (at := last.get(node)) is not None]
            row.missing += sum(last.get(node) is None for node in meant)
        for state in [await client.state(time.time()) for client in clients]:
            for why, count in state["failures"].items():
                row.reopened[why] = row.reopened.get(why, 0) + count
        return row
    except (TimeoutError, RuntimeError, OSError, ValueError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    finally:
        for client in clients:
            await stop(client.proc)
        for proc in procs:
            await stop(proc, grace=15)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if math.isfinite(seconds) else "never"


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    header = (
        f"{'replicas':>8}{'streams each':>13}{'total':>7}{'sync s':>8}{'sent to':>8}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'FAILED':>8}{'reopened':>9}"
        f"{'CPU s/change':>13}{'load':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        where = f"{row.replicas:>8}{row.streams:>13}{row.replicas * row.streams:>7}"
        samples = row.latencies + [math.inf] * row.missing
        if row.error or not samples:
            print(f"{where}  FAILED: {row.error or 'no change was sent to any stream'}")
            continue
        print(
            f"{where}{row.sync_s:>8.1f}{median(row.meant):>8}"
            f"{ms(percentile(samples, 50)):>8}{ms(percentile(samples, 99)):>8}"
            f"{ms(max(samples)):>8}{row.unsynced + row.missing:>8}"
            f"{sum(row.reopened.values()):>9}{median(row.replica_cpu):>13.2f}{row.load:>6.1f}"
        )
    print(
        "sent to: streams whose node a change was sent to (median of the changes); FAILED: "
        "streams never synced plus (stream, change) pairs sent a change and receiving nothing "
        f"within {args.change_timeout:g} s, of {args.changes} changes ('never' in the "
        "percentiles); reopened: client streams the server refused or cut; CPU s/change: the "
        "busiest replica, median; load: 1-min load average before the changes"
    )
    for row in rows:
        if row.reopened:
            print(f"{row.replicas} replica(s): reopened {row.reopened}")


def median(values: Sequence[float]) -> Any:
    return sorted(values)[len(values) // 2]


async def controller(args: argparse.Namespace) -> int:
    raise_fd_limit()
    print(f"machine: {machine()}; Python {platform.python_version()}, grpcio {grpc.__version__}")
    print(
        f"mesh (bench/mesh.py, seed {args.seed}): {args.services} services x {len(GROUPS)} "
        f"groups, {args.chains} chains, no instances; {args.mode} streams, each on its own "
        f"TCP connection, {args.clients} client processes per replica; {args.changes} changes "
        f"of one chain's hop weight per case, applied through the API; latency: apply -> "
        f"a stream's last response (quiet {args.quiet:g} s). Replicas, clients and etcd all "
        f"share this machine's {os.cpu_count()} cores.",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="tasklane-replicas-"))
    etcd = EmbeddedEtcd(work / "etcd", free_port(), free_port())
    rows = []
    try:
        etcd.start(timeout=30)
        proc, _, http = await start_replica(etcd, work / "state", work / "up-apply.log")
        token = (work / "state" / "api-token").read_text().strip()
        rules = make_rules(args.services, args.chains, args.seed)
        mesh = [*rules.services.values(), *rules.chains.values()]
        await asyncio.to_thread(api_apply, http, token, documents(mesh))
        await stop(proc, grace=15)
        for case, replicas in enumerate(sorted({1, args.replicas})):
            started = time.time()
            rows.append(await run_case(replicas, 1 + case * args.changes, etcd, work, args))
            print(f"  {replicas} replica(s): {time.time() - started:.0f} s", file=sys.stderr)
    finally:
        etcd.stop()
        if rows and not any(row.error for row in rows):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    print_table(rows, args)
    return 1 if any(r.error or r.unsynced or r.missing for r in rows) else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2500, help="streams on each replica")
    parser.add_argument("--replicas", type=int, default=2, help="compared with one replica")
    parser.add_argument(
        "--mode",
        choices=("sotw", "delta"),
        default="delta",
        help="delta (default, as sidecars run): scoped, a change reaches only the roles whose "
        "scope holds the changed host; sotw: every stream holds the whole mesh",
    )
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="client processes per replica")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--change-timeout", type=float, default=30.0)
    parser.add_argument("--quiet", type=float, default=2.0, help="s without a response: done")
    # internal role of this same file
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.streams, args.replicas, args.changes, args.clients, args.services) < 1:
        parser.error("--streams, --replicas, --changes, --clients and --services must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.client:
        raise_fd_limit()
        asyncio.run(client_run(args))
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the children on the way
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(controller(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
