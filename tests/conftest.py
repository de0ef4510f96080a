"""Fixtures every test module can use without importing them (real etcd servers)."""

pytest_plugins = ["tests.fixtures_etcd"]
