"""Canonical JSON: the exact bytes a signature covers (sorted keys, no spaces, UTF-8).

NaN and the infinities are refused: JSON has no such numbers, and two parsers would read them
differently. A signature covers `signed_bytes(domain, document)`: a domain tag naming the kind
of document first, so a signature made over one kind (a receipt) can never be presented as
another (an audit checkpoint) even if their fields happened to coincide.
"""

from __future__ import annotations

import json
from typing import Any


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# The kinds of signed document, one domain each.
SEALED_IMAGE = "sealed-image"          # the customer's image descriptor
PLACEMENT_REQUEST = "placement-request"  # the customer's request
CUSTOMER_QUERY = "customer-query"      # the customer's status and receipt queries
LAUNCH_RECEIPT = "launch-receipt"      # the TC's receipt
AUDIT_CHECKPOINT = "audit-checkpoint"  # the TC's signed audit head


def signed_bytes(domain: str, document: dict[str, Any]) -> bytes:
    return b"tccdeploy/" + domain.encode() + b"\x00" + canonical(document)


def b64decode_canonical(text: str) -> bytes:
    """Standard base64 with exactly one spelling: the padding's spare bits must be zero, so no
    two texts decode to the same bytes (a document's every byte is then meaningful)."""
    import base64
    import binascii

    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    if base64.b64encode(data).decode() != text:
        raise ValueError("not base64 in its canonical form")
    return data
