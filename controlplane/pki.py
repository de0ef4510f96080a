"""Certificates for the control plane's TLS: xDS with client certificates, and the admission
webhook Kubernetes calls over HTTPS.

A TLS directory holds one small private CA and what it signed, as PEM files:

    ca.crt                 trusted by both ends
    ca.key                 only needed to issue more certificates
    server.crt server.key  the control plane (xDS, webhook)
    client.crt client.key  sidecars (`tasklane run`, `tasklane gateway`)

`tasklane tls init DIR` writes one; `tasklane up --tls-dir DIR` and `tasklane run|gateway
--tls-dir DIR` (or $TASKLANE_TLS_DIR) read it, checking every file before anything starts.
Bring your own files with the same names to use another CA (ca.crt may be a bundle). Keys are
written 0600 and never printed or logged; Envoy reads them from their paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.errors import TasklaneError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"
# Where `tasklane run` and `tasklane gateway` find their --tls-dir when it is not given.
TLS_DIR_ENV = "TASKLANE_TLS_DIR"
# The names a local control plane is reached by; `tls init --host` adds more.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365
CLIENT_URI_PREFIX = "spiffe://tasklane/"  # + a client's common name, as its SAN
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")

T = TypeVar("T")


class TlsError(TasklaneError):
    """A TLS directory is missing a file or holds something that is not a certificate/key."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tasklane"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def is_ip(host: str) -> bool:
    """True for an IP literal (an IP_ADDRESS subject alternative name), False for a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """KeyUsage with only the `allowed` usages set."""
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _client_uri(common_name: str) -> x509.UniformResourceIdentifier:
    path = urllib.parse.quote(common_name.replace(" ", "-"), safe="")
    return x509.UniformResourceIdentifier(f"{CLIENT_URI_PREFIX}{path}")


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        if is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        elif _DNS_NAME.fullmatch(host):
            names.append(x509.DNSName(host.lower()))
        else:
            raise TlsError(f"--host {host!r}: neither an IP address nor a DNS name")
    if not names:
        raise TlsError("a server certificate needs at least one host name or address")
    return x509.SubjectAlternativeName(names)


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def new_ca(common_name: str = "tasklane CA", days: int = VALID_DAYS) -> KeyPair:
    """A self-signed CA that may only sign end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    hosts: Iterable[str] = (),
    server: bool,
    days: int = VALID_DAYS,
) -> KeyPair:
    """A certificate signed by `ca`: for a server (its `hosts` as subject alternative names)
    or for a client (TLS client authentication only)."""
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.certificate.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)  # ECDHE + ECDSA
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    # A client is known by its CA (the server checks no name of it), yet strict verifiers
    # want a subject alternative name: a SPIFFE-style URI of its common name.
    san = _san(hosts) if server else x509.SubjectAlternativeName([_client_uri(common_name)])
    builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write(path: Path, data: bytes, private: bool) -> None:
    # Created with its final mode: a key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def init_dir(directory: Path, hosts: Iterable[str] = DEFAULT_HOSTS) -> None:
    """Write a new CA, a server certificate for `hosts` and a client certificate to
    `directory`; refuses to overwrite an existing CA (its clients would stop working)."""
    if (directory / CA_CERT).exists():
        raise TlsError(f"{directory / CA_CERT} exists: not overwriting a CA")
    ca = new_ca()
    server = issue(ca, "tasklane control plane", hosts=hosts, server=True)
    client = issue(ca, "tasklane sidecar", server=False)
    directory.mkdir(parents=True, exist_ok=True)
    for (cert_name, key_name), pair in (
        ((SERVER_CERT, SERVER_KEY), server),
        ((CLIENT_CERT, CLIENT_KEY), client),
        ((CA_CERT, CA_KEY), ca),  # last: its presence means the directory is complete
    ):
        _write(directory / key_name, pair.key, private=True)
        _write(directory / cert_name, pair.cert, private=False)


def add_hosts(directory: Path, hosts: Iterable[str]) -> list[str]:
    """Issue a new server certificate from `directory`'s own CA for the names of the current
    one plus `hosts`, and return the names it has. The CA and the client certificate stay as
    they are, so every sidecar that trusts the CA keeps working."""
    ca_key = directory / CA_KEY
    if not ca_key.is_file():
        raise TlsError(f"{ca_key} missing: only the CA's key can issue a server certificate")
    ca = KeyPair((directory / CA_CERT).read_bytes(), ca_key.read_bytes())
    try:
        current = server_names(
            x509.load_pem_x509_certificate((directory / SERVER_CERT).read_bytes())
        )
    except (OSError, ValueError):  # none yet, or unreadable: start from the defaults
        current = list(DEFAULT_HOSTS)
    names = list(dict.fromkeys([*current, *hosts]))
    server = issue(ca, "tasklane control plane", hosts=names, server=True)
    # Each file replaced whole, never half written; the control plane reads them at start.
    for name, data, private in ((SERVER_KEY, server.key, True), (SERVER_CERT, server.cert, False)):
        staged = directory / f".{name}.new"
        _write(staged, data, private)
        os.replace(staged, directory / name)
    return names


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    kinds = (x509.DNSName, x509.IPAddress)
    return [str(name.value) for name in san if isinstance(name, kinds)]  # in their order


@dataclass(frozen=True)
class TlsFiles:
    """One end's files in a TLS directory: the CA to trust, and its own certificate/key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def _files(directory: Path, cert: str, key: str) -> TlsFiles:
    # Absolute: Envoy reads them from the bootstrap, whatever its working directory.
    base = directory.resolve()
    files = TlsFiles(base / CA_CERT, base / cert, base / key)
    for path in (files.ca, files.cert, files.key):
        if not path.is_file():
            raise TlsError(f"--tls-dir {directory}: {path.name} missing (tasklane tls init)")
    try:
        ca, own, private = files.read()
    except OSError as exc:
        name = Path(exc.filename).name
        raise TlsError(f"--tls-dir {directory}: {name}: {exc.strerror}") from None
    own_cert = _parse(directory, files.cert, "certificate", x509.load_pem_x509_certificate, own)
    _parse(directory, files.ca, "certificate", x509.load_pem_x509_certificates, ca)  # or a bundle
    own_key = _parse(directory, files.key, "private key (without a passphrase)", _key, private)
    if own_key.public_key() != own_cert.public_key():
        raise TlsError(f"--tls-dir {directory}: {key} is not the key of {cert}")
    return files


def _key(pem: bytes) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(pem, password=None)


def _parse(directory: Path, path: Path, what: str, loader: Callable[[bytes], T], pem: bytes) -> T:
    """loader(pem), or a TlsError naming the file (never quoting it: it may be a key)."""
    try:
        return loader(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TlsError(f"--tls-dir {directory}: {path.name} is not a PEM {what}") from None


def server_files(directory: Path) -> TlsFiles:
    """The control plane's files; a clear TlsError when one is missing or unreadable."""
    return _files(directory, SERVER_CERT, SERVER_KEY)


def client_files(directory: Path) -> TlsFiles:
    """A sidecar's files; a clear TlsError when one is missing or unreadable."""
    return _files(directory, CLIENT_CERT, CLIENT_KEY)
