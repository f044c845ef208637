"""The TC's own identity: a CA key (0600) and self-signed certificate, made once, and a key per
purpose under it.

Customers and engines pin the CA certificate. The CA key signs certificates only; what the TC
signs for other reasons has its own key, certified by the CA for that one purpose (an
extended key usage of tccdeploy's arc), so a signature made for one purpose is never valid
for another: receipts (`receipt`), audit checkpoints (`audit`), the nodes' tickets (`ticket`), attestation results (`ear`). The RSA key-wrapping key
receives customers' sealed VM keys.
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

from ..crypto.purpose import OID_ARC, PURPOSES, purpose_certificate  # noqa: F401 - the TC's verifiers import them here

KEY_FILE = "tc-key.pem"
CERT_FILE = "tc-cert.pem"
WRAP_KEY_FILE = "tc-wrap-key.pem"
WRAP_CERT_FILE = "tc-wrap-cert.pem"


@dataclass(frozen=True)
class PurposeKey:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    retired: tuple[x509.Certificate, ...] = ()  # earlier keys' certificates: what they signed still verifies

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_id(self) -> str:
        return key_id(self.certificate)

    @property
    def all_pem(self) -> str:
        """The current certificate and the retired ones, for verifiers of older signatures."""
        return self.pem + "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.retired)


def key_id(certificate: x509.Certificate) -> str:
    """A purpose key's short name, carried with what it signs so a verifier picks the right one
    after rotations."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """The CA key signs (node certificates, receipts); a separate RSA key receives wrapped VM keys."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    wrap_key: rsa.RSAPrivateKey
    wrap_certificate: x509.Certificate
    purposes: dict[str, PurposeKey]

    def purpose(self, name: str) -> PurposeKey:
        return self.purposes[name]

    @property
    def bundle_pem(self) -> str:
        """What customers seal against: the CA certificate and the key-wrapping certificate."""
        return self.pem + self.wrap_certificate.public_bytes(serialization.Encoding.PEM).decode() + \
            "".join(self.purposes[p].all_pem for p in sorted(self.purposes))

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
    return load(state), True


def _make_purpose_key(state: str, purpose: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
    """A signing key for one purpose, certified by the CA with that purpose's EKU only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    value = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    name = value.decode() if isinstance(value, bytes) else value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {purpose} signing")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(ca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([PURPOSES[purpose]]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_secret(os.path.join(state, f"tc-{purpose}-key.pem"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(os.path.join(state, f"tc-{purpose}-cert.pem"), "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


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
    purposes = {}
    for purpose in PURPOSES:
        key_path = os.path.join(state, f"tc-{purpose}-key.pem")
        if not os.path.exists(key_path):  # a state made before purpose keys existed: add them now
            _make_purpose_key(state, purpose, key, cert)
        purpose_key = _private(key_path)
        with open(os.path.join(state, f"tc-{purpose}-cert.pem"), "rb") as fh:
            purpose_cert = x509.load_pem_x509_certificate(fh.read())
        retired: list[x509.Certificate] = []
        if os.path.exists(os.path.join(state, f"tc-{purpose}-retired.pem")):
            with open(os.path.join(state, f"tc-{purpose}-retired.pem"), "rb") as fh:
                retired = x509.load_pem_x509_certificates(fh.read())
        assert isinstance(purpose_key, ec.EllipticCurvePrivateKey)
        purposes[purpose] = PurposeKey(purpose_key, purpose_cert, tuple(retired))
    return Identity(key, cert, wrap_key, wrap_cert, purposes)


def rotate(state: str, purpose: str) -> PurposeKey:
    """A new key for purpose, certified by the CA; the old key is destroyed and its certificate
    kept among the retired ones (receipts and audit entries it signed still verify, nothing new
    can be signed with it)."""
    if purpose not in PURPOSES:
        raise ValueError(f"no TC key for {purpose!r}; purposes: {', '.join(PURPOSES)}")
    current = load(state)
    old = current.purpose(purpose)
    bundle = os.path.join(state, f"tc-{purpose}-retired.pem")
    from ..crypto.files import atomic_write

    atomic_write(bundle, old.all_pem.encode(), 0o644)  # the old certificate first, then the ones before it
    os.unlink(os.path.join(state, f"tc-{purpose}-key.pem"))
    os.unlink(os.path.join(state, f"tc-{purpose}-cert.pem"))
    _make_purpose_key(state, purpose, current.key, current.certificate)
    return load(state).purpose(purpose)
