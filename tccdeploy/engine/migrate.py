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
5. The destination holds the VM paused with its TPM's evidence of the arrival; the TC commits
   on that evidence (the registry moves the VM in one transaction) and answers with a settle
   ticket for each end: the destination runs, the source QEMU quits and its disk goes. Any
   failure before: the TC records the abort, the destination drops its copy, the source
   resumes. Each end moves only on the TC's settle ticket, so a VM never runs twice, whatever
   the engine does; and it is never lost (`vms --repair` settles what a crash left).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from .. import progress
from ..coordinator.interface import TC
from ..coordinator.keybroker import Refused
from ..coordinator.records import VMRecord
from .attestation import attest
from .placement import rank
from .runner import Engine, Session


def copy_disk(source: Session, destination: Session, vm_id: str, sha256: str, what: str = "disk") -> None:
    """The encrypted disk (or a suspended VM's saved state), source service to destination service
    through the engine: ciphertext only; the destination keeps it only if its digest is sha256."""
    kind = {"what": what} if what != "disk" else {}
    state = destination.tvmm("disk_state", {"vm_id": vm_id, **kind})
    if not state["complete"]:
        offset = int(state["partial_size"])
        stream = source.tvmm_stream_from("disk_send", {"vm_id": vm_id, "offset": offset, **kind}, timeout=300)
        with progress.transfer(f"copy {what} {source.host.name} -> {destination.host.name}", None) as advance:
            def counted() -> Generator[bytes, None, None]:
                for piece in stream:
                    advance(len(piece))
                    yield piece

            pieces = counted()
            try:  # as it comes, source service to destination service; a cut copy resumes from disk_state
                destination.tvmm_stream_to("disk_receive", pieces, {"vm_id": vm_id, "offset": offset, **kind}, timeout=300)
            finally:
                pieces.close()
        if stream.outcome is None:
            raise Refused("migrate.stream", f"the source's copy of {vm_id}'s {what} ended before its end")
    destination.tvmm("disk_commit", {"vm_id": vm_id, "sha256": sha256, **kind}, timeout=300)


def relay(source: Session, target: Session, vm_id: str, label: str) -> int:
    """The migration stream, source service to destination service, as it comes: blocks of
    ciphertext between two SSH channels (node.protocol), no base64 and no round trip per piece.
    The engine sees only ciphertext; the destination authenticates every chunk. Returns the
    ciphertext's size."""
    stream = source.tvmm_stream_from("migrate_out_stream", {"vm_id": vm_id}, timeout=120)
    with progress.transfer(label, None) as advance:
        def counted() -> Generator[bytes, None, None]:
            for piece in stream:
                advance(len(piece))
                yield piece

        pieces = counted()
        try:
            target.tvmm_stream_to("migrate_in_stream", pieces, {"vm_id": vm_id}, timeout=120)
        finally:
            pieces.close()  # a destination that refused early: the source's channel is closed, not left mid-stream
    if stream.outcome is None:
        raise Refused("migrate.stream", f"the source's stream of {vm_id} ended before its end")
    return stream.bytes


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
    begin = coordinator.migration_begin(vm.vm_id, destination)
    migration, vm_id = begin["migration"], vm.vm_id
    source, target = engine.session(hosts[vm.node]), engine.session(hosts[destination])
    committed = False
    try:
        out = source.tvmm("migrate_out_start", {"ticket": begin["out_ticket"]})
        copy_disk(source, target, vm_id, vm.image_sha256)
        target.tvmm("migrate_in_start", {"ticket": begin["in_ticket"]}, timeout=120)
        began = time.monotonic()
        moved = relay(source, target, vm_id, f"migrate {vm.name} {vm.node} -> {destination}")
        streamed = time.monotonic() - began
        status = target.tvmm("migrate_in_finish", {"vm_id": vm_id}, timeout=120)
        settled = coordinator.migration_end(migration, vm_id, commit=True, evidence=status.get("evidence"))
        committed = True
    except BaseException as exc:
        if not committed:
            _roll_back(engine, coordinator, migration, vm_id, vm.node, destination, exc)
        raise
    outcome = settle(engine, settled, vm_id, resume=out["was_running"])
    if out["was_running"] and not outcome.get("running"):
        raise Refused("migrate.not-running", f"{vm.name} moved to {destination} but is not running there: "
                                             f"{outcome.get('error') or outcome.get('status')}")
    return {"vm": vm.name, "from": vm.node, "to": destination, "migration": migration, "ciphertext_bytes": moved,
            "stream_seconds": round(streamed, 3)}


