"""TC tickets: the TC's written permission for one key use by one node's TVMM service.

Every use of a VM key on a node needs one: launch, migrate-out (to the source) and migrate-in
(to the destination), suspend and resume; so do a migration's outcome at each end (settle) and a
VM's end (end),
which carry no key but are the TC's decision and the question the node's TPM answers. A ticket
names the node (name, node-certificate serial, TK name), the VM and its customer, the request,
the machine profile and an expiry, and carries the key wrapped to that node's TK under an OAEP
label binding the ticket's kind, the VM, the customer and the ticket's id: the key opens only in
that TPM, only for that use. The TC signs it with its ticket key (certified by the TC's CA for
tickets alone); the service checks it against the TC CA it pinned when its TK was made, and
keeps the ids it has used. Shared by the TC (which issues) and the service (which checks).
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .canonical import b64decode_canonical, signed_bytes
from .purpose import purpose_certificate
from .reasoned import Reasoned

DOMAIN = "tvmm-ticket"
TTL = 300  # seconds a ticket is good for: the engine hands it over right away
KINDS = ("launch", "migrate-out", "migrate-in", "settle", "end", "suspend", "resume")
PIN_TAG = b"tccdeploy-tk-pin\x00"

HEX32 = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
B64_KEY = {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": 1024}
TIME = {"type": "integer", "minimum": 0, "maximum": 1 << 40}
NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
TK_NAME = {"type": "string", "pattern": "^[0-9a-f]{68}$"}
_COMMON: dict[str, Any] = {
    "v": {"type": "integer", "enum": [1]}, "id": HEX32, "node": NAME, "node_serial": {"type": "string", "pattern": "^[0-9a-f]{1,64}$"},
    "tk_name": TK_NAME, "vm_id": HEX32, "customer": {"type": "string", "pattern": "^[0-9a-f]{16,64}$"},
    "issued": TIME, "expires": TIME,
}
_PROFILE: dict[str, Any] = {
    "name": NAME, "image_sha256": HEX64, "vcpus": {"type": "integer", "minimum": 1, "maximum": 256},
    "memory_mib": {"type": "integer", "minimum": 16, "maximum": 1024 * 1024},
}
MIGRATION = {"type": "string", "pattern": "^[0-9]{1,20}$"}


def _body(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    properties = {**_COMMON, "kind": {"type": "string", "enum": [kind]}, **fields}
    return {"type": "object", "properties": properties, "required": sorted(properties), "additionalProperties": False}


def signed(body: dict[str, Any]) -> dict[str, Any]:
    """The schema of a signed ticket whose body is `body`."""
    return {
        "type": "object",
        "properties": {"ticket": body,
                       "signature": {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": 256},
                       "certificate": {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": 4096}},
        "required": ["certificate", "signature", "ticket"],
        "additionalProperties": False,
    }


# launch: the VM, its profile and Kvm, for one request
RUNTIME_PCR = {"type": "integer", "minimum": 0, "maximum": 23}
LAUNCH = _body("launch", {**_PROFILE, "request": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                          "kvm": B64_KEY, "runtime_pcr": RUNTIME_PCR})
# migrate-out (to the source): Kmig, and the destination the TC chose for it
MIGRATE_OUT = _body("migrate-out", {"migration": MIGRATION, "destination": NAME, "destination_tk_name": TK_NAME,
                                    "kmig": B64_KEY})
# migrate-in (to the destination): the VM's profile, Kvm and the same Kmig, and where it comes from
MIGRATE_IN = _body("migrate-in", {**_PROFILE, "migration": MIGRATION, "source": NAME, "kvm": B64_KEY,
                                  "kmig": B64_KEY, "runtime_pcr": {"type": "integer", "minimum": 0, "maximum": 23}})
# settle (to each end of a migration, after the TC decided it): commit or abort, never both. The
# source resumes only on an abort, the destination runs only on a commit: one copy runs.
SETTLE = _body("settle", {"migration": MIGRATION, "outcome": {"type": "string", "enum": ["commit", "abort"]},
                          "role": {"type": "string", "enum": ["source", "destination"]}, "runtime_pcr": RUNTIME_PCR})
# end (poweroff or destroy one VM): no key in it; the ticket's id is the question the node's TPM
# answers, so the TC marks a VM gone only on that answer.
END = _body("end", {"action": {"type": "string", "enum": ["poweroff", "destroy"]}, "runtime_pcr": RUNTIME_PCR})
# suspend (to the VM's node): a fresh Ksus the TC made, under which the service saves the VM's
# state to its disk (STREAM, the suspension's id in the header); only a resume ticket opens it.
SUSPENSION = {"type": "string", "pattern": "^[0-9]{1,20}$"}
SUSPEND = _body("suspend", {"suspension": SUSPENSION, "ksus": B64_KEY, "runtime_pcr": RUNTIME_PCR})
# resume (to the node the TC chose, once per suspension): the VM's profile, Kvm, the same Ksus, and
# the saved state's digest (as the suspending node's TPM reported it)
RESUME = _body("resume", {**_PROFILE, "suspension": SUSPENSION, "kvm": B64_KEY, "ksus": B64_KEY,
                          "state_sha256": HEX64, "runtime_pcr": RUNTIME_PCR})
SIGNED = signed(LAUNCH)


class TicketError(Reasoned, ValueError):
    pass


def label(kind: str, what: str, vm_id: str, customer: str, ticket_id: str) -> bytes:
    """The OAEP label of a key in a ticket: what it is (kvm, kmig), for which use, VM, customer
    and ticket. A key lifted out of one ticket opens for no other. A TPM takes labels of at most
    64 bytes with the trailing NUL, so the binding is a digest of those fields (60 characters)."""
    bound = f"{kind}\x00{what}\x00{vm_id}\x00{customer}\x00{ticket_id}".encode()
    return b"tccdeploy-ticket:" + base64.urlsafe_b64encode(hashlib.sha256(bound).digest()).rstrip(b"=")


def pin_qualifier(nonce: bytes, ca_der: bytes) -> bytes:
    """What the AK certifies the TK over: the TC's nonce and the CA certificate the service pinned
    with that TK. The TC admits the TK only if this is its own CA, so a service that pinned
    another CA (an engine's) never gets a node certificate, and no key ever reaches it."""
    return hashlib.sha256(PIN_TAG + nonce + hashlib.sha256(ca_der).digest()).digest()


PIN_BRANCH_TAG = b"tccdeploy-tk-pin-branch\0"
TPM_CC_POLICY_OR = 0x00000171


def pin_branch(ca_der: bytes) -> bytes:
    """The second branch of a TK's PolicyOR: the pinned CA's digest, a policy no session reaches."""
    return hashlib.sha256(PIN_BRANCH_TAG + hashlib.sha256(ca_der).digest()).digest()


def pinned_policy(pcr_policy: bytes, ca_der: bytes) -> bytes:
    """A TK's authPolicy: TPM2_PolicyOR (Part 3, 23.6) of its PolicyPCR digest, the branch a
    session satisfies, and pin_branch(CA). The pinned CA is then part of the TK's public area and
    name, which the TC certifies: the service kept the pin beside the TK in a file, and a boot of
    the provider's software (root, the TK unusable there) rewrote it to a CA of the engine's, so
    the approved boot took the engine's tickets for the certified TK (found in review)."""
    import struct

    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_OR) + pcr_policy + pin_branch(ca_der)).digest()


