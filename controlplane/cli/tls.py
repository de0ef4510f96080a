"""`tasklane tls init DIR`: the certificates for xDS over TLS with client certificates."""

from __future__ import annotations

import argparse
from pathlib import Path

from controlplane import pki


def add_tls(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane tls init DIR [--host NAME ...]`."""
    p = commands.add_parser(
        "tls",
        parents=[common],
        help="make the TLS directory for `up/run/gateway --tls-dir`",
        description="Certificates for xDS over TLS: the control plane proves its name, sidecars "
        "prove they hold a certificate from the same private CA.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        parents=[common],
        help="write a new CA, a server and a client certificate to DIR, or add names to DIR's",
        description="Write a new private CA (ca.crt, ca.key), the control plane's certificate "
        "(server.crt, server.key) and the sidecars' (client.crt, client.key) to DIR, keys "
        "mode 0600. An existing CA is never overwritten: on a DIR that has one, --host issues "
        "a new server certificate from it with the names it had plus the new ones, and leaves "
        "the CA and the client certificate as they are (restart `tasklane up --tls-dir DIR` "
        "to serve it).",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="one more DNS name or IP address sidecars reach the control plane at (the server "
        f"certificate always has {', '.join(pki.DEFAULT_HOSTS)}); repeat for more",
    )
    init.set_defaults(handler=init_dir)


def init_dir(args: argparse.Namespace) -> int:
    """Write the directory; the one line printed names it and the server's names, no key."""
    if (args.dir / pki.CA_CERT).exists():
        if not args.host:
            raise pki.TlsError(
                f"{args.dir / pki.CA_CERT} exists: not overwriting a CA (--host NAME adds a "
                "name to its server certificate)"
            )
        names = pki.add_hosts(args.dir, args.host)
        print(
            f"tasklane tls: a new server certificate in {args.dir} from its CA (names: "
            f"{', '.join(names)}); the CA and the client certificate are unchanged; restart "
            "`tasklane up --tls-dir` to serve it"
        )
        return 0
    hosts = [*pki.DEFAULT_HOSTS, *args.host]
    pki.init_dir(args.dir, hosts)
    print(
        f"tasklane tls: wrote a new CA and certificates to {args.dir} "
        f"(server names: {', '.join(dict.fromkeys(hosts))}; keys are mode 0600)"
    )
    return 0
