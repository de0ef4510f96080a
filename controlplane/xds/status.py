"""Per-node xDS status: what each connected sidecar was sent, ACKed and rejected.

go-control-plane keeps no ACK state (its issue #954); `tasklane status` and the dashboard
read this board to show which version every sidecar really runs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field

from controlplane.model.group import GroupKey

from .types import SHORT_NAME


@dataclass
class Nack:
    at: float
    version: str
    message: str


@dataclass
class TypeStatus:
    sent_version: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    nacks: int = 0
    last_nack: Nack | None = None


@dataclass
class NodeStatus:
    node_id: str
    role: str
    protocol: str  # "sotw" or "delta"
    connected_at: float
    stream_id: int
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def type(self, type_url: str) -> TypeStatus:
        return self.types.setdefault(type_url, TypeStatus())

    def sent(self, type_url: str, version: str) -> None:
        entry = self.type(type_url)
        entry.sent_version, entry.sent_at = version, time.time()

    def acked(self, type_url: str, version: str) -> None:
        entry = self.type(type_url)
        entry.acked_version, entry.acked_at = version, time.time()

    def nacked(self, type_url: str, version: str, message: str) -> None:
        entry = self.type(type_url)
        entry.nacks += 1
        entry.last_nack = Nack(time.time(), version, message)

    def to_json(self, unknown_service: bool = False) -> dict:
        """The node for /api/v1/status; `unknown_service` when no rule defines its role, so
        it is served only the answer that says so (translate/unknown.py)."""
        data = asdict(self)
        data["service"], data["group"] = GroupKey.parse(self.role)  # no client parses roles
        data["types"] = {SHORT_NAME.get(t, t): v for t, v in data["types"].items()}
        data["unknown_service"] = unknown_service
        return data


class StatusBoard:
    """Connected nodes. A node that reconnects replaces its older stream's entry."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeStatus] = {}
        self._by_role: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        self.changes = 0  # bumped whenever the connected nodes change

    def connect(self, node_id: str, role: str, protocol: str) -> NodeStatus:
        status = NodeStatus(node_id, role, protocol, time.time(), next(self._ids))
        older = self._nodes.get(node_id)
        if older is not None:
            self._leave(older)
        self._nodes[node_id] = status
        self._by_role.setdefault(role, set()).add(node_id)
        self.changes += 1
        return status

    def disconnect(self, status: NodeStatus) -> None:
        current = self._nodes.get(status.node_id)
        if current is not None and current.stream_id == status.stream_id:
            del self._nodes[status.node_id]
            self._leave(current)
            self.changes += 1

    def _leave(self, status: NodeStatus) -> None:
        nodes = self._by_role.get(status.role)
        if nodes is not None:
            nodes.discard(status.node_id)
            if not nodes:
                del self._by_role[status.role]

    def role_nodes(self, role: str) -> AbstractSet[str]:
        """The node ids connected in `role` (the board's own set: read it, don't keep it)."""
        return self._by_role.get(role, frozenset())

    def get(self, node_id: str) -> NodeStatus | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[NodeStatus]:
        return sorted(self._nodes.values(), key=lambda n: n.node_id)
