"""Suspension, as the TC decides it: a VM's state saved on its node under a Ksus only the TC
holds, and resumed once, through a resume ticket, on an admitted, trusted node.

The TC makes Ksus, keeps it wrapped to its own key-wrapping key, and sends it wrapped to the
node's TK in the suspend ticket; it records the VM suspended only on the node's TPM evidence
(`suspended`, with the saved state's digest). A resume ticket carries Kvm and Ksus to one node
the TC checked as it checks a key release (admitted, freshly trusted, approved build, the VM's
constraints); the registry lets a suspension go to one node only (a retry goes to the same
node, whose service resumes a suspension once), and the VM runs again in the records only on
that node's `resumed` evidence.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509

from ..crypto import ticket as tickets
from ..crypto import wrap
from ..manifest.models import Perimeter
from . import audit, keybroker, runtime
from .identity import Identity
from .lifecycle import customer_of, node_ticket, trusted_boot, under_certified_tk
from .references import Baseline
from .refusals import Refused
from .store import Conflict, Registry


def _ksus_label(vm_id: str, suspend_ticket: str) -> bytes:
    """The label Ksus is kept under at the TC (wrapped to its own key): this VM's suspension."""
    return b"tccdeploy-ksus:" + f"{vm_id}:{suspend_ticket}".encode()




def begin(registry: Registry, tc: Identity, vm_name: str, runtime_pcr: int) -> dict[str, Any]:
    """Record a suspension of a running VM and issue its suspend ticket (a fresh Ksus wrapped to
    the VM's node's TK)."""
    vm = registry.vm(vm_name)
    if vm is None or vm["node"] is None:
        raise Refused("suspend.unknown-vm", f"no VM {vm_name!r}")
    certificate = registry.last_certificate(vm["node"])
    if certificate is None:
        raise Refused("suspend.node-unknown", f"{vm['node']} holds no trusted key the TC certified")
    ksus = secrets.token_bytes(32)
    ticket_id = tickets.new_id()
    kept = base64.b64encode(wrap.wrap(tc.wrap_certificate.public_key(), ksus,  # type: ignore[arg-type]
                                      _ksus_label(vm["vm_id"], ticket_id))).decode()
    try:
        suspension = registry.start_suspension(
            vm["vm_id"], vm["node"], kept, ticket_id,
            audit.entry("suspension.start", vm["node"], vm["vm_id"], ticket=ticket_id))
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    public = x509.load_pem_x509_certificate(certificate["pem"].encode()).public_key()
    customer = customer_of(registry, vm["vm_id"], "suspend.node-unknown")
    ticket = node_ticket(registry, tc, vm["node"], vm["vm_id"], "suspend", {
        "suspension": str(suspension), "runtime_pcr": runtime_pcr,
        "ksus": base64.b64encode(wrap.wrap(public, ksus, tickets.label(  # type: ignore[arg-type]
            "suspend", "ksus", vm["vm_id"], customer, ticket_id))).decode()}, "suspend.node-unknown", ticket_id)
    del ksus
    return {"suspension": suspension, "vm_id": vm["vm_id"], "node": vm["node"], "ticket": ticket}


def end(registry: Registry, suspension_id: int, evidence: Any, runtime_pcr: int, saved: bool = True) -> dict[str, Any]:
    """The VM is suspended, on its node's TPM evidence for the suspend ticket (saved), or the
    suspension is dropped (not saved: the VM still runs where it was)."""
    row = registry.suspension(suspension_id)
    if row is None:
        raise Refused("suspend.unknown", f"no suspension {suspension_id}")
    digest = None
    if saved:
        identity_row = registry.identity(row["node"])
        if identity_row is None:
            raise Refused("suspend.node-unknown", f"{row['node']} is not enrolled")
        checked = runtime.verify(evidence, identity_row["ak_public"], runtime_pcr, row["suspend_ticket"])
        last = runtime.last_event_of(checked.events, row["vm_id"])
        if last.get("event") != "suspended" or last.get("ticket") != row["suspend_ticket"] \
                or not isinstance(last.get("state_sha256"), str) or len(last["state_sha256"]) != 64:
            raise Refused("suspend.evidence-event", f"{row['node']}'s TPM does not show the VM saved by this suspension")
        under_certified_tk(registry, row["node"], last)
        trusted_boot(registry, row["node"], checked.boot, reason="suspend.evidence-boot")
        digest = last["state_sha256"]
    try:
        registry.end_suspension(suspension_id, saved, digest, audit.entry(
            "suspension.saved" if saved else "suspension.abort", row["node"], row["vm_id"], suspension=suspension_id,
            state_sha256=digest))
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    return {"suspension": suspension_id, "vm_id": row["vm_id"], "state": "suspended" if saved else "aborted"}


