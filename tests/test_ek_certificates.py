"""EK certificates: a chain to the perimeter's manufacturer root (through its published
intermediates), the TCG EK profile (end entity, key usage, EKU), validity, and the EK's own key;
each refusal with its reason. Certificates made here with `cryptography`, no TPM."""

from __future__ import annotations

import dataclasses
import datetime
import functools
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.enrollment import OID_EK_CERTIFICATE, EnrollmentRefused, check_ek_certificate
from tccdeploy.manifest.loader import load_manifests
from tccdeploy.manifest.models import ManufacturerCA

from .attestkit import rsa_public
from .conftest import REPO

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@functools.cache
def key() -> rsa.RSAPrivateKey:
    """An EK's key, made once: RSA generation is what would make these tests slow."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca(cn: str, signer: tuple | None = None, is_ca: bool = True, cert_sign: bool = True,
       not_after: datetime.datetime = NOW + 3650 * DAY):  # type: ignore[no-untyped-def]
    own = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = (signer[0].subject, signer[1]) if signer else (name(cn), own)
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name).public_key(own.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, cert_sign, True, False, False), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return cert, own


def ek_cert(signer, ek: rsa.RSAPrivateKey, *, is_ca: bool = False, encipher: bool = True, eku: list | None = None,
            not_after: datetime.datetime = NOW + 3650 * DAY) -> bytes:  # type: ignore[no-untyped-def]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(signer[0].subject)
               .public_key(ek.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(not_after)
               .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(name("tpm"))]), critical=True)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, encipher, False, not encipher, False, False, False, False),
                              critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(signer[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture
def vendor(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A manufacturer: a root, an intermediate under it, both in the perimeter."""
    root = ca("Vendor EK Root")
    intermediate = ca("Vendor EK Intermediate", root)
    (tmp_path / "root.pem").write_bytes(pem(root[0]))
    (tmp_path / "intermediates.pem").write_bytes(pem(intermediate[0]))
    perimeter = load_manifests([str(REPO / "examples")]).perimeter
    assert perimeter is not None
    perimeter = dataclasses.replace(perimeter, manufacturer_cas=(
        ManufacturerCA("vendor", str(tmp_path / "root.pem"), intermediates=str(tmp_path / "intermediates.pem")),))
    return perimeter, root, intermediate, tmp_path


def check(perimeter, der: bytes, ek: rsa.RSAPrivateKey) -> str:  # type: ignore[no-untyped-def]
    return check_ek_certificate(perimeter, der, tpm2.parse_public(rsa_public(ek)))


def refusal(perimeter, der: bytes, ek: rsa.RSAPrivateKey) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(EnrollmentRefused) as info:
        check(perimeter, der, ek)
    return info.value.reason


def test_an_ek_certificate_from_the_root_or_through_an_intermediate_is_accepted(vendor):
    perimeter, root, intermediate, _ = vendor
    ek = key()
    assert check(perimeter, ek_cert(root, ek, eku=[OID_EK_CERTIFICATE]), ek) == "vendor"
    assert check(perimeter, ek_cert(intermediate, ek, eku=[OID_EK_CERTIFICATE]), ek) == "vendor"
    assert check(perimeter, ek_cert(intermediate, ek), ek) == "vendor"  # no EKU extension: accepted
    assert check(perimeter, ek_cert(intermediate, ek, eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]), ek) == "vendor"


def test_an_intermediate_the_manufacturer_did_not_publish_is_not_a_chain(vendor, tmp_path):
    perimeter, root, _, _ = vendor
    stray = ca("Someone's CA", root)  # signed by the root, but not in the perimeter's bundle
    ek = key()
    assert refusal(perimeter, ek_cert(stray, ek), ek) == "ek.untrusted-manufacturer"
    other = ca("Other Vendor")
    assert refusal(perimeter, ek_cert(other, ek), ek) == "ek.untrusted-manufacturer"


@pytest.mark.parametrize("bad, code", [
    ({"is_ca": False}, "ek.ca-invalid"),
    ({"cert_sign": False}, "ek.ca-invalid"),
    ({"not_after": NOW - DAY}, "ek.ca-expired"),
])
def test_an_intermediate_that_is_not_a_valid_ca_is_refused(vendor, bad, code):
    perimeter, root, _, tmp_path = vendor
    intermediate = ca("Vendor EK Intermediate 2", root, **bad)
    (tmp_path / "intermediates.pem").write_bytes(pem(intermediate[0]))
    ek = key()
    assert refusal(perimeter, ek_cert(intermediate, ek), ek) == code


@pytest.mark.parametrize("bad, code", [
    ({"is_ca": True}, "ek.certificate-ca"),
    ({"encipher": False}, "ek.certificate-key-usage"),
    ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "ek.certificate-eku"),
    ({"not_after": NOW - DAY}, "ek.certificate-expired"),
])
def test_a_certificate_that_is_not_a_valid_ek_certificate_is_refused(vendor, bad, code):
    perimeter, _, intermediate, _ = vendor
    ek = key()
    assert refusal(perimeter, ek_cert(intermediate, ek, **bad), ek) == code


def test_an_ek_certificate_for_another_key_is_refused(vendor):
    perimeter, _, intermediate, _ = vendor
    ek, other = rsa.generate_private_key(public_exponent=65537, key_size=2048), key()
    assert refusal(perimeter, ek_cert(intermediate, ek), other) == "ek.key-mismatch"


def test_bytes_that_are_not_a_certificate_are_refused(vendor):
    perimeter, *_ = vendor
    assert refusal(perimeter, b"\x30\x03\x02\x01\x00", key()) == "ek.certificate-malformed"
