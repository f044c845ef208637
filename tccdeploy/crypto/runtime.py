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


def replay(events: list[dict[str, Any]]) -> bytes:
    """The runtime PCR's value after these events, from zero (a TPM reset)."""
    value = bytes(32)
    for event in events:
        value = hashlib.sha256(value + event_digest(event)).digest()
    return value


def qualifier(ticket_id: str) -> bytes:
    """The quote's qualifying data: the ticket this evidence answers. A quote made for one ticket
    is no evidence for another, so evidence cannot be replayed for a second launch."""
    return hashlib.sha256(EVIDENCE_TAG + ticket_id.encode()).digest()
