"""pytest fixtures that run a real etcd (EmbeddedEtcd) on free ports; import them in conftest.

Each server gets its own ports and data directory, so tests stay parallel-safe under xdist,
and is stopped afterwards, so no etcd outlives the test that needed it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.errors import RuntimeFailure
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port

START_ATTEMPTS = 3


def start_etcd(base_dir: Path) -> EmbeddedEtcd:
    """Start etcd on two fresh free ports under base_dir.

    Retries with new ports: between free_port() and etcd binding it, another xdist worker
    can take the port.
    """
    error: RuntimeFailure | None = None
    for attempt in range(START_ATTEMPTS):
        client_port = free_port()
        peer_port = free_port()
        while peer_port == client_port:
            peer_port = free_port()
        etcd = EmbeddedEtcd(base_dir / f"etcd-{attempt}", client_port, peer_port)
        try:
            etcd.start(timeout=20.0)
        except RuntimeFailure as exc:
            error = exc
            continue
        return etcd
    assert error is not None
    raise error


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """A running etcd of this test's own; stopped at the end of the test."""
    etcd = start_etcd(tmp_path)
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def etcd_endpoint_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """'host:port' of an etcd shared by one test module; tests must use distinct keys."""
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield etcd.endpoint
    finally:
        etcd.stop()
