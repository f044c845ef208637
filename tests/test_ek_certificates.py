"""EK certificates: a chain to the perimeter's manufacturer root (through its published
intermediates), the TCG EK profile (end entity, key usage, EKU), validity, and the EK's own key;
each refusal with its reason. Certificates made here with `cryptography`, no TPM."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.enrollment import OID_EK_CERTIFICATE, EnrollmentRefused, check_ek_certificate

from .attestkit import rsa_public
from .ekkit import DAY, NOW, ca, ek_cert, key, pem, vendor_perimeter


@pytest.fixture
def vendor(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A manufacturer: a root, an intermediate under it, both in the perimeter."""
    perimeter, root, intermediate = vendor_perimeter(tmp_path)
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
