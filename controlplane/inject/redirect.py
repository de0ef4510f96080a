"""The inbound redirect of an injected pod: iptables rules that send TCP for the app port
into the sidecar's inbound listener, as Istio's istio-init does.

Without them a Service whose targetPort is the app's port reaches the app directly, around
the inbound guard (a task group's 403 for undyed requests) and the hops' rate limits. The
rules, in the pod's network namespace (nat table):

- PREROUTING: every connection from outside the pod to the app port goes to the inbound port;
- OUTPUT: so does one from inside the pod to one of its own addresses (its pod IP), except
  from the sidecar's uid, and except over 127.0.0.0/8, where the sidecar reaches the app and
  containers of the pod talk to each other.

`inbound_rules` makes them (pure); `python -m controlplane.inject.redirect RULES`, the init
container's command, loads them with `iptables-restore`, which replaces the nat table whole, so
running it again (a restarted pod) leaves the same rules. IPv4 only: ip6tables is not set.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

CHAIN = "TASKLANE_INBOUND"
RESTORE = "iptables-restore"
RESTORE_TIMEOUT_S = 30.0


def inbound_rules(app_port: int, inbound_port: int, proxy_uid: int) -> str:
    """`iptables-restore` input: TCP to `app_port` goes to `inbound_port`, unless it comes
    from `proxy_uid` (the sidecar) or over loopback."""
    return "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            f":{CHAIN} - [0:0]",
            f"-A PREROUTING -p tcp -j {CHAIN}",
            f"-A OUTPUT -p tcp ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL "
            f"-m owner ! --uid-owner {proxy_uid} -j {CHAIN}",
            f"-A {CHAIN} -p tcp --dport {app_port} -j REDIRECT --to-ports {inbound_port}",
            "COMMIT",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Load the rules given as the one argument; a one-line error and exit code 1 if not."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(f"usage: python -m {__spec__.name if __spec__ else __name__} RULES", file=sys.stderr)
        return 2
    try:
        done = subprocess.run(
            [RESTORE], input=args[0], text=True, capture_output=True, timeout=RESTORE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"tasklane redirect: cannot run {RESTORE}: {exc}", file=sys.stderr)
        return 1
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        print(f"tasklane redirect: {RESTORE} failed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
