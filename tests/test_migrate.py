"""Encrypted migration on the lab with real QEMU: state kept, untrusted destinations refused,
and every failure before the commit leaves exactly one running copy."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path

import pytest

from tccdeploy.coordinator import audit
from tccdeploy.coordinator.keybroker import Refused
from tccdeploy.engine import migrate as migrating
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.enforce import enforce_round
from tccdeploy.engine.launch import launch
from tccdeploy.engine.lifecycle import end_vm
from tccdeploy.engine.runner import Engine, Session
from tccdeploy.lab import procs
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory
from tccdeploy.tvmm.qmp import QMP

from .labvms import kill_everywhere
from .tcworld import coordinator_with_customer, sealed_request  # noqa: E402

pytestmark = pytest.mark.slow
IVT, IVT_SIZE = 0x0, 1024  # the real-mode interrupt vector table


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory):
    root = tmp_path_factory.mktemp("migrate")
    tc, state = coordinator_with_customer(lab, root)
    (root / "disk.raw").write_bytes(bytes(2 * 1024 * 1024))
    engine = Engine(load_inventory(lab.inventory_dir).select("node1,node2,node3,node4,outside1"), state=state)
    engine.run(enroll(tc))
    engine.run(attest(tc, admit_nodes=True))

    class World:
        pass

    w = World()
    w.root, w.tc, w.engine, w.state, w.lab = root, tc, engine, state, lab
    yield w
    for vm in tc.registry.vms():
        kill_everywhere(lab, vm["vm_id"])
    engine.close()
    tc.close()


@pytest.fixture(autouse=True)
def trusted_nodes(world):  # type: ignore[no-untyped-def]
    """Each test starts with nodes 1-4 admitted: a node an earlier test quarantined stays out
    until the TC's operator releases it (as here, after the lab put it back)."""
    for name in ("node1", "node2", "node3", "node4"):
        if world.tc.registry.node(name)["state"] == "quarantined":
            world.lab.reset(name)
            world.tc.release_node(name, "test: the lab put the node back")
            fresh(world)
            world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == name])
    yield


def fresh(world) -> None:  # type: ignore[no-untyped-def]
    """Lab resets between tests drop connections: start every test on new sessions."""
    for name in list(world.engine.sessions):
        world.engine.sessions.pop(name).close()


def start_vm(world, node: str) -> dict:  # type: ignore[no-untyped-def]
    """Launch a fresh VM on node (the engine's host list pins it: no site constraint, which the TC
    would hold migrations to)."""
    fresh(world)
    name = f"vm-{secrets.token_hex(3)}"
    envelope = sealed_request(world.root, name)
    others = [h for h in world.engine.hosts if h.name != node]
    keep = world.engine.hosts
    world.engine.hosts = [h for h in keep if h not in others]  # only node is a candidate
    try:
        launch(world.engine, world.tc, envelope, envelope["bundle"])
    finally:
        world.engine.hosts = keep
    return world.tc.registry.vm(name)


def qemu_pids(vm_id: str) -> list[int]:
    return [p for p in procs.processes_mentioning(vm_id) if procs.cmdline(p).startswith("qemu-system")]


