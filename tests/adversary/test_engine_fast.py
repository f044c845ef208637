"""The hostile engine at unit speed: the real TC and the real engine code against software nodes
(tests/enginekit.py), where the engine lies about what the nodes did. The TC believes a node's
TPM only; each lie is refused by its reason and the VM stays where the TC's records put it.
The lab versions of these attacks are in test_tickets_lab.py and test_tvmm_split.py."""

from __future__ import annotations

import pytest

from tccdeploy.coordinator.refusals import Refused
from tccdeploy.engine.migrate import repair

from ..enginekit import Fleet, interrupted


@pytest.fixture
def fleet(tmp_path):  # type: ignore[no-untyped-def]
    made = Fleet(tmp_path, ["n1", "n2"])
    yield made
    made.close()


def refusal(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Refused) as info:
        call(*args, **kwargs)
    return info.value.reason


def test_repair_does_not_commit_on_a_destination_that_only_says_it_holds_the_vm(fleet):
    vm = fleet.launch("n1")
    interrupted(fleet, vm, arrived=False)
    fleet.services["n2"].vms[vm.vm_id] = "paused"  # says it holds the VM; its TPM shows no arrival
    (done,) = [r for r in repair(fleet.engine, fleet.tc) if r["vm_id"] == vm.vm_id]
    assert done["action"] == "rolled back" and fleet.where(vm)[0] == "n1"


def test_a_commit_on_the_sources_evidence_is_refused(fleet):
    """The engine hands the TC the source's quote (another AK) as the destination's arrival."""
    vm = fleet.launch("n1")
    begin = interrupted(fleet, vm, arrived=False)
    in_ticket = begin["in_ticket"]["ticket"]
    forged = fleet.services["n1"]._record({"event": "migrated-in", "vm_id": vm.vm_id, "migration": in_ticket["migration"],
                                           "source": "n1", "ticket": in_ticket["id"],
                                           "image_sha256": in_ticket["image_sha256"]}, in_ticket)
    assert refusal(fleet.tc.migration_end, begin["migration"], vm.vm_id, True, evidence=forged) == "runtime.signature"
    assert fleet.where(vm) == ("n1", "running") and fleet.tc.migrations()[-1].state == "started"


def test_a_commit_on_evidence_quoted_for_another_ticket_is_refused(fleet):
    """The destination's own TPM, but its quote answers the source's ticket: replayed, not this arrival."""
    vm = fleet.launch("n1")
    begin = interrupted(fleet, vm, arrived=True)
    replayed = fleet.services["n2"].evidence(begin["out_ticket"]["ticket"]["id"])
    assert refusal(fleet.tc.migration_end, begin["migration"], vm.vm_id, True, evidence=replayed) == "runtime.nonce"
    assert refusal(fleet.tc.migration_end, begin["migration"], vm.vm_id, True, evidence=None) == "runtime.missing"
    assert fleet.where(vm)[0] == "n1"


def test_a_commit_on_arrival_evidence_of_another_vm_is_refused(fleet):
    """The destination's TPM quoted for this ticket, but the last event for this VM is not its arrival."""
    vm = fleet.launch("n1")
    begin = interrupted(fleet, vm, arrived=False)
    evidence = fleet.services["n2"].evidence(begin["in_ticket"]["ticket"]["id"])  # quoted for it, showing nothing
    assert refusal(fleet.tc.migration_end, begin["migration"], vm.vm_id, True, evidence=evidence) == "migrate.evidence-event"
    assert fleet.where(vm)[0] == "n1"


def test_a_log_stripped_of_the_policys_bank_quarantines_the_node(fleet):
    """The engine (or the node's software) sends the boot log with its sha256 digests removed,
    hoping the build check is skipped: the verdict is untrusted by name and the node leaves."""
    import struct

    from tccdeploy.eventlog import EventLogWriter, parse

    node = fleet.world.nodes["n1"]
    evidence = node.tpm.evidence(fleet.tc.nonce("n1"))
    stripped = EventLogWriter(["sha1", "sha256"]).header()
    for event in parse(evidence.eventlog).events:
        stripped += struct.pack("<III", event.pcr, event.type, 1) + struct.pack("<H", 0x0004) + event.digests["sha1"]
        stripped += struct.pack("<I", len(event.data)) + event.data
    evidence.eventlog = stripped
    verdict, _ = fleet.tc.verify("n1", "site1", fleet.tc.registry.node("n1")["address"], evidence)
    assert [r["code"] for r in verdict.reasons] == ["eventlog.bank-missing"]
    assert fleet.tc.node("n1").state == "quarantined"


def test_a_sha1_format_log_sent_for_a_sha256_policy_quarantines_the_node(fleet):
    """The boot log rewritten in the TPM 1.2 SHA-1 format (now parsed) carries no sha256 digests:
    the build cannot be checked, so the node is untrusted by name, not admitted on a log it chose."""
    import struct

    from tccdeploy.eventlog import parse

    node = fleet.world.nodes["n1"]
    evidence = node.tpm.evidence(fleet.tc.nonce("n1"))
    evidence.eventlog = b"".join(struct.pack("<II", e.pcr, e.type) + e.digests["sha1"] + struct.pack("<I", len(e.data))
                                 + e.data for e in parse(evidence.eventlog).events)
    verdict, _ = fleet.tc.verify("n1", "site1", fleet.tc.registry.node("n1")["address"], evidence)
    assert [r["code"] for r in verdict.reasons] == ["eventlog.bank-missing"]
    assert fleet.tc.node("n1").state == "quarantined"


