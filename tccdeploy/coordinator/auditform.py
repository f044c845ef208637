"""The canonical form of an audit entry: what is hashed is exactly what is stored and read back,
on SQLite and PostgreSQL alike, whatever a request carried.

A value that would not survive that round trip unchanged (a number where a VM id belongs, a
lone surrogate or a NUL in text, an integer beyond 64 bits, a NaN, a tuple, a non-text key) is
replaced before hashing, by a digest of it where it is text ("sha256:..."), so a refused,
hostile input is recorded as a fingerprint, never as data, and cannot make the chain's stored
entries disagree with their hashes (issue 15: one unauthenticated request had made `audit
verify` report tampering forever).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

MAX_TEXT = 4000  # characters of one text value kept; longer ones are cut (deterministically)
INT_LIMIT = 1 << 63  # what a BIGINT and every JSON reader hold exactly


def _fingerprint(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def text(value: Any) -> str | None:
    """A column's text (node, vm, kind): the string itself if it is plain text of a sane length,
    else its fingerprint (None for None)."""
    if value is None:
        return None
    if isinstance(value, str):
        cleaned = _string(value)
        return cleaned if len(cleaned) <= 256 else _fingerprint(value.encode("utf-8", "surrogatepass"))
    return _fingerprint(repr(value).encode("utf-8", "surrogatepass"))


def _string(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database stores it, no UTF-8 reader reads it
        return _fingerprint(value.encode("utf-8", "surrogatepass"))
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        return _fingerprint(value.encode("utf-8"))
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "..."


def data(value: Any) -> Any:
    """A JSON value that survives json.dumps/json.loads and either database unchanged."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -INT_LIMIT < value < INT_LIMIT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return [data(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out[_string(key) if isinstance(key, str) else _string(str(key))] = data(item)
        return out
    return _string(str(value))
