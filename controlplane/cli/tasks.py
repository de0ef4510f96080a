"""`tasklane task` (report and list runs) and `tasklane simulate` (replay a workload)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controlplane.cli.client import (
    api_token,
    call,
    output,
    quote_segment,
    server_option,
)
from controlplane.cli.views import table
from controlplane.model.run import format_time

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
    parents = [common, server_option()]
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
    path = f"/api/v1/tasks/{quote_segment(args.task)}/runs"
    run = call(args.server, "POST", path, body, api_token(args))
    output(f"run {run['task']}/{run['id']} started at {format_time(run['started_at'])}\n")
    return 0


def task_finish(args: argparse.Namespace) -> int:
    body = {"outcome": args.outcome}
    if args.id is not None:
        body["id"] = args.id
    path = f"/api/v1/tasks/{quote_segment(args.task)}/runs/finish"
    run = call(args.server, "POST", path, body, api_token(args))
    duration = _duration(run["finished_at"] - run["started_at"])
    output(
        f"run {run['task']}/{run['id']} finished ({run['outcome']}) at "
        f"{format_time(run['finished_at'])} after {duration}\n"
    )
    return 0


def task_runs(args: argparse.Namespace) -> int:
    body = call(args.server, "GET", f"/api/v1/tasks/{quote_segment(args.task)}/runs")
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
    output(table(rows) + "\n")
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
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table (default: two tables within 100 columns and a legend) or json",
    )
    p.set_defaults(handler=simulate_workload)


def simulate_workload(args: argparse.Namespace) -> int:
    from controlplane.cli.simulation import as_json, render
    from controlplane.scaler.simulate import simulate
    from controlplane.scaler.workload import load_workload

    report = simulate(load_workload(args.workload), args.days, args.policy, args.seed)
    output(as_json(report) if args.output == "json" else render(report) + "\n")
    return 0
