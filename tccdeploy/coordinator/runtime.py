"""Runtime evidence: the TC believes a VM event on a node only from its TPM.

A node's TVMM service answers each key-using operation with a quote by the node's AK over the
perimeter's runtime PCR, qualified by the ticket it acted on, and the list of VM events since
the TPM's reset. The TC checks the quote's signature and form, that it names that ticket, that
it covers exactly the runtime PCR, and that the list replays to the quoted value; what the list
then says happened is for the caller to match against its own records."""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

from ..crypto.runtime import qualifier, replay
from . import tpm2
from .refusals import Refused

MAX_EVENTS = 10_000


@dataclass(frozen=True)
class RuntimeEvidence:
    events: list[dict[str, Any]]
    reset_count: int
    value: bytes
    restart_count: int = 0

    @property
    def boot(self) -> tuple[int, int]:
        """The TPM's (resetCount, restartCount) when it quoted: the boot the events come from. A
        TPM Restart (Shutdown(STATE), then Startup(CLEAR): a resume from hibernation) clears the
        PCRs and lets other software run under the same resetCount; only the pair names a boot."""
        return self.reset_count, self.restart_count


def verify(evidence: Any, ak_public: bytes, pcr: int, ticket_id: str, redactions: bool = False) -> RuntimeEvidence:
    """The evidence's events, if the node's TPM vouches for them for this ticket; Refused with
    `runtime.*` otherwise. redactions: other VMs' events may stand as their digests (a receipt's
    copy of evidence the TC checked whole; never evidence the TC decides on)."""
    if not isinstance(evidence, dict):
        raise Refused("runtime.missing", "no runtime evidence from the node's TPM: nothing is recorded "
                                                   "on the engine's word")
    try:
        attest_raw = base64.b64decode(evidence["attest"], validate=True)
        signature_raw = base64.b64decode(evidence["signature"], validate=True)
        value = bytes.fromhex(evidence["value"])
        events = evidence["events"]
        if not isinstance(events, list) or len(events) > MAX_EVENTS or not all(isinstance(e, dict) for e in events):
            raise ValueError("events is a list of objects")
        attest = tpm2.parse_attest(attest_raw)
        signature = tpm2.parse_signature(signature_raw)
        ak = tpm2.parse_public(ak_public)
    except (KeyError, TypeError, ValueError, tpm2.TPMFormatError) as exc:
        raise Refused("runtime.malformed", f"the runtime evidence does not parse: {exc}") from None
    if not tpm2.verify_signature(ak, attest_raw, signature):
        raise Refused("runtime.signature", "the runtime quote is not signed by the node's AK")
    if attest.magic != tpm2.TPM_GENERATED or attest.type != tpm2.ST_ATTEST_QUOTE:
        raise Refused("runtime.signature", "the runtime evidence is not a TPM-generated quote")
    if not hmac.compare_digest(attest.extra_data, qualifier(ticket_id)):
        raise Refused("runtime.nonce", "the runtime quote was not made for this ticket (replayed evidence)")
    if attest.pcr_selection != ((tpm2.ALG_SHA256, (pcr,)),):
        raise Refused("runtime.pcr", f"the runtime quote does not cover exactly the runtime PCR {pcr} (sha256)")
    if not hmac.compare_digest(attest.pcr_digest, tpm2.pcr_digest("sha256", [value])):
        raise Refused("runtime.pcr", "the runtime PCR value given is not the one quoted")
    try:
        replayed = replay(events, redactions)
    except (TypeError, ValueError) as exc:
        raise Refused("runtime.malformed", f"the runtime events do not encode: {exc}") from None
    if not hmac.compare_digest(replayed, value):
        raise Refused("runtime.log", "the runtime event list does not replay to the quoted PCR value")
    return RuntimeEvidence(events, attest.reset_count, value, attest.restart_count)


def last_event_of(events: list[dict[str, Any]], vm_id: str) -> dict[str, Any]:
    """The last event concerning vm_id (what the node last did with it), or {}."""
    return next((e for e in reversed(events) if e.get("vm_id") == vm_id), {})
