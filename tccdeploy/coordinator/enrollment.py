"""Enrollment: binding a node's attestation key to a genuine TPM, with no trust on first use.

1. The EK certificate must chain to a manufacturer CA of the perimeter, through the
   intermediates the manufacturer publishes (each a CA valid now), be an EK certificate by the
   TCG's profile (check_ek_profile) and valid now, and its public key must be the EK the node
   presents. Refusals: ek.certificate-malformed, ek.untrusted-manufacturer, ek.ca-invalid,
   ek.ca-expired, ek.certificate-ca, ek.certificate-key-usage, ek.certificate-eku,
   ek.certificate-expired, ek.key-mismatch.
2. The AK must be a restricted, fixedTPM signing key.
3. MakeCredential(EK, secret, AK name): only the TPM holding that EK *and* that AK can
   ActivateCredential and return the secret. The TC keeps only the secret's hash.
4. The EK must be on the TC operator's roster (roster.py), which gives the node its site; the
   claimed address must lie in that site's networks (a consistency check, not proof).
Enrolling a node again with the TPM it is enrolled with changes nothing. A node enrolled with
another EK is refused (`ek.changed`) until the TC's operator runs `tc nodes replace-tpm`; an
EK enrolled as another node is refused (`ek.duplicate`). A refused enrollment changes nothing.

Every refusal is an EnrollmentRefused with a stable reason code.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..manifest.models import Perimeter
from . import roster, tpm2
from .refusals import EnrollmentRefused, Refused
from .store import Audit, Conflict, Registry
from .verifier import perimeter_problems

__all__ = ["Challenge", "EnrollmentRefused", "begin", "check_ak", "check_ek_certificate", "finish"]

CHALLENGE_TTL = 120.0
OID_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")  # tcg-kp-EKCertificate


@dataclass(frozen=True)
class Challenge:
    credential: bytes
    secret: bytes


def _load_cert(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise EnrollmentRefused("ek.certificate-malformed", f"the EK certificate does not parse: {exc}") from None


def _load_file(path: str | None) -> list[x509.Certificate]:
    """The certificates in a CA file (PEM, possibly several, or one DER); none if unreadable."""
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        return x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    except (OSError, ValueError):
        return []


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key, algorithm = issuer.public_key(), cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            return False
    except Exception:  # noqa: BLE001 - any failure is "not signed by this CA"
        return False
    return True


MAX_CHAIN = 4  # root, a few intermediates: real vendors use one or two (Intel's On-Die CA, three)


def _path(cert: x509.Certificate, anchors: list[x509.Certificate], intermediates: list[x509.Certificate]) \
        -> list[x509.Certificate] | None:
    """The CAs from cert's issuer up to an anchor (the anchor last), or None."""
    path: list[x509.Certificate] = []
    current = cert
    for _ in range(MAX_CHAIN):
        anchor = next((a for a in anchors if _signed_by(current, a)), None)
        if anchor is not None:
            return [*path, anchor]
        parent = next((i for i in intermediates if i not in path and _signed_by(current, i)), None)
        if parent is None:
            return None
        path.append(parent)
        current = parent
    return None


def _extension(cert: x509.Certificate, kind: type) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_ca(ca: x509.Certificate, now: datetime.datetime, name: str) -> None:
    constraints = _extension(ca, x509.BasicConstraints)
    usage = _extension(ca, x509.KeyUsage)
    if constraints is None or not constraints.ca or (usage is not None and not usage.key_cert_sign):
        raise EnrollmentRefused("ek.ca-invalid", f"{ca.subject.rfc4514_string()} in manufacturer {name}'s chain is not a "
                                                 "CA certificate (basicConstraints CA:TRUE and keyCertSign)")
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise EnrollmentRefused("ek.ca-expired", f"{ca.subject.rfc4514_string()} in manufacturer {name}'s chain is not "
                                                 "valid now")


