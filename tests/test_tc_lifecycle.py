"""How a VM's stay on a node ends, as the TC decides it (coordinator/lifecycle.py): one outcome
per migration, carried to each end by a settle ticket; a VM off or destroyed only on its node's
TPM evidence answering the TC's end ticket, while the node is trusted in that boot, or on a
trusted quote showing the TPM was reset. Each refusal by its reason, without a lab."""

from __future__ import annotations

import base64
import copy

import pytest

from tccdeploy.coordinator.refusals import Refused
from tccdeploy.crypto import ticket as tickets

from .brokerkit import reason


@pytest.fixture
def world(broker_world):
    return broker_world




def launched_event(world, node: str, record: dict) -> dict:  # type: ignore[no-untyped-def]
    release = world.tc.registry.releases(record["vm_id"])[-1]
    return {"event": "launched", "vm_id": record["vm_id"], "image_sha256": record["image_sha256"],
            "ticket": release["ticket"], "vcpus": 1, "memory_mib": 64}


def ended_evidence(world, node: str, record: dict, end_ticket: dict, event: str = "destroyed",  # type: ignore[no-untyped-def]
                   quoted_for: str | None = None, **changes) -> dict:
    """node's answer to the end ticket: its runtime events since the launch, the end last."""
    ticket = end_ticket
    body = ticket["ticket"]
    end = {"event": event, "vm_id": record["vm_id"], "ticket": body["id"]} | changes
    return world.nodes[node].tpm.runtime_evidence(ticket, events=[launched_event(world, node, record), end],
                                                  quoted_for=quoted_for)


# -- a VM's end -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "code"), [
    ("none", "runtime.missing"),
    ("other-quote", "runtime.nonce"),
    ("other-node", "runtime.signature"),
    ("powered-off", "vm.end-evidence"),
    ("other-vm", "vm.end-evidence"),
    ("other-ticket", "vm.end-evidence"),
    ("not-last", "vm.end-evidence"),
    ("altered-ticket", "vm.end-ticket"),
    ("launch-ticket", "vm.end-ticket"),
    ("other-boot", "vm.end-boot-untrusted"),
    ("restarted", "vm.end-boot-untrusted"),
    ("untrusted-now", "vm.end-boot-untrusted"),
])
def test_a_vm_ends_in_the_records_only_on_its_nodes_evidence_answering_the_end_ticket(world, case, code):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1")
    ticket = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    assert ticket["ticket"]["action"] == "destroy" and ticket["ticket"]["runtime_pcr"] == 15
    honest = ended_evidence(world, "n1", record, ticket)
    given_ticket, evidence = ticket, honest
    if case == "none":
        evidence = None
    elif case == "other-quote":  # the node's quote for something else (replayed evidence)
        evidence = ended_evidence(world, "n1", record, ticket, quoted_for=tickets.new_id())
    elif case == "other-node":
        evidence = ended_evidence(world, "n2", record, ticket)
    elif case == "powered-off":  # a power-off shown for a destroy ticket
        evidence = ended_evidence(world, "n1", record, ticket, event="powered-off")
    elif case == "other-vm":
        evidence = ended_evidence(world, "n1", record, ticket, vm_id="f" * 32)
    elif case == "other-ticket":
        evidence = ended_evidence(world, "n1", record, ticket, ticket=tickets.new_id())
    elif case == "not-last":  # it ended, then was back (launched again) before the quote
        body = ticket["ticket"]
        events = [launched_event(world, "n1", record), {"event": "destroyed", "vm_id": record["vm_id"], "ticket": body["id"]},
                  launched_event(world, "n1", record)]
        evidence = world.nodes["n1"].tpm.runtime_evidence(ticket, events=events)
    elif case == "altered-ticket":  # the engine turns a poweroff ticket into a destroy
        given_ticket = copy.deepcopy(world.tc.vm_end_ticket(record["vm_id"], "n1", "poweroff"))
        given_ticket["ticket"]["action"] = "destroy"
        evidence = ended_evidence(world, "n1", record, given_ticket)
    elif case == "launch-ticket":  # a real TC ticket, of another kind
        given_ticket = world.tc.release_key(world.accepted("acme")["id"], "n1")["ticket"]
        evidence = ended_evidence(world, "n1", record, given_ticket)
    elif case == "other-boot":  # evidence from a boot other than the one the TC last found trusted
        world.nodes["n1"].tpm.reset += 1
        evidence = ended_evidence(world, "n1", record, ticket)
        world.nodes["n1"].tpm.reset -= 1
    elif case == "restarted":  # a TPM Restart: resetCount kept, PCRs cleared for other software
        world.nodes["n1"].tpm.restart += 1
        evidence = ended_evidence(world, "n1", record, ticket)
        world.nodes["n1"].tpm.restart -= 1
    elif case == "untrusted-now":  # the node failed its last attestation: its word proves nothing
        verdict, _ = world.attest("n1", pcrs=[0])
        assert not verdict.trusted
    assert reason(world.tc.vm_ended, given_ticket, evidence) == code
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"
    if case != "untrusted-now":
        assert world.tc.vm_ended(ticket, honest) == {"vm_id": record["vm_id"], "node": "n1", "state": "destroyed",
                                                     "recorded": True}
        assert world.tc.registry.vm(record["vm_id"]) is None