def vm_dir(world, node: str, vm_id: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(world.lab.node_dir(world.lab.node(node), "tvmm", "vms", vm_id))


def destroy(world, node: str, vm: dict) -> None:  # type: ignore[no-untyped-def]
    """As an operator ends a VM: the TC's end ticket, the node's evidence, the TC's record."""
    host = next(h for h in world.engine.hosts if h.name == node)
    ended = end_vm(world.engine.session(host), world.tc, vm["vm_id"], node, "destroy")
    assert ended["recorded"] and ended["state"] == "destroyed" and world.tc.registry.vm(vm["vm_id"]) is None


def status(world, node: str, vm_id: str) -> str:  # type: ignore[no-untyped-def]
    return migrating._call_fresh(world.engine, node, "vm_status", {"vm_id": vm_id})["status"]


def assert_one_copy_running_on(world, node: str, vm: dict) -> None:  # type: ignore[no-untyped-def]
    assert world.tc.registry.vm(vm["name"])["node"] == node
    assert status(world, node, vm["vm_id"]) == "running"
    assert len(qemu_pids(vm["vm_id"])) == 1
    assert not world.tc.registry.migrations("started")


def guest_memory(world, node: str, vm_id: str, address: int, size: int) -> bytes:  # type: ignore[no-untyped-def]
    """Guest RAM, read over the VM's QMP socket (a test may; the product has no such operation)."""
    dump = vm_dir(world, node, vm_id) / "memory.bin"
    qmp = QMP(str(vm_dir(world, node, vm_id) / "qmp.sock"))
    try:
        qmp.execute("pmemsave", val=address, size=size, filename=str(dump))
    finally:
        qmp.close()
    try:
        return dump.read_bytes()
    finally:
        dump.unlink()


def test_a_running_vm_migrates_and_keeps_its_memory(world):
    vm = start_vm(world, "node1")
    # The interrupt vector table the guest's firmware wrote (and keeps, once it has finished
    # booting) : a destination waiting for the stream has not run any firmware, so only the
    # migrated RAM can bring it.
    # Settled: the same for 3 s (on a loaded machine the firmware was seen still changing
    # vectors after two equal reads half a second apart).
    deadline, table, same = time.monotonic() + 90, b"", 0
    while time.monotonic() < deadline and same < 6:
        time.sleep(0.5)
        now = guest_memory(world, "node1", vm["vm_id"], IVT, IVT_SIZE)
        same = same + 1 if any(now) and now == table else 0
        table = now
    assert any(table), "the guest's firmware never settled its interrupt vector table"
    fresh(world)
    result = migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    assert result["to"] == "node3" and result["ciphertext_bytes"] > 0
    assert_one_copy_running_on(world, "node3", vm)
    assert not vm_dir(world, "node1", vm["vm_id"]).exists()  # the source's disk is gone
    assert guest_memory(world, "node3", vm["vm_id"], IVT, IVT_SIZE) == table
    kinds = [e["kind"] for e in world.tc.registry.audit_entries(vm=vm["vm_id"])]
    assert "migration.start" in kinds and "migration.commit" in kinds
    assert audit.verify(world.tc.registry).ok


def test_migration_to_a_quarantined_or_outside_node_is_refused(world, lab_node):
    vm = start_vm(world, "node1")
    lab_node("node2")
    world.lab.tamper("node2")
    fresh(world)
    world.engine.run(attest(world.tc), [h for h in world.engine.hosts if h.name == "node2"])
    assert world.tc.registry.node("node2")["state"] == "quarantined"
    for target, reason in (("node2", "migrate.destination-untrusted"), ("outside1", "migrate.destination-untrusted")):
        with pytest.raises(Refused) as info:
            migrating.migrate(world.engine, world.tc, vm["name"], target)
        assert info.value.reason == reason
    with pytest.raises(Refused) as info:  # the TC refuses even an engine that skips its own checks
        world.tc.migration_begin(vm["name"], "node2")
    assert info.value.reason == "release.not-admitted"
    assert_one_copy_running_on(world, "node1", vm)
    fresh(world)
    world.lab.reset("node2")
    world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == "node2"])


class Fault(Exception):
    pass


