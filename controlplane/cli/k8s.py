"""`tasklane k8s manifests`: everything that runs tasklane in a Kubernetes cluster, as YAML
for `kubectl apply -f -` (the objects are built in controlplane/deploy/manifests.py).

The output holds private keys and the API token: pipe it to kubectl, do not commit it. Each
run makes a new CA and token unless `--tls-dir` and `--token-file` name existing ones, so
keep those to re-apply without rotating every client's credentials.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from controlplane import pki
from controlplane.api.token import client_token
from controlplane.deploy import manifests as k8s


def add_k8s(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane k8s manifests [...]`."""
    p = commands.add_parser(
        "k8s",
        help="Kubernetes: print the manifests that run tasklane in a cluster",
        description="Kubernetes deployment helpers.",
    )
    sub = p.add_subparsers(dest="k8s_command", metavar="COMMAND", required=True)
    m = sub.add_parser(
        "manifests",
        parents=[common],
        help="print the control plane's manifests (multi-document YAML) on stdout",
        description="Print the Namespace, control-plane Deployment, Service, RBAC, Secrets, "
        "admission webhook and (without --etcd) a 3-member etcd as YAML for `kubectl apply "
        "-f -`. The output holds private keys and the API token.",
    )
    m.add_argument(
        "--namespace",
        default=k8s.NAMESPACE,
        help=f"the control plane's namespace (default: {k8s.NAMESPACE})",
    )
    m.add_argument(
        "--workload-namespace",
        default=k8s.WORKLOAD_NAMESPACE,
        metavar="NS",
        help="the namespace of the Deployments the scaler scales (`tasklane up --namespace`; "
        f"default: {k8s.WORKLOAD_NAMESPACE}); it must exist",
    )
    m.add_argument(
        "--etcd",
        metavar="HOST:PORT",
        help="use this etcd (one endpoint, as `tasklane up --etcd`) instead of a 3-member "
        "etcd StatefulSet in the namespace",
    )
    m.add_argument(
        "--image", default=k8s.DEFAULT_IMAGE, help=f"tasklane image (default: {k8s.DEFAULT_IMAGE})"
    )
    m.add_argument(
        "--replicas",
        type=int,
        default=k8s.DEFAULT_REPLICAS,
        help=f"control-plane replicas, at least {k8s.DEFAULT_REPLICAS} "
        f"(default: {k8s.DEFAULT_REPLICAS})",
    )
    m.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="use this TLS directory (ca.crt, server.crt/key for tasklane.<namespace>.svc, "
        "client.crt/key) instead of a new CA",
    )
    m.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="use this API token instead of a new one",
    )
    m.set_defaults(handler=manifests)


def manifests(args: argparse.Namespace) -> int:
    """Print every manifest; on bad input a TasklaneError before anything is printed."""
    options = k8s.Options(
        namespace=args.namespace,
        workload_namespace=args.workload_namespace,
        image=args.image,
        replicas=args.replicas,
        etcd=args.etcd,
    )
    options.check()
    if args.tls_dir is None:
        tls_files = k8s.new_tls_files(options.namespace)
    else:
        tls_files = read_tls_dir(args.tls_dir)
        k8s.check_tls_files(tls_files, options.namespace, str(args.tls_dir))
    token = secrets.token_urlsafe(32) if args.token_file is None else client_token(args.token_file)
    sys.stdout.write(k8s.to_yaml(k8s.manifests(options, tls_files, token)))
    return 0


def read_tls_dir(directory: Path) -> dict[str, bytes]:
    """The TLS directory's files (k8s.TLS_FILES); pki's one-line TlsError when one is missing,
    unreadable, or not PEM."""
    server, client = pki.server_files(directory), pki.client_files(directory)
    paths = {
        pki.CA_CERT: server.ca,
        pki.SERVER_CERT: server.cert,
        pki.SERVER_KEY: server.key,
        pki.CLIENT_CERT: client.cert,
        pki.CLIENT_KEY: client.key,
    }
    try:
        return {name: path.read_bytes() for name, path in paths.items()}
    except OSError as exc:  # changed since pki read it
        raise pki.TlsError(f"--tls-dir {directory}: {exc.strerror}") from None
