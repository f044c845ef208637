"""The audit log: every TC decision, appended to a hash chain in the registry.

    hash_n = sha256(hash_{n-1} || canonical({id, time, kind, node, vm, data}))

`verify` recomputes the chain: an edited entry breaks its own hash, a deleted one leaves a gap
in the ids, a reordered one breaks the `prev` links. Deleting the newest entries leaves a
shorter but consistent chain, so `verify` prints the head (count and hash) for operators to
record elsewhere, and `--expect-head` checks against a recorded one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from ..crypto.canonical import canonical
from .store import Registry

GENESIS = "0" * 64


def entry_hash(prev: str, entry: dict[str, Any]) -> str:
    body = {k: entry.get(k) for k in ("id", "time", "kind", "node", "vm", "data")}
    return hashlib.sha256(prev.encode() + canonical(body)).hexdigest()


def append(registry: Registry, kind: str, node: str | None = None, vm: str | None = None, **data: Any) -> dict[str, Any]:
    return registry.audit_append({"time": time.time(), "kind": kind, "node": node, "vm": vm, "data": data}, entry_hash)


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head: str
    problem: str = ""


def verify(registry: Registry, expect_head: str | None = None) -> Verification:
    prev = GENESIS
    rows = registry.audit_entries()
    for number, row in enumerate(rows, start=1):
        if row["id"] != number:
            return Verification(False, len(rows), prev, f"entry {number} is missing (the log jumps to {row['id']}): deleted")
        if row["prev"] != prev:
            return Verification(False, len(rows), prev, f"entry {number} does not follow entry {number - 1}: reordered or replaced")
        if entry_hash(prev, row) != row["hash"]:
            return Verification(False, len(rows), prev, f"entry {number} ({row['kind']}) was edited: its hash does not match")
        prev = row["hash"]
    head = f"{len(rows)}:{prev}"
    if expect_head and expect_head != head:
        return Verification(False, len(rows), prev, f"the head is {head}, not the recorded {expect_head}: entries were removed")
    return Verification(True, len(rows), prev)
