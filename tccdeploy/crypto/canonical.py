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
