"""The narrow interface: every operation the TVMM service offers, with the JSON schema (2020-12)
its arguments must satisfy. Nothing else is callable, no unknown field passes, and no argument
is free-form: VM ids, digests and base64 have fixed shapes and bounds, PCRs and NV indices lie
in fixed ranges, and nothing names a path, a command or a QEMU option.

The service checks arguments with the small validator below (the subset of JSON Schema these
schemas use) rather than the jsonschema package: it starts once per engine session on every
node, and the package's import costs more than the whole check. A test holds the schemas to the
2020-12 meta-schema and the validator to jsonschema's answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..crypto.reasoned import Reasoned
from ..crypto.ticket import END, LAUNCH, MIGRATE_IN, MIGRATE_OUT, RESUME, SETTLE, SUSPEND, signed

VM_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
BANK = {"type": "string", "enum": ["sha1", "sha256", "sha384", "sha512"]}
PCRS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "minItems": 1, "maxItems": 24,
        "uniqueItems": True}
PEM = {"type": "string", "maxLength": 8192,
       "pattern": "^-----BEGIN CERTIFICATE-----\\n[A-Za-z0-9+/=\\n]+-----END CERTIFICATE-----\\n?$"}


def b64(max_bytes: int) -> dict[str, Any]:
    return {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "maxLength": (max_bytes + 2) // 3 * 4}


def args(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": sorted(required),
            "additionalProperties": False}


NONCE = b64(64)
WHAT = {"type": "string", "enum": ["disk", "state"]}
OFFSET = {"type": "integer", "minimum": 0, "maximum": 1 << 50}

OPERATIONS: dict[str, dict[str, Any]] = {
    # identity and enrollment
    "identity": args({}),
    "ak_create": args({}),
    "ak_activate": args({"credential": b64(4096), "secret": b64(4096)}),
    # attestation
    "quote": args({"nonce": NONCE, "bank": BANK, "pcrs": PCRS}),
    # an asset tag lives in the owner or platform NV range, never in the EK certificates' range
    "nv_certify": args({"index": {"type": "integer", "minimum": 0x01000000, "maximum": 0x01BFFFFF}, "nonce": NONCE}),
    # admission
    # the TC's CA certificate, pinned with the TK (the AK certifies the TK over it)
    "tk_create": args({"bank": BANK, "pcrs": PCRS, "nonce": NONCE, "tc_ca": PEM}),
    "tk_check": args({"ciphertext": b64(512)}),
    # the encrypted disk, moved in and out as ciphertext
    # (and a suspended VM's saved state: ciphertext under the TC's Ksus)
    "disk_state": args({"vm_id": VM_ID}, {"what": WHAT}),
    # (the bytes follow the answer as blocks, node.protocol: never base64 in JSON)
    "disk_receive": args({"vm_id": VM_ID, "offset": OFFSET}, {"what": WHAT}),
    "disk_commit": args({"vm_id": VM_ID, "sha256": SHA256}, {"what": WHAT}),
    "disk_send": args({"vm_id": VM_ID, "offset": OFFSET}, {"what": WHAT}),
    # VMs
    "launch": args({"ticket": signed(LAUNCH)}),  # everything else (VM, profile, key) is the TC's ticket
    "vm_status": args({"vm_id": VM_ID}),
    "vm_stop": args({"vm_id": VM_ID}),
    "vm_start": args({"vm_id": VM_ID}),
    "vm_end": args({"ticket": signed(END)}),  # poweroff or destroy, as the TC's end ticket says
    # suspension: the state saved under the TC's Ksus, resumed once through its resume ticket
    "vm_suspend": args({"ticket": signed(SUSPEND)}),
    "vm_resume": args({"ticket": signed(RESUME)}),
    # migration
    # Kmig, and where the stream may go, are the TC's (its tickets), never the engine's
    "migrate_out_start": args({"ticket": signed(MIGRATE_OUT)}),
    # the stream itself follows the answer as blocks of ciphertext (node.protocol), never as JSON
    "migrate_out_stream": args({"vm_id": VM_ID}),
    # a migration's outcome at each end is the TC's settle ticket, never the engine's say
    "migrate_out_end": args({"vm_id": VM_ID, "ticket": signed(SETTLE)}),
    "migrate_in_start": args({"ticket": signed(MIGRATE_IN)}),
    "migrate_in_stream": args({"vm_id": VM_ID}),
    "migrate_in_finish": args({"vm_id": VM_ID}),
    "migrate_in_settle": args({"vm_id": VM_ID, "ticket": signed(SETTLE), "resume": {"type": "boolean"}}),
    "migrate_in_discard": args({"vm_id": VM_ID}),
    # the runtime PCR's event list, quoted for a ticket (a repair's evidence)
    "runtime_log": args({"runtime_pcr": {"type": "integer", "minimum": 0, "maximum": 23},
                         "ticket": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}),
}

Handler = Callable[..., Any]  # a result dict, or a streaming answer (node.protocol)
HANDLERS: dict[str, Handler] = {}


class ServiceError(Reasoned):
    """A refusal or failure the engine sees as a plain message, with a reason code."""


def operation(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of one operation of OPERATIONS (and only of those)."""
    if name not in OPERATIONS:
        raise KeyError(f"{name} is not an operation of the interface")

    def register(func: Handler) -> Handler:
        HANDLERS[name] = func
        return func

    return register


def problems(schema: dict[str, Any], value: Any, where: str = "args") -> list[str]:
    """What is wrong with value under schema (the subset of JSON Schema used above)."""
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: an integer is expected"]
    elif kind is not None and not isinstance(value, checks[kind]):
        return [f"{where}: {'an' if kind[0] in 'ao' else 'a'} {kind} is expected"]
    out: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: must be one of {', '.join(map(str, schema['enum']))}")
    if kind == "integer":
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: at most {schema['maximum']}")
    if kind == "string":
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{where}: at most {schema['maxLength']} characters")
        elif "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{where}: does not match {schema['pattern']}")
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            out.append(f"{where}: {schema.get('minItems', 0)} to {schema.get('maxItems')} items")
        elif schema.get("uniqueItems") and len({repr(v) for v in value}) != len(value):
            out.append(f"{where}: items must be unique")
        else:
            for i, item in enumerate(value):
                out.extend(problems(schema.get("items", {}), item, f"{where}[{i}]"))
    if kind == "object":
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"{where}: {name} is required")
        for name, item in value.items():
            if name not in properties:
                if schema.get("additionalProperties") is False:
                    out.append(f"{where}: unknown field {name!r}")
            else:
                out.extend(problems(properties[name], item, f"{where}.{name}"))
    return out
