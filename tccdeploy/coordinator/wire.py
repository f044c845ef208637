"""The TC's HTTP API on the wire: one place for every body's shape, used by the server (to check
what arrives) and by the client (to build what it sends).

Bytes travel as standard base64; every body is a JSON object whose schema refuses unknown
fields, so a typo or a field from another version is a clear 400, never silently ignored.
"""

from __future__ import annotations

import base64
from typing import Any

from ..crypto import ticket as tickets
from ..crypto.bundle import HEX32, HEX64, SIGNED_DESCRIPTOR
from .verifier import Evidence, Verdict

B64 = {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": 4 * 1024 * 1024}
NODE = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
SHORT = {"type": "string", "maxLength": 256}
HOST_KEY = {"type": "string", "minLength": 1, "maxLength": 256}  # required: a node is reached at its pinned key


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required}


def _placement_request() -> tuple[dict[str, Any], dict[str, Any]]:
    """The PlacementRequest manifest's published schema, and its $defs (hoisted to the body's root)."""
    import json
    from importlib import resources

    schema = json.loads(resources.files("tccdeploy.schemas").joinpath("placementrequest.schema.json").read_text())
    defs = schema.pop("$defs")
    return {k: v for k, v in schema.items() if k not in ("$schema", "$id")}, defs


_MANIFEST, _MANIFEST_DEFS = _placement_request()
# A customer's signed request and signed image descriptor, typed to the last field: whatever
# arrives at the TC unauthenticated is shaped before any code reads it.
SIGNED_REQUEST = _object({
    "request": _object({"manifest": _MANIFEST, "id": HEX32, "salt": HEX32, "created": {"type": "string", "maxLength": 64},
                        "customer": {"type": "string", "maxLength": 128},
                        "image": _object({"vm_id": HEX32, "sha256": HEX64}, ["vm_id", "sha256"])},
                       ["manifest", "id", "created", "customer", "image"]),
    "signature": B64}, ["request", "signature"])


# A node's TPM evidence of a VM event (crypto/runtime.py, coordinator/runtime.py).
RUNTIME_EVIDENCE = _object({"attest": B64, "signature": B64, "pcr": {"type": "integer", "minimum": 0, "maximum": 23},
                            "value": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            "events": {"type": "array", "maxItems": 10000,
                                       "items": {"type": "object", "maxProperties": 16}}},
                           ["attest", "signature", "value", "events"])