def inject(monkeypatch, op: str, action) -> None:  # type: ignore[no-untyped-def]
    """Run action just before the engine's first call of op (then let the call go ahead), whether
    the op is a plain call or a stream's (the stream's blocks then pass through action's result
    when it returns an iterable)."""
    fired = {"done": False}

    def first(name: str) -> bool:
        if name == op and not fired["done"]:
            fired["done"] = True
            return True
        return False

    plain, source, sink = Session.tvmm, Session.tvmm_stream_from, Session.tvmm_stream_to

    def call(self, name, args=None, timeout=None):  # type: ignore[no-untyped-def]
        if first(name):
            action(self, args)
        return plain(self, name, args, timeout)

    def stream_from(self, name, args=None, timeout=None):  # type: ignore[no-untyped-def]
        if first(name):
            action(self, args)
        return source(self, name, args, timeout)

    def stream_to(self, name, blocks, args=None, timeout=None):  # type: ignore[no-untyped-def]
        if first(name):
            blocks = action(self, blocks) or blocks
        return sink(self, name, blocks, args, timeout)

    monkeypatch.setattr(Session, "tvmm", call)
    monkeypatch.setattr(Session, "tvmm_stream_from", stream_from)
    monkeypatch.setattr(Session, "tvmm_stream_to", stream_to)


def _kill_service(world, session: Session) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the node's TVMM service process serving this session (a crash on the node)."""
    service = world.lab.service_dir(world.lab.node(session.host.name))
    pids = [p for p in procs.processes_mentioning(service) if " serve " in procs.cmdline(p)]
    assert pids, f"no service process of {session.host.name}"
    for pid in pids:
        os.kill(pid, 9)


@pytest.mark.parametrize("fault", ["destination-service", "source-service", "ssh-connection", "stream-bit-flip",
                                   "destination-attestation", "engine"])
def test_a_failure_before_the_commit_leaves_the_vm_running_on_the_source(world, lab_node, monkeypatch, fault: str):
    vm = start_vm(world, "node1")
    fresh(world)
    if fault == "destination-service":
        inject(monkeypatch, "migrate_in_stream", lambda s, a: _kill_service(world, s))
    elif fault == "source-service":
        inject(monkeypatch, "migrate_out_stream", lambda s, a: _kill_service(world, s))
    elif fault == "ssh-connection":
        inject(monkeypatch, "migrate_in_start", lambda s, a: s.service_connection.close())
    elif fault == "stream-bit-flip":
        def flip(session, blocks):  # type: ignore[no-untyped-def]
            def flipped():  # type: ignore[no-untyped-def]
                for i, piece in enumerate(blocks):
                    if i == 1:  # the first block after the header: a bit of guest memory
                        piece = bytearray(piece)
                        piece[len(piece) // 2] ^= 1
                    yield bytes(piece)

            return flipped()

        inject(monkeypatch, "migrate_in_stream", flip)
    elif fault == "destination-attestation":
        lab_node("node3")
        inject(monkeypatch, "migrate_in_start", lambda s, a: world.lab.tamper("node3"))
    elif fault == "engine":
        def die(session, args):  # type: ignore[no-untyped-def]
            raise Fault("the engine died")  # no rollback runs: like a killed process

        original_rollback = migrating._roll_back
        monkeypatch.setattr(migrating, "_roll_back", lambda *a, **k: None)
        inject(monkeypatch, "migrate_in_stream", die)
    with pytest.raises(Exception):  # noqa: B017 - each fault surfaces its own way
        migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    monkeypatch.undo()
    fresh(world)
    if fault == "engine":
        assert world.tc.registry.migrations("started")  # left behind, as by a killed engine
        repaired = migrating.repair(world.engine, world.tc)
        assert [r["action"] for r in repaired] == ["rolled back"]
        assert original_rollback is migrating._roll_back
    assert_one_copy_running_on(world, "node1", vm)
    assert not (vm_dir(world, "node3", vm["vm_id"]) / "qemu.pid").exists()
    aborted = [m for m in world.tc.registry.migrations() if m["vm_id"] == vm["vm_id"]]
    assert [m["state"] for m in aborted] == ["aborted"]
    destroy(world, "node1", vm)


def test_a_tampered_nodes_vms_are_stopped_not_moved_its_tk_cannot_open_the_migration_key(world, lab_node):
    """A node whose boot changed cannot unwrap the migrate-out ticket's Kmig, so it can make no
    stream a trusted node would take: evacuation fails closed, its VMs are powered off, and no
    copy of their state runs anywhere."""
    first, second = start_vm(world, "node4"), start_vm(world, "node4")
    lab_node("node4")
    world.lab.tamper("node4")
    fresh(world)
    report = enforce_round(world.engine, world.tc)
    assert {"node": "node4", "reason": "build.unknown"} in report.quarantined
    for vm in (first, second):
        outcome = next(v for v in report.vms if v["vm"] == vm["name"])
        assert outcome["result"].startswith("powered off") and "tvmm.tk-refused" in outcome["evacuation_error"]
        # powered off; live in the TC's records, as the tampered node's evidence proves nothing
        assert outcome["result"].endswith("(vm.end-boot-untrusted)"), outcome
        assert world.tc.registry.vm(vm["name"])["state"] == "running" and qemu_pids(vm["vm_id"]) == []
        aborted = [m for m in world.tc.registry.migrations() if m["vm_id"] == vm["vm_id"]]
        assert aborted and all(m["state"] == "aborted" for m in aborted)
    fresh(world)
    world.lab.reset("node4")
    world.tc.release_node("node4", "test: the lab put the node back")
    world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == "node4"])
    # rebooted into the approved build: the TPM's higher resetCount proves the old boot's VMs gone
    assert [world.tc.registry.vm(vm["name"])["state"] for vm in (first, second)] == ["off", "off"]


