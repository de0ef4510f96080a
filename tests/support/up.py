"""`tasklane up` as a user runs it, for tests: a real process on free ports with a real etcd,
its readiness, its one-line errors, and a `running_up` fixture (loaded by tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.runtime.ports import free_port
from tests.support.procs import wait_gone

TASKLANE = [str(Path(sys.executable).parent / "tasklane")]  # the installed console script
PYTHON_M = [sys.executable, "-m", "controlplane"]
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
START_ATTEMPTS = 3

# Direct connections even when http_proxy is set in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Up:
    """One `tasklane up` process, its ports, and files holding its stdout and stderr."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    state_dir: Path
    out: Path
    err: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['http']}{path}"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    @property
    def token(self) -> str:
        """The API token it made in its state dir, which writes need."""
        return (self.state_dir / "api-token").read_text().strip()

    def kill(self) -> None:
        """SIGKILL (if still running) and reap; the kernel then kills its etcd child too."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT)


def free_ports() -> dict[str, int]:
    ports: dict[str, int] = {}
    for name in ("xds", "http", "etcd_client", "etcd_peer"):
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[name] = port
    return ports


def launch(
    command: list[str],
    tmp_path: Path,
    ports: dict[str, int],
    *,
    etcd: str | None = None,
    options: Sequence[str] = (),
    state_dir: Path | None = None,
) -> Up:
    """Start `tasklane up` on the given ports with a state dir of its own under tmp_path
    (or `state_dir`, e.g. another replica's, for its API token), and any more `options`
    (e.g. --tls-dir DIR)."""
    run_dir = Path(os.path.realpath(tmp_path)) / f"up-{ports['xds']}-{time.monotonic_ns()}"
    run_dir.mkdir()
    state_dir = state_dir or run_dir / "state"
    args = [
        *command,
        "up",
        "--state-dir", str(state_dir),
        "--xds-port", str(ports["xds"]),
        "--http-port", str(ports["http"]),
        "--etcd-client-port", str(ports["etcd_client"]),
        "--etcd-peer-port", str(ports["etcd_peer"]),
    ]  # fmt: skip
    if etcd is not None:
        args += ["--etcd", etcd]
    args += options
    out, err = run_dir / "stdout", run_dir / "stderr"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file, cwd=run_dir
        )
    return Up(proc, ports, state_dir, out, err)


def wait_ready(up: Up, timeout: float = READY_TIMEOUT) -> bool:
    """True once the ready line is printed; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.stdout().startswith("tasklane up: "):
            return True
        if up.proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"tasklane up not ready within {timeout:g}s; stderr:\n{up.stderr()}")


def start_up(
    tmp_path: Path,
    *,
    etcd: str | None = None,
    options: Sequence[str] = (),
    state_dir: Path | None = None,
) -> Up:
    """A ready `tasklane up`; retries on fresh ports if another xdist worker took one."""
    for _ in range(START_ATTEMPTS):
        up = launch(
            TASKLANE, tmp_path, free_ports(), etcd=etcd, options=options, state_dir=state_dir
        )
        if wait_ready(up):
            return up
        up.kill()
        if "already in use" not in up.stderr():
            break
    raise AssertionError(f"tasklane up failed (exit {up.proc.returncode}):\n{up.stderr()}")


def get_json(url: str) -> tuple[int, dict]:
    try:
        with _opener.open(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def etcd_children(pid: int) -> list[int]:
    """Pids of the live etcd processes whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if comm == "etcd" and int(ppid) == pid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def assert_one_line_error(err: str, starts_with: str) -> None:
    assert "Traceback" not in err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"tasklane: error: {starts_with}"), err


@pytest.fixture
def running_up(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """A ready `tasklane up` with an embedded etcd (and the options of an indirect
    parametrization, if any); killed (with its etcd) afterwards."""
    up = start_up(tmp_path, options=getattr(request, "param", ()))
    etcd_pids = etcd_children(up.proc.pid)
    try:
        yield up
    finally:
        up.kill()
        for pid in etcd_pids:
            if not wait_gone(pid, timeout=2.0):
                os.kill(pid, signal.SIGKILL)
