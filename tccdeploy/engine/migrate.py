"""Encrypted migration, as the engine carries it out: it relays only ciphertext.

1. A fresh attestation of the destination; the TC checks it is admitted and trusted now and
   issues the migration's two tickets: a fresh Kmig wrapped to the source's TK (migrate-out,
   naming the destination) and, with Kvm, to the destination's (migrate-in). Refused
   otherwise, whoever asks.
2. The source pauses the VM (the switch) and migrates it into its TVMM service, which encrypts
   the stream with STREAM under the ticket's Kmig, the migration's id in its header.
3. The encrypted disk (LUKS qcow2) is copied source -> destination as it is, digest checked.
4. The destination's TPM unwraps Kvm and Kmig; its service authenticates every chunk before
   QEMU sees it, and checks the stream's end.
5. Commit only when the destination runs: the registry moves the VM (one transaction), then the
   source QEMU quits and its disk goes. Any failure before: the destination discards, the
   source resumes. A VM is never lost and never runs twice.
"""

from __future__ import annotations

from typing import Any

from ..coordinator.interface import TC
from ..coordinator.keybroker import Refused
from ..coordinator.records import VMRecord
from .attestation import attest
from .placement import rank
from .runner import Engine, Session

CHUNK = 1 << 20


def copy_disk(source: Session, destination: Session, vm_id: str, sha256: str) -> None:
    """The encrypted disk, source service to destination service through the engine: ciphertext
    only; the destination keeps it only if its digest is the image's."""
    state = destination.tvmm("disk_state", {"vm_id": vm_id})
    if not state["complete"]:
        offset = int(state["partial_size"])
        while True:
            piece = source.tvmm("disk_read", {"vm_id": vm_id, "offset": offset, "size": CHUNK})
            if piece["data"]:
                written = destination.tvmm("disk_write", {"vm_id": vm_id, "offset": offset, "data": piece["data"]})
                offset = int(written["size"])
            if piece["eof"]:
                break
    destination.tvmm("disk_commit", {"vm_id": vm_id, "sha256": sha256}, timeout=300)


def choose_destination(engine: Engine, coordinator: TC, vm: VMRecord) -> str:
    request = coordinator.request_record(vm.request)
    assert request is not None
    hosts = {h.name for h in engine.hosts}
    nodes = [n for n in coordinator.nodes() if n.name in hosts and n.name != vm.node]
    capacities = {h.name: int(h.vars.get("tcc_capacity", 4)) for h in engine.hosts}
    candidates = rank(request.spec, nodes, coordinator.vms(), capacities, coordinator.builds, vm.customer)
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        why = "; ".join(f"{c.node}: {', '.join(c.reasons)}" for c in candidates) or "no other node"
        raise Refused("migrate.no-destination", f"no trusted node can take {vm.name} ({why})")
    return eligible[0].node


def migrate(engine: Engine, coordinator: TC, vm_name: str, destination: str = "auto") -> dict[str, Any]:
    vm = coordinator.vm(vm_name)
    if vm is None or vm.node is None:
        raise Refused("migrate.unknown-vm", f"no VM {vm_name!r}")
    if destination == "auto":
        destination = choose_destination(engine, coordinator, vm)
    hosts = {h.name: h for h in engine.hosts}
    for name in (vm.node, destination):
        if name not in hosts:
            raise Refused("migrate.not-in-inventory", f"{name} is not in the inventory")
    check = engine.run(attest(coordinator), [hosts[destination]])[0]  # a fresh verdict on the destination
    if check.status not in ("ok", "changed"):
        raise Refused("migrate.destination-untrusted", f"{destination} is not trusted now: {check.msg}")
    begin = coordinator.migration_begin(vm.name, destination)
    migration, vm_id = begin["migration"], vm.vm_id
    source, target = engine.session(hosts[vm.node]), engine.session(hosts[destination])
    committed = False
    moved = 0
    try:
        out = source.tvmm("migrate_out_start", {"ticket": begin["out_ticket"]})
        copy_disk(source, target, vm_id, vm.image_sha256)
        target.tvmm("migrate_in_start", {"ticket": begin["in_ticket"]}, timeout=120)
        while True:
            piece = source.tvmm("migrate_out_read", {"vm_id": vm_id}, timeout=120)
            if piece["data"]:
                moved += len(piece["data"]) * 3 // 4
                target.tvmm("migrate_in_data", {"vm_id": vm_id, "data": piece["data"]}, timeout=120)
            if piece["eof"]:
                break
        status = target.tvmm("migrate_in_finish", {"vm_id": vm_id, "resume": out["was_running"]}, timeout=120)
        if out["was_running"] and not status["running"]:
            raise Refused("migrate.not-running", f"the VM is {status['status']} on {destination}")
        coordinator.migration_end(migration, vm_id, commit=True, evidence=status.get("evidence"))
        committed = True
    except BaseException as exc:
        if not committed:
            _roll_back(engine, coordinator, migration, vm_id, vm.node, destination, exc)
        raise
    try:
        source.tvmm("migrate_out_end", {"vm_id": vm_id, "commit": True})
    except Exception:  # noqa: BLE001 - the source is paused after migrating; repair removes it
        pass
    return {"vm": vm.name, "from": vm.node, "to": destination, "migration": migration, "ciphertext_bytes": moved}


