"""Admission: a trusted key (TK) bound to the verified boot, and a node certificate for it.

After a trusted verdict the node creates TK: an RSA-2048 decrypt key under its SRK whose
authPolicy is PolicyPCR over the PCRs as they are, and the AK certifies it against a TC nonce.
The TC accepts TK only if:

    tk.malformed          the certification or TK's public area does not parse
    tk.certify-signature  the certification is not signed by the node's AK
    tk.certify-type       it is not a TPM-generated certification
    tk.certify-nonce      it does not carry the TC's admission nonce
    tk.name               the certified object is not this TK
    tk.attributes         not fixedTPM + fixedParent + sensitiveDataOrigin + decrypt, or it is a
                          signing or restricted key, or userWithAuth lets a password use it
    tk.scheme             its scheme is not OAEP-SHA256 (decrypt-only): scheme NULL allows raw RSA
    tk.policy             its policy is not PolicyPCR over the PCR values the TC verified
    admit.not-trusted     the attestation it builds on is not the node's latest trusted one, or stale
    admit.quarantined     the node is quarantined: only the TC's operator releases it (`tc nodes
                          release`), or, where the perimeter says `readmit: after-reboot`, a trusted
                          quote showing the TPM reset since the quarantine
    tk.check-failed       the TPM could not decrypt the TC's challenge with it (proof it works now)

then issues a short-lived X.509 certificate for TK's key, signed by the TC's CA, naming the
node, its site, its TVMM build and the attestation. Keys are released to nodes only through TK.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID

from ..crypto import ticket as tickets
from ..manifest.models import Perimeter
from . import tpm2
from .identity import Identity
from .refusals import AdmissionRefused
from .store import Audit, Conflict, Registry

__all__ = ["AdmissionRefused", "begin", "check_tk", "finish", "policy_pcr_digest"]

TK_CHECK_LABEL = "tccdeploy-tk-check"
TPM_CC_POLICY_PCR = 0x0000017F
CHALLENGE_TTL = 60.0
# tccdeploy's OID arc (ITU-T X.667 UUID form), for the node certificate's extensions.
OID_ARC = "2.25.5221148118478671275721855852512125145"
OID_SITE = x509.ObjectIdentifier(OID_ARC + ".1")
OID_BUILD = x509.ObjectIdentifier(OID_ARC + ".2")
OID_ATTESTATION = x509.ObjectIdentifier(OID_ARC + ".3")
OID_NODE_TK = x509.ObjectIdentifier(OID_ARC + ".10.3")  # EKU: a node's trusted key, for wrapped VM keys only


def policy_pcr_digest(bank: str, pcrs: list[int], values: list[bytes]) -> bytes:
    """TPM2_PolicyPCR's policyDigest from a fresh session (TPM 2.0 Part 3, 23.7)."""
    pcr_digest = hashlib.new(bank, b"".join(values)).digest()
    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + tpm2.selection_bytes(bank, pcrs)
                          + pcr_digest).digest()


def check_tk(tk: tpm2.Public) -> None:
    required = tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.DECRYPT
    forbidden = tpm2.SIGN | tpm2.RESTRICTED | tpm2.USER_WITH_AUTH
    if tk.type != tpm2.ALG_RSA or tk.rsa_bits != 2048 or not tk.has(required) or tk.attributes & forbidden \
            or tk.name_alg != tpm2.ALG_SHA256:
        raise AdmissionRefused(
            "tk.attributes",
            f"TK attributes 0x{tk.attributes:08x}: it must be an RSA-2048 decrypt key, fixedTPM, fixedParent, made in "
            "the TPM, not restricted, not signing, and usable only through its policy (userWithAuth clear)",
        )
    if tk.scheme != (tpm2.ALG_OAEP, tpm2.ALG_SHA256):
        raise AdmissionRefused("tk.scheme", "the TK must carry the OAEP-SHA256 decryption scheme: with scheme NULL the "
                                            "TPM would also use it as a raw RSA key, i.e. to sign")


