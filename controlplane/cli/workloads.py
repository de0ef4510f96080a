"""`tasklane run` (an app behind its sidecar) and `tasklane gateway` (the ingress)."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from controlplane import pki
from controlplane.cli.client import (
    api_token,
    call,
    server_option,
    servers,
)
from controlplane.errors import TasklaneError
from controlplane.runtime.gateway import GatewayOptions, run_gateway
from controlplane.runtime.sidecar import RunOptions, run_instance, xds_addresses

STATUS_PATH = "/api/v1/status"


def add_tls_dir(parser: argparse.ArgumentParser) -> None:
    """--tls-dir, for the commands whose Envoy connects to the control plane's xDS port."""
    parser.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        default=os.environ.get(pki.TLS_DIR_ENV),
        help="connect to xDS over TLS with DIR's client certificate, as a control plane "
        f"started with `tasklane up --tls-dir` requires (default: ${pki.TLS_DIR_ENV})",
    )


def client_tls(args: argparse.Namespace) -> pki.TlsFiles | None:
    """The --tls-dir files, checked before anything starts; None without --tls-dir."""
    return None if args.tls_dir is None else pki.client_files(args.tls_dir)


def replicas_xds(args: argparse.Namespace, tls: pki.TlsFiles | None) -> tuple[tuple[str, int], ...]:
    """The xDS address of each control plane replica --server lists, from its status."""
    return xds_addresses(servers(args.server), lambda url: call(url, "GET", STATUS_PATH), tls)


# --- tasklane run: an app as an instance, behind an Envoy sidecar -------------------------


def add_run(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane run --service S [--group G] [--port P] -- CMD ...`."""
    p = commands.add_parser(
        "run",
        parents=[common, server_option()],
        help="run an app as an instance of a service group, behind an Envoy sidecar",
        description="Start an Envoy sidecar fed by the control plane, then CMD (with $PORT, "
        "$TASKLANE_EGRESS and http_proxy set), and register the instance while CMD runs. "
        "SIGTERM or Ctrl-C deregisters it, then stops CMD and Envoy. The exit code is CMD's.",
    )
    p.add_argument("--service", required=True, help="the service this instance belongs to")
    p.add_argument("--group", default="default", help="its service group (default: default)")
    p.add_argument(
        "--port", type=int, help="the port CMD listens on (default: a free one, given as $PORT)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the sidecar's inbound listener binds and other sidecars reach this "
        "instance at (default: 127.0.0.1)",
    )
    p.add_argument(
        "--sotw",
        action="store_true",
        help="state-of-the-world xDS: the sidecar holds the whole mesh's config (default: "
        "incremental xDS, holding what the app calls and asking for other services on demand)",
    )
    add_tls_dir(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise TasklaneError("no command to run: tasklane run --service S -- CMD [ARG ...]")
    tls = client_tls(args)
    options = RunOptions(
        service=args.service,
        group=args.group,
        command=command,
        xds=replicas_xds(args, tls),
        host=args.host,
        port=args.port,
        delta=not args.sotw,
        tls=tls,
    )
    # Read before anything starts: registering is a write.
    return run_instance(options, functools.partial(call, args.server, token=api_token(args)))


# --- tasklane gateway: the ingress for external traffic -----------------------------------


def add_gateway(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane gateway --port P [--trusted-cidr CIDR ...] [--trust-header NAME
    --trust-secret-file FILE]`."""
    p = commands.add_parser(
        "gateway",
        parents=[common, server_option()],
        help="run the ingress gateway for external traffic until interrupted",
        description="Run an Envoy ingress in the foreground. It routes `Host: <service>` "
        "requests into the mesh like a sidecar's egress listener, and removes task dyes (every "
        "chain's dye header, the dye members of `baggage`) from callers it does not trust, so "
        "online traffic cannot reach a task group. Ctrl-C or SIGTERM stops it.",
    )
    p.add_argument("--port", type=int, required=True, help="port external callers connect to")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only, like `tasklane up`; "
        "0.0.0.0 for every address)",
    )
    p.add_argument(
        "--trusted-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="callers connecting from this address range keep their dyes; repeat for more",
    )
    p.add_argument(
        "--trust-header",
        metavar="NAME",
        help="requests whose NAME header holds the secret keep their dyes; NAME itself is "
        "removed from every request",
    )
    p.add_argument(
        "--trust-secret-file", type=Path, metavar="FILE", help="the secret of --trust-header"
    )
    p.add_argument(
        "--sotw",
        action="store_true",
        help="state-of-the-world xDS (default: incremental, every service's host sent apart)",
    )
    p.add_argument(
        "--admin-port", type=int, help="Envoy admin port on 127.0.0.1 (default: a free one)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tasklane"),
        help="where the gateway's Envoy keeps its bootstrap and log, in gateway-<port>/, "
        "removed on a clean stop (default: .tasklane)",
    )
    add_tls_dir(p)
    p.set_defaults(handler=gateway)


def gateway(args: argparse.Namespace) -> int:
    tls = client_tls(args)
    options = GatewayOptions(
        port=args.port,
        host=args.host,
        trusted_cidrs=tuple(args.trusted_cidr),
        trust_header=args.trust_header,
        trust_secret_file=args.trust_secret_file,
        delta=not args.sotw,
        admin_port=args.admin_port,
        state_dir=args.state_dir,
        tls=tls,
    )
    return run_gateway(options, functools.partial(replicas_xds, args, tls))
