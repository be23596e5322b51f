"""The secure broker's X.509: an ECDSA P-256 CA, server and client certificates, the CRL.

Pure apart from key generation and random serial numbers: every function takes
keys, names and ``now`` and returns certificates or PEM bytes; none touches a
file or the clock (:class:`converter.broker.secure.SecureDir` stores them).

Guarantees:

* every certificate is valid from :data:`BACKDATE` before ``now`` (a device whose
  clock lags a little still connects) and no leaf outlives its CA;
* leaves are not CAs, may only sign (digital signature), and carry exactly one
  extended key usage: server auth for the broker, client auth for a device,
  whose certificate's CN is its device id (Mosquitto's username);
* the CRL stays valid as long as the CA, so it never expires under a running broker;
* :func:`server_cert_fits` keeps a server certificate only while it is signed by
  the current CA, names exactly the wanted SANs and has over
  :data:`SERVER_RENEW_DAYS` left.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from converter.broker.registry import Revocation

CA_DAYS = 20 * 365
SERVER_DAYS = 825
DEVICE_DAYS = 10 * 365
SERVER_RENEW_DAYS = 30
# certificates start a day early: a device whose clock lags a little still connects
BACKDATE = dt.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "litefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: Ed25519 works with Mosquitto's OpenSSL 3 too, but P-256 is what
    every TLS stack on small devices (mbedTLS, older Android, OpenSSL 1.1) accepts."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name("litefleet broker CA"))
        .issuer_name(_name("litefleet broker CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    sans: Sequence[str],
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    sans: Sequence[str],
    now: dt.datetime,
) -> x509.Certificate:
    return _leaf(ca_key, ca, key, "litefleet broker", server=True, sans=sans, now=now, days=SERVER_DAYS)


def make_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    now: dt.datetime,
) -> x509.Certificate:
    """A client certificate; Mosquitto takes the CN as the MQTT username."""
    return _leaf(ca_key, ca, key, common_name, server=False, sans=(), now=now, days=DEVICE_DAYS)


def make_crl(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, revoked: Iterable[Revocation], now: dt.datetime
) -> x509.CertificateRevocationList:
    """The CRL stays valid as long as the CA: an expired CRL would make OpenSSL
    refuse every client certificate while the broker runs."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - BACKDATE)
        .next_update(ca.not_valid_after_utc)
    )
    for r in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(dt.datetime.fromisoformat(r.revoked))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def server_cert_fits(
    cert: x509.Certificate, ca: x509.Certificate, sans: Sequence[str], now: dt.datetime
) -> bool:
    """Keep the server certificate unless its CA, names or remaining life changed."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    want = {_san(s) for s in sans}
    return set(have) == want and cert.not_valid_after_utc - now > dt.timedelta(days=SERVER_RENEW_DAYS)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (write it owner-only)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_crl(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)