def settle(engine: Engine, settled: dict[str, Any], vm_id: str, resume: bool = True,
           ends: tuple[str, ...] = ("destination", "source")) -> dict[str, Any]:
    """Carry the TC's settle tickets to the migration's ends (destination first: on a commit the
    VM runs again sooner; on an abort the copy is dropped before the source resumes). Best
    effort: an end left unsettled stays paused until `vms --repair` brings it its ticket."""
    result: dict[str, Any] = {}
    for role in ends:
        ticket = settled[role]
        node = ticket["ticket"]["node"]
        try:
            if role == "destination":
                answer = _call_fresh(engine, node, "migrate_in_settle", {"vm_id": vm_id, "ticket": ticket,
                                                                         "resume": resume})
                result.update(status=answer.get("status"), running=answer.get("running"))
            else:
                _call_fresh(engine, node, "migrate_out_end", {"vm_id": vm_id, "ticket": ticket})
        except Exception as exc:  # noqa: BLE001 - left for repair; the TC's outcome stands
            result.setdefault("error", f"{node}: {exc}")
    return result


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
    """The TC records the abort (the VM never moved); its settle tickets then drop the
    destination's copy and resume the source."""
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    settled = coordinator.migration_end(migration, vm_id, commit=False, reason=reason)
    settle(engine, settled, vm_id)


REPAIR_LEASE = 120.0  # seconds: a repair leases the migration's source while it decides it


def _repair_one(engine: Engine, coordinator: TC, row: Any) -> dict[str, Any]:
    """Commit a started migration on the destination's evidence, else abort it; settle both ends."""
    vm_id, source, destination = row.vm_id, row.source, row.destination
    try:
        status = _call_fresh(engine, destination, "vm_status", {"vm_id": vm_id})["status"]
    except Exception:  # noqa: BLE001 - not there (or unreachable): it cannot be committed
        status = "absent"
    evidence = None
    if status in ("paused", "running") and row.in_ticket:
        try:  # the destination's TPM on what it did: the TC commits only on that
            evidence = _call_fresh(engine, destination, "runtime_log",
                                   {"runtime_pcr": coordinator.runtime_pcr(), "ticket": row.in_ticket})["evidence"]
        except Exception:  # noqa: BLE001 - no evidence: it cannot be committed
            evidence = None
    settled = None
    if evidence is not None:
        try:
            settled = coordinator.migration_end(row.id, vm_id, commit=True, reason="repair: destination holds it",
                                                evidence=evidence)
        except Refused as exc:  # the TC does not believe it arrived: abort
            status = exc.reason
    if settled is None:
        settled = coordinator.migration_end(row.id, vm_id, commit=False, reason=f"repair: destination {status}")
    settle(engine, settled, vm_id)
    return {"migration": row.id, "vm_id": vm_id, "action": "committed" if settled["outcome"] == "commit"
            else "rolled back", "node": destination if settled["outcome"] == "commit" else source}


def repair(engine: Engine, coordinator: TC, held: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Decide the migrations an interrupted run left 'started', and settle the ends of decided
    ones that never got their ticket.

    A started migration commits only on the destination TPM's evidence that the VM arrived
    through its ticket (the TC checks it); otherwise it is aborted. Either way, each end then
    gets the TC's settle ticket. A migration whose source another engine leases is that engine's
    (it is under way, not interrupted): left alone, and the TC would refuse to end it (node.leased).
    held: the sources this engine leases already (its round's), decided under that lease; any
    other source is leased for the repair and given back after it."""
    out = []
    hosts = {h.name for h in engine.hosts}
    for row in coordinator.migrations("started"):
        if row.source in held:
            out.append(_repair_one(engine, coordinator, row))
            continue
        if row.source not in coordinator.lease_nodes([row.source], REPAIR_LEASE)["granted"]:
            continue
        try:
            out.append(_repair_one(engine, coordinator, row))
        finally:
            try:
                coordinator.release_leases([row.source])
            except Exception:  # noqa: BLE001 - it runs out by itself
                pass
    # Decided migrations whose ends may still wait for their ticket (the run died in between).
    last: dict[str, Any] = {}
    for row in coordinator.migrations():
        if row.state != "started":
            last[row.vm_id] = row
    for vm_id, row in last.items():
        for role, node in (("destination", row.destination), ("source", row.source)):
            if node not in hosts:
                continue
            try:
                pending = _call_fresh(engine, node, "vm_status", {"vm_id": vm_id}).get("migration")
            except Exception:  # noqa: BLE001 - unreachable: next repair
                continue
            if pending and str(pending.get("migration")) == str(row.id) and pending.get("role") == role:
                settled = coordinator.migration_settlement(row.id)
                settle(engine, settled, vm_id, ends=(role,))
                out.append({"migration": row.id, "vm_id": vm_id, "action": f"settled {role} ({settled['outcome']})",
                            "node": node})
    return out


def drain(engine: Engine, coordinator: TC, node: str) -> list[dict[str, Any]]:
    """Move every VM off node (maintenance), one at a time, each to a trusted node placement picks."""
    out = []
    for vm in [v for v in coordinator.vms() if v.node == node and v.state == "running"]:
        try:
            moved = migrate(engine, coordinator, vm.vm_id, "auto")  # by id: another VM may share its name
            out.append({"vm": vm.name, "result": f"moved to {moved['to']}", "ok": True})
        except Exception as exc:  # noqa: BLE001 - reported; the VM still runs where it was
            out.append({"vm": vm.name, "result": f"not moved: {exc}", "ok": False})
    return out