def resume_ticket(registry: Registry, tc: Identity, perimeter: Perimeter, baseline: Baseline, vm_name: str,
                  node: str | None, capacity_of: Callable[[str], int | None]) -> dict[str, Any]:
    """A resume ticket for the VM's open suspension, to node (default: where it was suspended),
    if node may have the VM's key now; once per suspension, on one node. capacity_of: the
    roster's VM limit of the node it goes to, asked once that node is chosen (asked only for a
    named node, a resume to the default one skipped the limit: found in review)."""
    vm = registry.vm(vm_name)
    if vm is None or vm["state"] != "suspended":
        raise Refused("suspend.not-suspended", f"VM {vm_name!r} is not suspended")
    open_rows = [s for s in registry.suspensions(vm["vm_id"]) if s["state"] in ("suspended", "resuming")]
    if not open_rows:
        raise Refused("suspend.not-suspended", f"VM {vm_name!r} has no saved state to resume")
    row = open_rows[-1]
    target = node or row["resume_node"] or row["node"]
    request = registry.request(vm["request"])
    assert request is not None
    customer = customer_of(registry, vm["vm_id"], "suspend.node-unknown")
    ticket_id = tickets.new_id()
    _, certificate, rewrapped, guard = keybroker.rewrap_for(
        registry, tc, perimeter, baseline, request, target, capacity_of(target),
        tickets.label("resume", "kvm", vm["vm_id"], customer, ticket_id))
    try:
        registry.resuming(int(row["id"]), target, ticket_id, audit.entry(
            "suspension.resume", target, vm["vm_id"], suspension=int(row["id"]), ticket=ticket_id,
            certificate_serial=certificate["serial"]), guard)
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    ksus = wrap.unwrap(tc.wrap_key, base64.b64decode(row["ksus"]), _ksus_label(vm["vm_id"], row["suspend_ticket"]))
    public = x509.load_pem_x509_certificate(certificate["pem"].encode()).public_key()
    spec = request["spec"]
    ticket = node_ticket(registry, tc, target, vm["vm_id"], "resume", {
        "suspension": str(row["id"]), "name": vm["name"], "image_sha256": vm["image_sha256"],
        "vcpus": int(spec["vcpus"]), "memory_mib": int(spec["memoryMiB"]), "state_sha256": row["state_sha256"],
        "kvm": base64.b64encode(rewrapped).decode(), "runtime_pcr": perimeter.attestation.runtime_pcr,
        "ksus": base64.b64encode(wrap.wrap(public, ksus, tickets.label(  # type: ignore[arg-type]
            "resume", "ksus", vm["vm_id"], customer, ticket_id))).decode()}, "suspend.node-unknown", ticket_id)
    del ksus
    return {"suspension": int(row["id"]), "vm_id": vm["vm_id"], "node": target, "ticket": ticket,
            "from": row["node"], "state_sha256": row["state_sha256"]}


def resumed(registry: Registry, suspension_id: int, evidence: Any, runtime_pcr: int) -> dict[str, Any]:
    """The VM runs again, on the resume node's TPM evidence for its resume ticket."""
    row = registry.suspension(suspension_id)
    if row is None or row["state"] != "resuming" or not row["resume_ticket"]:
        raise Refused("suspend.not-resuming", f"suspension {suspension_id} is not being resumed")
    identity_row = registry.identity(row["resume_node"])
    if identity_row is None:
        raise Refused("suspend.node-unknown", f"{row['resume_node']} is not enrolled")
    checked, quoted_for = None, ""
    for quoted_for in str(row["resume_ticket"]).split():  # a retry on the same node adds a ticket: any of them
        try:
            checked = runtime.verify(evidence, identity_row["ak_public"], runtime_pcr, quoted_for)
            break
        except Refused as exc:
            if exc.reason != "runtime.nonce":
                raise
    if checked is None:
        raise Refused("runtime.nonce", "the runtime quote was not made for any resume ticket of this suspension")
    last = runtime.last_event_of(checked.events, row["vm_id"])
    if last.get("event") != "resumed" or last.get("ticket") != quoted_for:
        raise Refused("suspend.evidence-event", f"{row['resume_node']}'s TPM does not show the VM resumed by this ticket")
    under_certified_tk(registry, row["resume_node"], last)
    trusted_boot(registry, row["resume_node"], checked.boot, reason="suspend.evidence-boot")
    try:
        registry.resumed(suspension_id, checked.reset_count, audit.entry(
            "suspension.resumed", row["resume_node"], row["vm_id"], suspension=suspension_id))
    except Conflict as exc:
        raise Refused(exc.reason, str(exc)) from None
    return {"suspension": suspension_id, "vm_id": row["vm_id"], "node": row["resume_node"], "state": "running"}

