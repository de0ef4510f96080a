"""An injected sidecar's entry point: render the pod's Envoy bootstrap from a few arguments,
then become Envoy.

The pod spec carries only these arguments, as Istio's injection template hands a few to its
agent, not the ~300-line bootstrap (a GitOps user reads and diffs the injected manifests):

    python -m controlplane.inject.start --service fund-facade --group task \\
        --pod-name $(POD_NAME) --pod-ip $(POD_IP) --app-port 8080 \\
        --xds tasklane.tasklane-system.svc:18000 --tls-dir /etc/tasklane/tls \\
        [--sotw] [--app-health PATH[=APP_PATH] ...] -- ENVOY FLAGS

The kubelet expands `$(POD_NAME)` and `$(POD_IP)`; the bootstrap is inject.pod.pod_bootstrap's,
the one `tasklane inject` used to inline, so the sidecar is the same. Envoy gets it with
`--config-yaml` (no file: the root filesystem may be read-only) and the flags after `--`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from controlplane.inject.pod import pod_bootstrap
from controlplane.model.group import GroupKey
from controlplane.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsFiles
from controlplane.runtime.envoy import envoy_binary

MODULE = "controlplane.inject.start"


def endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """argparse type: HOST:PORT, or several (the control plane's replicas) comma-separated."""
    found = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not HOST:PORT")
        found.append((host, int(port)))
    return tuple(found)


def _app_health(text: str) -> tuple[str, str | None]:
    """PATH=APP_PATH: the ready port passes PATH on to the app's APP_PATH; PATH alone: it
    answers from its TCP check of the app."""
    path, equals, app_path = text.partition("=")
    return path, app_path if equals else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Render an injected sidecar's Envoy bootstrap, then exec Envoy with the "
        "flags after --.",
    )
    p.add_argument("--service", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--pod-name", required=True, help="the node id's instance part")
    p.add_argument("--pod-ip", required=True, help="announced with the inbound port")
    p.add_argument("--app-port", type=int, help="none: a client-only pod (egress only)")
    p.add_argument("--xds", required=True, type=endpoints, metavar="HOST:PORT[,HOST:PORT...]")
    p.add_argument("--sotw", action="store_true", help="state-of-the-world xDS")
    p.add_argument("--tls-dir", type=Path, help="ca.crt, client.crt, client.key: mTLS to xDS")
    p.add_argument(
        "--app-health", type=_app_health, action="append", default=[], metavar="PATH[=APP_PATH]"
    )
    p.add_argument("envoy_flags", nargs=argparse.REMAINDER, metavar="-- ENVOY FLAGS")
    return p


def parse(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The pod_bootstrap() arguments and Envoy's own flags of a command line."""
    args = parser().parse_args(argv)
    (xds_host, xds_port), *more = args.xds
    tls, where = None, args.tls_dir
    if where is not None:
        tls = TlsFiles(where / CA_CERT, where / CLIENT_CERT, where / CLIENT_KEY)
    flags = args.envoy_flags[1:] if args.envoy_flags[:1] == ["--"] else args.envoy_flags
    return {
        "node_id": GroupKey(args.service, args.group).node_id(args.pod_name),
        "service": args.service,
        "group": args.group,
        "host": args.pod_ip,
        "app_port": args.app_port,
        "xds_host": xds_host,
        "xds_port": xds_port,
        "more_xds": tuple(more),
        "delta": not args.sotw,
        "tls": tls,
        "app_health": tuple(args.app_health),
    }, flags


def bootstrap(argv: Sequence[str]) -> str:
    """The bootstrap YAML Envoy gets from this command line."""
    return pod_bootstrap(**parse(argv)[0])


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Exec Envoy, which then gets the container's signals itself."""
    options, flags = parse(sys.argv[1:] if argv is None else argv)
    binary = str(envoy_binary())
    os.execv(binary, [binary, "--config-yaml", pod_bootstrap(**options), *flags])


if __name__ == "__main__":
    main()
