"""Launch receipts: what the TC attests about a launch, verifiable offline with its certificate.

A receipt is canonical JSON signed (ECDSA P-256, SHA-256, domain `launch-receipt`) by the TC's
receipt key, whose certificate (issued by the TC's CA for receipts only) travels with it. It
says which VM (id, image digest, request, customer) started on which node, under which node
certificate, TVMM build and attestation (time and PCR digest), all taken from the TC's own
records. `tccdeploy receipt verify` needs only the TC's CA certificate.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..crypto.canonical import LAUNCH_RECEIPT, b64decode_canonical, signed_bytes
from .identity import Identity, purpose_certificate

KIND = "tccdeploy-launch-receipt"
DOMAIN = LAUNCH_RECEIPT


class ReceiptError(Exception):
    pass


def sign(tc: Identity, body: dict[str, Any]) -> dict[str, Any]:
    body = {"type": KIND, "version": 2, **body,
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
        raise ReceiptError(f"not a receipt of this TC: {exc}") from None
    if not isinstance(body, dict) or body.get("type") != KIND:
        raise ReceiptError("not a tccdeploy launch receipt")
    fingerprint = hashlib.sha256(tc_certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    if body.get("tc") != fingerprint:
        raise ReceiptError("the receipt names another TC than this certificate")
    key = certificate.public_key()
    try:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    except Exception:  # noqa: BLE001
        raise ReceiptError("the signature does not verify: the receipt was altered or not signed by this TC") from None
    return body
