"""The ingress gateway: one Envoy in front of the mesh for external (online) traffic.

It routes like a sidecar's egress listener (route config `egress`, `Host: <service>`), but an
outside caller must not be able to steer itself into a task group by sending a dye: only
trusted callers keep theirs. Trust is either where the caller connects from (a listener filter
chain matching the trusted CIDRs, decided before any byte of HTTP is read) or a shared-secret
header (checked per request by the trust filter, a Lua script made here: the secret stays with
the gateway). Every other request loses the dye headers of all chains and the dye members of
`baggage`, keeping the other members: that is the dye filter's job, whose config the control
plane serves over ECDS (controlplane/translate/gateway.py), so a chain applied later with its
own header or baggage key is stripped as soon as it is applied, with no restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.errors import RuntimeFailure, TasklaneError
from controlplane.model.dye import DEFAULT_DYE_HEADER
from controlplane.model.group import GroupKey
from controlplane.pki import TlsFiles
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.translate.gateway import lua_string
from controlplane.xds.names import GATEWAY_DYE_FILTER, GATEWAY_ROLE, GATEWAY_TRUST_METADATA

log = logging.getLogger(__name__)


READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.5
GATEWAY_TEMPLATE = "gateway.yaml"
GATEWAY_LISTENER = "gateway"
TRUSTED_CHAIN = "trusted-source"

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token, lower case as in h2
_SECRET = re.compile(r"[\x21-\x7e]+")  # what a client can put in a header value as it is
_RESERVED_HEADERS = frozenset(
    {DEFAULT_DYE_HEADER, "baggage", "host", "content-length", "transfer-encoding", "te"}
)


@dataclass(frozen=True)
class Trust:
    """Who may send dyes through the gateway: callers from `cidrs`, or requests whose `header`
    carries `secret` (both None when no secret is configured)."""

    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    header: str | None = None
    secret: str | None = None

    @classmethod
    def build(cls, cidrs: Sequence[str], header: str | None, secret_file: Path | None) -> Trust:
        """Checked options of `tasklane gateway`; a TasklaneError names the bad one."""
        networks = tuple(_network(text) for text in cidrs)
        if (header is None) != (secret_file is None):
            raise TasklaneError("--trust-header and --trust-secret-file go together")
        if header is None or secret_file is None:
            return cls(networks)
        name = header.lower()
        if not _HEADER_NAME.fullmatch(name):
            raise TasklaneError(f"--trust-header {header!r} is not an HTTP header name")
        if name in _RESERVED_HEADERS:
            raise TasklaneError(f"--trust-header {header!r} is a header the mesh itself uses")
        return cls(networks, name, _read_secret(secret_file))


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        # Not strict: 10.1.2.3/8 means the /8 it lies in, as in most firewall tools.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise TasklaneError(f"--trusted-cidr {text!r} is not an address range") from None


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not ASCII text"
        raise TasklaneError(f"--trust-secret-file {path}: cannot read: {reason}") from None
    if not _SECRET.fullmatch(secret):
        raise TasklaneError(
            f"--trust-secret-file {path}: the secret must be one run of visible ASCII characters"
        )
    return secret


# ---------------------------------------------------------------------------- Lua

# The trust filter's script; trust_script() puts its configuration (the `local` constants it
# reads) in front. It only decides whether the caller is trusted and marks the request so in
# its dynamic metadata; the dye filter after it (controlplane/translate/gateway.py, served by
# the control plane) keeps or strips the dyes accordingly.
_LUA_BODY = r"""
-- Whether `given` is the secret. Every byte is compared even after a mismatch, so that the
-- time taken does not tell a guesser how long a prefix was right.
local function is_secret(given)
  if #given ~= #SECRET then
    return false
  end
  local differences = 0
  for i = 1, #SECRET do
    if string.byte(given, i) ~= string.byte(SECRET, i) then
      differences = differences + 1
    end
  end
  return differences == 0
end

