"""`tasklane up` and `tasklane demo`: what runs in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import pki
from controlplane.cli.inject import add_sidecar_options, sidecar_options
from controlplane.errors import RuleError, TasklaneError
from controlplane.model.cron import format_duration, parse_duration
from controlplane.model.scope import DEFAULT_IDLE
from controlplane.scaler.actuators import Actuator, DryRunActuator
from controlplane.scaler.policy import PolicyConfig
from controlplane.store.rules import DEFAULT_HISTORY_LIMIT
from controlplane.xds.names import ALLOW_ANY, OUTBOUND_POLICIES

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

log = logging.getLogger("tasklane")


def add_up(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane up`: run the control plane in the foreground until SIGINT/SIGTERM."""
    p = commands.add_parser(
        "up",
        parents=[common],
        help="run the control plane (etcd, xDS, HTTP API) until interrupted",
        description="Run the control plane in the foreground; Ctrl-C or SIGTERM stops it.",
    )
    p.add_argument(
        "--etcd",
        metavar="HOST:PORT",
        help="use this etcd instead of starting an embedded one",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tasklane"),
        help="where the API token (api-token) and the embedded etcd's data are kept "
        "(default: .tasklane)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address xDS and HTTP listen on")
    p.add_argument("--xds-port", type=int, default=18000, help="xDS gRPC port (default: 18000)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP API port (default: 8080)")
    p.add_argument(
        "--etcd-client-port",
        type=int,
        default=2379,
        help="client port of the embedded etcd (default: 2379; ignored with --etcd)",
    )
    p.add_argument(
        "--etcd-peer-port",
        type=int,
        default=2380,
        help="peer port of the embedded etcd (default: 2380; ignored with --etcd)",
    )
    p.add_argument(
        "--actuator",
        choices=("none", "dry-run", "local", "kubernetes"),
        default="none",
        help="what the scaler drives: local `tasklane run` processes (Service spec.run), "
        "Deployments' scale, or nothing but recorded decisions (default: no scaler)",
    )
    p.add_argument(
        "--scale-period", type=float, default=15.0, help="scaler sync period, s (default: 15)"
    )
    p.add_argument(
        "--scale-down-window",
        type=float,
        default=300.0,
        help="scaler: a group goes down only this long after it went up, s (default: 300)",
    )
    p.add_argument(
        "--parked-cost",
        type=float,
        default=PolicyConfig.parked_cost,
        help="scaler: a parked instance's hour in running hours, 0-1: it holds memory, not "
        "CPU; pre-warms and gaps between runs are parked when that costs less than a cold "
        "start (default: 0.25)",
    )
    p.add_argument(
        "--keep-alive",
        type=int,
        default=1,
        help="local actuator: instances per group parked for fast resume (default: 1)",
    )
    p.add_argument(
        "--namespace", default="default", help="kubernetes actuator: Deployments' namespace"
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="serve xDS (and access logs, TaskService) over TLS, only to clients with a "
        "certificate from DIR's CA (`tasklane tls init DIR`; default: plaintext); the local "
        "actuator's instances use DIR's client certificate",
    )
    p.add_argument(
        "--accept-announce",
        action="store_true",
        help="register the instances sidecars announce on their xDS stream (pods injected by "
        "`tasklane inject` or the webhook, docker-compose): announcements carry no API token, "
        "so use it where only the mesh reaches the xDS port, or with --tls-dir",
    )
    p.add_argument(
        "--webhook-port",
        type=int,
        metavar="PORT",
        help="serve the Kubernetes sidecar injector (a mutating admission webhook, POST "
        "/inject) over HTTPS on this port, with --tls-dir's server certificate (default: off); "
        "the --sidecar-* options say what it injects",
    )
    p.add_argument(
        "--outbound-traffic-policy",
        metavar="|".join(OUTBOUND_POLICIES),
        default=ALLOW_ANY,
        help="what sidecars do with a host that is no service of the mesh (an external API, "
        "a cluster service outside the mesh): ALLOW_ANY passes it through, HTTP and HTTPS "
        "(CONNECT) alike; REGISTRY_ONLY answers 502 naming the host (default: ALLOW_ANY)",
    )
    p.add_argument(
        "--scope-idle",
        metavar="DURATION",
        default=format_duration(int(DEFAULT_IDLE)),
        help="a service a role's sidecars called (learned from the access logs, or asked for "
        "on demand) stays in the role's scope until it goes uncalled this long, e.g. 90m "
        f"(default: {format_duration(int(DEFAULT_IDLE))})",
    )
    p.add_argument(
        "--history-limit",
        type=int,
        default=DEFAULT_HISTORY_LIMIT,
        metavar="N",
        help="how many revisions of the rules `tasklane history` and `tasklane rollback` keep "
        f"(at least 1; default: {DEFAULT_HISTORY_LIMIT})",
    )
    add_sidecar_options(p, prefix="sidecar-")
    p.set_defaults(handler=up)


