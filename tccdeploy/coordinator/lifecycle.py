"""How a VM's stay on a node ends, as the TC decides it: a migration's outcome at each end (settle
tickets) and a VM powered off or destroyed (end tickets and the node's TPM evidence).

The engine carries these tickets; it decides nothing. A migration has one outcome in the
registry, and each end acts only on a ticket stating it, so the source resumes only if the
destination will never run, and the reverse: one copy runs, whatever the engine does. A VM
leaves the TC's live records only on its node's TPM saying it ended in answer to the TC's own
end ticket, while the node's last attestation is trusted and of that boot, or on a trusted quote
showing the node's TPM was reset since the VM came (add_attestation).
"""

from __future__ import annotations

import time
from typing import Any

from ..crypto import ticket as tickets
from . import audit, runtime
from .identity import Identity
from .refusals import Refused
from .store import Conflict, Registry

END_EVENTS = {"poweroff": "powered-off", "destroy": "destroyed"}
END_STATES = {"poweroff": "off", "destroy": "destroyed"}


def node_ticket(registry: Registry, tc: Identity, node: str, vm_id: str, kind: str, fields: dict[str, Any],
                refusal: str, ticket_id: str | None = None) -> dict[str, Any]:
    """A ticket of kind for the TVMM service of node (its newest certificate's serial and TK),
    about vm_id (ticket_id: the id its keys' labels were made with); Refused(refusal) when the TC
    never certified a TK for node."""
    certificate = registry.last_certificate(node)
    if certificate is None:
        raise Refused(refusal, f"{node} holds no trusted key the TC certified")
    customer = customer_of(registry, vm_id, refusal)
    now = int(time.time())
    signer = tc.purpose("ticket")
    return tickets.issue(signer.key, signer.certificate, {
        "v": 1, "kind": kind, "id": ticket_id or tickets.new_id(), "node": node, "node_serial": certificate["serial"],
        "tk_name": certificate["tk_name"], "vm_id": vm_id, "customer": customer,
        "issued": now, "expires": now + tickets.TTL, **fields})


def customer_of(registry: Registry, vm_id: str, refusal: str) -> str:
    """The key id of the customer whose image vm_id is: what the tickets' key labels bind."""
    owner = registry.image_owner(vm_id)
    if owner is None:
        raise Refused(refusal, f"VM {vm_id} has no owner in the TC's records")
    return str(owner["key_id"])


def settlements(registry: Registry, tc: Identity, migration: dict[str, Any], runtime_pcr: int) -> dict[str, Any]:
    """The settle tickets of an ended migration, one per end, stating its recorded outcome."""
    outcome = {"committed": "commit", "aborted": "abort"}.get(migration["state"])
    if outcome is None:
        raise Refused("migrate.not-settled", f"migration {migration['id']} is {migration['state']}: it has no outcome yet")
    out: dict[str, Any] = {"migration": int(migration["id"]), "outcome": outcome}
    for role, node in (("source", migration["source"]), ("destination", migration["destination"])):
        out[role] = node_ticket(registry, tc, node, migration["vm_id"], "settle", {
            "migration": str(migration["id"]), "outcome": outcome, "role": role, "runtime_pcr": runtime_pcr},
            "migrate.source-unknown")
    return out


def trusted_boot(registry: Registry, node: str, boot: tuple[int, int], reason: str) -> None:
    """Refused (reason) unless node's latest attestation is trusted and from the boot (TPM
    resetCount and restartCount) its runtime evidence comes from. Only a node trusted now, in that
    boot, is believed: software booted since the last trusted quote (tampered, within the quote's
    age) holds the same AK and could extend and quote any event. Both counters: a TPM Restart
    keeps resetCount and clears the PCRs for other software (found in review)."""
    latest = registry.attestations(node, limit=1)
    if not latest or latest[0]["verdict"] != "trusted" or (latest[0]["reset_count"], latest[0]["restart_count"]) != boot:
        raise Refused(reason, f"{node} is not trusted in the boot its evidence comes from (TPM resetCount "
                              f"{boot[0]}, restartCount {boot[1]}): its word proves nothing until it is attested again")


