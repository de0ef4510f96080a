"""One instance: a running copy of a service in one group, as callers need to know it, and
the terms on which it stays registered (a lease of DEFAULT_TTL renewed every
KEEPALIVE_INTERVAL). `tasklane run`, the API and the store share these; only the store
(store/registry.py) talks to etcd."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, fields

from controlplane.model.group import GroupKey

# The registry's folder: an instance's key is `instances/<service>/<group>/<id>`.
INSTANCES = "instances/"
DEFAULT_TTL = 5
# Renewing three times per TTL survives one lost keep-alive (and a slow one) without expiry.
KEEPALIVE_INTERVAL = 1.5
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")


def proxy_env(egress: str) -> dict[str, str]:
    """How an instance's app reaches its sidecar's egress listener (`host:port`): plain HTTP
    as a proxy, HTTPS as CONNECT tunnels (for hosts outside the mesh), in both spellings
    clients read; loopback stays direct."""
    proxy = f"http://{egress}"
    return {
        **dict.fromkeys(PROXY_VARIABLES, proxy),
        "no_proxy": "localhost,127.0.0.1",
        "NO_PROXY": "localhost,127.0.0.1",
    }


@dataclass(frozen=True)
class Instance:
    """One running copy of a service in one group, as callers need to know it."""

    id: str
    service: str
    group: str
    host: str
    inbound_port: int  # the registered address: the sidecar's inbound listener
    # 0 when not known: an instance its sidecar announced (announce.py) has no `tasklane run`.
    app_port: int
    admin_port: int
    egress_port: int
    pid: int
    started_at: float

    @property
    def key(self) -> str:
        """Its name in the registry (and so its identity in a build)."""
        return instance_key(self.service, self.group, self.id)

    @property
    def group_key(self) -> GroupKey:
        return GroupKey(self.service, self.group)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.inbound_port

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Instance:
        """An Instance from its JSON document; ValueError naming what is wrong otherwise."""
        if not isinstance(data, dict):
            raise ValueError("an instance must be a JSON object")
        wanted = {f.name: f.type for f in fields(cls)}
        missing, unknown = set(wanted) - set(data), set(data) - set(wanted)
        if missing or unknown:
            raise ValueError(
                f"instance fields: missing {sorted(missing) or 'none'}, "
                f"unknown {sorted(unknown) or 'none'}"
            )
        kinds = {"str": str, "int": int, "float": (int, float)}
        for name, kind in wanted.items():
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, kinds[kind]):
                raise ValueError(f"instance field {name!r} must be a {kind}, not {value!r}")
        for name in ("id", "service", "group", "host"):
            value = data[name]
            if not _NAME.fullmatch(value):
                raise ValueError(
                    f"instance field {name!r} must be 1-{MAX_NAME} printable characters "
                    f"without '/' or spaces, not {value[:40]!r}"
                )
        # A port out of range would make every build of the mesh fail (Envoy's uint32 port).
        # Envoy takes only IP literals as EDS endpoints: a name would be NACKed by every caller.
        try:
            ipaddress.ip_address(data["host"])
        except ValueError:
            raise ValueError(
                f"instance field 'host' must be an IP address, not {data['host'][:40]!r}"
            ) from None
        if not 1 <= data["inbound_port"] <= 65535:
            raise ValueError("instance field 'inbound_port' must be a port 1-65535")
        for name in ("app_port", "admin_port", "egress_port"):
            if not 0 <= data[name] <= 65535:
                raise ValueError(f"instance field {name!r} must be a port 1-65535, or 0")
        if data["pid"] < 0:
            raise ValueError("instance field 'pid' must not be negative")
        return cls(**data)


MAX_NAME = 253  # a DNS name's length: ids, service and group names, hosts
_NAME = re.compile(rf"[\x21-\x2e\x30-\x7e]{{1,{MAX_NAME}}}")


def instance_key(service: str, group: str, instance_id: str) -> str:
    """The store key of one instance."""
    return f"{INSTANCES}{service}/{group}/{instance_id}"


def group_key_of(key: str) -> GroupKey:
    """The (service, group) of an instance's store key."""
    _, service, group, _ = key.rsplit("/", 3)
    return GroupKey(service, group)