def begin(registry: Registry, perimeter: Perimeter, node: str, attestation_id: int, tk_public: bytes,
          certify_attest: bytes, certify_signature: bytes, nonce: bytes, nonce_ok: bool, ca_der: bytes) -> bytes:
    """Check TK; return a challenge (ciphertext to TK) that only a working TK can open.

    The AK certified TK over the TC's nonce *and* the CA certificate the node's service pinned
    with it (tickets.pin_qualifier): a TK whose service pinned another CA is refused here."""
    policy = perimeter.attestation
    identity = registry.identity(node)
    latest = registry.attestations(node, limit=1)
    if identity is None or not latest or latest[0]["id"] != attestation_id or latest[0]["verdict"] != "trusted" \
            or time.time() - latest[0]["time"] > policy.max_quote_age:
        raise AdmissionRefused("admit.not-trusted", "admission needs the node's latest attestation to be trusted and fresh")
    node_row = registry.node(node)
    if node_row is not None and node_row["state"] == "quarantined" and not (
            policy.readmit == "after-reboot" and node_row["quarantine_reset"] is not None
            and (latest[0]["reset_count"] or 0) > node_row["quarantine_reset"]):
        raise AdmissionRefused("admit.quarantined", f"{node} is quarantined; it stays out until the TC's operator runs "
                                                    f"`tccdeploy tc nodes release {node}`"
                               + (" or it reboots into an approved build" if policy.readmit == "after-reboot" else ""))
    if not nonce_ok:
        raise AdmissionRefused("tk.certify-nonce", "the admission nonce is unknown, used or expired")
    try:
        tk = tpm2.parse_public(tk_public)
        attest = tpm2.parse_attest(certify_attest)
        signature = tpm2.parse_signature(certify_signature)
        ak = tpm2.parse_public(identity["ak_public"])
    except tpm2.TPMFormatError as exc:
        raise AdmissionRefused("tk.malformed", f"the TK or its certification does not parse: {exc}") from None
    if not tpm2.verify_signature(ak, certify_attest, signature):
        raise AdmissionRefused("tk.certify-signature", "the TK certification is not signed by the node's AK")
    if attest.magic != tpm2.TPM_GENERATED or attest.type != tpm2.ST_ATTEST_CERTIFY:
        raise AdmissionRefused("tk.certify-type", "the TK certification is not a TPM-generated TPM2_Certify")
    if not hmac.compare_digest(attest.extra_data, tickets.pin_qualifier(nonce, ca_der)):
        raise AdmissionRefused("tk.certify-nonce", "the TK certification does not carry the TC's nonce and the TC's "
                                                   "CA certificate pinned by the node's service")
    if not hmac.compare_digest(attest.certified_name, tk.name):
        raise AdmissionRefused("tk.name", "the certified object is not the TK presented")
    check_tk(tk)
    values = latest[0]["pcr_values"]
    expected = tickets.pinned_policy(policy_pcr_digest(policy.bank, list(policy.pcrs), [
        bytes.fromhex(values[str(p)]) for p in policy.pcrs]), ca_der) if all(str(p) in values for p in policy.pcrs) else b""
    if not expected or not hmac.compare_digest(tk.auth_policy, expected):
        raise AdmissionRefused("tk.policy", "the TK's policy is not PolicyPCR over the PCR values the TC verified, "
                                            "ORed with the branch that pins this TC's CA")
    challenge = os.urandom(32)
    public = tk.public_key()
    ciphertext = public.encrypt(challenge, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),  # type: ignore[union-attr]
                                                        TK_CHECK_LABEL.encode() + b"\x00"))
    registry.save_admission(node, attestation_id, tk_public, hashlib.sha256(hashlib.sha256(challenge).digest()).digest(),
                            time.time() + CHALLENGE_TTL)
    return ciphertext


def finish(registry: Registry, perimeter: Perimeter, tc: Identity, node: str, answer_hex: str,
           audit: Callable[[dict[str, Any]], Audit] = lambda r: None) -> dict[str, Any]:
    """Check the TK's answer and issue the node certificate; the node becomes admitted."""
    pending = registry.take_admission(node)
    if pending is None or pending["expires"] < time.time():
        raise AdmissionRefused("tk.check-failed", "no admission of this node is under way (or it expired)")
    try:
        answer = bytes.fromhex(answer_hex)
    except ValueError:
        answer = b""
    if not hmac.compare_digest(hashlib.sha256(answer).digest(), pending["challenge_hash"]):
        raise AdmissionRefused("tk.check-failed", "the TPM did not decrypt the challenge with the TK")
    attestation = registry.attestation(pending["attestation"])
    node_row = registry.node(node)
    assert attestation is not None and node_row is not None
    tk = tpm2.parse_public(pending["tk_public"])
    now = datetime.datetime.now(datetime.UTC)
    lifetime = perimeter.attestation.certificate_lifetime
    serial = x509.random_serial_number()

    def utf8(value: str) -> bytes:
        data = value.encode()
        return b"\x0c" + bytes([len(data)]) + data if len(data) < 128 else b"\x0c\x81" + bytes([len(data)]) + data

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node_row["site"] or "-")]))
        .issuer_name(tc.certificate.subject)
        .public_key(tk.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([OID_NODE_TK]), critical=True)
        .add_extension(x509.UnrecognizedExtension(OID_SITE, utf8(node_row["site"] or "")), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_BUILD, utf8(attestation["build"] or "")), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_ATTESTATION, utf8(str(attestation["id"]))), critical=False)
        .sign(tc.key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    record = {"serial": f"{serial:x}", "attestation": attestation["id"], "tk_name": tk.name.hex(),
              "not_after": (now + datetime.timedelta(seconds=lifetime)).timestamp(), "pem": pem,
              "build": attestation["build"]}
    result = {"serial": record["serial"], "not_after": record["not_after"], "build": attestation["build"]}
    try:
        registry.admit(node, record, perimeter.attestation.readmit == "after-reboot", audit(result))
    except Conflict as exc:
        raise AdmissionRefused(exc.reason, str(exc)) from None
    return {"serial": record["serial"], "not_after": record["not_after"], "build": attestation["build"], "certificate": pem}
