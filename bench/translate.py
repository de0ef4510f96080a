"""Translator benchmark: how long rules -> every role's snapshot takes at mesh scale.

The generated mesh of bench/mesh.py: 1000 services x 3 groups, 200 chains of 3-6 hops, 2
instances per group, each service declaring ~4 callees. A fresh `Translator` builds every
role's scoped view (what Delta sidecars get) and the gateway's, and a real
`SnapshotCache(STATIC_CLUSTERS)` takes each snapshot ("publish": the consistency check and
the change diff run there). Then the incremental cases, each timed from the new rules to the
last `set_snapshots`: one hop's weight changes, on a chain in the middle of the list and on
the chain whose first hop the most services call (the most roles hold it: the worst case);
one instance is added.

    .venv/bin/python bench/translate.py [--services 1000] [--chains 200] [--reps 10]
    .venv/bin/python bench/translate.py --services 10000 --chains 2000 --reps 5

A missed target is profiled (cProfile) and the top functions are printed under the table.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import cpu_model, load_average  # bench/ is the script's directory
from mesh import TASK_GROUPS, busiest_chain, change_weight, make_endpoints, make_rules

from controlplane.model.rules import RuleSet
from controlplane.translate import Endpoints, Translator
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.names import GATEWAY_ROLE, STATIC_CLUSTERS
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.types import PUSH_ORDER, SHORT_NAME

ROOT = Path(__file__).resolve().parent.parent
TARGET_FULL_S = {1000: 2.0}  # a fresh build of every role, at 1,000 services
# A one-chain change or an instance, rebuilt and published: at 1,000 services, and at 10,000.
TARGET_REBUILD_S = {1000: 0.050, 10000: 0.100}


def publish(cache: SnapshotCache, snapshots: dict[str, Snapshot]) -> None:
    """What the server does with a build: every role's snapshot into the cache."""
    cache.set_snapshots(snapshots)


@dataclass
class Timing:
    """Wall seconds of one build + publish, and the CPU seconds of both (this process's
    own, so a busy machine shows as wall > CPU rather than as a slower translator)."""

    build: float
    publish: float
    cpu: float

    @property
    def total(self) -> float:
        return self.build + self.publish


def timed(translator: Translator, cache: SnapshotCache, rules: RuleSet, eps: Endpoints) -> Timing:
    """One build then publish. The collector stays on, as in the server, but starts each
    sample empty so that garbage of the previous one is not charged to it."""
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    snapshots = translator.build(rules, eps)
    built = time.perf_counter()
    publish(cache, snapshots)
    done = time.perf_counter()
    return Timing(built - start, done - built, time.process_time() - cpu)


def add_instance(eps: Endpoints, key: tuple[str, str], rep: int) -> Endpoints:
    """The endpoints with one more instance in group `key`."""
    out = dict(eps)
    out[key] = [*eps[key], ("10.255.255.1", 20000 + rep)]
    return out


def median_timing(samples: Sequence[Timing]) -> Timing:
    return Timing(
        statistics.median(t.build for t in samples),
        statistics.median(t.publish for t in samples),
        statistics.median(t.cpu for t in samples),
    )


_SPLIT = (  # (label, file suffix, function): the parts a rebuild is made of
    ("Translator.build", "translate/translator.py", "build"),
    ("SnapshotCache.set_snapshots", "xds/cache.py", "set_snapshots"),
    ("  Snapshot.check_consistent", "xds/snapshot.py", "check_consistent"),
    ("  Snapshot.changed_types", "xds/snapshot.py", "changed_types"),
)


