"""The local CA and server certificate `bus up --tls` makes: kept across restarts, usable by a
cluster's routes (client authentication too), and made again by the same CA when an older
certificate cannot serve routes."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus.identity.certificates import ensure_server_tls, serves_routes


def _usage(cert_file: str) -> list[x509.ObjectIdentifier]:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _server_only(cert_file: str, ca_file: str, ca_key_file: Path) -> None:
    """Replace the server certificate with one allowing server authentication only (as made
    before routes were TLS), signed by the same CA."""
    ca = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old server")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    Path(cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_the_certificate_is_kept_and_serves_clients_and_routes(tmp_path: Path) -> None:
    first = ensure_server_tls(tmp_path / "tls")
    usage = _usage(first.cert_file)
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage and ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert serves_routes(Path(first.cert_file))
    kept = Path(first.cert_file).read_bytes()
    assert ensure_server_tls(tmp_path / "tls") == first and Path(first.cert_file).read_bytes() == kept
    assert "verify: true" in first.route_block() and first.ca_file in first.route_block()


def test_an_older_certificate_without_client_authentication_is_made_again_by_the_same_ca(tmp_path: Path) -> None:
    made = ensure_server_tls(tmp_path / "tls")
    ca = Path(made.ca_file).read_bytes()
    _server_only(made.cert_file, made.ca_file, tmp_path / "tls" / "ca-key.pem")
    assert not serves_routes(Path(made.cert_file))
    again = ensure_server_tls(tmp_path / "tls")
    assert serves_routes(Path(again.cert_file))
    assert Path(again.ca_file).read_bytes() == ca  # clients keep trusting it
    issuer = x509.load_pem_x509_certificate(Path(again.cert_file).read_bytes()).issuer
    assert issuer == x509.load_pem_x509_certificate(ca).subject
