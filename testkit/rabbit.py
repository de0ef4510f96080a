"""A real RabbitMQ node (Debian's `rabbitmq-server`) on free ports, in its own directory, for
the message-queue lane tests and bench/queues.py.

Each node has its own name, data and log directories, Erlang cookie (in its own $HOME) and its
own epmd on a free port (ERL_EPMD_PORT), so nodes of parallel workers never meet and stopping
one leaves no process behind: the node's process group is killed, then its epmd. A node
stopped and started again keeps its data (durable queues and persistent messages survive).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions

from controlplane.runtime.ports import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the node itself, not the su wrapper
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass
class Broker:
    """One RabbitMQ node; `url` is its AMQP address (guest may log in from loopback)."""

    home: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def parameters(self) -> pika.URLParameters:
        return pika.URLParameters(self.url)

    def _env(self) -> dict[str, str]:
        name = f"tasklane{self.port}@localhost"
        return {
            **os.environ,
            "HOME": str(self.home),  # its .erlang.cookie is made here
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.home / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.home / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_LOGS": str(self.home / "log" / "node.log"),
        }

    def start(self) -> None:
        """Start the node (keeping its data from a previous start) and wait for AMQP."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "enabled_plugins").write_text("[].\n")
        # A small disk floor: the machine's disk is shared, and the default alarm blocks publishers.
        (self.home / "rabbitmq.conf").write_text("disk_free_limit.absolute = 50MB\n")
        with open(self.home / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [str(SERVER)],
                env=self._env(),
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                pika.BlockingConnection(self.parameters()).close()
                return
            except pika.exceptions.AMQPConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.home / "stdout.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"rabbitmq did not start:\n{log}") from None
                time.sleep(0.2)

    def version(self) -> str:
        """The installed rabbitmq-server package's version (Debian's)."""
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or "unknown"

    def stop(self, crash: bool = False) -> None:
        """Stop the node's whole process group and its epmd; nothing is left running. `crash`:
        SIGKILL at once, as a node that dies (nothing flushed on the way out)."""
        if self.process is not None:
            signals = ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0))
            for sig, wait in signals[crash:]:
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    _wait_group_gone(self.process.pid, wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.process = None
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        subprocess.run(
            [epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10
        )


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)
