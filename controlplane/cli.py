"""The `tasklane` command line.

Each subcommand is one `add_<name>` function (its parser, with `handler=` set to the function
that runs it) listed in COMMANDS. Handlers return the exit code; any TasklaneError they raise
becomes one `tasklane: error: <message>` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from controlplane.api import auth
from controlplane.app import ControlPlane
from controlplane.cli_views import render_status, render_top, watch
from controlplane.cli_views import table as _table
from controlplane.errors import RuleError, TasklaneError
from controlplane.model.load import RULE_SUFFIXES
from controlplane.runtime.gateway import GatewayOptions, run_gateway
from controlplane.runtime.sidecar import RunOptions, run_instance
from controlplane.scaler.actuators import Actuator, DryRunActuator
from controlplane.scaler.policy import PolicyConfig
from controlplane.store.runs import format_time

log = logging.getLogger("tasklane")

EXIT_ERROR = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


# --- tasklane up ---------------------------------------------------------------------------


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
        "--keep-alive",
        type=int,
        default=1,
        help="local actuator: instances per group parked for fast resume (default: 1)",
    )
    p.add_argument(
        "--namespace", default="default", help="kubernetes actuator: Deployments' namespace"
    )
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
            sync_period_s=args.scale_period, scale_down_window_s=args.scale_down_window
        ),
    )
    asyncio.run(_run_until_signalled(control_plane))
    return 0


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
    return (
        f"tasklane up: xDS on {host}:{control_plane.xds_port}, "
        f"HTTP on http://{host}:{control_plane.http_port}, "
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


# --- tasklane apply / diff / get / delete: clients of the rules API -----------------------

DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "TASKLANE_SERVER"
# Bounds a hung server only: an apply is one validation and one etcd transaction.
REQUEST_TIMEOUT = 60.0
OUTPUTS = ("table", "yaml", "json")
STDIN = "-"

# Straight to the control plane: apps (and tests) set http_proxy for the mesh's egress.
_api_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _server_option() -> argparse.ArgumentParser:
    """--server, for every command that talks to a running control plane."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"HTTP address of the control plane (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the API token, which writes need (default: $TASKLANE_TOKEN, else "
        f"{auth.DEFAULT_TOKEN_PATH}, written by `tasklane up` into its state dir)",
    )
    return parser


def _add_filename(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="a rule file, a directory of *.yaml/*.yml files (not recursive), or - for stdin; "
        "repeat for more",
    )


def add_apply(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane apply -f FILE|DIR [--dry-run]`: create or update rules, all or nothing."""
    p = commands.add_parser(
        "apply",
        parents=[common, _server_option()],
        help="create or update rules from YAML files",
        description="Send rule files to the control plane, which checks them against the "
        "stored rules and writes every change in one transaction, or nothing at all. Rules "
        "not in the files are kept.",
    )
    _add_filename(p)
    p.add_argument("--dry-run", action="store_true", help="check and show the diff without writing")
    p.set_defaults(handler=apply)


def apply(args: argparse.Namespace) -> int:
    """One line per document, as kubectl prints them; a dry run adds the diff."""
    body = _apply_files(args, _rule_files(args.filename), dry_run=args.dry_run)
    suffix = " (dry run)" if args.dry_run else ""
    lines = [f"{r['kind'].lower()}/{r['name']} {r['action']}{suffix}\n" for r in body["results"]]
    _output("".join(lines) + (body["diff"] if args.dry_run else ""))
    return 0


def add_diff(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane diff -f FILE|DIR`: what an apply would change; exit 1 if anything."""
    p = commands.add_parser(
        "diff",
        parents=[common, _server_option()],
        help="show what applying rule files would change",
        description="Print a unified diff between the stored rules and the rule files. Exit "
        "status: 0 no changes, 1 changes, 2 error (like kubectl diff).",
    )
    _add_filename(p)
    p.set_defaults(handler=diff)


def diff(args: argparse.Namespace) -> int:
    body = _apply_files(args, _rule_files(args.filename), dry_run=True)
    _output(body["diff"])
    return 1 if any(result["action"] != "unchanged" for result in body["results"]) else 0


def add_get(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane get KIND [NAME] [-o table|yaml|json]`."""
    p = commands.add_parser(
        "get",
        parents=[common, _server_option()],
        help="show stored rules",
        description="Show the stored rules of one kind, or one rule. `-o yaml` prints "
        "documents that `tasklane apply -f -` takes back unchanged.",
    )
    p.add_argument(
        "kind",
        metavar="KIND",
        help="service (svc), taskchain (chain) or scheduledtask (task), or a plural",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="one rule (default: all of KIND)")
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="output format (default: table)"
    )
    p.set_defaults(handler=get)


def get(args: argparse.Namespace) -> int:
    if args.kind in ("profile", "profiles"):
        return _get_profile(args)
    path = f"/api/v1/rules/{_quote(args.kind)}"
    if args.name is not None:
        path += f"/{_quote(args.name)}"
    body = _call(args.server, "GET", path)
    documents = body["items"] if args.name is None else [body]
    if args.output == "json":
        _output(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    elif args.output == "yaml":
        # Every document starts with ---, so outputs of several gets can be concatenated.
        _output(
            yaml.safe_dump_all(documents, explicit_start=True, sort_keys=False, allow_unicode=True)
        )
    elif documents:
        _output(_table([_row(document) for document in documents]) + "\n")
    else:
        print(f"No {body['kind']} rules found.", file=sys.stderr)
    return 0


def _get_profile(args: argparse.Namespace) -> int:
    """`tasklane get profile SERVICE`: when each task group of the service is wanted up (the
    next 24 h, minute by minute, as spans) and the scaler's recent decisions and reasons."""
    if args.name is None:
        raise TasklaneError("tasklane get profile needs a SERVICE name")
    body = _call(args.server, "GET", f"/api/v1/profile/{_quote(args.name)}")
    if args.output != "table":
        text = json.dumps(body, indent=2) if args.output == "json" else yaml.safe_dump(body)
        _output(text + "\n")
        return 0
    rows = []
    for group, counts in sorted(body["groups"].items()):
        for first, last, replicas in _spans(counts):
            rows.append(
                {
                    "GROUP": group,
                    "FROM": _clock(body["start"] + first * 60),
                    "UNTIL": _clock(body["start"] + (last + 1) * 60),
                    "REPLICAS": str(replicas),
                }
            )
    hours = body["minutes"] / 60
    print(f"profile of {body['service']}, next {hours:g} h (UTC):")
    print(_table(rows) if rows else "no task group of this service is wanted up")
    decisions = [
        {"AT": _clock(d["at"]), "GROUP": d["group"], "REPLICAS": str(d["replicas"]),
         "REASON": d["reason"]}
        for d in body["decisions"][-10:]
    ]  # fmt: skip
    print("\nrecent decisions:")
    print(_table(decisions) if decisions else "none yet")
    return 0


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(first minute, last minute, replicas) of each run of equal non-zero counts."""
    spans: list[tuple[int, int, int]] = []
    for minute, replicas in enumerate(counts):
        if spans and spans[-1][1] == minute - 1 and spans[-1][2] == replicas:
            spans[-1] = (spans[-1][0], minute, replicas)
        elif replicas:
            spans.append((minute, minute, replicas))
    return spans


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%m-%d %H:%M")


def add_delete(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane delete KIND NAME`: refused while another rule refers to it."""
    p = commands.add_parser(
        "delete",
        parents=[common, _server_option()],
        help="delete one rule",
        description="Delete one rule. A service a chain uses, or a chain a task drives, is "
        "refused with the name of the rule that still refers to it.",
    )
    p.add_argument(
        "kind",
        metavar="KIND",
        help="service (svc), taskchain (chain) or scheduledtask (task), or a plural",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=delete)


def delete(args: argparse.Namespace) -> int:
    path = f"/api/v1/rules/{_quote(args.kind)}/{_quote(args.name)}"
    body = _call(args.server, "DELETE", path, None, _token(args))
    _output(f"{body['kind'].lower()}/{body['name']} {body['action']}\n")
    return 0


def _output(text: str) -> None:
    """Write to stdout; a reader that has gone away (`tasklane get svc | head -1`) is not an
    error, so no traceback, and nothing more is written to the closed pipe."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _rule_files(given: list[str]) -> list[dict[str, str]]:
    """Read the files here, not on the server, so messages name paths as the user typed them."""
    files: list[dict[str, str]] = []
    for name in given:
        if name == STDIN:
            files.append({"name": "<stdin>", "text": _decode("<stdin>", sys.stdin.buffer.read())})
            continue
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p.name for p in path.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file()
            )
            if not found:
                raise RuleError(f"{name}: no *.yaml or *.yml files in this directory")
            paths = [os.path.join(name, each) for each in found]
        elif path.exists():
            paths = [name]
        else:
            raise RuleError(f"{name}: no such file or directory")
        for each in paths:
            try:
                data = Path(each).read_bytes()
            except OSError as exc:
                raise RuleError(f"{each}: cannot read: {exc.strerror or exc}") from None
            files.append({"name": each, "text": _decode(each, data)})
    return files


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RuleError(f"{name}: not UTF-8 text (byte {exc.start})") from None


def _apply_files(
    args: argparse.Namespace, files: list[dict[str, str]], *, dry_run: bool
) -> dict[str, Any]:
    body = {"files": files, "dryRun": dry_run}
    return _call(args.server, "POST", "/api/v1/apply", body, _token(args))


def _token(args: argparse.Namespace) -> str:
    """The API token a write sends (see --token-file)."""
    return auth.client_token(args.token_file)


class ApiError(TasklaneError):
    """The control plane answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _call(
    server: str, method: str, path: str, body: object = None, token: str | None = None
) -> Any:
    """One API request, with `token` for writes; its JSON answer, or TasklaneError (ApiError
    for an error status) with a one-line reason."""
    base = (server if "://" in server else f"http://{server}").rstrip("/")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        with _api_opener.open(request, timeout=REQUEST_TIMEOUT) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise ApiError(_api_error(base, exc), exc.code) from None
    except urllib.error.URLError as exc:
        raise _unreachable(base, exc.reason) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _unreachable(base, exc) from None
    try:
        return json.loads(payload)
    except ValueError:
        raise TasklaneError(
            f"{base} did not answer with JSON: is it a tasklane control plane?"
        ) from None


def _unreachable(base: str, reason: object) -> TasklaneError:
    shown = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return TasklaneError(
        f"cannot reach the control plane at {base}: {shown} (is `tasklane up` running?)"
    )


def _api_error(base: str, exc: urllib.error.HTTPError) -> str:
    """The API's own one-line message, or the HTTP status when the answer has none."""
    try:
        message = json.loads(exc.read())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return f"{base} answered HTTP {exc.code} {exc.reason}: is it a tasklane control plane?"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _row(document: dict[str, Any]) -> dict[str, str]:
    """The table columns of one rule: what one needs to recognise it at a glance."""
    spec = document["spec"]
    row = {"NAME": document["metadata"]["name"]}
    if document["kind"] == "Service":
        row["PROTOCOL"] = spec["protocol"]
        row["GROUPS"] = ",".join(
            f"{g['name']}:{g['minReplicas']}-{g['maxReplicas']}" for g in spec["groups"]
        )
    elif document["kind"] == "TaskChain":
        row["DYES"] = ",".join(spec["dye"]["values"])
        row["FALLBACK"] = spec["fallback"]
        row["HOPS"] = ",".join(_hop(hop) for hop in spec["hops"])
    elif document["kind"] == "ScheduledTask":
        row["CHAIN"] = spec["chain"]
        row["SCHEDULE"] = spec["schedule"]
        row["TIMEZONE"] = spec["timezone"]
        row["DURATION"] = spec["expectedDuration"]
    return row


def _hop(hop: dict[str, Any]) -> str:
    """'account-svc/debit', with '(80%)' when only part of the dyed traffic goes there."""
    share = f"({hop['weight']}%)" if hop["weight"] != 100 else ""
    return f"{hop['service']}/{hop['group']}{share}"


# --- tasklane run: an app as an instance, behind an Envoy sidecar -------------------------


def add_run(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane run --service S [--group G] [--port P] -- CMD ...`."""
    p = commands.add_parser(
        "run",
        parents=[common, _server_option()],
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
    p.add_argument("--delta", action="store_true", help="use incremental (delta) xDS")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise TasklaneError("no command to run: tasklane run --service S -- CMD [ARG ...]")
    options = RunOptions(
        service=args.service,
        group=args.group,
        command=command,
        server=args.server,
        host=args.host,
        port=args.port,
        delta=args.delta,
    )
    # Read before anything starts: registering is a write.
    return run_instance(options, functools.partial(_call, args.server, token=_token(args)))


# --- tasklane gateway: the ingress for external traffic -----------------------------------


def add_gateway(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane gateway --port P [--trusted-cidr CIDR ...] [--trust-header NAME
    --trust-secret-file FILE]`."""
    p = commands.add_parser(
        "gateway",
        parents=[common, _server_option()],
        help="run the ingress gateway for external traffic until interrupted",
        description="Run an Envoy ingress in the foreground. It routes `Host: <service>` "
        "requests into the mesh like a sidecar's egress listener, and removes task dyes (every "
        "chain's dye header, the dye members of `baggage`) from callers it does not trust, so "
        "online traffic cannot reach a task group. Ctrl-C or SIGTERM stops it.",
    )
    p.add_argument("--port", type=int, required=True, help="port external callers connect to")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
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
    p.add_argument("--delta", action="store_true", help="use incremental (delta) xDS")
    p.add_argument(
        "--admin-port", type=int, help="Envoy admin port on 127.0.0.1 (default: a free one)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tasklane"),
        help="where the gateway's Envoy keeps its bootstrap and log (default: .tasklane)",
    )
    p.set_defaults(handler=gateway)


def gateway(args: argparse.Namespace) -> int:
    options = GatewayOptions(
        port=args.port,
        host=args.host,
        server=args.server,
        trusted_cidrs=tuple(args.trusted_cidr),
        trust_header=args.trust_header,
        trust_secret_file=args.trust_secret_file,
        delta=args.delta,
        admin_port=args.admin_port,
        state_dir=args.state_dir,
    )
    return run_gateway(options, functools.partial(_call, args.server))


# --- tasklane task: report and list runs of scheduled tasks -------------------------------


def add_task(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane task start|finish|runs TASK`: the run lifecycle, through the HTTP API."""
    p = commands.add_parser(
        "task",
        help="report that a run of a scheduled task started or finished; list its runs",
        description="Record runs of a ScheduledTask. The scaler keeps the task's chain up while "
        "a run is open and learns run durations from the finished ones, so a scheduler reports "
        "each run's start and finish (here, over HTTP, or with the gRPC TaskService).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    parents = [common, _server_option()]
    start = actions.add_parser(
        "start",
        parents=parents,
        help="record that a run starts now",
        description="Record that a run of TASK starts now; its chain stays up until it finishes.",
    )
    start.add_argument("task", metavar="TASK", help="a ScheduledTask's name")
    start.add_argument(
        "--id", help="the run's id (default: its UTC start time and a random suffix)"
    )
    start.set_defaults(handler=task_start)
    finish = actions.add_parser(
        "finish",
        parents=parents,
        help="record that a run finished now",
        description="Record that a run finished now: by default the task's latest open run.",
    )
    finish.add_argument("task", metavar="TASK", help="a ScheduledTask's name")
    finish.add_argument("--id", help="the run to finish (default: the latest open run)")
    finish.add_argument(
        "--outcome",
        default="succeeded",
        help="how it ended, e.g. succeeded or failed (default: succeeded)",
    )
    finish.set_defaults(handler=task_finish)
    runs = actions.add_parser(
        "runs",
        parents=parents,
        help="list a task's recorded runs",
        description="List a task's recorded runs, oldest first: open ones and the last "
        "finished ones (older finished runs are pruned).",
    )
    runs.add_argument("task", metavar="TASK", help="a ScheduledTask's name")
    runs.set_defaults(handler=task_runs)


def task_start(args: argparse.Namespace) -> int:
    body = {} if args.id is None else {"id": args.id}
    run = _call(args.server, "POST", f"/api/v1/tasks/{_quote(args.task)}/runs", body, _token(args))
    _output(f"run {run['task']}/{run['id']} started at {format_time(run['started_at'])}\n")
    return 0


def task_finish(args: argparse.Namespace) -> int:
    body = {"outcome": args.outcome}
    if args.id is not None:
        body["id"] = args.id
    path = f"/api/v1/tasks/{_quote(args.task)}/runs/finish"
    run = _call(args.server, "POST", path, body, _token(args))
    duration = _duration(run["finished_at"] - run["started_at"])
    _output(
        f"run {run['task']}/{run['id']} finished ({run['outcome']}) at "
        f"{format_time(run['finished_at'])} after {duration}\n"
    )
    return 0


def task_runs(args: argparse.Namespace) -> int:
    body = _call(args.server, "GET", f"/api/v1/tasks/{_quote(args.task)}/runs")
    if not body["items"]:
        print(f"No runs of task {body['task']} recorded.", file=sys.stderr)
        return 0
    rows = []
    for run in body["items"]:
        finished = run["finished_at"]
        rows.append(
            {
                "ID": run["id"],
                "STARTED": format_time(run["started_at"]),
                "FINISHED": "-" if finished is None else format_time(finished),
                "DURATION": "-" if finished is None else _duration(finished - run["started_at"]),
                "OUTCOME": run["outcome"] or "open",
            }
        )
    _output(_table(rows) + "\n")
    return 0


def _duration(seconds: float) -> str:
    """'2h05m03s', '7m00s', '42s': compact and exact to the second."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- tasklane simulate: replay a workload under each scaling policy -----------------------


def add_simulate(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane simulate --workload FILE [--days 7] [--policy all|NAME] [--seed N]`."""
    from controlplane.scaler.simulate import POLICIES  # pure; only this command needs it

    p = commands.add_parser(
        "simulate",
        parents=[common],
        help="replay a workload of scheduled tasks under scaling policies and compare them",
        description="A discrete-event replay, on a virtual clock, of the runs of a workload "
        "file (rules plus run and start-up behaviour; see bench/workloads/week.yaml) under "
        "static peak, HPA, KEDA cron, tasklane's own policy and the oracle. Prints replica-"
        "hours, under-capacity at task start, scale events and flaps per policy.",
    )
    p.add_argument("--workload", type=Path, required=True, metavar="FILE", help="workload YAML")
    p.add_argument("--days", type=float, default=7, help="days to measure (default: 7)")
    p.add_argument(
        "--policy",
        choices=("all", *POLICIES),
        default="all",
        help="one policy, or all (default)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: the workload's)")
    p.set_defaults(handler=simulate_workload)


def simulate_workload(args: argparse.Namespace) -> int:
    from controlplane.scaler.simulate import simulate
    from controlplane.scaler.workload import load_workload

    report = simulate(load_workload(args.workload), args.days, args.policy, args.seed)
    _output(report.table() + "\n")
    return 0


# --- tasklane status / top: views of a running control plane (cli_views.py) ---------------

TOP_INTERVAL = 2.0


def add_status(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane status`: the sidecars and their xDS sync, like `istioctl proxy-status`."""
    p = commands.add_parser(
        "status",
        parents=[common, _server_option()],
        help="show the connected sidecars and whether each runs the config it was sent",
        description="A line on etcd, xDS, the leader and the last config build, then one row "
        "per connected sidecar (node, service, group, xDS protocol) with each xDS type's state: "
        "SYNCED (ACKed what it was sent), STALE (sent, not ACKed yet) or NACK (rejected; the "
        "message is shown below the table).",
    )
    p.set_defaults(handler=status)


def status(args: argparse.Namespace) -> int:
    body = _call(args.server, "GET", "/api/v1/status")
    _output(render_status(body, datetime.now(UTC).timestamp()) + "\n")
    return 0


def add_top(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane top [--watch]`: isolation per chain, hop and group."""
    p = commands.add_parser(
        "top",
        parents=[common, _server_option()],
        help="show per chain and hop: request rates, leaks, fallbacks, rate-limited requests",
        description="Isolation accounting from the sidecars' access logs, per chain, hop and "
        "group: dyed and online request rates, requests, 5xx, p50/p99 latency, leaks, "
        "fallbacks by reason and rate-limited requests; then uncovered hops and propagation "
        "breaks.",
    )
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help=f"refresh every {TOP_INTERVAL:g} s until Ctrl-C",
    )
    p.set_defaults(handler=top)


def top(args: argparse.Namespace) -> int:
    def frame() -> str:
        try:
            return render_top(_call(args.server, "GET", "/api/v1/isolation"))
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise TasklaneError(
                f"{args.server} has no isolation accounting (GET /api/v1/isolation: 404): "
                "is it an older control plane?"
            ) from None

    def timed_frame() -> str:
        now = f"{datetime.now(UTC):%H:%M:%S} UTC"
        return f"tasklane top at {now}, every {TOP_INTERVAL:g}s (Ctrl-C to stop)\n\n{frame()}"

    if not args.watch:
        _output(frame() + "\n")
        return 0
    return watch(timed_frame, TOP_INTERVAL)


# --- the command line as a whole -----------------------------------------------------------

# --- tasklane demo -------------------------------------------------------------------------


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


COMMANDS = (
    add_up,
    add_apply,
    add_diff,
    add_get,
    add_delete,
    add_run,
    add_gateway,
    add_demo,
    add_task,
    add_simulate,
    add_status,
    add_top,
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one subparser per entry of COMMANDS, each with the common options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (default: info)"
    )
    parser = argparse.ArgumentParser(
        prog="tasklane",
        description="Service-mesh traffic steering for scheduled batch tasks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tasklane` script and of `python -m controlplane`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except TasklaneError as exc:
        print(f"tasklane: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
