"""TLS for the embedded servers: a local certificate authority and a server certificate it signs.

    files = ensure_server_tls(home_auth_dir, hosts=("127.0.0.1", "localhost"))
    files.ca_file       the CA every client verifies the servers with (BUS_TLS_CA)
    files.config_block  the nats-server `tls { ... }` block that serves the certificate

Made once and kept (a restart serves the same certificate, so clients keep trusting it); the keys
are written 0600. Given files (`bus up --tls-cert/--tls-key/--tls-ca`) are used as they are.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bus.errors import ConfigurationError
from bus.identity.keys import write_secret

CA_DAYS = 3650
SERVER_DAYS = 825


class ServerTls(msgspec.Struct, frozen=True, kw_only=True):
    """The files a TLS server presents, and the CA its clients verify it with."""

    cert_file: str
    key_file: str
    ca_file: str

    @property
    def config_block(self) -> str:
        """The nats-server config block: serve this certificate, require TLS from every client."""
        return (
            "tls {\n"
            f"  cert_file: {msgspec.json.encode(self.cert_file).decode()}\n"
            f"  key_file: {msgspec.json.encode(self.key_file).decode()}\n"
            "  timeout: 2\n"
            "}\n"
        )

    def route_block(self, indent: str = "  ") -> str:
        """The `tls { ... }` block of a `cluster { ... }`: routes between nodes are TLS too,
        each node presenting this certificate and verifying the other's against the CA (so the
        certificate must allow client authentication as well: the ones made here do)."""
        lines = [
            "tls {",
            f"  cert_file: {msgspec.json.encode(self.cert_file).decode()}",
            f"  key_file: {msgspec.json.encode(self.key_file).decode()}",
            f"  ca_file: {msgspec.json.encode(self.ca_file).decode()}",
            "  verify: true",
            "  timeout: 2",
            "}",
        ]
        return "".join(f"{indent}{line}\n" for line in lines)


def default_hosts() -> tuple[str, ...]:
    """The names a local server's certificate covers: loopback, and this machine's name."""
    return ("127.0.0.1", "::1", "localhost", socket.gethostname())


def ensure_server_tls(directory: Path, hosts: tuple[str, ...] | None = None) -> ServerTls:
    """The local CA and a server certificate for `hosts` under `directory` (made when missing).
    Raises ConfigurationError when the files cannot be written or read."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    cert, key = directory / "server.pem", directory / "server-key.pem"
    try:
        if not (ca_cert.is_file() and ca_key.is_file()):
            _write_ca(ca_cert, ca_key)
        if not (cert.is_file() and key.is_file()) or not serves_routes(cert):
            # (A certificate made before routes were TLS lacks client authentication: made again,
            # by the same CA, so clients go on trusting the servers.)
            _write_server(cert, key, ca_cert, ca_key, hosts or default_hosts())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot make the TLS files in {directory}: {exc}") from exc
    return ServerTls(cert_file=str(cert), key_file=str(key), ca_file=str(ca_cert))


def given_server_tls(cert_file: Path, key_file: Path, ca_file: Path) -> ServerTls:
    """Files the operator brings. Raises ConfigurationError naming a missing one."""
    for what, path in (("certificate", cert_file), ("key", key_file), ("CA", ca_file)):
        if not path.is_file():
            raise ConfigurationError(f"the TLS {what} file {path} does not exist")
    return ServerTls(cert_file=str(cert_file.resolve()), key_file=str(key_file.resolve()), ca_file=str(ca_file.resolve()))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_ca(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Continuum local CA")])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_secret(key_path, _key_pem(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _write_server(cert_path: Path, key_path: Path, ca_cert_path: Path, ca_key_path: Path, hosts: tuple[str, ...]) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Continuum NATS server")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Client authentication too: a cluster node presents it when it dials another's route.
        .add_extension(x509.ExtendedKeyUsage(_SERVER_AND_ROUTE), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_secret(key_path, _key_pem(key))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


_SERVER_AND_ROUTE = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def serves_routes(cert_path: Path) -> bool:
    """Whether the certificate allows client authentication (what a route's dialer presents).
    Raises OSError, ValueError (not a PEM certificate)."""
    try:
        usage = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction: any use
    return x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
