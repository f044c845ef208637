"""Ending a VM's copy on a node, as the engine carries it: the TC's end ticket to the node's
TVMM service, the service's TPM evidence back to the TC, which alone decides the VM is gone."""

from __future__ import annotations

from typing import Any

from ..coordinator.interface import TC
from .runner import Session


def end_vm(session: Session, coordinator: TC, vm_id: str, node: str, action: str) -> dict[str, Any]:
    """Power off (memory gone, encrypted disk kept) or destroy (disk gone too) the copy of vm_id
    on node, and have the TC record it from the node's evidence. Returns the service's answer
    with the TC's record ("recorded": the TC's VM row changed)."""
    ticket = coordinator.vm_end_ticket(vm_id, node, action)
    result = session.tvmm("vm_end", {"ticket": ticket})
    recorded = coordinator.vm_ended(ticket, result["evidence"])
    return {k: v for k, v in result.items() if k != "evidence"} | {"recorded": recorded.get("recorded", False),
                                                                   "state": recorded.get("state")}
