"""What every benchmark prints first (the machine it ran on and how busy it was), and a real
`tasklane up` for the benchmarks that drive one."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from controlplane.runtime.ports import free_port

TASKLANE = [sys.executable, "-m", "controlplane"]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load: figures taken on a busy machine say so."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.platform()}; "
        f"load average {load_average()}"
    )


@contextlib.contextmanager
def tasklane_up(work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`tasklane up` (embedded etcd, free ports, state in `work`): (its HTTP URL, an
    environment for CLI commands against it); terminated on exit."""
    ports = [str(free_port()) for _ in range(4)]
    up = subprocess.Popen(
        [*TASKLANE, "up", "--state-dir", str(work / "state"), "--xds-port", ports[0],
         "--http-port", ports[1], "--etcd-client-port", ports[2], "--etcd-peer-port", ports[3]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=work,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        if not up.stdout.readline().startswith("tasklane up: "):
            raise SystemExit("tasklane up did not start")
        http = f"http://127.0.0.1:{ports[1]}"
        token = (work / "state" / "api-token").read_text().strip()
        yield http, {**os.environ, "TASKLANE_SERVER": http, "TASKLANE_TOKEN": token}
    finally:
        up.terminate()
        up.wait(timeout=30)
