"""A hostile engine re-pins an idle node to a CA of its own, then forges the node's word.

A node's service honours tickets of the CA pinned with its trusted key, and a node with no VM
running may be pinned anew (it may move to another TC). The engine pins its own CA on such a
node (a new TK the TC never certified), signs itself a ticket bearing the id of one the TC
issued (a migrate-in, a resume, an end...), and the service does what it says and records the
event under that id in the TPM's runtime log: a quote by the node's own AK, for the TC's ticket
id, over a log that replays. The TC believed it, committing a migration to a VM the engine made
while the source destroyed the real one (found in review). Every event now names the TK its
ticket was for, and the TC believes only events under a TK it certified for that node."""

from __future__ import annotations

import pytest

from ..brokerkit import reason
from ..test_tc_lifecycle import ended_evidence, resumed_evidence, saved_evidence, saved_on_n1

ENGINES_TK = "000b" + "ee" * 32  # the TPM name of the TK the engine had made under its own CA


@pytest.fixture
def world(broker_world):
    return broker_world


def nodes(world) -> None:  # type: ignore[no-untyped-def]
    for node in ("n1", "n2"):
        world.node(node)


def test_an_arrival_recorded_under_the_engines_pin_commits_nothing(world):
    nodes(world)
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    body = begun["in_ticket"]["ticket"]
    forged = world.nodes["n2"].tpm.runtime_evidence(begun["in_ticket"], events=[{
        "event": "migrated-in", "vm_id": record["vm_id"], "migration": body["migration"], "source": "n1",
        "ticket": body["id"], "image_sha256": body["image_sha256"], "tk": ENGINES_TK}])
    assert reason(world.tc.migration_end, begun["migration"], record["vm_id"], True, "", forged) == "runtime.tk"
    assert world.tc.registry.migration(begun["migration"])["state"] == "started"
    assert world.tc.registry.vm(record["vm_id"])["node"] == "n1"


def test_a_launch_recorded_under_the_engines_pin_gets_no_receipt(world):
    nodes(world)
    record = world.accepted("acme")
    release = world.tc.release_key(record["id"], "n1")
    body = release["ticket"]["ticket"]
    forged = world.nodes["n1"].tpm.runtime_evidence(release["ticket"], events=[{
        "event": "launched", "vm_id": body["vm_id"], "image_sha256": body["image_sha256"], "ticket": body["id"],
        "vcpus": body["vcpus"], "memory_mib": body["memory_mib"], "tk": ENGINES_TK}])
    assert reason(world.tc.record_launch, release, "n1", {"running": True, "evidence": forged}) == "runtime.tk"
    assert world.tc.registry.vm(record["vm_id"]) is None and world.tc.registry.receipt(record["id"]) is None


def test_an_end_recorded_under_the_engines_pin_ends_nothing(world):
    nodes(world)
    record = world.launched("acme", "n1")
    end = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    assert reason(world.tc.vm_ended, end, ended_evidence(world, "n1", record, end, tk=ENGINES_TK)) == "runtime.tk"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"


def test_a_save_recorded_under_the_engines_pin_suspends_nothing(world):
    nodes(world)
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    forged = saved_evidence(world, "n1", record, begun, tk=ENGINES_TK)
    assert reason(world.tc.suspend_end, begun["suspension"], forged) == "runtime.tk"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"


def test_a_resume_recorded_under_the_engines_pin_resumes_nothing(world):
    record, begun = saved_on_n1(world)
    resume = world.tc.resume_begin("web", "n2")
    forged = resumed_evidence(world, "n2", record, resume, tk=ENGINES_TK)
    assert reason(world.tc.resume_end, begun["suspension"], forged) == "runtime.tk"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "suspended"


def test_an_event_under_a_key_the_tc_certified_there_is_believed(world):
    """The same steps with the node's certified TK: the check refuses only what it should."""
    nodes(world)
    record = world.launched("acme", "n1")
    end = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    tk = world.tc.registry.last_certificate("n1")["tk_name"]
    assert world.tc.vm_ended(end, ended_evidence(world, "n1", record, end, tk=tk))["state"] == "destroyed"
