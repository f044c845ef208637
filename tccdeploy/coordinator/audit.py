"""The audit log: every TC decision, appended to a signed hash chain in the registry.

    hash_n = sha256(hash_{n-1} || canonical({id, time, kind, node, vm, data}))
    signature_n = ECDSA(audit key, "tccdeploy/audit-checkpoint\\0" || canonical({count: n, head: hash_n, tc}))

Each entry is written in the same transaction as the decision it records (store.py), so no
crash leaves a decision without its entry. Every entry's signature is a checkpoint of the head
at that point, made with the TC's audit key (its certificate is issued by the TC's CA for
audit checkpoints only): someone with write access to the database can recompute every hash
but cannot sign, so `verify` catches a rewritten chain as well as an edited, deleted or
reordered entry. Truncating the newest entries leaves a shorter, validly signed chain; that is
what a published checkpoint is for: `tc audit checkpoint` exports the signed head, the operator
publishes it outside the TC (a transparency log, a ticket, a customer's inbox), and
`audit verify --checkpoint FILE` proves the chain still contains it.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..crypto.canonical import AUDIT_CHECKPOINT, canonical, signed_bytes
from .identity import Identity, key_id, purpose_certificate
from .store import Registry

GENESIS = "0" * 64
DOMAIN = AUDIT_CHECKPOINT


def entry_hash(prev: str, entry: dict[str, Any]) -> str:
    body = {k: entry.get(k) for k in ("id", "time", "kind", "node", "vm", "data")}
    return hashlib.sha256(prev.encode() + canonical(body)).hexdigest()


def checkpoint_body(count: int, head: str, tc_fingerprint: str) -> dict[str, Any]:
    return {"count": count, "head": head, "tc": tc_fingerprint}


class Auditor:
    """The registry's auditor: the next link's hash and its checkpoint signature."""

    def __init__(self, tc: Identity):
        self.key = tc.purpose("audit").key
        self.key_id = tc.purpose("audit").key_id
        self.fingerprint = tc.fingerprint

    def __call__(self, prev: str, entry: dict[str, Any]) -> tuple[str, str]:
        """(hash, "KEY_ID:SIGNATURE"): the key id names the audit key, so entries signed before a
        rotation (`tc rotate audit`) still verify with the retired key's certificate."""
        digest = entry_hash(prev, entry)
        body = checkpoint_body(int(entry["id"]), digest, self.fingerprint)
        signature = base64.b64encode(self.key.sign(signed_bytes(DOMAIN, body), ec.ECDSA(hashes.SHA256()))).decode()
        return digest, f"{self.key_id}:{signature}"


def append(registry: Registry, kind: str, node: str | None = None, vm: str | None = None, **data: Any) -> dict[str, Any]:
    """An entry of its own (a refusal, an operator's note); decisions pass theirs to the registry."""
    return registry.audit_append(entry(kind, node, vm, **data))


def entry(kind: str, node: str | None = None, vm: str | None = None, **data: Any) -> dict[str, Any]:
    return {"kind": kind, "node": node, "vm": vm, "data": data}


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head: str
    problem: str = ""
    code: str = ""  # the reason code of the problem (audit.*)


class _Checker:
    """The audit keys' public halves by key id: the current one and every retired one, each
    certified by the TC's CA for audit checkpoints."""

    def __init__(self, ca: x509.Certificate | None, audit_pem: str | None):
        self.keys: dict[str, Any] | None = None
        self.fingerprint = ""
        if ca is not None and audit_pem is not None:
            from cryptography.hazmat.primitives import serialization

            self.keys = {}
            for cert in x509.load_pem_x509_certificates(audit_pem.encode()):
                checked = purpose_certificate(cert.public_bytes(serialization.Encoding.PEM), ca, "audit")
                self.keys[key_id(checked)] = checked.public_key()
            self.fingerprint = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()

    def signed(self, count: int, head: str, signature: str | None) -> bool:
        if self.keys is None:
            return True
        name, _, value = (signature or "").rpartition(":")
        key = self.keys.get(name)
        try:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(base64.b64decode(value, validate=True),
                       signed_bytes(DOMAIN, checkpoint_body(count, head, self.fingerprint)), ec.ECDSA(hashes.SHA256()))
        except Exception:  # noqa: BLE001 - unsigned, unknown key, malformed or forged: all "not signed"
            return False
        return True


def verify_entries(rows: list[dict[str, Any]], ca: x509.Certificate | None = None, audit_pem: str | None = None,
                   expect_head: str | None = None, checkpoint: dict[str, Any] | None = None) -> Verification:
    """Recompute the chain over rows; with the TC's CA and audit certificate, check every
    entry's checkpoint signature too; with a published checkpoint, check the chain holds it."""
    try:
        checker = _Checker(ca, audit_pem)
    except ValueError as exc:
        return Verification(False, len(rows), GENESIS, f"the audit certificate is not this TC's: {exc}",
                            code="audit.certificate")
    prev = GENESIS
    for number, row in enumerate(rows, start=1):
        if row["id"] != number:
            return Verification(False, len(rows), prev, f"entry {number} is missing (the log jumps to {row['id']}): deleted",
                                code="audit.deleted")
        if row["prev"] != prev:
            return Verification(False, len(rows), prev, f"entry {number} does not follow entry {number - 1}: reordered or "
                                                        "replaced", code="audit.reordered")
        if entry_hash(prev, row) != row["hash"]:
            return Verification(False, len(rows), prev, f"entry {number} ({row['kind']}) was edited: its hash does not match",
                                code="audit.edited")
        if not checker.signed(number, row["hash"], row.get("signature")):
            return Verification(False, len(rows), prev, f"entry {number} ({row['kind']}) is not signed by the TC's audit "
                                                        "key: the chain was rewritten", code="audit.unsigned")
        prev = row["hash"]
    head = f"{len(rows)}:{prev}"
    if expect_head and expect_head != head:
        return Verification(False, len(rows), prev, f"the head is {head}, not the recorded {expect_head}: entries were removed",
                            code="audit.truncated")
    if checkpoint is not None:
        count, wanted = int(checkpoint["count"]), str(checkpoint["head"])
        if count > len(rows) or rows[count - 1]["hash"] != wanted:
            return Verification(False, len(rows), prev, f"the published checkpoint {count}:{wanted[:16]}... is not in this "
                                                        "chain: entries were removed or the chain replaced",
                                code="audit.checkpoint-missing")
        if not checker.signed(count, wanted, checkpoint.get("signature")):
            return Verification(False, len(rows), prev, "the checkpoint is not signed by this TC's audit key",
                                code="audit.checkpoint-unsigned")
    return Verification(True, len(rows), prev)


def verify(registry: Registry, expect_head: str | None = None, tc: Identity | None = None,
           checkpoint: dict[str, Any] | None = None) -> Verification:
    return verify_entries(registry.audit_entries(), tc.certificate if tc else None,
                          tc.purpose("audit").all_pem if tc else None, expect_head, checkpoint)


def checkpoint(registry: Registry, tc: Identity) -> dict[str, Any]:
    """The signed head, to publish outside the TC."""
    rows = registry.audit_entries()
    if not rows:
        raise ValueError("the audit log is empty: nothing to checkpoint yet")
    last = rows[-1]
    return {"type": "tccdeploy-audit-checkpoint", "count": int(last["id"]), "head": last["hash"], "time": last["time"],
            "tc": tc.fingerprint, "signature": last["signature"], "certificates": tc.purpose("audit").all_pem}
