"""Why an Envoy has no config yet, from its `xds` cluster's counters (admin `/stats`).

Envoy keeps retrying a control plane it cannot reach or that refuses it, never ready, and says
why only in its log, seconds later. Its counters tell at once: each failed attempt counts as
one of the causes below. A cause is named once it repeats (ATTEMPTS), so one dropped
connection during a control plane's restart is not mistaken for a refusal.
"""

from __future__ import annotations

import socket

from controlplane.pki import TlsFiles

XDS_CLUSTER = "xds"  # the bootstrap's cluster of the control plane (templates/bootstrap.yaml)
STATS_FILTER = rf"^cluster\.{XDS_CLUSTER}\."  # the admin /stats filter of the counters read here
ATTEMPTS = 2  # failed attempts with the same cause before it is named
# A control plane that just started serves xDS a registration grace after its API (app.py),
# so a sidecar started right after `tasklane up` meets refused connections for ~2 s: those
# only name a cause once they have lasted longer than this.
CONNECT_GRACE = 5.0


def config_failure(
    stats: dict[str, int], xds: str, tls: TlsFiles | None, running_for: float
) -> str | None:
    """One line naming why the connection to the control plane at `xds` ("host:port") fails,
    from the `cluster.xds.*` counters of an Envoy started `running_for` seconds ago; None
    while they name no repeated cause."""

    def count(name: str) -> int:
        return stats.get(f"cluster.{XDS_CLUSTER}.{name}", 0)

    where = f"xDS connection to {xds} failed TLS"
    if tls is not None:
        if count("ssl.fail_verify_error") >= 1:
            return (
                f"{where}: unknown CA (the control plane's certificate is not signed by "
                f"{tls.ca}: are both TLS dirs from one `tasklane tls init`?)"
            )
        if count("ssl.fail_verify_san") >= 1:
            host = xds.rpartition(":")[0]
            return f"{where}: the control plane's certificate does not name {host}"
        if count("ssl.connection_error") >= ATTEMPTS:
            return f"{where}: the handshake failed (is it a TLS port?)"
        # TLS 1.3: the client's handshake is over before the server checks the client's
        # certificate, so a refusal shows as the server closing the connection at once.
        closed = count("upstream_cx_destroy_remote_with_active_rq")
        if closed >= ATTEMPTS and count("ssl.handshake") >= ATTEMPTS:
            return (
                f"{where}: the control plane closed it after the handshake, refusing the "
                f"client certificate {tls.cert} (not signed by its CA?)"
            )
    if count("upstream_cx_connect_fail") >= ATTEMPTS and running_for >= CONNECT_GRACE:
        return f"cannot connect to the control plane's xDS at {xds}: {connect_error(xds)}"
    return None


def connect_error(xds: str) -> str:
    """What connecting to `xds` ("host:port") from here says, e.g. "Connection refused"."""
    host, _, port = xds.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return "it accepts connections now (it failed before)"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