def new_id() -> str:
    import secrets

    return secrets.token_hex(16)


def issue(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate, body: dict[str, Any]) -> dict[str, Any]:
    signature = key.sign(signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    return {"ticket": body, "signature": base64.b64encode(signature).decode(),
            "certificate": base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()}


def verify(envelope: dict[str, Any], ca: x509.Certificate, now: float | None = None) -> dict[str, Any]:
    """The ticket's body, if the pinned TC signed it with its ticket key and it has not expired;
    TicketError with its reason otherwise. What it names is for the caller to check."""
    try:
        der = b64decode_canonical(envelope["certificate"])
        signature = b64decode_canonical(envelope["signature"])
        body = envelope["ticket"]
    except (KeyError, TypeError, ValueError):
        raise TicketError("ticket.malformed", "the ticket is not a signed TC ticket") from None
    try:
        certificate = purpose_certificate(der, ca, "ticket")
    except ValueError as exc:
        raise TicketError("ticket.certificate", f"the ticket's signing certificate: {exc}") from None
    public = certificate.public_key()
    try:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, AssertionError, ValueError, TypeError):
        raise TicketError("ticket.signature", "the ticket is not signed by the TC's ticket key") from None
    moment = time.time() if now is None else now
    if not isinstance(body.get("expires"), int) or body["expires"] < moment:
        raise TicketError("ticket.expired", "the ticket has expired")
    return body
