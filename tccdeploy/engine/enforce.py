"""Enforcement: trust is kept, not checked once.

A round re-attests every admitted node in parallel with fresh nonces. A node that fails (a
changed boot, a build revoked in the manifests, outside the perimeter) is quarantined by the TC
as it records the verdict; a node unreachable for longer than the policy's grace period is
quarantined too. Then the VMs on quarantined nodes are handled by the perimeter's policy:

    stop        power the VM off (QEMU quits: its memory is gone; the disk stays encrypted)
    evacuate    migrate it to a trusted node (encrypted); if that fails, power it off (fail closed)
    quarantine  leave it, and report it

A round also finishes or rolls back migrations an interrupted run left behind.

Several engines may share a fleet, each enforcing a shard of it (`--shard K/N`: the nodes whose
name hashes to K of N) or an overlapping one. Each round first leases its nodes from the TC for
the round; a node another engine leases is left to that engine (the TC refuses a second engine's
quarantine or migration of it: node.leased), so no node is acted on twice at once.
"""

from __future__ import annotations

import hashlib
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
    leased: list[dict[str, str]] = field(default_factory=list)  # nodes another engine leases: left to it
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"attested": [r.as_dict() for r in self.attested], "quarantined": self.quarantined, "vms": self.vms,
                "leased": self.leased, "elapsed": round(self.elapsed, 3)}


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N): this engine's shard of N."""
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(k) <= int(n):
        raise ValueError(f"--shard {text!r}: give K/N with 1 <= K <= N, e.g. --shard 1/2 and --shard 2/2 for two "
                         "engines that split the fleet")
    return int(k), int(n)


def in_shard(node: str, shard: tuple[int, int] | None) -> bool:
    """Whether node falls in shard K/N: by its name's SHA-256, so every engine places it alike
    and the shards of N split any fleet about evenly."""
    if shard is None:
        return True
    k, n = shard
    return int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big") % n == k - 1


def lease_seconds(interval: float) -> float:
    """How long a round's leases last: two intervals (a round that runs long keeps them), at
    least a minute, at most what the TC grants."""
    return min(max(2 * interval, 60.0), 600.0)


def enforce_round(engine: Engine, coordinator: TC, only: set[str] | None = None,
                  shard: tuple[int, int] | None = None) -> Report:
    """One round over every admitted node of the engine's inventory (or only those named, or
    only its shard) that it can lease for the round."""
    start = time.monotonic()
    report = Report()
    grace = coordinator.grace_period()
    hosts = {h.name: h for h in engine.hosts}
    candidates = [n.name for n in coordinator.nodes()
                  if n.state == "admitted" and (only is None or n.name in only) and in_shard(n.name, shard)]
    leases = coordinator.lease_nodes(candidates, lease_seconds(coordinator.enforce_interval())) if candidates else \
        {"granted": {}, "held": {}}
    report.leased = [{"node": node, "engine": str(held["engine"])} for node, held in sorted(leases["held"].items())]
    admitted = [n for n in candidates if n in leases["granted"]]
    try:  # after the round's leases: a source it leases is repaired under that lease, not given back
        report.vms += [_repaired(coordinator, item) for item in repair(engine, coordinator, frozenset(admitted))]
    except Exception:  # noqa: BLE001 - repair is retried next round; enforcement must go on
        pass
    try:
        _round(engine, coordinator, report, hosts, admitted, grace, whole=only is None)
    finally:
        if admitted:
            try:
                coordinator.release_leases(admitted)
            except Exception:  # noqa: BLE001 - they run out by themselves
                pass
    report.elapsed = time.monotonic() - start
    return report


def _round(engine: Engine, coordinator: TC, report: Report, hosts: dict, admitted: list[str],  # type: ignore[type-arg]
           grace: float, whole: bool) -> None:
    """The round over the nodes this engine leased."""
    before = set(admitted)
    for name in admitted:
        if name not in hosts and whole:
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
                moved = migrate(engine, coordinator, vm.vm_id, "auto")  # by id: another VM may share its name
                outcome["result"] = f"evacuated to {moved['to']}"
                coordinator.record_enforcement(node, vm.vm_id, action, outcome["result"])
                out.append(outcome)
                continue
            except Refused as exc:
                if exc.reason == "node.leased":  # another engine's round has the node now: its to handle
                    outcome["result"] = f"left to the engine that leases {node} ({exc})"
                    out.append(outcome)
                    continue
                outcome["evacuation_error"] = str(exc)
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
