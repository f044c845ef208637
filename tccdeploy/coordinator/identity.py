"""The TC's own identity: a CA key (0600) and self-signed certificate, made once.

Customers pin its fingerprint; node certificates and receipts are signed with it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_FILE = "tc-key.pem"
CERT_FILE = "tc-cert.pem"
WRAP_KEY_FILE = "tc-wrap-key.pem"
WRAP_CERT_FILE = "tc-wrap-cert.pem"


@dataclass(frozen=True)
class Identity:
    """The CA key signs (node certificates, receipts); a separate RSA key receives wrapped VM keys."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    wrap_key: rsa.RSAPrivateKey
    wrap_certificate: x509.Certificate

    @property
    def bundle_pem(self) -> str:
        """What customers seal against: the CA certificate and the key-wrapping certificate."""
        return self.pem + self.wrap_certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()


def _write_secret(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def init(state: str, name: str = "tccdeploy trusted coordinator") -> tuple[Identity, bool]:
    """Create the identity if absent; (identity, created)."""
    key_path, cert_path = os.path.join(state, KEY_FILE), os.path.join(state, CERT_FILE)
    if os.path.exists(key_path):
        return load(state), False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    wrap_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    wrap_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name + " key wrapping")]))
        .issuer_name(subject)
        .public_key(wrap_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(state, mode=0o700, exist_ok=True)
    _write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    _write_secret(os.path.join(state, WRAP_KEY_FILE), wrap_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(state, WRAP_CERT_FILE), "wb") as fh:
        fh.write(wrap_cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key, cert, wrap_key, wrap_cert), True


def _private(path: str):  # type: ignore[no-untyped-def]
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    with open(path, "rb") as fh:
        return serialization.load_pem_private_key(fh.read(), None)


def load(state: str) -> Identity:
    try:
        key = _private(os.path.join(state, KEY_FILE))
        wrap_key = _private(os.path.join(state, WRAP_KEY_FILE))
        with open(os.path.join(state, CERT_FILE), "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(os.path.join(state, WRAP_CERT_FILE), "rb") as fh:
            wrap_cert = x509.load_pem_x509_certificate(fh.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no TC identity in {state}: run `tccdeploy tc init`") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(wrap_key, rsa.RSAPrivateKey)
    return Identity(key, cert, wrap_key, wrap_cert)
