"""What a node's announcement registers (announce.announced), without processes."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2

from controlplane.announce import announced
from controlplane.xds.names import META_ANNOUNCE, META_GROUP, META_SERVICE


def node(**metadata: str) -> base_pb2.Node:
    identity = base_pb2.Node(id="fund-facade-7d9c-x2")
    for key, value in metadata.items():
        identity.metadata.fields[key].string_value = value
    return identity


ROLE = {META_SERVICE: "fund-facade", META_GROUP: "task"}


def test_an_announcement_becomes_the_nodes_instance() -> None:
    instance = announced(node(**ROLE, **{META_ANNOUNCE: "10.1.2.3:15006"}), now=12.5)
    assert instance is not None
    assert instance.key == "instances/fund-facade/task/fund-facade-7d9c-x2"
    assert instance.address == ("10.1.2.3", 15006)
    assert (instance.app_port, instance.admin_port, instance.pid, instance.started_at) == (
        0, 0, 0, 12.5,
    )  # fmt: skip


def test_ipv6_hosts_lose_their_brackets() -> None:
    instance = announced(node(**ROLE, **{META_ANNOUNCE: "[fd00::7]:15006"}), now=0)
    assert instance is not None and instance.address == ("fd00::7", 15006)


def test_no_announcement_is_no_instance() -> None:
    assert announced(node(**ROLE), now=0) is None


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({**ROLE, META_ANNOUNCE: "10.1.2.3"}, "must be '<ip>:<port>'"),
        ({**ROLE, META_ANNOUNCE: "10.1.2.3:http"}, "must be '<ip>:<port>'"),
        ({**ROLE, META_ANNOUNCE: "10.1.2.3:70000"}, "'inbound_port' must be a port"),
        ({**ROLE, META_ANNOUNCE: ":15006"}, "'host'"),
        ({META_GROUP: "task", META_ANNOUNCE: "10.1.2.3:15006"}, "'service'"),
        # Not expanded by the kubelet: Envoy would reject it as an endpoint at every caller.
        ({**ROLE, META_ANNOUNCE: "$(POD_IP):15006"}, "'host' must be an IP address"),
        ({**ROLE, META_ANNOUNCE: "fund-facade:15006"}, "'host' must be an IP address"),
    ],
)
def test_malformed_announcements_say_why(metadata: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        announced(node(**metadata), now=0)