# -- platforms and staged rollouts (issue 17) ------------------------------------------------------
def test_an_engine_cannot_make_a_machine_a_rollout_node_by_naming_it_so(tmp_path):
    """The roster lists a machine without a name; the engine enrolls it as node1, the name the
    candidate's rollout lists, and boots it into the candidate. The TC names a node for a rollout
    from its own roster only: the candidate is refused there."""
    import hashlib

    from tccdeploy.coordinator import tpm2

    from ..attestkit import Node
    from ..brokerkit import World

    world = World(tmp_path)
    try:
        tpm = Node(build="tvmm-2026.3")
        ek = hashlib.sha256(b"unnamed machine").hexdigest()
        world.tc.registry.roster_add("sha256:" + ek, "site1", None, None)  # racked, not named
        world.tc.registry.enroll("node1", "site1", "127.0.1.7", {
            "ek_certificate": b"c", "ek_fingerprint": ek, "ek_public": b"e", "ak_public": tpm.ak_public,
            "ak_name": tpm2.parse_public(tpm.ak_public).name, "ssh_host_key": tpm.host_key, "manufacturer": "software"})
        verdict, _ = world.tc.verify("node1", "site1", "127.0.1.7", tpm.evidence(world.tc.nonce("node1")))
        assert [r["code"] for r in verdict.reasons] == ["build.not-in-rollout"]
        assert world.tc.rollout_identity("node1") == (None, ("sha256:" + ek,))
    finally:
        world.close()


def test_firmware_the_operator_never_approved_quarantines_the_node_whatever_the_build(tmp_path):
    """The provider flashes other firmware under an approved TVMM build: the platform part of the
    verdict refuses it by name, and the admitted node leaves."""
    from ..brokerkit import World

    world = World(tmp_path)
    try:
        node = world.node("node1")
        node.tpm.model = "lab-model-x"  # its firmware now measures as no Platform lists
        verdict, _ = world.attest("node1")
        assert [r["code"] for r in verdict.reasons] == ["platform.unknown"] and verdict.build == "tvmm-2026.1"
        assert world.tc.registry.node("node1")["state"] == "quarantined"
    finally:
        world.close()


def test_a_key_release_on_a_verdict_made_before_the_rollout_ended_is_refused(tmp_path):
    """node1 was admitted on the candidate while its rollout named it; the TC's operator ends the
    rollout without it. The engine asks for a key on the still-fresh verdict: the TC asks the
    manifests as they are now, and refuses."""
    import dataclasses

    from tccdeploy.manifest.loader import load_manifests

    from ..brokerkit import World, reason

    world = World(tmp_path)
    try:
        node = world.node("node1", admit=False)
        node.tpm.build = "tvmm-2026.3"
        world.admit("node1")
        world.customer("alice")
        record = world.accepted("alice")
        loaded = load_manifests([world.manifests])
        loaded.builds = [dataclasses.replace(b, rollout=dataclasses.replace(b.rollout, nodes=("node2",)))
                         if b.name == "tvmm-2026.3" else b for b in loaded.builds]
        world.tc.reload(loaded)
        assert reason(world.tc.release_key, record["id"], "node1") == "release.build-revoked"
        assert world.tc.registry.releases(record["vm_id"]) == []
    finally:
        world.close()


def test_a_log_whose_events_are_relabelled_is_not_the_build(tmp_path):
    """The engine rewrites the event log's types (the kernel's EFI application event as EV_IPL),
    digests untouched, so it still replays to the quoted PCRs: the build names each event's type,
    and the verdict is build.unknown."""
    import struct

    from tccdeploy.eventlog import EVENT_CODES, EventLogWriter, parse

    from ..brokerkit import World

    world = World(tmp_path)
    try:
        node = world.node("node1", admit=False)
        evidence = node.tpm.evidence(world.tc.nonce("node1"))
        log = parse(evidence.eventlog)
        relabelled = EventLogWriter(["sha1", "sha256"]).header()
        for event in log.events:
            kind = EVENT_CODES["EV_IPL"] if event.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION" else event.type
            relabelled += struct.pack("<III", event.pcr, kind, 2)
            relabelled += struct.pack("<H", 0x0004) + event.digests["sha1"] + struct.pack("<H", 0x000B) + event.digests["sha256"]
            relabelled += struct.pack("<I", len(event.data)) + event.data
        evidence.eventlog = relabelled
        verdict, _ = world.tc.verify("node1", "site1", world.tc.registry.node("node1")["address"], evidence)
        assert [r["code"] for r in verdict.reasons] == ["build.unknown"]
    finally:
        world.close()
