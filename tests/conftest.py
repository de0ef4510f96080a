"""Fixtures every test module can use without importing them: real etcd servers and a running
`tasklane up`. Markers by directory: tests that run real processes (etcd, Envoy, `tasklane up`,
Chromium) or long loads carry their directory's marker, so `make test-fast` can leave them out."""

import pytest

pytest_plugins = ["tests.support.etcd", "tests.support.up"]

SLOW_DIRECTORIES = ("integration", "faults", "browser", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        directory = item.path.parent.name
        if directory in SLOW_DIRECTORIES and not item.get_closest_marker("in_process"):
            item.add_marker(directory)
