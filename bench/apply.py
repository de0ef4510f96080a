"""Apply benchmark: 10,000 rules through `tasklane apply` against a real `tasklane up`.

The mesh of bench/mesh.py at 9,800 Services and 200 TaskChains (10,000 documents, 2.8 MB of
YAML), applied with the CLI as a user runs it (the process's whole run is timed) to a
`tasklane up` with its embedded etcd, which keeps etcd's default limit of 128 operations per
transaction. Then the translator's rebuild after the apply, as /api/v1/status reports it:
after the first apply of all 10,000 (a full build), and after a routine one-rule change.

    .venv/bin/python bench/apply.py [--services 9800] [--chains 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml
from common import TASKLANE, machine, tasklane_up  # bench/ is the script's directory
from mesh import make_rules

from controlplane.model.rules import to_document

ROOT = Path(__file__).resolve().parent.parent
TARGET_APPLY_S = 10.0
TARGET_DRY_RUN_S = 5.0
TARGET_REBUILD_S = 2.0
READY_TIMEOUT = 60.0
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status(http: str) -> dict:
    with _opener.open(f"{http}/api/v1/status", timeout=10) as response:
        return json.loads(response.read())


def run(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    """Seconds one CLI command takes, start to exit."""
    start = time.perf_counter()
    done = subprocess.run([*TASKLANE, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode not in ok:
        raise SystemExit(f"tasklane {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed


def wait_rebuilt(http: str, rules: int, after: float, timeout: float = 60.0) -> dict:
    """The sync's status once a build with `rules` rules was published after `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sync = status(http)["sync"]
        if sync.get("rules") == rules and sync.get("last_build_at", 0) >= after:
            return sync
        time.sleep(0.02)
    raise SystemExit(f"no build of {rules} rules within {timeout:g}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=9_800)
    parser.add_argument("--chains", type=int, default=200)
    args = parser.parse_args(argv)
    rules = make_rules(args.services, args.chains, seed=1)
    documents = [to_document(rule) for rule in rules.all()]
    total = len(documents)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    work = Path(tempfile.mkdtemp(prefix="tasklane-bench-apply-"))
    mesh = work / "mesh.yaml"
    mesh.write_text(yaml.dump_all(documents, Dumper=dumper, sort_keys=False))
    size_mb = mesh.stat().st_size / 1e6
    # One hop weight changed: what a routine edit of a big mesh looks like.
    edited = work / "edited.yaml"
    edited.write_text(mesh.read_text().replace("weight: 90\n", "weight: 91\n", 1))

    try:
        with tasklane_up(work) as (http, env):
            mesh_s, edited_s = str(mesh), str(edited)
            dry = run(["apply", "-f", mesh_s, "--dry-run"], env)
            rows = [("dry run, 10,000 new (diff of all)", dry, TARGET_DRY_RUN_S)]
            applied_at = time.time()
            rows.append(("apply, 10,000 new", run(["apply", "-f", mesh_s], env), TARGET_APPLY_S))
            sync = wait_rebuilt(http, total, applied_at)
            rebuild = sync["last_build_ms"] / 1000
            rows.append(("  translator rebuild after it", rebuild, TARGET_REBUILD_S))
            published = sync["last_build_at"] - applied_at
            rows.append(("  apply start -> snapshots published", published, 0))
            diff = run(["diff", "-f", edited_s], env, ok=(1,))
            rows.append(("diff, 1 of 10,000 changed", diff, TARGET_DRY_RUN_S))
            applied_at = time.time()
            one = run(["apply", "-f", edited_s], env)
            rows.append(("apply, 1 of 10,000 changed", one, TARGET_APPLY_S))
            rebuild = wait_rebuilt(http, total, applied_at)["last_build_ms"] / 1000
            rows.append(("  translator rebuild after it", rebuild, TARGET_REBUILD_S))
            rows += [
                ("apply, 10,000 unchanged", run(["apply", "-f", edited_s], env), TARGET_APPLY_S),
                ("rollback to revision 1 (1 change)", run(["rollback", "1"], env), TARGET_APPLY_S),
            ]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # its etcd's data: ~70 MB

    print(f"# tasklane apply at scale: {total:,} documents ({size_mb:.1f} MB)")
    print(f"# {machine()}")
    print("# each row: one run of the CLI command, process start to exit (wall)")
    print(f"{'case':<38}{'seconds':>9}{'target':>9}  verdict")
    for case, seconds, target in rows:
        if not target:  # shown for context, no target of its own
            print(f"{case:<38}{seconds:>9.2f}{'-':>9}")
            continue
        verdict = "pass" if seconds <= target else "MISS"
        print(f"{case:<38}{seconds:>9.2f}{target:>9.1f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
