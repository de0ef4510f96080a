"""Keep-alive benchmark: how much sooner a parked instance serves again than a new one.

A real `tasklane up` and real `tasklane run`s (demo/chain_app behind Envoy sidecars): one
online fund-facade instance whose egress listener sends the probes, and the fund-facade task
group that a strict chain steers dyed requests to (503 while it has no instance). Probes are
dyed GETs every 2 ms; "served" is the first 200 answered by the task group.

- cold: `tasklane run` started -> first dyed request served (Python start-up, Envoy start and
  config, the app, registration, callers' EDS update and first health check);
- resume: SIGUSR2 to a parked run -> first dyed request served (SIGCONT, the sidecar's health
  check, registration, callers' EDS update and first health check).

Each cold sample is stopped (SIGTERM) and each resumed one parked again (SIGUSR1) and seen
failing with 503 before the next sample. Every child is stopped on exit.

    .venv/bin/python bench/resume.py [--samples 10]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from common import machine  # bench/ is the script's directory

from controlplane.runtime.ports import free_port
from controlplane.runtime.process import dying_with_parent, stop_process

RULES = """\
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: fund-facade}
spec:
  groups: [{name: default}, {name: task, maxReplicas: 4}]
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: fund-yield}
spec:
  dye: {values: [fund-yield]}
  fallback: strict
  hops: [{service: fund-facade, group: task}]
"""
APP = [sys.executable, "-m", "demo.chain_app", "--service", "fund-facade"]
PROBE_INTERVAL = 0.002
TIMEOUT = 60.0
T = TypeVar("T")


class Bench:
    """The control plane and the online caller; runs() starts `tasklane run`s."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.http_port = free_port()
        self.server = f"http://127.0.0.1:{self.http_port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def tasklane(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with (self.work / log).open("ab") as out:
            proc = subprocess.Popen(
                dying_with_parent([sys.executable, "-m", "controlplane", *args]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def run(self, group: str, log: str) -> subprocess.Popen[bytes]:
        return self.tasklane(
            "run", "--server", self.server, "--token-file", str(self.token_file),
            "--service", "fund-facade", "--group", group, "--", *APP, log=log,
        )  # fmt: skip

    @property
    def token_file(self) -> Path:
        """The API token `tasklane up` writes into its state dir; writes need it."""
        return self.work / "state" / "api-token"

    def start(self) -> int:
        """Start the control plane and the caller; returns the caller's egress port."""
        self.tasklane(
            "up", "--state-dir", str(self.work / "state"),
            "--xds-port", str(free_port()), "--http-port", str(self.http_port),
            "--etcd-client-port", str(free_port()), "--etcd-peer-port", str(free_port()),
            log="up.log",
        )  # fmt: skip
        wait(lambda: self._get("/healthz")[0] == 200, "the control plane")
        rules = self.work / "rules.yaml"
        rules.write_text(RULES)
        applied = subprocess.run(
            [sys.executable, "-m", "controlplane", "apply", "--server", self.server]
            + ["--token-file", str(self.token_file), "-f", str(rules)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if applied.returncode != 0:
            raise SystemExit(f"apply failed: {applied.stderr.strip()}")
        self.run("default", "caller.log")
        [caller] = wait(lambda: self.instances("default"), "the caller registered")
        return caller["egress_port"]

    def instances(self, group: str) -> list[dict]:
        status, body = self._get("/api/v1/instances")
        items = body.get("items", []) if status == 200 else []
        return [item for item in items if item["group"] == group]

    def _get(self, path: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, ValueError):
            return 0, {}
        finally:
            conn.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            stop_process(proc, timeout=15)


def wait(check: Callable[[], T], what: str) -> T:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.01)
    raise SystemExit(f"not reached in {TIMEOUT:g}s: {what}")


def dyed_status(egress: int) -> tuple[int, str]:
    """Status of one dyed GET through the caller's sidecar, and the group that served it."""
    conn = http.client.HTTPConnection("127.0.0.1", egress, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": "fund-facade", "x-task-dye": "fund-yield"})
        response = conn.getresponse()
        body = response.read()
    except OSError:
        return 0, ""
    finally:
        conn.close()
    with contextlib.suppress(ValueError, KeyError, IndexError):
        return response.status, json.loads(body)["hops"][0]["group"]
    return response.status, ""


def until_served(egress: int, started: float) -> float:
    """Seconds from `started` to the first dyed request the task group served."""
    while time.monotonic() - started < TIMEOUT:
        if dyed_status(egress) == (200, "task"):
            return time.monotonic() - started
        time.sleep(PROBE_INTERVAL)
    raise SystemExit(f"no dyed request served within {TIMEOUT:g}s")


def until_refused(egress: int) -> None:
    wait(lambda: dyed_status(egress)[0] == 503, "dyed requests refused (no task instance)")


def app_states(run: subprocess.Popen[bytes]) -> set[str]:
    """Kernel states of the run's children (its app and Envoy): 'T' once parked."""
    states = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == run.pid:
                states.add(fields[0])
    return states


def cold_samples(bench: Bench, egress: int, count: int) -> list[float]:
    samples = []
    for number in range(count):
        started = time.monotonic()
        run = bench.run("task", f"cold-{number}.log")
        samples.append(until_served(egress, started))
        run.send_signal(signal.SIGTERM)
        stop_process(run, timeout=15)
        until_refused(egress)
    return samples


def resume_samples(bench: Bench, egress: int, count: int) -> list[float]:
    run = bench.run("task", "resumed.log")
    until_served(egress, time.monotonic())
    samples = []
    for _ in range(count):
        run.send_signal(signal.SIGUSR1)
        wait(lambda: app_states(run) == {"T"}, "the instance parked")
        until_refused(egress)
        time.sleep(0.5)  # parked for a while, not just stopped
        started = time.monotonic()
        run.send_signal(signal.SIGUSR2)
        samples.append(until_served(egress, started))
    return samples


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def print_table(rows: dict[str, list[float]]) -> None:
    width = max(map(len, rows))
    print(f"{'case':<{width}} {'n':>3} {'p50 ms':>7} {'p90 ms':>7} {'min ms':>7} {'max ms':>7}")
    for name, samples in rows.items():
        values = (percentile(samples, 50), percentile(samples, 90), min(samples), max(samples))
        print(f"{name:<{width}} {len(samples):>3} " + " ".join(f"{v * 1000:>7.0f}" for v in values))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="samples of each case")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tasklane-resume-") as work:
        bench = Bench(Path(work))
        try:
            egress = bench.start()
            until_refused(egress)
            rows = {
                "cold: `tasklane run` start -> first served": cold_samples(
                    bench, egress, args.samples
                ),
                "resume: SIGUSR2 to a parked run -> first served": resume_samples(
                    bench, egress, args.samples
                ),
            }
        finally:
            bench.stop()
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