def under_certified_tk(registry: Registry, node: str, event: dict[str, Any]) -> None:
    """Refused (runtime.tk) unless event was done under a ticket for a trusted key the TC
    certified for node. The service honours tickets of the CA pinned with its TK, and an idle
    node may be pinned anew (to move to another TC): an engine that pinned a CA of its own there
    signed itself a ticket bearing the id of one the TC issued, and the TPM recorded, say, the
    VM's arrival under that id (found in review). The TC certifies only TKs pinned to its own CA,
    so the event's TK is what shows the ticket was the TC's."""
    tk = event.get("tk")
    if not isinstance(tk, str) or not registry.certified_tk(node, tk):
        raise Refused("runtime.tk", f"{node}'s TPM records this event under a trusted key the TC never certified "
                                    "there: it was not done on a ticket of this TC")


def end_ticket(registry: Registry, tc: Identity, vm_id: str, node: str, action: str, runtime_pcr: int) -> dict[str, Any]:
    """An end ticket for vm_id on node, if the TC's records put a copy of it there: the VM's stay,
    or a key released there for a launch of it."""
    if action not in END_EVENTS:
        raise Refused("vm.end-action", f"an end ticket powers off or destroys, not {action!r}")
    vm = registry.vm(vm_id)
    if vm is not None and vm["vm_id"] != vm_id:  # a name: tickets name the VM by its id only
        vm = None
    here = vm is not None and vm["node"] == node
    released = any(r["node"] == node for r in registry.releases(vm_id))
    if not here and not released:
        raise Refused("vm.end-not-here", f"the TC's records put no copy of VM {vm_id} on {node}")
    if any(s["state"] == "resuming" for s in registry.suspensions(vm_id)):
        raise Refused("vm.end-resuming", f"VM {vm_id} is being resumed: settle that first (its resume evidence)")
    return node_ticket(registry, tc, node, vm_id, "end", {"action": action, "runtime_pcr": runtime_pcr},
                       "vm.end-node-unknown")


def ended(registry: Registry, tc: Identity, ticket: Any, evidence: Any, runtime_pcr: int) -> dict[str, Any]:
    """Record a VM's end from its node's TPM evidence answering the TC's end ticket: the ticket
    must be the TC's own end ticket, the quote the node's AK's for that ticket over the runtime
    PCR, the VM's last event there its end by that ticket, and the node trusted now in that boot."""
    ca = tc.certificate
    try:
        body = tickets.verify(ticket, ca, now=0)  # a ticket acted on may be reported after its expiry
    except tickets.TicketError as exc:
        raise Refused("vm.end-ticket", f"not an end ticket of this TC: {exc}") from None
    if body.get("kind") != "end":  # (the TC's own end tickets carry an action it knows)
        raise Refused("vm.end-ticket", "not an end ticket of this TC")
    node, vm_id = body["node"], body["vm_id"]
    identity_row = registry.identity(node)
    if identity_row is None:
        raise Refused("vm.end-node-unknown", f"{node} is not enrolled")
    checked = runtime.verify(evidence, identity_row["ak_public"], runtime_pcr, body["id"])
    last = runtime.last_event_of(checked.events, vm_id)
    if last.get("event") != END_EVENTS[body["action"]] or last.get("ticket") != body["id"]:
        raise Refused("vm.end-evidence", f"{node}'s TPM does not show VM {vm_id} ended by this ticket "
                                               "(and not back since)")
    under_certified_tk(registry, node, last)
    # Its VMs stay live in the records until it proves them gone (trusted again, or reset: add_attestation).
    trusted_boot(registry, node, checked.boot, reason="vm.end-boot-untrusted")
    state = END_STATES[body["action"]]
    try:
        recorded = registry.end_vm(vm_id, node, state, float(body["issued"]), audit.entry(
            "vm.end", node, vm_id, state=state, ticket=body["id"], reset_count=checked.reset_count))
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    return {"vm_id": vm_id, "node": node, "state": state if recorded else None, "recorded": recorded}