def test_a_node_whose_build_is_revoked_is_evacuated_in_one_round(world, lab_node):
    """Its boot did not change (its TK still opens), but the TC no longer approves the build: the
    next round quarantines it and its VMs move, each through its pair of tickets."""
    lab_node("node4")
    world.lab.reboot("node4", "tvmm-2026.2")
    fresh(world)
    world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == "node4"])
    first, second = start_vm(world, "node4"), start_vm(world, "node4")
    builds = world.tc.builds
    world.tc.builds = [dataclasses.replace(b, status="revoked") if b.name == "tvmm-2026.2" else b for b in builds]
    try:
        fresh(world)
        report = enforce_round(world.engine, world.tc)
    finally:
        world.tc.builds = builds
    assert {"node": "node4", "reason": "build.revoked"} in report.quarantined
    for vm in (first, second):
        row = world.tc.registry.vm(vm["name"])
        assert row["node"] != "node4" and row["state"] == "running", report.vms
        assert status(world, row["node"], vm["vm_id"]) == "running"
        assert len(qemu_pids(vm["vm_id"])) == 1
    fresh(world)
    world.lab.reset("node4")
    world.tc.release_node("node4", "test: the lab put the node back")
    world.engine.run(attest(world.tc, admit_nodes=True), [h for h in world.engine.hosts if h.name == "node4"])


def test_drain_moves_every_vm_off_a_node(world):
    vm = start_vm(world, "node2")
    fresh(world)
    results = migrating.drain(world.engine, world.tc, "node2")
    assert [r["ok"] for r in results if r["vm"] == vm["name"]] == [True]
    row = world.tc.registry.vm(vm["name"])
    assert row["node"] not in ("node2", None) and status(world, row["node"], vm["vm_id"]) == "running"
    assert len(qemu_pids(vm["vm_id"])) == 1