function envoy_on_request(handle)
  local trusted = TRUSTED_SOURCE
  if SECRET_HEADER ~= nil then
    -- Repeated headers come joined with ",", which never equals the secret: untrusted.
    local headers = handle:headers()
    local given = headers:get(SECRET_HEADER)
    if given ~= nil then
      headers:remove(SECRET_HEADER) -- the secret never goes past the gateway
      trusted = trusted or is_secret(given)
    end
  end
  if trusted then
    handle:streamInfo():dynamicMetadata():set(TRUST_METADATA, "trusted", true)
  end
end
"""


def trust_script(trust: Trust, *, trusted_source: bool) -> str:
    """The gateway's trust script for one filter chain: the trusted-source chain trusts every
    request (and drops the secret header); the other only those with the right secret."""
    config = "\n".join(
        [
            "-- tasklane gateway trust filter; generated by controlplane/runtime/gateway.py",
            f"local TRUSTED_SOURCE = {'true' if trusted_source else 'false'}"
            "  -- the caller's address is in a trusted CIDR",
            f"local SECRET_HEADER = {lua_string(trust.header)}  -- nil: no shared secret",
            f"local SECRET = {lua_string(trust.secret)}",
            f"local TRUST_METADATA = {lua_string(GATEWAY_TRUST_METADATA)}"
            "  -- read by the dye filter",
        ]
    )
    return config + "\n" + _LUA_BODY


# ---------------------------------------------------------------------------- Envoy


class _ReadableDumper(yaml.SafeDumper):
    """Writes multi-line strings (the Lua scripts) as `|` blocks, so the bootstrap an operator
    opens to debug the gateway shows the scripts as they run."""


def _block_strings(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ReadableDumper.add_representer(str, _block_strings)


class GatewayEnvoy(EnvoyProcess):
    """The gateway's Envoy: node role GATEWAY_ROLE, the static listener of templates/gateway.yaml.

    The bootstrap holds the secret (inside the Lua script), so work_dir is made private.
    """

    def __init__(
        self,
        *,
        node_id: str,
        listen_host: str,
        port: int,
        trust: Trust,
        xds_host: str,
        xds_port: int,
        admin_port: int,
        delta: bool,
        work_dir: Path,
        log_level: str = "warning",
        tls: TlsFiles | None = None,
        more_xds: Sequence[tuple[str, int]] = (),
    ) -> None:
        service, group = GroupKey.parse(GATEWAY_ROLE)
        super().__init__(
            node_id=node_id,
            service=service,
            group=group,
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=admin_port,
            delta=delta,
            work_dir=work_dir,
            log_level=log_level,
            tls=tls,
            more_xds=more_xds,
            parts={
                GATEWAY_TEMPLATE: {
                    "listen_host": listen_host,
                    "port": port,
                    "dye_filter": GATEWAY_DYE_FILTER,
                    "trusted_lua": trust_script(trust, trusted_source=True),
                    "untrusted_lua": trust_script(trust, trusted_source=False),
                }
            },
        )
        self.listen_host, self.port = listen_host, port
        self.trust = trust

    def render(self) -> str:
        """The bootstrap, with the trusted CIDRs in the trusted-source filter chain (a list
        the template's string variables cannot carry), or without that chain when none."""
        doc = yaml.safe_load(super().render())
        listener = next(
            item
            for item in doc["static_resources"]["listeners"]
            if item["name"] == GATEWAY_LISTENER
        )
        if self.trust.cidrs:
            (trusted,) = (c for c in listener["filter_chains"] if c["name"] == TRUSTED_CHAIN)
            trusted["filter_chain_match"]["source_prefix_ranges"] = [
                {"address_prefix": str(net.network_address), "prefix_len": net.prefixlen}
                for net in self.trust.cidrs
            ]
        else:
            del listener["filter_chains"]  # the default (untrusted) chain serves everyone
        return yaml.dump(doc, Dumper=_ReadableDumper, sort_keys=False)

    def start(self) -> GatewayEnvoy:
        """Start Envoy with its bootstrap (and log) in a directory only this user can read."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o700)
        super().start()
        return self


# ---------------------------------------------------------------------------- `tasklane gateway`


@dataclass(frozen=True)
class GatewayOptions:
    """What `tasklane gateway` was asked for."""

    port: int
    host: str
    trusted_cidrs: tuple[str, ...] = ()
    trust_header: str | None = None
    trust_secret_file: Path | None = None
    delta: bool = True  # False: state of the world
    admin_port: int | None = None
    state_dir: Path = Path(".tasklane")
    tls: TlsFiles | None = None  # the client files (pki.client_files) when xDS is TLS


def run_gateway(options: GatewayOptions, find_xds: Callable[[], Sequence[tuple[str, int]]]) -> int:
    """Check the options, learn the control plane replicas' xDS addresses (`find_xds`, e.g.
    sidecar.xds_addresses), then run the gateway's Envoy, spread over them, until
    SIGTERM/SIGINT; 0 after a clean stop, which removes the gateway's state (bootstrap, log).
    A gateway that fails keeps it: its one-line error names the log.

    Envoy is started from the calling (main) thread, which lives as long as Envoy should: the
    parent-death signal that stops an orphaned Envoy is tied to the thread that started it.
    """
    trust = Trust.build(options.trusted_cidrs, options.trust_header, options.trust_secret_file)
    xds = find_xds()
    (xds_host, xds_port), *more_xds = xds
    _check_can_listen(options.host, options.port)
    envoy = GatewayEnvoy(
        node_id=GroupKey.parse(GATEWAY_ROLE).node_id(f"{socket.gethostname()}-{options.port}"),
        listen_host=options.host,
        port=options.port,
        trust=trust,
        xds_host=xds_host,
        xds_port=xds_port,
        more_xds=more_xds,
        admin_port=options.admin_port or free_port(),
        delta=options.delta,
        work_dir=options.state_dir / f"gateway-{options.port}",
        tls=options.tls,
    )
    stopping = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        envoy.start()
        envoy.wait_ready(READY_TIMEOUT)
        print(ready_line(envoy, ", ".join(f"{h}:{p}" for h, p in xds)), flush=True)
        while not stopping.wait(POLL_INTERVAL):
            if not envoy.running() and not stopping.is_set():
                raise RuntimeFailure(f"the gateway's Envoy exited; log {envoy.log_path}")
        log.info("stopping")
    except RuntimeFailure as exc:
        raise RuntimeFailure(_one_line(exc, envoy)) from None
    finally:
        envoy.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    shutil.rmtree(envoy.work_dir, ignore_errors=True)
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Fail with a clear line before Envoy does with a log: binding here answers both "is the
    port taken" (Envoy's SO_REUSEPORT would even share it with another gateway) and "is the
    address one of this host's"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Envoy: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TasklaneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _one_line(exc: RuntimeFailure, envoy: GatewayEnvoy) -> str:
    """EnvoyProcess errors end with Envoy's log tail: keep their first line and Envoy's own
    last critical message (e.g. why the listener could not bind)."""
    critical = [line for line in envoy.log_tail().splitlines() if "critical" in line]
    reason = critical[-1].rsplit("] ", 1)[-1].strip() if critical else ""
    return f"{str(exc).splitlines()[0]} {reason}".strip()


def ready_line(envoy: GatewayEnvoy, xds: str) -> str:
    """The one stdout line saying where the gateway listens and whom it trusts (the dye names
    it strips come from the control plane and change with the rules)."""
    trusted = [str(net) for net in envoy.trust.cidrs]
    if envoy.trust.header is not None:
        trusted.append(f"header {envoy.trust.header}")
    return (
        f"tasklane gateway: listening on {envoy.listen_host}:{envoy.port}, xDS at {xds}, "
        f"admin on 127.0.0.1:{envoy.admin_port}; trusted: {', '.join(trusted) or 'nobody'}; "
        "everyone else loses the dyes of every chain"
    )
