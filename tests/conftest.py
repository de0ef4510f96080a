"""Fixtures every test module can use without importing them: real etcd servers and a running
`tasklane up`."""

pytest_plugins = ["tests.fixtures_etcd", "tests.support.up"]
