"""The runtime PCR: what a node's TVMM service did with VMs, as the TPM vouches for it.

The service extends the perimeter's runtime PCR (sha256 bank) with each VM event and keeps the
list of events since the TPM's last reset; a quote over that PCR, with qualifying data naming
the ticket the event answers, is the evidence the TC checks before it believes "it runs". Shared
by the service (which extends and quotes) and the TC (which replays), so both compute the same
digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .canonical import canonical

EVENT_TAG = b"tccdeploy-runtime-event\x00"
EVIDENCE_TAG = b"tccdeploy-runtime-evidence\x00"
EVENTS = ("launched", "migrated-in", "migrated-out", "destroyed")


def event_digest(event: dict[str, Any]) -> bytes:
    """What the PCR is extended with for one event (sha256 over a tag and its canonical JSON)."""
    return hashlib.sha256(EVENT_TAG + canonical(event)).digest()


# An event shown by its digest alone: what a receipt carries for other VMs' events on the node,
# so one customer's receipt does not tell it what else runs there (found in review).
REDACTED = "redacted"


def redact(events: list[dict[str, Any]], vm_id: str) -> list[dict[str, Any]]:
    """events with every event not of vm_id replaced by {"redacted": its digest in hex}: the list
    replays to the same value (replay with redactions), and shows only vm_id's own events."""
    return [e if e.get("vm_id") == vm_id else {REDACTED: event_digest(e).hex()} for e in events]


def replay(events: list[dict[str, Any]], redactions: bool = False) -> bytes:
    """The runtime PCR's value after these events, from zero (a TPM reset). redactions: an event
    {"redacted": hex digest} counts as that digest (a receipt's; never in evidence the TC
    decides on, where hiding an event would hide what a node did)."""
    value = bytes(32)
    for event in events:
        if redactions and len(event) == 1 and REDACTED in event:
            digest = event[REDACTED]
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError("a redacted event is the sha256 of the event, in hex")
            value = hashlib.sha256(value + bytes.fromhex(digest)).digest()
        else:
            value = hashlib.sha256(value + event_digest(event)).digest()
    return value


def qualifier(ticket_id: str) -> bytes:
    """The quote's qualifying data: the ticket this evidence answers. A quote made for one ticket
    is no evidence for another, so evidence cannot be replayed for a second launch."""
    return hashlib.sha256(EVIDENCE_TAG + ticket_id.encode()).digest()
