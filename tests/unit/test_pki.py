"""controlplane/pki.py: what `tasklane tls init` writes, checked with cryptography's own
verifier (web-PKI rules: SANs, usages, chain), and the one-line errors of a bad TLS dir."""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from controlplane import pki


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(certificate: x509.Certificate, kind: type) -> object:
    return certificate.extensions.get_extension_for_class(kind).value


def server_verifier(ca: x509.Certificate, name: x509.GeneralName) -> object:
    return PolicyBuilder().store(Store([ca])).build_server_verifier(name)


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tls"
    pki.init_dir(directory, [*pki.DEFAULT_HOSTS, "cp.example", "10.0.0.7"])
    return directory


def test_keys_are_private_and_certificates_readable(tls_dir: Path) -> None:
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tls_dir.iterdir()}
    assert modes == {
        "ca.crt": 0o644, "ca.key": 0o600,
        "server.crt": 0o644, "server.key": 0o600,
        "client.crt": 0o644, "client.key": 0o600,
    }  # fmt: skip


def test_server_certificate_names_every_host_and_serves_only(tls_dir: Path) -> None:
    server = cert(tls_dir / "server.crt")
    san = ext(server, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "cp.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(host) for host in ("127.0.0.1", "::1", "10.0.0.7")
    ]
    assert list(ext(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(server, x509.BasicConstraints).ca is False
    usage = ext(server, x509.KeyUsage)
    assert usage.digital_signature and not usage.key_cert_sign


def test_client_certificate_authenticates_clients_only(tls_dir: Path) -> None:
    client = cert(tls_dir / "client.crt")
    assert list(ext(client, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    uris = ext(client, x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://tasklane/tasklane-sidecar"]


def test_ca_signs_certificates_only(tls_dir: Path) -> None:
    ca = cert(tls_dir / "ca.crt")
    constraints = ext(ca, x509.BasicConstraints)
    assert (constraints.ca, constraints.path_length) == (True, 0)
    usage = ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.DNSName("cp.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ],
)
def test_server_chain_verifies_for_each_name(tls_dir: Path, name: x509.GeneralName) -> None:
    ca = cert(tls_dir / "ca.crt")
    chain = server_verifier(ca, name).verify(cert(tls_dir / "server.crt"), [])
    assert chain[-1] == ca


def test_server_chain_fails_for_another_name(tls_dir: Path) -> None:
    with pytest.raises(VerificationError, match="subjectAltName"):
        server_verifier(cert(tls_dir / "ca.crt"), x509.DNSName("elsewhere.example")).verify(
            cert(tls_dir / "server.crt"), []
        )


def test_client_chain_verifies(tls_dir: Path) -> None:
    verifier = PolicyBuilder().store(Store([cert(tls_dir / "ca.crt")])).build_client_verifier()
    verified = verifier.verify(cert(tls_dir / "client.crt"), [])
    assert verified.chain[-1] == cert(tls_dir / "ca.crt")


def test_another_ca_does_not_verify(tls_dir: Path) -> None:
    other = pki.new_ca()
    with pytest.raises(VerificationError):
        server_verifier(other.certificate, x509.DNSName("localhost")).verify(
            cert(tls_dir / "server.crt"), []
        )
    foreign = pki.issue(other, "intruder", server=False)
    verifier = PolicyBuilder().store(Store([cert(tls_dir / "ca.crt")])).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(foreign.certificate, [])


def test_a_certificate_cannot_serve_as_the_other_kind(tls_dir: Path) -> None:
    """A client certificate is no server's (no host, no serverAuth)."""
    with pytest.raises(VerificationError):
        server_verifier(cert(tls_dir / "ca.crt"), x509.DNSName("localhost")).verify(
            cert(tls_dir / "client.crt"), []
        )


def test_init_refuses_to_overwrite_a_ca(tls_dir: Path) -> None:
    before = {path.name: path.read_bytes() for path in tls_dir.iterdir()}
    with pytest.raises(pki.TlsError, match="exists: not overwriting a CA"):
        pki.init_dir(tls_dir)
    assert {path.name: path.read_bytes() for path in tls_dir.iterdir()} == before


def test_init_refuses_a_bad_host_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(pki.TlsError, match="--host 'two words': neither an IP"):
        pki.init_dir(tmp_path / "tls", ["localhost", "two words"])
    assert not (tmp_path / "tls").exists()


def test_files_are_absolute_and_checked(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tls_dir.parent)
    files = pki.client_files(Path("tls"))
    assert files == pki.TlsFiles(tls_dir / "ca.crt", tls_dir / "client.crt", tls_dir / "client.key")
    assert pki.server_files(tls_dir).key == tls_dir / "server.key"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "server.key").unlink(), "server.key missing (tasklane tls init)"),
        (lambda d: (d / "ca.crt").write_text("junk"), "ca.crt is not a PEM certificate"),
        (
            lambda d: (d / "server.key").write_text("-----BEGIN PRIVATE KEY-----\nAA==\n"),
            "server.key is not a PEM private key",
        ),
        (
            lambda d: (d / "server.key").write_bytes((d / "client.key").read_bytes()),
            "server.key is not the key of server.crt",
        ),
    ],
)
def test_bad_server_files_name_the_file(tls_dir: Path, damage: object, message: str) -> None:
    damage(tls_dir)
    with pytest.raises(pki.TlsError, match=re.escape(message)) as raised:
        pki.server_files(tls_dir)
    assert "\n" not in str(raised.value)
    assert "PRIVATE KEY" not in str(raised.value)
