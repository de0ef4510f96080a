"""The inbound redirect of an injected pod, proven in real network namespaces: a "pod"
(`unshare --net`) and a "node" (another one) joined by a veth pair, so nothing of the
machine's own network changes. In the pod, an "app" and a stand-in for the sidecar's inbound
listener each answer with their name. The injector's own init container command (iptables
rules from controlplane/inject/redirect.py) is run in the pod as the kubelet would; then a
connection from the node to the app port lands on the sidecar, and only the sidecar's uid (or
loopback) still reaches the app."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from controlplane.inject.pod import (
    INBOUND_PORT,
    PROXY_UID,
    REDIRECT_NAME,
    InjectOptions,
    inject_pod,
)
from controlplane.runtime.process import stop_process
from tests.support.system import missing, require_command

pytestmark = pytest.mark.timeout(60)
NODE_IP, POD_IP = "10.97.0.1", "10.97.0.2"
APP_PORT, METRICS_PORT = 8080, 9100
TIMEOUT = 10.0
# The machine's Python for the clients: another uid may not be allowed into the venv's.
CLIENT_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
# Answers every connection with its name, then closes; prints "up" once listening.
_SERVE = """\
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server(("0.0.0.0", port))
print("up", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(name.encode())
    conn.close()
"""
# Prints who answered at host:port, or the error's name.
_ASK = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as conn:
        print(conn.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


class Namespace:
    """A network namespace held by a sleeping process; commands join it with nsenter."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 300"],
            stdout=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != b"up\n":
            self.holder.kill()
            missing("cannot make a network namespace (unshare --net needs root)")
        self.enter = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def run(self, *command: str, stdin: str | None = None, uid: int | None = None) -> str:
        user = [] if uid is None else [f"--setuid={uid}", f"--setgid={uid}"]
        done = subprocess.run(
            [*self.enter, *user, *command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def network() -> Iterator[tuple[Namespace, Namespace]]:
    """(node, pod): POD_IP in the pod reached from NODE_IP over a veth pair."""
    require_command("iptables-restore", "iptables")
    node, pod = Namespace(), Namespace()
    try:
        node.run("ip", "link", "add", "node0", "type", "veth", "peer", "name", "eth0", "netns",
                 str(pod.holder.pid))  # fmt: skip
        node.run("ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0")
        node.run("ip", "link", "set", "node0", "up")
        pod.run("ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        pod.run("ip", "link", "set", "eth0", "up")
        yield node, pod
    finally:
        pod.close()
        node.close()


@pytest.fixture
def servers(network: tuple[Namespace, Namespace]) -> Iterator[None]:
    """In the pod: the app on its port and on a second one, and the 'sidecar' on 15006."""
    _, pod = network
    procs = []
    try:
        for name, port in (("app", APP_PORT), ("metrics", METRICS_PORT), ("sidecar", INBOUND_PORT)):
            proc = subprocess.Popen(
                [*pod.enter, sys.executable, "-c", _SERVE, name, str(port)],
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline() == b"up\n", name
        yield
    finally:
        for proc in procs:
            stop_process(proc)


def ask(namespace: Namespace, host: str, port: int, uid: int | None = None) -> str:
    return namespace.run(CLIENT_PYTHON, "-c", _ASK, host, str(port), uid=uid).strip()


def redirect_command() -> list[str]:
    """The init container's command as `tasklane inject` writes it, for a pod whose app
    listens on APP_PORT; `python` is this interpreter (the image's is on its PATH)."""
    pod = inject_pod(
        {
            "metadata": {"labels": {"tasklane.io/service": "web", "tasklane.io/group": "task"}},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "x",
                        "ports": [{"containerPort": APP_PORT}, {"containerPort": METRICS_PORT}],
                    }
                ]
            },
        },
        InjectOptions(),
    )
    assert pod is not None
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == REDIRECT_NAME]
    command = init["command"]
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_inbound_traffic_to_the_app_port_lands_on_the_sidecar(
    network: tuple[Namespace, Namespace], servers: None
) -> None:
    node, pod = network
    # Without the rules, the node reaches the app around the sidecar.
    assert ask(node, POD_IP, APP_PORT) == "app"

    pod.run(*redirect_command())
    pod.run(*redirect_command())  # a restarted pod runs it again: the same rules, once
    rules = pod.run("iptables-save", "-t", "nat")
    assert rules.count("--to-ports 15006") == 1, rules

    # From outside the pod (a Service's targetPort, another pod, the node): the sidecar.
    assert ask(node, POD_IP, APP_PORT) == "sidecar"
    assert ask(node, POD_IP, INBOUND_PORT) == "sidecar"
    # Inside the pod, to its own IP: the sidecar too, except from the sidecar's uid.
    assert ask(pod, POD_IP, APP_PORT) == "sidecar"
    assert ask(pod, POD_IP, APP_PORT, uid=PROXY_UID) == "app"
    # Loopback, where the sidecar forwards to the app, is left alone for every uid.
    assert ask(pod, "127.0.0.1", APP_PORT, uid=PROXY_UID) == "app"
    assert ask(pod, "127.0.0.1", APP_PORT) == "app"
    # Only the app port is redirected: the pod's other ports are what they were.
    assert ask(node, POD_IP, METRICS_PORT) == "metrics"


def test_failing_rules_are_one_line_and_exit_1(network: tuple[Namespace, Namespace]) -> None:
    _, pod = network
    command = [*pod.enter, sys.executable, "-m", "controlplane.inject.redirect", "*nat\nbogus\n"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.startswith("tasklane redirect: iptables-restore failed: ")
    assert done.stderr.count("\n") == 1, done.stderr
