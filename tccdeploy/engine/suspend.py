"""Suspend and resume, as the engine carries them: tickets from the TC to the node's service, the
service's TPM evidence back; the engine moves only ciphertext (the saved state, the disk).

1. suspend: the TC's suspend ticket (a fresh Ksus for the node's TK) to the VM's node; the
   service saves the VM's state under Ksus on the node's disk and QEMU quits; the TC records
   the VM suspended on the TPM's evidence.
2. resume: the TC's resume ticket (Kvm and Ksus for the TK of a node it checked as for a key
   release) to that node, after copying the disk and the saved state there if it is another
   node; the service resumes the VM once; the TC records it running on the TPM's evidence.
"""

from __future__ import annotations

from typing import Any

from ..coordinator.interface import TC
from ..coordinator.keybroker import Refused
from .attestation import attest
from .migrate import copy_disk
from .runner import Engine, Session


def _session(engine: Engine, node: str) -> Session:
    host = next((h for h in engine.hosts if h.name == node), None)
    if host is None:
        raise Refused("suspend.not-in-inventory", f"{node} is not in the inventory")
    return engine.session(host)


def _fresh(engine: Engine, node: str) -> Session:
    """A new connection to node's service (the old one may have died with the call)."""
    stale = engine.sessions.pop(node, None)
    if stale is not None:
        stale.close()
    return _session(engine, node)


def suspend(engine: Engine, coordinator: TC, vm_name: str) -> dict[str, Any]:
    """Save a running VM's state on its node (encrypted under the TC's Ksus) and stop it."""
    begun = coordinator.suspend_begin(vm_name)
    session = _session(engine, begun["node"])
    try:
        saved = session.tvmm("vm_suspend", {"ticket": begun["ticket"]}, timeout=300)
    except Exception as failure:
        # The answer is lost, or the node did not save it: its TPM says which. Saved: the TC
        # records it (nothing is lost); not saved: the TC drops the suspension, the VM runs on.
        body = begun["ticket"]["ticket"]
        try:
            fresh = _fresh(engine, begun["node"])
            evidence = fresh.tvmm("runtime_log", {"runtime_pcr": body["runtime_pcr"], "ticket": body["id"]})["evidence"]
            coordinator.suspend_end(begun["suspension"], evidence)
        except Exception:  # noqa: BLE001 - no evidence of a save
            coordinator.suspend_end(begun["suspension"], None, saved=False)
            raise failure from None
        return {"vm": vm_name, "node": begun["node"], "suspension": begun["suspension"], "bytes": 0,
                "state_sha256": None, "recovered": True}
    coordinator.suspend_end(begun["suspension"], saved["evidence"])
    return {"vm": vm_name, "node": begun["node"], "suspension": begun["suspension"], "bytes": saved["bytes"],
            "state_sha256": saved["state_sha256"]}


def resume(engine: Engine, coordinator: TC, vm_name: str, node: str | None = None) -> dict[str, Any]:
    """Resume a suspended VM on node (default: where it was suspended), once."""
    if node is not None:
        host = next((h for h in engine.hosts if h.name == node), None)
        if host is None:
            raise Refused("suspend.not-in-inventory", f"{node} is not in the inventory")
        check = engine.run(attest(coordinator), [host])[0]  # the TC checks a fresh verdict, as for a release
        if check.status not in ("ok", "changed"):
            raise Refused("resume.node-untrusted", f"{node} is not trusted now: {check.msg}")
    ticket = coordinator.resume_begin(vm_name, node)
    body = ticket["ticket"]["ticket"]
    target = _session(engine, ticket["node"])
    if ticket["node"] != ticket["from"]:  # the disk and the saved state, as ciphertext, to the other node
        source = _session(engine, ticket["from"])
        copy_disk(source, target, body["vm_id"], body["image_sha256"])
        copy_disk(source, target, body["vm_id"], ticket["state_sha256"], what="state")
    answer = target.tvmm("vm_resume", {"ticket": ticket["ticket"]}, timeout=300)
    coordinator.resume_end(ticket["suspension"], answer["evidence"])
    return {"vm": vm_name, "node": ticket["node"], "suspension": ticket["suspension"], "running": answer["running"]}
