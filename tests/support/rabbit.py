"""The RabbitMQ broker of the message-queue lane tests: Debian's `rabbitmq-server`, installed
with apt-get when missing (like Chromium), one node (testkit/rabbit.py) per test session and
xdist worker, stopped with its epmd afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.rabbit import Broker
from tests.support.system import require_command


def install() -> None:
    """rabbitmq-server from Debian's packages, installed when missing (as root)."""
    require_command("rabbitmq-server", "rabbitmq-server")


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker per test session (per xdist worker), stopped with its epmd afterwards."""
    install()
    broker = Broker(tmp_path_factory.mktemp("rabbit"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