SCHEMAS: dict[str, dict[str, Any]] = {
    "EnrollmentBegin": _object({"node": NODE, "ek_certificate": B64, "ek_public": B64, "ak_public": B64,
                                "ssh_host_key": HOST_KEY, "site": {"type": ["string", "null"], "maxLength": 128},
                                "address": SHORT},
                               ["node", "ek_certificate", "ek_public", "ak_public", "ssh_host_key", "address"]),
    "EnrollmentFinish": _object({"node": NODE, "answer": B64}, ["node", "answer"]),
    "NonceRequest": _object({"node": NODE, "purpose": {"enum": ["quote", "certify"]}}, ["node"]),
    "Attestation": _object({
        "node": NODE, "site": {"type": ["string", "null"], "maxLength": 128}, "address": SHORT,
        "evidence": _object({"attest": B64, "signature": B64, "eventlog": B64, "nonce": B64, "ssh_host_key": HOST_KEY,
                             "pcrs": {"type": "object", "additionalProperties": False,
                                      "patternProperties": {"^[0-9]{1,2}$": {"type": "string", "pattern": "^[0-9a-f]{0,128}$"}}},
                             "asset_attest": B64, "asset_signature": B64, "asset_nv_public": B64},
                            ["attest", "signature", "pcrs", "eventlog", "nonce", "ssh_host_key"]),
    }, ["node", "address", "evidence"]),
    "AdmissionBegin": _object({"node": NODE, "attestation": {"type": "integer", "minimum": 1}, "tk_public": B64,
                               "certify_attest": B64, "certify_signature": B64, "nonce": B64},
                              ["node", "attestation", "tk_public", "certify_attest", "certify_signature", "nonce"]),
    "AdmissionFinish": _object({"node": NODE, "answer": {"type": "string", "pattern": "^[0-9a-f]{0,256}$"}},
                               ["node", "answer"]),
    "Quarantine": _object({"reason": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}}, ["reason"]),
    "NodeLeases": _object({"nodes": {"type": "array", "maxItems": 20000, "items": NODE},
                           "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 600}}, ["nodes", "seconds"]),
    "NodeLeasesEnd": _object({"nodes": {"type": "array", "maxItems": 20000, "items": NODE}}, ["nodes"]),
    "EkCheck": _object({"ek_certificate": B64, "ek_public": B64, "node": NODE,
                        "site": {"type": ["string", "null"], "maxLength": 128}}, ["ek_certificate", "ek_public"]),
    "PerimeterCheck": _object({"site": {"type": ["string", "null"], "maxLength": 128}, "address": SHORT}, ["address"]),
    "RequestSubmit": _object({"request": SIGNED_REQUEST, "bundle": SIGNED_DESCRIPTOR}, ["request", "bundle"])
    | {"$defs": _MANIFEST_DEFS},
    "CustomerQuery": _object({"time": {"type": "string", "maxLength": 64}, "signature": B64}, ["time", "signature"]),
    "Release": _object({"node": NODE}, ["node"]),
    "Launched": _object({"node": NODE, "status": {"type": "object", "maxProperties": 32,
                                                  "properties": {"evidence": RUNTIME_EVIDENCE}}}, ["node", "status"]),
    "Empty": _object({}, []),
    "VmState": _object({"state": {"enum": ["running", "stopped"]}}, ["state"]),
    "VmEndTicket": _object({"node": NODE, "action": {"enum": ["poweroff", "destroy"]}}, ["node", "action"]),
    "SuspendBegin": _object({"vm": SHORT}, ["vm"]),
    "SuspendEnd": _object({"saved": {"type": "boolean"}, "evidence": RUNTIME_EVIDENCE}, ["saved"]),
    "ResumeBegin": _object({"vm": SHORT, "node": NODE}, ["vm"]),
    "Resumed": _object({"evidence": RUNTIME_EVIDENCE}, ["evidence"]),
    "VmEnded": _object({"ticket": tickets.signed(tickets.END), "evidence": RUNTIME_EVIDENCE}, ["ticket", "evidence"]),
    "Enforcement": _object({"node": NODE, "policy": SHORT, "result": {"type": "string", "maxLength": 2000}},
                           ["node", "policy", "result"]),
    "MigrationBegin": _object({"vm": SHORT, "destination": NODE}, ["vm", "destination"]),
    "MigrationEnd": _object({"vm_id": SHORT, "commit": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 2000},
                             "evidence": RUNTIME_EVIDENCE},
                            ["vm_id", "commit"]),
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def evidence_to_wire(evidence: Evidence) -> dict[str, Any]:
    out: dict[str, Any] = {"attest": b64(evidence.attest), "signature": b64(evidence.signature),
                           "pcrs": {str(k): v.hex() for k, v in evidence.pcrs.items()},
                           "eventlog": b64(evidence.eventlog), "nonce": b64(evidence.nonce),
                           "ssh_host_key": evidence.ssh_host_key}
    if evidence.asset_attest:
        out |= {"asset_attest": b64(evidence.asset_attest), "asset_signature": b64(evidence.asset_signature),
                "asset_nv_public": b64(evidence.asset_nv_public)}
    return out


def evidence_from_wire(data: dict[str, Any]) -> Evidence:
    return Evidence(unb64(data["attest"]), unb64(data["signature"]),
                    {int(k): bytes.fromhex(v) for k, v in data["pcrs"].items()}, unb64(data["eventlog"]),
                    unb64(data["nonce"]), asset_attest=unb64(data.get("asset_attest", "")),
                    asset_signature=unb64(data.get("asset_signature", "")),
                    asset_nv_public=unb64(data.get("asset_nv_public", "")),
                    ssh_host_key=str(data.get("ssh_host_key", "")))


def verdict_from_wire(data: dict[str, Any]) -> Verdict:
    return Verdict(data["verdict"] == "trusted", list(data["reasons"]), list(data["warnings"]), data.get("build"),
                   data.get("pcr_digest"), data.get("reset_count"), data.get("restart_count"), data.get("platform"))