def profile(run: Callable[[], object], top: int = 15) -> str:
    """cProfile of one run: the split into build and publish, then the functions with the
    most own time and the most cumulative time (paths shown relative to the repo)."""
    gc.collect()  # as in timed(): no garbage of earlier runs charged to this one
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    cumulative = {
        label: sum(
            row[3]
            for (path, _, func), row in stats.stats.items()  # type: ignore[attr-defined]
            if path.endswith(suffix) and func == name
        )
        for label, suffix, name in _SPLIT
    }
    out.write(f"total under the profiler: {stats.total_tt * 1000:.0f} ms\n")  # type: ignore[attr-defined]
    for label, seconds in cumulative.items():
        out.write(f"  {label:<30}{seconds * 1000:>8.0f} ms cumulative\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue().replace(str(ROOT) + "/", "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def verdict(value: float, limit: float) -> str:
    if math.isinf(limit):
        return "-"
    return "pass" if value <= limit else "MISS"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--instances", type=int, default=2, help="per group")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each rebuild")
    parser.add_argument("--full-reps", type=int, default=3, help="fresh full builds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-profile", action="store_true", help="skip profiling misses")
    args = parser.parse_args(argv)

    import google.protobuf
    from google.protobuf.internal import api_implementation

    rules = make_rules(args.services, args.chains, args.seed)
    eps = make_endpoints(rules, args.instances)
    hop_count = sum(len(c.hops) for c in rules.chains.values())
    print(
        f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} CPUs, load average "
        f"{load_average()}; Python "
        f"{platform.python_version()}, protobuf {google.protobuf.__version__} "
        f"({api_implementation.Type()})"
    )
    print(
        f"rules: {len(rules.services)} services x {1 + len(TASK_GROUPS)} groups, "
        f"{len(rules.chains)} chains ({hop_count} hops, "
        f"{sum(c.fallback == 'loose' for c in rules.chains.values())} loose), "
        f"{args.instances} instances per group ({sum(map(len, eps.values()))} endpoints); "
        f"seed {args.seed}"
    )

    full: list[Timing] = []
    for _ in range(args.full_reps):
        translator, cache = Translator(), SnapshotCache(STATIC_CLUSTERS)
        full.append(timed(translator, cache, rules, eps))
    snapshots = translator.build(rules, eps)  # memoised: the same objects as published

    # One hop's weight, each rep a new value, then back to the base rules (untimed).
    chain_name = sorted(rules.chains)[len(rules.chains) // 2]
    busiest = busiest_chain(rules)
    weights: dict[str, list[Timing]] = {chain_name: [], busiest: []}
    reached: dict[str, int] = {}
    for name, samples in weights.items():
        for rep in range(args.reps):
            samples.append(timed(translator, cache, change_weight(rules, name, rep), eps))
            timed(translator, cache, rules, eps)  # back to the base rules, untimed
        changed = translator.build(change_weight(rules, name, args.reps), eps)
        reached[name] = sum(bool(c) for c in cache.set_snapshots(changed).values())
        timed(translator, cache, rules, eps)
    weight = weights[chain_name]
    key = (rules.chains[chain_name].hops[0].service, rules.chains[chain_name].hops[0].group)
    instance: list[Timing] = []
    for rep in range(args.reps):
        instance.append(timed(translator, cache, rules, add_instance(eps, key, rep)))
        timed(translator, cache, rules, eps)

    target = TARGET_REBUILD_S.get(args.services, math.inf)
    rows = [
        (
            "full build (fresh Translator)",
            median_timing(full),
            TARGET_FULL_S.get(args.services, math.inf),
            len(full),
        ),
        (
            f"hop weight ({reached[chain_name]} roles)",
            median_timing(weight),
            target,
            len(weight),
        ),
        (
            f"hop weight, busiest ({reached[busiest]})",
            median_timing(weights[busiest]),
            target,
            len(weights[busiest]),
        ),
        ("one instance added", median_timing(instance), target, len(instance)),
    ]
    header = (
        f"{'case':<30}{'n':>3}{'build ms':>10}{'publish ms':>12}{'total ms':>10}"
        f"{'CPU ms':>8}{'target ms':>11}  result"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, t, limit, n in rows:
        shown = "<= " + ms(limit) if math.isfinite(limit) else "-"
        print(
            f"{name:<30}{n:>3}{ms(t.build):>10}{ms(t.publish):>12}{ms(t.total):>10}"
            f"{ms(t.cpu):>8}{shown:>11}  {verdict(t.total, limit)}"
        )
    print()
    roles = [s for key, s in snapshots.items() if key != GATEWAY_ROLE]
    per_role = ", ".join(
        f"{statistics.mean(len(s.resources(t)) for s in roles):.1f} {SHORT_NAME[t].upper()}"
        for t in PUSH_ORDER
    )
    sizes = [
        sum(len(r.payload) for t in PUSH_ORDER for r in s.resources(t).values()) for s in roles
    ]
    gateway = sum(
        len(r.payload) for t in PUSH_ORDER for r in snapshots[GATEWAY_ROLE].resources(t).values()
    )
    print(f"roles: {len(snapshots)} ({len(snapshots) - 1} service groups + {GATEWAY_ROLE})")
    print(f"resources per role (mean): {per_role} (LDS is static in the sidecar bootstrap)")
    print(
        f"config per role (scoped view): mean {statistics.mean(sizes) / 1024:.1f} KiB, max "
        f"{max(sizes) / 1024:.1f} KiB; the gateway (whole mesh): {gateway / 1024:.0f} KiB"
    )
    print(f"peak RSS: {peak_rss_mb():.0f} MiB; load average after: {load_average()}")
    print(
        "full builds (s): "
        + ", ".join(f"{t.build:.2f}+{t.publish:.2f}" for t in full)
        + "; weight rebuilds (ms): "
        + ", ".join(ms(t.total) for t in weight)
        + "; busiest: "
        + ", ".join(ms(t.total) for t in weights[busiest])
        + "; instance rebuilds (ms): "
        + ", ".join(ms(t.total) for t in instance)
    )

    if args.no_profile:
        return 0
    for name, t, limit, _ in rows:
        if t.total <= limit:
            continue
        print(f"\n=== profile of a miss: {name} ===")
        if name.startswith("full"):
            fresh_cache = SnapshotCache(STATIC_CLUSTERS)
            print(profile(lambda c=fresh_cache: publish(c, Translator().build(rules, eps))))
        elif "weight" in name:
            changed = change_weight(rules, busiest if "busiest" in name else chain_name, args.reps)
            print(profile(lambda r=changed: publish(cache, translator.build(r, eps))))
            timed(translator, cache, rules, eps)
        else:
            more = add_instance(eps, key, args.reps)
            print(profile(lambda e=more: publish(cache, translator.build(rules, e))))
            timed(translator, cache, rules, eps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
