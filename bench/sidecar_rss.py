"""Sidecar memory benchmark: one real Envoy sidecar of a mesh of real size.

A real `tasklane up` (embedded etcd) is given the generated mesh of bench/mesh.py (1000
services x 3 groups, 200 chains, each service declaring ~4 callees: 1,200 documents, applied
with `tasklane apply`). Then `tasklane run` starts one instance of a service with its app, as
a user runs it: by default (Delta, the role's scoped view) and with `--sotw` (the whole
mesh, as every sidecar held it before scoping), one after the other. Each row is its Envoy's
RSS (from /proc) once ready and settled, beside the clusters and virtual hosts it holds (its
admin's /stats and /config_dump); then once more after its app called a service outside
its scope (asked for on demand; no instance of it runs here, so the call's answer is the
app's error for a callee without instances, not a 404).

    .venv/bin/python bench/sidecar_rss.py [--services 1000] [--chains 200]

Traffic stays on 127.0.0.1; every wait is bounded; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml
from common import TASKLANE, machine, tasklane_up  # bench/ is the script's directory
from mesh import make_rules

from controlplane.model.rules import to_document
from controlplane.model.scope import rule_scopes

TARGET_RSS_MB = 80.0
SETTLE_S = 5.0
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ADMIN = re.compile(r"admin :(\d+)")


def admin(port: int, path: str) -> str:
    with _opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def envoy_of(run: subprocess.Popen[str]) -> int:
    """The pid of the Envoy `tasklane run` started (its child running envoy)."""
    for child in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split():
        if "envoy" in Path(f"/proc/{child}/cmdline").read_text():
            return int(child)
    raise SystemExit("no Envoy under tasklane run")


def held(port: int) -> tuple[int, int]:
    """(clusters, egress virtual hosts) the Envoy holds."""
    clusters = int(re.search(r"cluster_manager.active_clusters: (\d+)", admin(port, "/stats"))[1])
    hosts = 0
    for config in json.loads(admin(port, "/config_dump"))["configs"]:
        for entry in config.get("dynamic_route_configs", []):
            if entry["route_config"]["name"] == "egress":
                hosts = len(entry["route_config"].get("virtual_hosts", []))
    return clusters, hosts


def measure(env: dict[str, str], service: str, outside: str, sotw: bool) -> dict[str, float]:
    app = (
        f'exec "$0" -m demo.chain_app --service {service} --group default '
        f'--instance "$TASKLANE_INSTANCE" --port "$PORT" --next {outside}'
    )
    command = [*TASKLANE, "run", "--service", service, *(["--sotw"] if sotw else [])]
    command += ["--", "sh", "-c", app, sys.executable]
    run = subprocess.Popen(
        command, env=env, cwd=Path(__file__).resolve().parent.parent, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert run.stderr is not None
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline:
            line = run.stderr.readline()
            if not line:
                raise SystemExit(f"tasklane run ended before registering (exit {run.wait()})")
            found = _ADMIN.search(line)
            port = int(found[1]) if found else None
        if port is None:
            raise SystemExit("tasklane run did not register within 120 s")
        time.sleep(SETTLE_S)
        pid = envoy_of(run)
        clusters, hosts = held(port)
        row = {"rss": rss_mb(pid), "clusters": clusters, "hosts": hosts}
        inbound = re.search(r"inbound [\d.]+:(\d+)", line)
        if inbound is not None:  # the app calls `outside` (no instance of it runs here)
            try:
                with _opener.open(f"http://127.0.0.1:{inbound[1]}/", timeout=30) as response:
                    row["call"] = response.status
            except urllib.error.HTTPError as exc:
                row["call"] = exc.code
            time.sleep(SETTLE_S)
            row["rss_after"] = rss_mb(pid)
            row["clusters_after"], row["hosts_after"] = held(port)
        return row
    finally:
        run.terminate()
        run.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rules = make_rules(args.services, args.chains, args.seed)
    scopes = rule_scopes(rules)
    service = max(sorted(rules.services), key=lambda s: len(scopes.get(s, ())))  # the largest
    outside = next(s for s in sorted(rules.services) if s != service and s not in scopes[service])
    work = Path(tempfile.mkdtemp(prefix="tasklane-bench-rss-"))
    mesh = work / "mesh.yaml"
    mesh.write_text(yaml.safe_dump_all([to_document(r) for r in rules.all()], sort_keys=False))
    rows = {}
    try:
        with tasklane_up(work) as (_, env):
            applied = subprocess.run([*TASKLANE, "apply", "-f", str(mesh)], env=env, text=True,
                                     capture_output=True)  # fmt: skip
            if applied.returncode:
                raise SystemExit(f"apply failed: {applied.stderr}")
            for label, sotw in (("delta (scoped, default)", False), ("sotw (whole mesh)", True)):
                rows[label] = measure(env, service, outside, sotw)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"# one real sidecar (`tasklane run`) of a {args.services}-service mesh")
    print(f"# {machine()}")
    print(
        f"# {len(rules.all())} rules; the instance: {service}|default, whose rules name "
        f"{len(scopes.get(service, ()))} callees (the largest scope); its app then calls "
        f"{outside}, outside that scope"
    )
    header = f"{'sidecar':<26}{'RSS MB':>8}{'clusters':>10}{'hosts':>7}{'target':>8}  verdict"
    header += f"  | after calling {outside}: RSS MB, clusters, hosts, status"
    print(header)
    for label, row in rows.items():
        verdict = "pass" if row["rss"] <= TARGET_RSS_MB else "MISS"
        after = (
            f"{row['rss_after']:.0f}, {row['clusters_after']}, {row['hosts_after']}, {row['call']}"
            if "rss_after" in row
            else "-"
        )
        print(
            f"{label:<26}{row['rss']:>8.0f}{row['clusters']:>10}{row['hosts']:>7}"
            f"{TARGET_RSS_MB:>8.0f}  {verdict:<7}  | {after}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