def test_a_powered_off_vm_is_off_then_may_be_destroyed_and_its_image_requested_again(world):
    world.node("n1")
    record = world.launched("acme", "n1", name="web")
    off = world.tc.vm_end_ticket(record["vm_id"], "n1", "poweroff")
    assert world.tc.vm_ended(off, ended_evidence(world, "n1", record, off, "powered-off"))["state"] == "off"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "off"
    assert reason(world.tc.set_vm_state, record["vm_id"], "running") == "vm.state-transition"  # not back on its word
    gone = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    assert world.tc.vm_ended(gone, ended_evidence(world, "n1", record, gone))["state"] == "destroyed"
    entries = [e for e in world.tc.registry.audit_entries(vm=record["vm_id"]) if e["kind"] == "vm.end"]
    assert [e["data"] for e in entries] == [{"state": "off", "ticket": off["ticket"]["id"], "reset_count": 1},
                                            {"state": "destroyed", "ticket": gone["ticket"]["id"], "reset_count": 1}]
    assert [e["node"] for e in entries] == ["n1", "n1"]


def test_an_end_ticket_is_only_for_a_copy_the_records_put_on_that_node(world):
    world.node("n1")
    world.node("n2")
    world.node("n3", admit=False)
    record = world.launched("acme", "n1")
    assert reason(world.tc.vm_end_ticket, record["vm_id"], "n2", "destroy") == "vm.end-not-here"
    assert reason(world.tc.vm_end_ticket, "f" * 32, "n1", "destroy") == "vm.end-not-here"
    assert reason(world.tc.vm_end_ticket, record["vm_id"], "n1", "dump") == "vm.end-action"
    failed = world.accepted("acme")  # a key released to n3 for a launch: its copy may be there
    world.tc.registry.record_release(failed["id"], failed["vm_id"], "n3", 1, "00", None, None)
    assert reason(world.tc.vm_end_ticket, failed["vm_id"], "n3", "destroy") == "vm.end-node-unknown"


def test_an_end_ticket_issued_before_the_vm_came_does_not_end_its_later_stay(world):
    world.node("n1")
    record = world.launched("acme", "n1")
    ticket = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    with world.tc.registry.transaction() as db:  # the VM left and came back after the ticket was made
        db.execute("UPDATE vms SET placed = ? WHERE vm_id = ?", (ticket["ticket"]["issued"] + 5, record["vm_id"]))
    assert world.tc.vm_ended(ticket, ended_evidence(world, "n1", record, ticket)) == \
        {"vm_id": record["vm_id"], "node": "n1", "state": None, "recorded": False}
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"


