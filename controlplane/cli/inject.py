"""`tasklane inject`: add the Envoy sidecar to Kubernetes manifests, like `istioctl
kube-inject`. Everything is read and injected before anything is written, so a refused
input leaves no output file, not even a partial one."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from controlplane.cli.client import STDIN
from controlplane.errors import TasklaneError
from controlplane.inject.pod import (
    DEFAULT_IMAGE,
    DEFAULT_TLS_SECRET,
    DEFAULT_XDS_ADDRESS,
    InjectOptions,
    parse_xds_addresses,
)
from controlplane.inject.workloads import inject_text


def add_inject(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane inject -f FILE|- [-o OUT] [--image IMAGE] [--xds-address HOST:PORT]
    [--tls-secret NAME | --plaintext-xds]`."""
    p = commands.add_parser(
        "inject",
        parents=[common],
        help="add the Envoy sidecar to Kubernetes manifests",
        description="Add the tasklane Envoy sidecar (a native sidecar, Kubernetes >= 1.29) to "
        "every Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod whose pod "
        "template has the labels tasklane.io/service and tasklane.io/group, unless it is "
        'annotated tasklane.io/inject: "false". Other documents pass through. Injecting '
        "twice changes nothing.",
    )
    p.add_argument(
        "-f", "--filename", required=True, metavar="FILE|-", help="manifests, - for stdin"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    add_sidecar_options(p)
    p.add_argument(
        "--plaintext-xds",
        action="store_true",
        help="sidecars speak plaintext xDS, for a control plane without --tls-dir (the one "
        "`tasklane k8s manifests` runs has it: plaintext sidecars could never connect to it)",
    )
    p.set_defaults(handler=inject)


def add_sidecar_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """What an injected sidecar is made of: `tasklane inject`'s options, and `tasklane up`'s
    for its webhook (with prefix "sidecar-")."""
    p.add_argument(
        f"--{prefix}image",
        default=DEFAULT_IMAGE,
        help=f"the tasklane image (`make image`: Envoy and iptables; default: {DEFAULT_IMAGE})",
    )
    p.add_argument(
        f"--{prefix}xds-address",
        default=DEFAULT_XDS_ADDRESS,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the control plane's xDS address as pods reach it: its Service, or each replica "
        f"(sidecars spread over them; default: {DEFAULT_XDS_ADDRESS})",
    )
    p.add_argument(
        f"--{prefix}tls-secret",
        metavar="NAME",
        help="a Secret in the pods' namespace with ca.crt, client.crt and client.key (a client "
        "certificate of the control plane's CA), mounted into the sidecar for mTLS to xDS "
        f"(default: {DEFAULT_TLS_SECRET}, made by `tasklane k8s manifests`)",
    )
    p.add_argument(
        f"--{prefix}sotw",
        action="store_true",
        help="sidecars use state-of-the-world xDS and hold the whole mesh's config (default: "
        "incremental xDS, each holding what its app calls)",
    )


def sidecar_options(args: argparse.Namespace, prefix: str = "") -> InjectOptions:
    """The InjectOptions add_sidecar_options() parsed; TasklaneError naming a bad one."""
    dest = prefix.replace("-", "_")
    option = vars(args)
    image = option[f"{dest}image"]
    (host, port), *more_xds = parse_xds_addresses(
        option[f"{dest}xds_address"], f"--{prefix}xds-address"
    )
    if not image.strip() or any(c.isspace() for c in image):
        raise TasklaneError(f"--{prefix}image: {image!r} is not an image reference")
    tls_secret = option[f"{dest}tls_secret"]
    if option.get(f"{dest}plaintext_xds"):
        if tls_secret is not None:
            raise TasklaneError(f"--{prefix}plaintext-xds: contradicts --{prefix}tls-secret")
    elif tls_secret is None:
        tls_secret = DEFAULT_TLS_SECRET
    return InjectOptions(
        image=image,
        xds_host=host,
        xds_port=port,
        more_xds=tuple(more_xds),
        delta=not option[f"{dest}sotw"],
        tls_secret=tls_secret,
    )


def inject(args: argparse.Namespace) -> int:
    """Read all, inject all, then write: stdout, or -o replaced whole (never half-written)."""
    options = sidecar_options(args)
    name, data = _read(args.filename)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TasklaneError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    result = inject_text(text, name, options)
    if args.output is None:
        sys.stdout.write(result)
    else:
        _write(Path(args.output), result)
    return 0


def _read(filename: str) -> tuple[str, bytes]:
    if filename == STDIN:
        return "<stdin>", sys.stdin.buffer.read()
    try:
        return filename, Path(filename).read_bytes()
    except OSError as exc:
        raise TasklaneError(f"{filename}: cannot read: {exc.strerror or exc}") from None


def _write(path: Path, text: str) -> None:
    """All or nothing: a temporary file next to `path`, renamed over it once complete."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TasklaneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise TasklaneError(f"{path}: cannot write: {exc.strerror or exc}") from None
