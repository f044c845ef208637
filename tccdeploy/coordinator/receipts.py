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


ENVELOPE = frozenset({"receipt", "signature", "certificate"})


def sign(tc: Identity, body: dict[str, Any]) -> dict[str, Any]:
    # 3: the node's launch evidence; 4: other VMs' events in it by digest only, the customer's key id
    version = 2 if "launch_evidence" not in body else 4 if "customer_key_id" in body else 3
    body = {"type": KIND, "version": version, **body,
            "tc": hashlib.sha256(tc.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()}
    signer = tc.purpose("receipt")
    signature = signer.key.sign(signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    # The signing certificate as strict base64 of its DER (not PEM text, whose line breaks a
    # parser forgives): every byte of a receipt is either signed or checked.
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    return {"receipt": body, "signature": base64.b64encode(signature).decode(), "certificate": base64.b64encode(der).decode()}


def verify(envelope: dict[str, Any], tc_certificate: x509.Certificate) -> dict[str, Any]:
    """The receipt's body if the TC signed exactly it; ReceiptError otherwise."""
    if not isinstance(envelope, dict) or set(envelope) != ENVELOPE:
        raise ReceiptError("receipt.malformed", "not a receipt: it holds exactly receipt, signature and certificate")
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
                                 str(evidence["ticket"]), redactions=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError("receipt.evidence-malformed", f"the launch evidence is malformed: {exc}") from None
    except Refused as exc:
        raise ReceiptError("receipt.evidence", f"the launch evidence does not hold: {exc.reason}: {exc}") from None
    last = last_event_of(checked.events, str(body.get("vm_id")))
    if last.get("event") != "launched" or last.get("vm_id") != body.get("vm_id") \
            or last.get("image_sha256") != body.get("image_sha256") or last.get("ticket") != evidence["ticket"]:
        raise ReceiptError("receipt.evidence-event", "the launch evidence's last event is not this VM launched from this image")


def parse(text: str | bytes) -> dict[str, Any]:
    """A receipt file's JSON, refusing a name given twice in any object: Python's reader keeps
    the last and verifies it, while another reader may show the first (an inserted "node" beside
    the signed one verified; found in review)."""
    import json

    def once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ReceiptError("receipt.malformed", f"not a receipt: {', '.join(twice)} given twice in one object")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=once)
    except ValueError as exc:
        raise ReceiptError("receipt.malformed", f"not a receipt: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ReceiptError("receipt.malformed", "not a receipt: not a JSON object")
    return value


def check_answers(body: dict[str, Any], request: dict[str, Any] | None = None, request_id: str | None = None,
                  key_id: str | None = None) -> None:
    """That a verified receipt answers the customer's own request (the signed request's body, as
    `request sign` wrote it) and names the customer's key: a receipt the TC signed proves a launch,
    but one for another request (an older one of the same customer, or another customer's that
    names the same VM) proves nothing about this one. ReceiptError receipt.other-request otherwise."""
    from ..crypto import customer

    expected: dict[str, Any] = {}
    if request is not None:
        try:
            expected = {"request": request["id"], "vm_id": request["image"]["vm_id"],
                        "image_sha256": request["image"]["sha256"],
                        "customer_key_id": customer.key_id(customer.parse_public(request["customer"]))}
        except (KeyError, TypeError, customer.CustomerKeyError) as exc:
            raise ReceiptError("receipt.other-request", f"the request given is not a signed placement request: {exc}") \
                from None
    if request_id is not None:
        expected["request"] = request_id
    if key_id is not None:
        expected["customer_key_id"] = key_id
    for name, value in expected.items():
        if name == "customer_key_id" and "customer_key_id" not in body:
            raise ReceiptError("receipt.other-request", "the receipt does not name the customer's key (a receipt before "
                                                        "version 4): it cannot be matched to your key")
        if body.get(name) != value:
            raise ReceiptError("receipt.other-request", f"the receipt is for {name} {body.get(name)}, not {value}: "
                                                        "it does not answer your request")