def test_a_trusted_quote_after_a_tpm_reset_proves_the_old_boots_vms_gone(world):
    world.node("n1")
    old = world.launched("acme", "n1", name="old")
    assert world.tc.registry.vm(old["vm_id"])["boot"] == 1
    world.nodes["n1"].tpm.reset += 1  # rebooted ...
    verdict, _ = world.attest("n1", pcrs=[0])  # ... into something the TC does not trust: proves nothing
    assert not verdict.trusted and world.tc.registry.vm(old["vm_id"])["state"] == "running"
    world.tc.release_node("n1", "test")
    world.admit("n1")  # trusted again, in the new boot
    assert world.tc.registry.vm(old["vm_id"])["state"] == "off"
    new = world.launched("acme", "n1", name="new")
    world.attest("n1")  # the same boot: the VM launched in it stays
    assert world.tc.registry.vm(new["vm_id"])["state"] == "running" and world.tc.registry.vm(new["vm_id"])["boot"] == 2
    entries = [e for e in world.tc.registry.audit_entries(node="n1") if e["kind"] == "vm.off-by-reboot"]
    assert [e["data"]["vms"] for e in entries] == [[old["vm_id"]]]


# -- a migration's outcome -----------------------------------------------------------------------
def arrival(world, begun: dict, record: dict) -> dict:  # type: ignore[no-untyped-def]
    body = begun["in_ticket"]["ticket"]
    return world.nodes[body["node"]].tpm.runtime_evidence(begun["in_ticket"], events=[{
        "event": "migrated-in", "vm_id": record["vm_id"], "migration": body["migration"], "source": body["source"],
        "ticket": body["id"], "image_sha256": body["image_sha256"]}])


