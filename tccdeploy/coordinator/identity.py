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
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_FILE = "tc-key.pem"
CERT_FILE = "tc-cert.pem"


@dataclass(frozen=True)
class Identity:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

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
    os.makedirs(state, mode=0o700, exist_ok=True)
    _write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key, cert), True


def load(state: str) -> Identity:
    key_path, cert_path = os.path.join(state, KEY_FILE), os.path.join(state, CERT_FILE)
    try:
        mode = os.stat(key_path).st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{key_path} is readable by others (mode {mode:o}); chmod 600 it")
        with open(key_path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), None)
        with open(cert_path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no TC identity in {state}: run `tccdeploy tc init`") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Identity(key, cert)