def test_an_engine_killed_after_postmigrate_leaves_the_source_running_with_its_disk(world, monkeypatch):
    """The source QEMU sent everything (postmigrate: its disk handed over) when the engine dies.
    The repair rolls back to the source, which runs with its disk attached again, holds no
    secret any more, and migrates again."""
    vm = start_vm(world, "node1")
    fresh(world)

    def die(session, args):  # type: ignore[no-untyped-def]
        raise Fault("the engine died after the whole stream")  # the source is in postmigrate now

    original_rollback = migrating._roll_back
    monkeypatch.setattr(migrating, "_roll_back", lambda *a, **k: None)
    inject(monkeypatch, "migrate_in_finish", die)
    with pytest.raises(Fault):
        migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    monkeypatch.undo()
    assert original_rollback is migrating._roll_back
    fresh(world)
    assert [r["action"] for r in migrating.repair(world.engine, world.tc)] == ["rolled back"]
    assert_one_copy_running_on(world, "node1", vm)
    qmp = QMP(str(vm_dir(world, "node1", vm["vm_id"]) / "qmp.sock"))
    try:
        block = qmp.execute("query-block")
        assert [b.get("inserted", {}).get("node-name") for b in block] == ["disk0"]
        assert not [o for o in qmp.execute("qom-list", path="/objects") if o["name"] == "kvm0"]  # the secret withdrawn
    finally:
        qmp.close()
    fresh(world)
    moved = migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    assert moved["to"] == "node3" and status(world, "node3", vm["vm_id"]) == "running"
    assert len(qemu_pids(vm["vm_id"])) == 1
    destroy(world, "node3", vm)


def test_an_engine_killed_before_the_commit_is_repaired_on_the_destinations_evidence(world, monkeypatch):
    """The destination took the whole stream and holds the VM, and the engine dies before it asks
    the TC to commit: the repair asks the destination's TPM what it did (runtime_log, quoted for
    the migration's ticket) and the TC commits on that evidence alone; the settle tickets then
    run the destination's copy and end the source's."""
    vm = start_vm(world, "node1")
    fresh(world)
    original_end, original_rollback = world.tc.migration_end, migrating._roll_back

    def die(migration, vm_id, commit, reason="", evidence=None):  # type: ignore[no-untyped-def]
        if commit:
            raise Fault("the engine died before the commit")
        return original_end(migration, vm_id, commit, reason, evidence)

    monkeypatch.setattr(world.tc, "migration_end", die)
    monkeypatch.setattr(migrating, "_roll_back", lambda *a, **k: None)
    with pytest.raises(Fault):
        migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    monkeypatch.undo()
    assert migrating._roll_back is original_rollback
    fresh(world)
    assert [r["action"] for r in migrating.repair(world.engine, world.tc)] == ["committed"]
    assert_one_copy_running_on(world, "node3", vm)
    entry = [e for e in world.tc.registry.audit_entries(vm=vm["vm_id"]) if e["kind"] == "migration.commit"][-1]
    assert entry["data"]["reason"] == "repair: destination holds it"
    assert not vm_dir(world, "node1", vm["vm_id"]).exists()
    destroy(world, "node3", vm)


def test_an_engine_killed_between_the_commit_and_the_ends_settlement_is_repaired(world, monkeypatch):
    """The TC committed, and the engine died before it carried the settle tickets: both ends hold
    the VM paused (neither runs on the engine's word) until the repair brings each its ticket
    again; then exactly one copy runs, on the destination, and it migrates again."""
    vm = start_vm(world, "node1")
    fresh(world)

    def die(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise Fault("the engine died after the commit")

    monkeypatch.setattr(migrating, "settle", die)
    with pytest.raises(Fault):
        migrating.migrate(world.engine, world.tc, vm["name"], "node3")
    monkeypatch.undo()
    fresh(world)
    assert world.tc.registry.vm(vm["vm_id"])["node"] == "node3"
    assert status(world, "node3", vm["vm_id"]) == "paused" and status(world, "node1", vm["vm_id"]) == "postmigrate"
    assert len(qemu_pids(vm["vm_id"])) == 2  # both held, neither running
    repaired = migrating.repair(world.engine, world.tc)
    assert sorted(r["action"] for r in repaired) == ["settled destination (commit)", "settled source (commit)"]
    assert_one_copy_running_on(world, "node3", vm)
    assert not vm_dir(world, "node1", vm["vm_id"]).exists()
    assert migrating.repair(world.engine, world.tc) == []  # nothing left to settle
    fresh(world)
    assert migrating.migrate(world.engine, world.tc, vm["name"], "node2")["to"] == "node2"
    assert_one_copy_running_on(world, "node2", vm)
    destroy(world, "node2", vm)
