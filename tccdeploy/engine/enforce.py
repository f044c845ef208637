"""Enforcement: trust is kept, not checked once.

A round re-attests every admitted node in parallel with fresh nonces. A node that fails (a
changed boot, a build revoked in the manifests, outside the perimeter) is quarantined by the TC
as it records the verdict; a node unreachable for longer than the policy's grace period is
quarantined too. Then the VMs on quarantined nodes are handled by the perimeter's policy:

    stop        power the VM off (QEMU quits: its memory is gone; the disk stays encrypted)
    evacuate    migrate it to a trusted node (encrypted); if that fails, power it off (fail closed)
    quarantine  leave it, and report it

A round also finishes or rolls back migrations an interrupted run left behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..coordinator.interface import TC
from ..coordinator.refusals import Refused
from .attestation import attest
from .lifecycle import end_vm
from .migrate import migrate, repair
from .runner import Engine, HostResult, Session


@dataclass
class Report:
    attested: list[HostResult] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    vms: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"attested": [r.as_dict() for r in self.attested], "quarantined": self.quarantined, "vms": self.vms,
                "elapsed": round(self.elapsed, 3)}


def enforce_round(engine: Engine, coordinator: TC, only: set[str] | None = None) -> Report:
    """One round over every admitted node of the engine's inventory (or only those named)."""
    start = time.monotonic()
    report = Report()
    try:
        report.vms += [_repaired(coordinator, item) for item in repair(engine, coordinator)]
    except Exception:  # noqa: BLE001 - repair is retried next round; enforcement must go on
        pass
    grace = coordinator.grace_period()
    hosts = {h.name: h for h in engine.hosts}
    admitted = [n.name for n in coordinator.nodes() if n.state == "admitted" and (only is None or n.name in only)]
    before = set(admitted)
    for name in admitted:
        if name not in hosts and only is None:
            if coordinator.quarantine(name, "node.not-in-inventory"):
                report.quarantined.append({"node": name, "reason": "node.not-in-inventory"})
    report.attested = engine.run(attest(coordinator), [hosts[n] for n in admitted if n in hosts],
                                 label="enforcement round: re-attesting")
    unreachable: dict[str, str] = {}
    for result in report.attested:
        if result.status == "unreachable":
            last = coordinator.last_trusted_time(result.host)
            if last is None or time.time() - last > grace:
                coordinator.quarantine(result.host, "node.unreachable")
                unreachable[result.host] = f"node.unreachable ({result.reason})"
    for name in before:
        row = coordinator.node(name)
        if row and row.state == "quarantined":
            reason = unreachable.get(name) or next((r.reason for r in report.attested if r.host == name), "") \
                or "node.not-in-inventory"
            if not any(q["node"] == name for q in report.quarantined):
                report.quarantined.append({"node": name, "reason": reason})
    for entry in report.quarantined:
        report.vms += handle_vms(engine, coordinator, entry["node"], hosts)
    report.elapsed = time.monotonic() - start
    return report


def _repaired(coordinator: TC, item: dict[str, Any]) -> dict[str, Any]:
    """A repaired migration as a VM outcome of the round, in the shape of handle_vms' (the VM by
    name, its node, the result), which the CLI and the playbook module print."""
    record = coordinator.vm(item["vm_id"])
    return {"vm": record.name if record is not None else item["vm_id"], "vm_id": item["vm_id"], "node": item["node"],
            "migration": item["migration"], "result": f"interrupted migration {item['action']}"}


def handle_vms(engine: Engine, coordinator: TC, node: str, hosts: dict) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    action = coordinator.on_failure()
    out = []
    for vm in [v for v in coordinator.vms() if v.node == node and v.state in ("running", "starting", "stopped")]:
        outcome = {"vm": vm.name, "vm_id": vm.vm_id, "node": node, "policy": action}
        if action == "quarantine":
            outcome["result"] = "left running (policy quarantine)"
            coordinator.record_enforcement(node, vm.vm_id, action, outcome["result"])
            out.append(outcome)
            continue
        if action == "evacuate" and vm.state == "running":
            try:
                moved = migrate(engine, coordinator, vm.name, "auto")
                outcome["result"] = f"evacuated to {moved['to']}"
                coordinator.record_enforcement(node, vm.vm_id, action, outcome["result"])
                out.append(outcome)
                continue
            except Exception as exc:  # noqa: BLE001 - fall back to powering it off
                outcome["evacuation_error"] = str(exc)
        # The VM must not keep running on an untrusted node (fail closed).
        try:
            host = hosts[node]
            engine.sessions.pop(node, None)
            ended = _power_off(engine.session(host), coordinator, vm.vm_id, node)
            failed = f" (evacuation failed: {outcome.get('evacuation_error')})" if "evacuation_error" in outcome else ""
            outcome["result"] = "powered off" + failed + ended
        except Exception as exc:  # noqa: BLE001 - an unreachable node: the TC releases nothing to it anyway
            outcome["result"] = f"could not reach the node to stop it: {exc}"
        coordinator.record_enforcement(node, vm.vm_id, action, outcome["result"])
        out.append(outcome)
    return out


def _power_off(session: Session, coordinator: TC, vm_id: str, node: str) -> str:
    """Power the VM off through its node's service; what the TC made of the node's evidence. A node
    that is not trusted now is not believed (its VM stays live in the records until the node is
    trusted again or rebooted): the power-off still happens."""
    try:
        end_vm(session, coordinator, vm_id, node, "poweroff")
    except Refused as exc:
        return f"; the TC keeps it live until {node} proves it gone ({exc.reason})"
    return ""