def check_ek_profile(cert: x509.Certificate, rsa_ek: bool) -> None:
    """What the TCG EK Credential Profile makes an EK certificate, as real verifiers check it
    (go-attestation, Canonical's secboot): an end entity (not a CA), whose key usage, if given,
    lets it encrypt (keyEncipherment for RSA, keyAgreement for ECC), and whose extended key
    usage, if given, names tcg-kp-EKCertificate (2.23.133.8.1) or anyExtendedKeyUsage. Many EK
    certificates carry no EKU extension; that is accepted, as those verifiers accept it."""
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EnrollmentRefused("ek.certificate-ca", "the EK certificate is a CA certificate, not an EK's")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not (usage.key_encipherment if rsa_ek else usage.key_agreement):
        raise EnrollmentRefused("ek.certificate-key-usage", "the EK certificate's key usage does not allow "
                                                            + ("keyEncipherment" if rsa_ek else "keyAgreement"))
    usages = _extension(cert, x509.ExtendedKeyUsage)
    if usages is not None and not ({OID_EK_CERTIFICATE, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(usages)):
        raise EnrollmentRefused("ek.certificate-eku", "the EK certificate's extended key usage does not name "
                                                      "tcg-kp-EKCertificate (2.23.133.8.1): it is not an EK certificate")


def check_ek_certificate(perimeter: Perimeter, ek_cert_der: bytes, ek: tpm2.Public) -> str:
    """The manufacturer CA's name when the certificate is genuine and is the EK's; else refuse."""
    cert = _load_cert(ek_cert_der)
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = None
    for ca in perimeter.manufacturer_cas:
        path = _path(cert, _load_file(ca.certificate), _load_file(ca.intermediates))
        if path is not None:
            for link in path:
                _check_ca(link, now, ca.name)
            issuer_name = ca.name
            break
    if issuer_name is None:
        raise EnrollmentRefused(
            "ek.untrusted-manufacturer",
            f"the EK certificate (issuer {cert.issuer.rfc4514_string()}) does not chain to a manufacturer CA of "
            f"perimeter {perimeter.name}",
        )
    check_ek_profile(cert, ek.type == tpm2.ALG_RSA)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise EnrollmentRefused("ek.certificate-expired", "the EK certificate is outside its validity dates")
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or ek.type != tpm2.ALG_RSA or \
            public.public_numbers().n != int.from_bytes(ek.modulus, "big"):
        raise EnrollmentRefused("ek.key-mismatch", "the EK certificate is for another key than the EK the TPM presents")
    return issuer_name


def load_certificate_der(data: bytes) -> bytes:
    """The certificate in DER, however the TPM stored it: what the EK fingerprint is taken over."""
    return _load_cert(data).public_bytes(serialization.Encoding.DER)


def check_ak(ak: tpm2.Public) -> None:
    required = tpm2.RESTRICTED | tpm2.SIGN | tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN
    if not ak.has(required) or ak.attributes & tpm2.DECRYPT:
        raise EnrollmentRefused("ak.attributes",
                                "the AK must be a restricted signing key, fixedTPM and fixedParent, made in the TPM")
    if ak.name_alg != tpm2.ALG_SHA256:
        raise EnrollmentRefused("ak.attributes", "the AK's name algorithm must be SHA-256")


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def begin(registry: Registry, perimeter: Perimeter,
          roster_entries: Callable[[tuple[str, ...]], list[roster.RosterEntry]], node: str, ek_cert: bytes,
          ek_public: bytes, ak_public: bytes, ssh_host_key: str, site: str | None, address: str) -> Challenge | None:
    """Check the TPM and the roster; a credential challenge for the AK, or None when node is
    enrolled with this very TPM already (nothing to do: enrollment is a no-op, not a reset).
    roster_entries: the roster's entries for an EK's names (the TC's own lookup)."""
    try:
        ek = tpm2.parse_public(ek_public)
        ak = tpm2.parse_public(ak_public)
    except tpm2.TPMFormatError as exc:
        raise EnrollmentRefused("evidence.malformed", f"malformed key from the node: {exc}") from None
    if not ssh_host_key:
        raise EnrollmentRefused("node.ssh-host-key", "the node's SSH host key is required: it is pinned at enrollment and "
                                                     "checked at every attestation")
    manufacturer = check_ek_certificate(perimeter, ek_cert, ek)
    check_ak(ak)
    cert_der = load_certificate_der(ek_cert)
    ek_fp = fingerprint(cert_der)
    identities = roster.ek_identities(cert_der)
    try:
        entry = roster.check(roster_entries(identities), node, identities, site)
    except Refused as exc:
        raise EnrollmentRefused(exc.reason, str(exc)) from None
    outside = perimeter_problems(perimeter, entry.site, address)
    if outside:
        raise EnrollmentRefused(outside[0][0], outside[0][1] + " (the roster puts the machine there)")
    known = registry.identity(node)
    if known is not None:
        if hmac.compare_digest(known["ek_fingerprint"], ek_fp):
            return None
        raise EnrollmentRefused(
            "ek.changed",
            f"{node} was enrolled with another TPM (EK certificate {known['ek_fingerprint'][:16]}...); a changed TPM is "
            f"the TC operator's decision, after checking the hardware: tccdeploy tc nodes replace-tpm {node}",
        )
    other = registry.identity_by_ek(ek_fp)
    if other is not None:
        raise EnrollmentRefused("ek.duplicate", f"this TPM is enrolled as {other['node']}: one EK is one node (a relayed "
                                                "TPM answers for two machines)")
    secret = os.urandom(32)
    credential, encrypted_seed = tpm2.make_credential(ek, secret, ak.name)
    registry.save_challenge(
        node, secret_hash=hashlib.sha256(secret).digest(), ek_certificate=cert_der, ek_fingerprint=ek_fp,
        ek_public=ek_public, ak_public=ak_public, ssh_host_key=ssh_host_key, manufacturer=manufacturer,
        expires=time.time() + CHALLENGE_TTL, site=entry.site, address=address,
    )
    return Challenge(credential, encrypted_seed)


def finish(registry: Registry, node: str, answer: bytes, audit: Callable[[dict[str, Any]], Audit] = lambda r: None) -> dict:
    pending = registry.take_challenge(node)
    if pending is None:
        raise EnrollmentRefused("enroll.no-challenge", f"no enrollment of {node} is under way")
    if pending["expires"] < time.time():
        raise EnrollmentRefused("enroll.challenge-expired", "the credential challenge expired; enroll again")
    if not hmac.compare_digest(hashlib.sha256(answer).digest(), pending["secret_hash"]):
        raise EnrollmentRefused("ak.not-bound", "the TPM could not activate the credential: the AK is not bound to the EK")
    ak = tpm2.parse_public(pending["ak_public"])
    identity = {
        "ek_certificate": pending["ek_certificate"], "ek_fingerprint": pending["ek_fingerprint"],
        "ek_key_fingerprint": roster.ek_identities(bytes(pending["ek_certificate"]))[1],
        "ek_public": pending["ek_public"], "ak_public": pending["ak_public"], "ak_name": ak.name,
        "ssh_host_key": pending["ssh_host_key"], "manufacturer": pending["manufacturer"],
    }
    result = {"node": node, "manufacturer": pending["manufacturer"], "ek_fingerprint": pending["ek_fingerprint"],
              "site": pending["site"]}
    try:
        registry.enroll(node, pending["site"], pending["address"], identity, audit(result))
    except Conflict as exc:
        raise EnrollmentRefused(exc.reason, str(exc)) from None
    return result
