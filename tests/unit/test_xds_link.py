"""Naming why an Envoy gets no config from its xDS cluster's counters (runtime/xds_link.py)."""

from __future__ import annotations

from pathlib import Path

from controlplane.pki import TlsFiles
from controlplane.runtime.xds_link import CONNECT_GRACE, config_failure

XDS = "127.0.0.1:1"  # nothing listens on port 1: connect_error() says so
TLS = TlsFiles(Path("/tls/ca.crt"), Path("/tls/client.crt"), Path("/tls/client.key"))


def stats(**counters: int) -> dict[str, int]:
    return {f"cluster.xds.{name.replace('__', '.')}": value for name, value in counters.items()}


def test_refused_connections_name_a_cause_only_after_the_grace() -> None:
    refused = stats(upstream_cx_connect_fail=3)
    assert config_failure(refused, XDS, None, CONNECT_GRACE - 1) is None  # `up` just started
    reason = config_failure(refused, XDS, None, CONNECT_GRACE)
    assert reason is not None and reason.startswith(
        f"cannot connect to the control plane's xDS at {XDS}"
    )


def test_one_failure_is_not_a_cause() -> None:
    assert config_failure(stats(upstream_cx_connect_fail=1), XDS, None, 60) is None


def test_tls_causes_are_named_at_once() -> None:
    unknown_ca = config_failure(stats(ssl__fail_verify_error=1), XDS, TLS, 0.5)
    assert unknown_ca is not None and "unknown CA" in unknown_ca and "/tls/ca.crt" in unknown_ca
    san = config_failure(stats(ssl__fail_verify_san=1), XDS, TLS, 0.5)
    assert san is not None and san.endswith("certificate does not name 127.0.0.1")
