"""GroupKey: the one value type of a (service, group) pair and its `service|group` text."""

from __future__ import annotations

from controlplane.model.group import GroupKey
from controlplane.xds.names import cluster_name, loose_cluster_name, role_name


def test_text_round_trips_and_names_agree() -> None:
    key = GroupKey("account-svc", "task")
    assert str(key) == f"{key}" == "account-svc|task"
    assert GroupKey.parse(str(key)) == key
    assert role_name(*key) == cluster_name(*key) == str(key)
    assert GroupKey.parse(loose_cluster_name(*key)) == key  # `|loose` is not part of the pair


def test_a_plain_pair_is_the_same_key() -> None:
    assert GroupKey("a", "b") == ("a", "b")
    assert {("a", "b"): 1}[GroupKey("a", "b")] == 1
    assert GroupKey.parse("lonely") == ("lonely", "")


def test_a_node_id_names_its_pair_first() -> None:
    node = GroupKey("account-svc", "task").node_id("pod-7")
    assert node == "account-svc|task|pod-7"
    assert GroupKey.parse(node) == ("account-svc", "task")
