"""The `tasklane` command line.

Each subcommand is one `add_<name>` function (its parser, with `handler=` set to the function
that runs it) listed in COMMANDS, grouped in modules by what they drive. Handlers return the
exit code; any TasklaneError they raise becomes one `tasklane: error: <message>` line on stderr
and exit code 2, never a traceback (a RuleError naming several problems is one such line each).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controlplane.cli.completion import add_completion
from controlplane.cli.get import add_get
from controlplane.cli.inject import add_inject
from controlplane.cli.k8s import add_k8s
from controlplane.cli.probe import add_probe
from controlplane.cli.rollout import add_rollout
from controlplane.cli.rules import (
    add_apply,
    add_delete,
    add_diff,
    add_history,
    add_rollback,
    add_validate,
)
from controlplane.cli.tasks import add_simulate, add_task
from controlplane.cli.tls import add_tls
from controlplane.cli.up import add_demo, add_up
from controlplane.cli.version import VersionFlag, add_version
from controlplane.cli.views import add_status, add_top
from controlplane.cli.workloads import add_gateway, add_run
from controlplane.errors import TasklaneError

EXIT_ERROR = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


COMMANDS = (
    add_up,
    add_apply,
    add_diff,
    add_validate,
    add_get,
    add_delete,
    add_history,
    add_rollback,
    add_rollout,
    add_run,
    add_gateway,
    add_demo,
    add_task,
    add_simulate,
    add_status,
    add_top,
    add_probe,
    add_inject,
    add_tls,
    add_k8s,
    add_version,
    add_completion,
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
    parser.add_argument(
        "--version", action=VersionFlag, help="print the versions of tasklane, Envoy and etcd"
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
    except TasklaneError as exc:  # several problems (a rule file's) are one line each
        for line in str(exc).split("\n"):
            print(f"tasklane: error: {line}", file=sys.stderr)
        return EXIT_ERROR
