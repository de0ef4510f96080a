"""The clusters and assignments the translator assembles from bytes are byte for byte what
protobuf's deterministic serialisation of the same messages gives (translate/clusters.py)."""

from __future__ import annotations

import pytest

from controlplane.translate.clusters import (
    group_cluster,
    group_cluster_bytes,
    load_assignment,
    load_assignment_bytes,
)


@pytest.mark.parametrize(
    ("service", "group"),
    [("a", "b"), ("account-svc", "default"), ("s" * 63, "task-group-with-a-long-name"), ("x", "ü")],
)
def test_group_clusters(service: str, group: str) -> None:
    expected = group_cluster(service, group).SerializeToString(deterministic=True)
    assert group_cluster_bytes(service, group) == expected


@pytest.mark.parametrize(
    "addresses",
    [
        (),
        (("127.0.0.1", 8080),),
        (("10.0.0.1", 1), ("10.0.0.2", 65535), ("fd00::1", 15006)),
        tuple((f"10.1.{i // 250}.{i % 250}", 20000 + i) for i in range(300)),  # long lengths
    ],
)
def test_load_assignments(addresses: tuple[tuple[str, int], ...]) -> None:
    expected = load_assignment("svc", "task", addresses).SerializeToString(deterministic=True)
    assert load_assignment_bytes("svc", "task", addresses) == expected