def _actuator(args: argparse.Namespace) -> Callable[[ControlPlane], Actuator] | None:
    """How to make the scaler's actuator once the control plane's API is up."""
    from controlplane.scaler.actuators.kubernetes import KubernetesActuator  # loads `kubernetes`
    from controlplane.scaler.actuators.local import LocalActuator
    from controlplane.scaler.profile import managed_groups

    if args.actuator == "dry-run":
        return lambda cp: DryRunActuator()
    if args.actuator == "local":
        return lambda cp: LocalActuator(
            f"http://127.0.0.1:{cp.http_port}",
            lambda: cp.sync.rules,
            Path(args.state_dir) / "instances",
            keep_alive=args.keep_alive,
            api_token=cp.api_token.value,
        )
    if args.actuator == "kubernetes":
        return lambda cp: KubernetesActuator(
            args.namespace, groups=lambda: managed_groups(cp.sync.rules)
        )
    return None


def up(args: argparse.Namespace) -> int:
    """Run the control plane until a signal; exit 0 after a clean stop."""
    if args.outbound_traffic_policy not in OUTBOUND_POLICIES:
        raise TasklaneError(
            f"--outbound-traffic-policy {args.outbound_traffic_policy!r} is not one of "
            f"{', '.join(OUTBOUND_POLICIES)}"
        )
    scope_idle = _scope_idle(args.scope_idle)
    if not 0 <= args.parked_cost <= 1:
        raise TasklaneError(f"--parked-cost must be from 0 to 1, got {args.parked_cost:g}")
    if args.history_limit < 1:
        raise TasklaneError(f"--history-limit must be at least 1, got {args.history_limit}")
    if args.tls_dir is not None and args.actuator == "local":
        pki.client_files(args.tls_dir)  # its `tasklane run` children need them: check now
        os.environ[pki.TLS_DIR_ENV] = str(args.tls_dir.resolve())  # what they inherit
    from controlplane.app import ControlPlane  # the servers: no other command needs them

    control_plane = ControlPlane(
        args.state_dir,
        etcd_endpoint=args.etcd,
        host=args.host,
        xds_port=args.xds_port,
        http_port=args.http_port,
        etcd_client_port=args.etcd_client_port,
        etcd_peer_port=args.etcd_peer_port,
        actuator=_actuator(args),
        scaler_config=PolicyConfig(
            sync_period_s=args.scale_period,
            scale_down_window_s=args.scale_down_window,
            parked_cost=args.parked_cost,
        ),
        accept_announce=args.accept_announce,
        tls_dir=args.tls_dir,
        webhook_port=args.webhook_port,
        inject_options=sidecar_options(args, prefix="sidecar-"),
        outbound_policy=args.outbound_traffic_policy,
        scope_idle=scope_idle,
        history_limit=args.history_limit,
    )
    asyncio.run(_run_until_signalled(control_plane))
    return 0


def _scope_idle(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except RuleError as exc:
        raise TasklaneError(f"--scope-idle: {exc}") from None
    if seconds <= 0:
        raise TasklaneError(f"--scope-idle must be longer than 0s: {text!r}")
    return float(seconds)


async def _run_until_signalled(control_plane: ControlPlane) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    # Installed before start(): a signal during startup is handled once startup returns.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await control_plane.start()
        print(ready_line(control_plane) + token_notice(control_plane), flush=True)
        await stopping.wait()
        log.info("stopping")
    finally:
        await control_plane.stop()


def ready_line(control_plane: ControlPlane) -> str:
    """The one line that tells the user (and scripts waiting on stdout) where everything is."""
    host = control_plane.host
    etcd = control_plane.etcd
    where = f"embedded, data in {etcd.data_dir}" if etcd is not None else "external"
    tls = " (TLS, client certificates required)" if control_plane.xds_tls else ""
    webhook = control_plane.webhook_port
    injector = f", sidecar injector on https://{host}:{webhook}/inject" if webhook else ""
    return (
        f"tasklane up: xDS{tls} on {host}:{control_plane.xds_port}, "
        f"HTTP on http://{host}:{control_plane.http_port}{injector}, "
        f"etcd at {control_plane.etcd_endpoint} ({where})"
    )


def token_notice(control_plane: ControlPlane) -> str:
    """On the start that made the API token: where it is, and on a terminal the token itself,
    once. Never when stdout is a file or a pipe: that is a log, and logs must not hold it."""
    token = control_plane.api_token
    if not token.created:
        return ""
    notice = f"\nAPI token written to {token.path}"
    if sys.stdout.isatty():
        notice += f"\nAPI token (shown once; writes send it as a Bearer token): {token.value}"
    return notice


def add_demo(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane demo [--duration N]`: the fund-yield chain end to end (demo/scenario.py)."""
    p = commands.add_parser(
        "demo",
        parents=[common],
        help="run the fund-yield demo: control plane, 12 instances, gateway, task and users",
        description="Start everything the fund-yield demo needs, fire the task on its cron, "
        "send online traffic, and print isolation per hop and group. Ctrl-C stops it.",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--work-dir", type=Path, help="logs and state (default: a new temp dir)")
    p.set_defaults(handler=demo)


def demo(args: argparse.Namespace) -> int:
    """Exit 0 when no leak was counted, 1 otherwise."""
    from demo import scenario  # the demo apps are not needed by any other command

    return scenario.run(args.duration, args.work_dir)
