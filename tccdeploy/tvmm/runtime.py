"""The service's runtime PCR and event list: every VM event it performs is extended into the
perimeter's runtime PCR (named by the TC's ticket) and appended to its list, which starts over
when the TPM resets; each event is answered with a quote over that PCR naming the ticket.

The list is written before the PCR is extended, so a crash in between leaves one event too many
in the list, never one too few: the next event drops it when the list no longer replays to the
PCR without it (and any other mismatch is left for the TC to refuse, fail closed)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..crypto.files import atomic_write
from ..crypto.runtime import event_digest, qualifier, replay
from . import config
from .interface import operation
from .tpm import extend_runtime, reset_count, runtime_quote, runtime_value

LOG_FILE = "runtime.json"
LOCK_FILE = "runtime.lock"


def _load(pcr: int, boot: int) -> list[dict[str, Any]]:
    try:
        with open(config.current().path(LOG_FILE)) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return []
    if stored.get("reset_count") != boot or stored.get("pcr") != pcr:
        return []  # a new boot: the PCR started again from zero
    return list(stored.get("events", []))


def _save(pcr: int, boot: int, events: list[dict[str, Any]]) -> None:
    atomic_write(config.current().path(LOG_FILE),
                 json.dumps({"pcr": pcr, "reset_count": boot, "events": events}).encode(), 0o600)


@contextmanager
def _locked() -> Iterator[None]:
    """One event at a time across the service's processes (one per engine session): the list and
    the PCR must move together."""
    fd = os.open(config.current().path(LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(ticket: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Extend the runtime PCR the ticket names with event and return the evidence: a quote over
    the PCR for this ticket, the PCR's value and the whole event list since the TPM's reset. The
    event names the ticket it was done under and the trusted key that ticket was for (the
    service checked it is this node's when it took the ticket): the TC believes an event only
    under a TK it certified, so one done under a CA the engine pinned on an idle node, with the
    id of a ticket the TC issued, proves nothing (found in review)."""
    event = {**event, "ticket": ticket["id"], "tk": ticket["tk_name"]}
    with _locked():
        return _record(int(ticket["runtime_pcr"]), event, ticket["id"])


def evidence(pcr: int, ticket_id: str) -> dict[str, Any]:
    """The evidence as it stands, for a ticket acted on earlier (a repair after the engine died)."""
    with _locked():
        events = _load(pcr, reset_count())
        attest, signature, value = runtime_quote(pcr, qualifier(ticket_id))
        if not any(value):
            events = []  # nothing extended since the PCR was cleared (see _record)
    return {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(signature).decode(),
            "pcr": pcr, "value": value.hex(), "events": events}


@operation("runtime_log")
def runtime_log(runtime_pcr: int, ticket: str) -> dict[str, Any]:
    """The runtime PCR's events since the TPM's reset, quoted for a ticket: what this node did with
    VMs, in the TPM's words. It changes nothing; the TC decides what it proves."""
    return {"changed": False, "evidence": evidence(runtime_pcr, ticket)}


def _record(pcr: int, event: dict[str, Any], ticket_id: str) -> dict[str, Any]:
    boot = reset_count()
    events = _load(pcr, boot)
    value = runtime_value(pcr)
    if not any(value):
        # Cleared since the list was written: a TPM Restart (resume from hibernation) clears the
        # PCRs under the same resetCount, and the old boot's list would never replay again, so
        # every event's evidence after it failed at the TC (found in review).
        events = []
    if replay(events) != value and events and replay(events[:-1]) == value:
        events = events[:-1]  # the last run wrote its event but died before extending
    events.append(event)
    _save(pcr, boot, events)
    extend_runtime(pcr, event_digest(event))
    attest, signature, value = runtime_quote(pcr, qualifier(ticket_id))
    return {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(signature).decode(),
            "pcr": pcr, "value": value.hex(), "events": events}
