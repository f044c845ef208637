"""EK certificates: a chain to the perimeter's manufacturer root (through its published
intermediates), the TCG EK profile (end entity, key usage, EKU), validity, and the EK's own key;
each refusal with its reason. Certificates made here with `cryptography`, no TPM."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tccdeploy.coordinator import tpm2
from tccdeploy.coordinator.enrollment import OID_EK_CERTIFICATE, EnrollmentRefused, check_ek_certificate

from .attestkit import rsa_public
from .ekkit import DAY, NOW, ca, ek_cert, key, name, pem, vendor_perimeter


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


# -- chains as real vendors make them, and the exact edges of validity ---------------------------
RSA_CA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_an_rsa_vendor_chain_is_checked_by_its_signature_not_its_names(tmp_path):
    """Real EK CAs (Infineon, STMicro, Nuvoton) are mostly RSA. A certificate that names the
    vendor's CA as its issuer but is signed by another key is no chain."""
    perimeter, _, _ = vendor_perimeter(tmp_path)
    root = ca("RSA Vendor Root", key=RSA_CA_KEY)
    (tmp_path / "root.pem").write_bytes(pem(root[0]))
    (tmp_path / "intermediates.pem").write_bytes(b"")
    ek = key()
    assert check(perimeter, ek_cert(root, ek), ek) == "vendor"
    impostor = (root[0], rsa.generate_private_key(public_exponent=65537, key_size=2048))  # same name, other key
    assert refusal(perimeter, ek_cert(impostor, ek), ek) == "ek.untrusted-manufacturer"
    elsewhere = ca("Another Root")  # signed by the vendor's key but naming another issuer: not a chain either
    assert refusal(perimeter, ek_cert(root, ek, issuer=elsewhere[0].subject), ek) == "ek.untrusted-manufacturer"


def test_an_ek_certificate_signed_with_an_ed25519_ca_is_not_a_chain(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    perimeter, _, _ = vendor_perimeter(tmp_path)
    odd = Ed25519PrivateKey.generate()
    root = (x509.CertificateBuilder().subject_name(name("Ed Root")).issuer_name(name("Ed Root"))
            .public_key(odd.public_key()).serial_number(1).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(odd, None))
    (tmp_path / "root.pem").write_bytes(pem(root))
    ek = key()
    der = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root.subject).public_key(ek.public_key())
           .serial_number(2).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY).sign(odd, None)
           .public_bytes(serialization.Encoding.DER))
    assert refusal(perimeter, der, ek) == "ek.untrusted-manufacturer"


def test_certificates_come_in_pem_or_der_both_for_the_ek_and_the_vendor(vendor):
    perimeter, root, intermediate, tmp_path = vendor
    ek = key()
    der = ek_cert(intermediate, ek)
    as_pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    assert check(perimeter, as_pem, ek) == "vendor"  # an EK certificate a TPM stored as PEM
    (tmp_path / "root.pem").write_bytes(root[0].public_bytes(serialization.Encoding.DER))  # a vendor root as DER
    (tmp_path / "intermediates.pem").write_bytes(intermediate[0].public_bytes(serialization.Encoding.DER))
    assert check(perimeter, der, ek) == "vendor"
    (tmp_path / "root.pem").unlink()  # an unreadable CA file is no anchor
    assert refusal(perimeter, der, ek) == "ek.untrusted-manufacturer"


@pytest.fixture
def frozen(monkeypatch):  # type: ignore[no-untyped-def]
    """The enrollment's clock, at a whole second (certificate times have no fractions)."""
    from types import SimpleNamespace

    from tccdeploy.coordinator import enrollment

    moment = [NOW.replace(microsecond=0)]
    clock = SimpleNamespace(now=lambda tz=None: moment[0])
    monkeypatch.setattr(enrollment, "datetime", SimpleNamespace(datetime=clock, UTC=datetime.UTC))
    return moment


EDGES = [("from", True), ("until", True), ("before", False), ("after", False)]


def window(now: datetime.datetime, edge: str) -> tuple[datetime.datetime, datetime.datetime]:
    """Validity dates that put now at their first or last second, or one second outside."""
    second = datetime.timedelta(seconds=1)
    return {"from": (now, now + DAY), "until": (now - DAY, now), "before": (now + second, now + DAY),
            "after": (now - DAY, now - second)}[edge]


@pytest.mark.parametrize("edge, accepted", EDGES)
def test_an_ek_certificate_is_valid_from_its_first_second_to_its_last(vendor, frozen, edge, accepted):
    perimeter, _, intermediate, _ = vendor
    start, end = window(frozen[0], edge)
    ek = key()
    der = ek_cert(intermediate, ek, not_before=start, not_after=end)
    if accepted:
        assert check(perimeter, der, ek) == "vendor"
    else:
        assert refusal(perimeter, der, ek) == "ek.certificate-expired"


@pytest.mark.parametrize("edge, accepted", EDGES)
def test_a_vendor_ca_is_valid_from_its_first_second_to_its_last(vendor, frozen, edge, accepted):
    perimeter, root, _, tmp_path = vendor
    start, end = window(frozen[0], edge)
    intermediate = ca("Vendor EK Intermediate 3", root, not_before=start, not_after=end)
    (tmp_path / "intermediates.pem").write_bytes(pem(intermediate[0]))
    ek = key()
    if accepted:
        assert check(perimeter, ek_cert(intermediate, ek), ek) == "vendor"
    else:
        with pytest.raises(EnrollmentRefused, match="in manufacturer vendor's chain is not valid now") as info:
            check(perimeter, ek_cert(intermediate, ek), ek)
        assert info.value.reason == "ek.ca-expired"


def test_an_ecc_ek_certificate_must_allow_key_agreement_and_is_not_taken_for_an_rsa_ek(vendor):
    from tccdeploy.coordinator.enrollment import check_ek_profile

    _, _, intermediate, _ = vendor
    ecc_ek = ec.generate_private_key(ec.SECP256R1())
    agreeing = x509.load_der_x509_certificate(ek_cert(intermediate, ecc_ek, encipher=False))
    check_ek_profile(agreeing, rsa_ek=False)
    with pytest.raises(EnrollmentRefused, match="does not allow keyEncipherment$") as info:
        check_ek_profile(agreeing, rsa_ek=True)
    assert info.value.reason == "ek.certificate-key-usage"
    enciphering = x509.load_der_x509_certificate(ek_cert(intermediate, ecc_ek, encipher=True))
    with pytest.raises(EnrollmentRefused, match="does not allow keyAgreement$"):
        check_ek_profile(enciphering, rsa_ek=False)
    perimeter = vendor[0]
    # an ECC certificate presented with an RSA EK: another key, refused by name (not a crash)
    assert refusal(perimeter, ek_cert(intermediate, ecc_ek, encipher=True), key()) == "ek.key-mismatch"