def test_a_migration_has_one_outcome_carried_to_each_end_by_its_settle_ticket(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    assert reason(world.tc.migration_settlement, begun["migration"]) == "migrate.not-settled"
    assert reason(world.tc.migration_settlement, 999) == "migrate.unknown"
    settled = world.tc.migration_end(begun["migration"], record["vm_id"], True, "", arrival(world, begun, record))
    assert settled["outcome"] == "commit" and settled["migration"] == begun["migration"]
    for role, node in (("source", "n1"), ("destination", "n2")):
        body = tickets.verify(settled[role], world.tc.identity().certificate)
        assert (body["kind"], body["role"], body["node"], body["outcome"], body["migration"], body["vm_id"]) == \
            ("settle", role, node, "commit", str(begun["migration"]), record["vm_id"])
        assert body["tk_name"] == world.tc.registry.last_certificate(node)["tk_name"]
    with pytest.raises(Exception):  # noqa: B017 - one outcome: no abort after the commit
        world.tc.migration_end(begun["migration"], record["vm_id"], False, "late")
    again = world.tc.migration_settlement(begun["migration"])
    assert again["outcome"] == "commit" and again["source"]["ticket"]["id"] != settled["source"]["ticket"]["id"]
    vm = world.tc.registry.vm(record["vm_id"])
    assert vm["node"] == "n2" and vm["boot"] == world.nodes["n2"].tpm.reset


def test_an_aborted_migrations_settle_tickets_say_abort_to_both_ends(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    settled = world.tc.migration_end(begun["migration"], record["vm_id"], False, "test")
    assert settled["outcome"] == "abort"
    assert {settled[r]["ticket"]["outcome"] for r in ("source", "destination")} == {"abort"}
    assert world.tc.registry.vm(record["vm_id"])["node"] == "n1"
    assert any(e["kind"] == "migration.abort" for e in world.tc.registry.audit_entries(vm=record["vm_id"]))


def test_the_engines_word_cannot_end_a_vm(world):
    world.node("n1")
    record = world.launched("acme", "n1")
    for state in ("destroyed", "off", "suspended", "starting"):
        assert reason(world.tc.set_vm_state, record["vm_id"], state) == "vm.state-transition"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"


# -- suspension ------------------------------------------------------------------------------------
def saved_evidence(world, node: str, record: dict, begun: dict, **changes) -> dict:  # type: ignore[no-untyped-def]
    body = begun["ticket"]["ticket"]
    event = {"event": "suspended", "vm_id": record["vm_id"], "suspension": body["suspension"], "ticket": body["id"],
             "state_sha256": "ab" * 32} | changes
    return world.nodes[node].tpm.runtime_evidence(begun["ticket"], events=[launched_event(world, node, record), event])


def resumed_evidence(world, node: str, record: dict, ticket: dict, **changes) -> dict:  # type: ignore[no-untyped-def]
    body = ticket["ticket"]["ticket"]
    event = {"event": "resumed", "vm_id": record["vm_id"], "suspension": body["suspension"], "ticket": body["id"],
             "image_sha256": body["image_sha256"]} | changes
    return world.nodes[node].tpm.runtime_evidence(ticket["ticket"], events=[event])


def test_a_vm_is_suspended_only_on_its_nodes_evidence_of_the_save(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    assert reason(world.tc.suspend_begin, "nosuch") == "suspend.unknown-vm"
    begun = world.tc.suspend_begin("web")
    body = tickets.verify(begun["ticket"], world.tc.identity().certificate)
    assert (body["kind"], body["node"], body["suspension"]) == ("suspend", "n1", str(begun["suspension"]))
    assert reason(world.tc.suspend_begin, "web") == "suspend.open"
    cases = [(None, "runtime.missing"),
             (saved_evidence(world, "n2", record, begun), "runtime.signature"),
             (saved_evidence(world, "n1", record, begun, event="resumed"), "suspend.evidence-event"),
             (saved_evidence(world, "n1", record, begun, ticket=tickets.new_id()), "suspend.evidence-event"),
             (saved_evidence(world, "n1", record, begun, state_sha256="short"), "suspend.evidence-event")]
    for evidence, code in cases:
        assert reason(world.tc.suspend_end, begun["suspension"], evidence) == code
        assert world.tc.registry.vm(record["vm_id"])["state"] == "running"
    assert world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))["state"] == "suspended"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "suspended"
    assert reason(world.tc.suspend_end, begun["suspension"], saved_evidence(world, "n1", record, begun)) \
        == "suspend.not-started"
    stored = world.tc.registry.suspension(begun["suspension"])
    # Ksus is kept wrapped to the TC's own key, not to the node's
    assert stored["state_sha256"] == "ab" * 32 and stored["ksus"] and stored["ksus"] != begun["ticket"]["ticket"]["ksus"]


def test_a_dropped_suspension_leaves_the_vm_running_where_it_was(world):
    world.node("n1")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    assert reason(world.tc.suspend_end, 999, None, saved=False) == "suspend.unknown"
    assert world.tc.suspend_end(begun["suspension"], None, saved=False)["state"] == "aborted"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"
    kinds = [e["kind"] for e in world.tc.registry.audit_entries(vm=record["vm_id"])]
    assert "suspension.abort" in kinds and "suspension.saved" not in kinds
    assert world.tc.suspend_begin("web")["suspension"] != begun["suspension"]  # a new one may start


def test_a_suspension_resumes_once_on_one_trusted_node(world):
    world.node("n1")
    world.node("n2")
    world.node("n3", admit=False)
    record = world.launched("acme", "n1", name="web")
    assert reason(world.tc.resume_begin, "web") == "suspend.not-suspended"
    assert reason(world.tc.resume_begin, "nosuch") == "suspend.not-suspended"
    begun = world.tc.suspend_begin("web")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    assert reason(world.tc.resume_end, begun["suspension"], None) == "suspend.not-resuming"  # no ticket issued yet
    assert reason(world.tc.resume_end, 999, None) == "suspend.not-resuming"
    assert reason(world.tc.resume_begin, "web", "n3") == "release.not-admitted"  # not a trusted node
    first = world.tc.resume_begin("web", "n2")
    assert first["state_sha256"] == "ab" * 32
    body = tickets.verify(first["ticket"], world.tc.identity().certificate)
    assert (body["kind"], body["node"], body["state_sha256"], first["from"]) == ("resume", "n2", "ab" * 32, "n1")
    assert reason(world.tc.resume_begin, "web", "n1") == "suspend.resumed"  # not a second node
    assert reason(world.tc.vm_end_ticket, record["vm_id"], "n1", "destroy") == "vm.end-resuming"
    retry = world.tc.resume_begin("web")  # the same node again (a retry): its service resumes once
    assert retry["node"] == "n2" and retry["ticket"]["ticket"]["id"] != first["ticket"]["ticket"]["id"]
    assert reason(world.tc.resume_end, begun["suspension"], resumed_evidence(world, "n1", record, first)) \
        == "runtime.signature"  # the wrong node's TPM
    assert reason(world.tc.resume_end, begun["suspension"],
                  resumed_evidence(world, "n2", record, first, event="suspended")) == "suspend.evidence-event"
    replayed = world.nodes["n2"].tpm.runtime_evidence(first["ticket"], events=[{"event": "resumed",
                                                      "vm_id": record["vm_id"], "ticket": first["ticket"]["ticket"]["id"]}],
                                                      quoted_for=tickets.new_id())
    assert reason(world.tc.resume_end, begun["suspension"], replayed) == "runtime.nonce"  # for no resume ticket
    assert world.tc.resume_end(begun["suspension"], resumed_evidence(world, "n2", record, first))["node"] == "n2"
    vm = world.tc.registry.vm(record["vm_id"])
    assert (vm["state"], vm["node"], vm["boot"]) == ("running", "n2", 1)
    assert reason(world.tc.resume_end, begun["suspension"], resumed_evidence(world, "n2", record, retry)) \
        == "suspend.not-resuming"
    assert reason(world.tc.resume_begin, "web") == "suspend.not-suspended"


def saved_on_n1(world) -> tuple[dict, dict]:  # type: ignore[no-untyped-def,type-arg]
    """Nodes n1 and n2; VM web launched on n1, then suspended there with its state saved."""
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    return record, begun


def test_a_resume_retry_is_believed_on_any_of_its_tickets_but_only_for_a_nonce_mismatch(world):
    record, begun = saved_on_n1(world)
    first = world.tc.resume_begin("web", "n2")
    retry = world.tc.resume_begin("web")  # the service took the second ticket
    forged = resumed_evidence(world, "n2", record, retry)
    forged["signature"] = resumed_evidence(world, "n1", record, retry)["signature"]  # another AK: not a nonce question
    assert reason(world.tc.resume_end, begun["suspension"], forged) == "runtime.signature"
    assert world.tc.resume_end(begun["suspension"], resumed_evidence(world, "n2", record, retry))["state"] == "running"
    assert first["ticket"]["ticket"]["id"] in world.tc.registry.suspension(begun["suspension"])["resume_ticket"]


def test_suspension_steps_for_a_node_the_tc_no_longer_knows_are_refused_by_name(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    db = world.tc.registry.backend.db
    kept = db.execute("SELECT * FROM certificates WHERE node = 'n1'").fetchall()
    db.execute("DELETE FROM certificates WHERE node = 'n1'")
    db.commit()
    with pytest.raises(Refused, match="n1 holds no trusted key the TC certified") as info:
        world.tc.suspend_begin("web")
    assert info.value.reason == "suspend.node-unknown"
    for row in kept:
        db.execute(f"INSERT INTO certificates VALUES ({', '.join('?' * len(row))})", tuple(row))
    db.commit()
    begun = world.tc.suspend_begin("web")
    identity = db.execute("SELECT * FROM identities WHERE node = 'n1'").fetchone()
    db.execute("DELETE FROM identities WHERE node = 'n1'")
    db.commit()
    with pytest.raises(Refused, match="n1 is not enrolled") as info:
        world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    assert info.value.reason == "suspend.node-unknown"
    db.execute(f"INSERT INTO identities VALUES ({', '.join('?' * len(identity))})", tuple(identity))
    db.commit()
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    ticket = world.tc.resume_begin("web", "n2")
    db.execute("DELETE FROM identities WHERE node = 'n2'")
    db.commit()
    with pytest.raises(Refused, match="n2 is not enrolled") as info:
        world.tc.resume_end(begun["suspension"], resumed_evidence(world, "n2", record, ticket))
    assert info.value.reason == "suspend.node-unknown"


def test_a_vm_marked_suspended_without_a_saved_state_is_not_resumed(world):
    world.node("n1")
    record = world.launched("acme", "n1", name="web")
    db = world.tc.registry.backend.db
    db.execute("UPDATE vms SET state = 'suspended' WHERE vm_id = ?", (record["vm_id"],))
    db.commit()
    with pytest.raises(Refused, match="has no saved state to resume") as info:
        world.tc.resume_begin("web")
    assert info.value.reason == "suspend.not-suspended"


def test_a_vm_whose_image_has_no_owner_gets_no_ticket(world):
    """Tickets bind the customer's key id into their key labels: without an owner there is none to bind."""
    world.node("n1")
    record = world.launched("acme", "n1", name="web")
    db = world.tc.registry.backend.db
    db.execute("PRAGMA foreign_keys = OFF")
    db.execute("DELETE FROM images WHERE vm_id = ?", (record["vm_id"],))
    db.commit()
    with pytest.raises(Refused, match=f"VM {record['vm_id']} has no owner in the TC's records") as info:
        world.tc.vm_end_ticket(record["vm_id"], "n1", "poweroff")
    assert info.value.reason == "vm.end-node-unknown"


def test_a_dropped_suspension_keeps_no_state_digest(world):
    world.node("n1")
    world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    world.tc.suspend_end(begun["suspension"], None, saved=False)
    assert world.tc.registry.suspension(begun["suspension"])["state_sha256"] is None


def test_destroying_a_suspended_vm_drops_its_saved_state(world):
    world.node("n1")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.suspend_begin("web")
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    end = world.tc.vm_end_ticket(record["vm_id"], "n1", "destroy")
    events = [launched_event(world, "n1", record), {"event": "destroyed", "vm_id": record["vm_id"],
                                                    "ticket": end["ticket"]["id"]}]
    assert world.tc.vm_ended(end, world.nodes["n1"].tpm.runtime_evidence(end, events=events))["state"] == "destroyed"
    assert world.tc.registry.suspension(begun["suspension"])["state"] == "aborted"


# -- what the tickets carry: the shape the service takes, keys it alone opens ---------------------
def test_every_lifecycle_ticket_is_what_the_services_interface_takes(world):
    from tccdeploy.tvmm.interface import OPERATIONS, problems

    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    owner = world.tc.registry.image_owner(record["vm_id"])["key_id"]
    begun = world.tc.migration_begin("web", "n2")
    settled = world.tc.migration_end(begun["migration"], record["vm_id"], False, "test")
    end = world.tc.vm_end_ticket(record["vm_id"], "n1", "poweroff")
    suspend = world.tc.suspend_begin("web")
    world.tc.suspend_end(suspend["suspension"], saved_evidence(world, "n1", record, suspend))
    resume = world.tc.resume_begin("web", "n2")
    shapes = [("migrate_out_end", {"vm_id": record["vm_id"], "ticket": settled["source"]}),
              ("migrate_in_settle", {"vm_id": record["vm_id"], "ticket": settled["destination"], "resume": True}),
              ("vm_end", {"ticket": end}), ("vm_suspend", {"ticket": suspend["ticket"]}),
              ("vm_resume", {"ticket": resume["ticket"]})]
    for op, args in shapes:
        assert problems(OPERATIONS[op], args) == [], op
        body = args["ticket"]["ticket"]
        certificate = world.tc.registry.last_certificate(body["node"])
        assert (body["customer"], body["node_serial"], body["tk_name"]) == \
            (owner, certificate["serial"], certificate["tk_name"]), op
        assert body["expires"] - body["issued"] == tickets.TTL, op
    assert (suspend["vm_id"], suspend["node"]) == (record["vm_id"], "n1")
    assert (resume["vm_id"], resume["node"], resume["from"]) == (record["vm_id"], "n2", "n1")


def test_suspension_keys_open_only_in_the_nodes_tpm_under_the_services_labels(world):
    """Ksus reaches the suspending node and the resuming node wrapped to each one's TK under the
    label its service computes (kind, key, VM, customer, ticket); Kvm too; and both are the keys
    they should be: the resume's Ksus is the suspension's, its Kvm the image's."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tccdeploy.crypto import wrap

    world.node("n1")
    world.node("n2").tk = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # its own, not a shared one
    world.admit("n2")
    kvm = bytes(range(32))
    bundle = world.image("acme", kvm=kvm)
    record = world.tc.accept_request(world.request("acme", bundle, name="web"), bundle)
    release = world.tc.release_key(record["id"], "n1")
    world.tc.record_launch(release, "n1", world.started("n1", release))
    begun = world.tc.suspend_begin("web")
    body = begun["ticket"]["ticket"]

    def opened(node: str, b: dict, kind: str, what: str) -> bytes:
        label = tickets.label(kind, what, b["vm_id"], b["customer"], b["id"])
        return wrap.unwrap(world.nodes[node].tk, base64.b64decode(b[what]), label)

    ksus = opened("n1", body, "suspend", "ksus")
    assert len(ksus) == 32
    for wrong in (("resume", "ksus"), ("suspend", "kvm")):
        with pytest.raises(Exception):  # noqa: B017 - another label: OAEP refuses
            opened("n1", body, *wrong)
    world.tc.suspend_end(begun["suspension"], saved_evidence(world, "n1", record, begun))
    resume = world.tc.resume_begin("web", "n2")["ticket"]["ticket"]
    assert opened("n2", resume, "resume", "ksus") == ksus
    assert opened("n2", resume, "resume", "kvm") == kvm
    with pytest.raises(Exception):  # noqa: B017 - n1's TK does not open what was made for n2's
        opened("n1", resume, "resume", "ksus")


def test_an_end_is_recorded_from_a_node_the_tc_knows_even_after_the_tickets_expiry(world, monkeypatch):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    monkeypatch.setattr(tickets, "TTL", -5)  # the evidence arrives after the ticket expired
    late = world.tc.vm_end_ticket(record["vm_id"], "n1", "poweroff")
    monkeypatch.undo()
    assert world.tc.vm_ended(late, ended_evidence(world, "n1", record, late, "powered-off"))["state"] == "off"
    other = world.launched("acme", "n1", name="other")
    ticket = world.tc.vm_end_ticket(other["vm_id"], "n1", "destroy")
    evidence = ended_evidence(world, "n1", other, ticket)
    world.tc.replace_tpm("n1", "test: a new TPM")  # the node is no longer the TPM the TC knew
    assert reason(world.tc.vm_ended, ticket, evidence) == "vm.end-node-unknown"


def test_a_vm_that_arrived_by_migration_may_be_ended_where_it_now_is(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    world.tc.migration_end(begun["migration"], record["vm_id"], True, "", arrival(world, begun, record))
    ticket = world.tc.vm_end_ticket(record["vm_id"], "n2", "destroy")  # no key release to n2: its stay
    assert ticket["ticket"]["node"] == "n2"


def test_each_suspension_step_is_audited_with_its_node_vm_and_ticket(world):
    record, begun = saved_on_n1(world)
    resume = world.tc.resume_begin("web", "n2")
    world.tc.resume_end(begun["suspension"], resumed_evidence(world, "n2", record, resume))
    entries = {e["kind"]: e for e in world.tc.registry.audit_entries(vm=record["vm_id"])}
    assert (entries["suspension.start"]["node"], entries["suspension.start"]["data"]["ticket"]) == \
        ("n1", begun["ticket"]["ticket"]["id"])
    assert entries["suspension.saved"]["data"] == {"suspension": begun["suspension"], "state_sha256": "ab" * 32}
    assert entries["suspension.saved"]["node"] == "n1"
    assert (entries["suspension.resume"]["node"], entries["suspension.resume"]["data"]["ticket"]) == \
        ("n2", resume["ticket"]["ticket"]["id"])
    assert entries["suspension.resume"]["data"] == {
        "suspension": begun["suspension"], "ticket": resume["ticket"]["ticket"]["id"],
        "certificate_serial": world.tc.registry.last_certificate("n2")["serial"]}
    assert (entries["suspension.resumed"]["node"], entries["suspension.resumed"]["data"]) == \
        ("n2", {"suspension": begun["suspension"]})
    assert all(e["vm"] == record["vm_id"] for e in entries.values())
