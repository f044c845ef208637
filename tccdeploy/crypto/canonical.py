"""Canonical JSON: the exact bytes a signature covers (sorted keys, no spaces, UTF-8)."""

from __future__ import annotations

import json
from typing import Any


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