def _call_fresh(engine: Engine, node: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Call the service's op on node, on a new connection if the old one died."""
    host = next(h for h in engine.hosts if h.name == node)
    try:
        return engine.session(host).tvmm(op, args)
    except Exception:  # noqa: BLE001 - the service or the connection died: one more try, fresh
        stale = engine.sessions.pop(node, None)
        if stale is not None:
            stale.close()
        return engine.session(host).tvmm(op, args)


def _roll_back(engine: Engine, coordinator: TC, migration: int, vm_id: str, source: str, destination: str,
               exc: BaseException | str) -> None:
    """Destination discards, source resumes; the registry records the abort (the VM never moved)."""
    for node, op, args in ((destination, "migrate_in_discard", {"vm_id": vm_id}),
                           (source, "migrate_out_end", {"vm_id": vm_id, "commit": False})):
        try:
            _call_fresh(engine, node, op, args)
        except Exception:  # noqa: BLE001 - best effort; repair finds what is left
            pass
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    coordinator.migration_end(migration, vm_id, commit=False, reason=reason)


def repair(engine: Engine, coordinator: TC) -> list[dict[str, Any]]:
    """Finish or roll back migrations an interrupted run left 'started'.

    The destination runs the VM only after it took the whole, authenticated stream: if it runs,
    the migration is committed and the source removed; otherwise it is rolled back."""
    out = []
    for row in coordinator.migrations("started"):
        vm_id, source, destination = row.vm_id, row.source, row.destination
        try:
            status = _call_fresh(engine, destination, "vm_control", {"vm_id": vm_id, "action": "status"})["status"]
        except Exception:  # noqa: BLE001 - not running there (or unreachable): roll back
            status = "absent"
        evidence = None
        if status == "running" and row.in_ticket:
            try:  # the destination's TPM on what it did: the TC commits only on that
                evidence = _call_fresh(engine, destination, "runtime_log",
                                       {"runtime_pcr": coordinator.runtime_pcr(), "ticket": row.in_ticket})["evidence"]
            except Exception:  # noqa: BLE001 - no evidence: it cannot be committed
                evidence = None
        if status == "running" and evidence is not None:
            try:
                coordinator.migration_end(row.id, vm_id, commit=True, reason="repair: destination running",
                                          evidence=evidence)
            except Refused as exc:  # the TC does not believe it arrived: undo it
                _roll_back(engine, coordinator, row.id, vm_id, source, destination, f"repair: {exc.reason}")
                out.append({"migration": row.id, "vm_id": vm_id, "action": "rolled back", "node": source})
                continue
            try:
                _call_fresh(engine, source, "migrate_out_end", {"vm_id": vm_id, "commit": True})
            except Exception:  # noqa: BLE001
                pass
            out.append({"migration": row.id, "vm_id": vm_id, "action": "committed", "node": destination})
        else:
            _roll_back(engine, coordinator, row.id, vm_id, source, destination, f"repair: destination {status}")
            out.append({"migration": row.id, "vm_id": vm_id, "action": "rolled back", "node": source})
    return out


def drain(engine: Engine, coordinator: TC, node: str) -> list[dict[str, Any]]:
    """Move every VM off node (maintenance), one at a time, each to a trusted node placement picks."""
    out = []
    for vm in [v for v in coordinator.vms() if v.node == node and v.state == "running"]:
        try:
            moved = migrate(engine, coordinator, vm.name, "auto")
            out.append({"vm": vm.name, "result": f"moved to {moved['to']}", "ok": True})
        except Exception as exc:  # noqa: BLE001 - reported; the VM still runs where it was
            out.append({"vm": vm.name, "result": f"not moved: {exc}", "ok": False})
    return out
