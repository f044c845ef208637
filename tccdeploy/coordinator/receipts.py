"""Launch receipts: what the TC attests about a launch, verifiable offline with its certificate.

A receipt is canonical JSON signed (ECDSA P-256, SHA-256, domain `launch-receipt`) by the TC's
receipt key, whose certificate (issued by the TC's CA for receipts only) travels with it. It
says which VM (id, image digest, request, customer) started on which node, under which node
certificate, TVMM build and attestation (time and PCR digest), all taken from the TC's own
records, and (version 3) the node's own TPM evidence of the launch: the runtime quote and event
list the TC checked before it recorded the launch, which `receipt verify` checks again.
`tccdeploy receipt verify` needs only the TC's CA certificate.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..crypto.canonical import LAUNCH_RECEIPT, b64decode_canonical, signed_bytes
from ..crypto.reasoned import Reasoned
from .identity import Identity, purpose_certificate

KIND = "tccdeploy-launch-receipt"
DOMAIN = LAUNCH_RECEIPT


class ReceiptError(Reasoned):
    """A receipt that does not prove what it says; `reason` names why (receipt.*)."""


def sign(tc: Identity, body: dict[str, Any]) -> dict[str, Any]:
    body = {"type": KIND, "version": 3 if "launch_evidence" in body else 2, **body,
            "tc": hashlib.sha256(tc.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()}
    signer = tc.purpose("receipt")
    signature = signer.key.sign(signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    # The signing certificate as strict base64 of its DER (not PEM text, whose line breaks a
    # parser forgives): every byte of a receipt is either signed or checked.
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    return {"receipt": body, "signature": base64.b64encode(signature).decode(), "certificate": base64.b64encode(der).decode()}


def verify(envelope: dict[str, Any], tc_certificate: x509.Certificate) -> dict[str, Any]:
    """The receipt's body if the TC signed exactly it; ReceiptError otherwise."""
    try:
        body, signature = envelope["receipt"], b64decode_canonical(envelope["signature"])
        certificate = purpose_certificate(b64decode_canonical(envelope["certificate"]), tc_certificate, "receipt")
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError("receipt.malformed", f"not a receipt of this TC: {exc}") from None
    if not isinstance(body, dict) or body.get("type") != KIND:
        raise ReceiptError("receipt.malformed", "not a tccdeploy launch receipt")
    fingerprint = hashlib.sha256(tc_certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    if body.get("tc") != fingerprint:
        raise ReceiptError("receipt.other-tc", "the receipt names another TC than this certificate")
    key = certificate.public_key()
    try:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    except Exception:  # noqa: BLE001
        raise ReceiptError("receipt.signature", "the signature does not verify: the receipt was altered or not signed by this TC") from None
    if body.get("version", 2) >= 3:
        check_launch_evidence(body)
    return body


def check_launch_evidence(body: dict[str, Any]) -> None:
    """The node's own TPM statement in the receipt, checked again without the TC: a quote by the
    node's AK over the runtime PCR, made for the launch ticket, whose events replay to it and end
    with this VM launched from this image. (That the AK is this node's TPM's is the TC's word:
    it bound the AK to the EK at enrollment.)"""
    from .refusals import Refused
    from .runtime import last_event_of
    from .runtime import verify as verify_runtime

    evidence = body.get("launch_evidence")
    if not isinstance(evidence, dict):
        raise ReceiptError("receipt.evidence-missing", "the receipt carries no launch evidence")
    try:
        checked = verify_runtime({"attest": evidence["quote"], "signature": evidence["signature"],
                                  "value": evidence["pcr_value"], "events": evidence["events"]},
                                 base64.b64decode(evidence["ak_public"], validate=True), int(evidence["runtime_pcr"]),
                                 str(evidence["ticket"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError("receipt.evidence-malformed", f"the launch evidence is malformed: {exc}") from None
    except Refused as exc:
        raise ReceiptError("receipt.evidence", f"the launch evidence does not hold: {exc.reason}: {exc}") from None
    last = last_event_of(checked.events, str(body.get("vm_id")))
    if last.get("event") != "launched" or last.get("vm_id") != body.get("vm_id") \
            or last.get("image_sha256") != body.get("image_sha256") or last.get("ticket") != evidence["ticket"]:
        raise ReceiptError("receipt.evidence-event", "the launch evidence's last event is not this VM launched from this image")
