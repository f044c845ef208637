"""The TC decides from its own records: every refusal of the key broker, the roster, the
quarantine, the launch and migration records and the customer's queries, each with its reason
code, in seconds and without a lab (software nodes, real verifier, real SQLite)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import time

import pytest

from tccdeploy.coordinator import roster, tpm2
from tccdeploy.coordinator.keybroker import check_customer_query, sign_customer_query
from tccdeploy.coordinator.refusals import AdmissionRefused, Refused
from tccdeploy.coordinator.roster import RosterEntry
from tccdeploy.coordinator.store import Conflict

from .attestkit import AssetTag
from .brokerkit import reason


@pytest.fixture
def world(broker_world):
    broker_world.customer("mallory")
    return broker_world


def codes(verdict) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["code"] for r in verdict.reasons]


# -- the roster ------------------------------------------------------------------------------
ENTRIES = [RosterEntry("sha256:" + "a" * 64, "site1", "n1"), RosterEntry("sha256:" + "b" * 64, "site2"),
           RosterEntry("sha256:" + "c" * 64, "site1"), RosterEntry("sha256:" + "c" * 64, "site2")]


@pytest.mark.parametrize("node, ek, claimed, code", [
    ("n1", "d", None, "perimeter.not-in-roster"),
    ("n2", "a", None, "perimeter.roster-name"),
    ("n1", "a", "site2", "perimeter.roster-site"),
    ("n3", "c", None, "perimeter.roster-conflict"),
])
def test_the_roster_refuses_what_it_does_not_place(node, ek, claimed, code):
    assert reason(roster.check, ENTRIES, node, ("sha256:" + ek * 64,), claimed) == code


def test_the_roster_places_a_named_and_an_unnamed_machine():
    assert roster.check(ENTRIES, "n1", ("x", "sha256:" + "a" * 64), "site1").site == "site1"
    assert roster.check(ENTRIES, "anything", ("sha256:" + "b" * 64,), None).site == "site2"
    assert roster.normalize("SHA256:" + "AB:" * 31 + "AB") == "sha256:" + "ab" * 32
    assert roster.normalize("  " + "cd" * 32 + " ") == "sha256:" + "cd" * 32  # bare hex, as some tools print it
    with pytest.raises(ValueError, match="'sha256:1234' is not an EK fingerprint: give sha256: and 64 hex digits"):
        roster.normalize("sha256:1234")
    with pytest.raises(ValueError, match="not an EK fingerprint"):
        roster.normalize("sha256:" + "g" * 64)


def test_a_node_taken_off_the_roster_fails_its_next_attestation(world):
    world.node("n1")
    ek = "sha256:" + hashlib.sha256(b"n1").hexdigest()
    assert world.tc.roster_remove(ek)
    verdict, _ = world.attest("n1")
    assert codes(verdict) == ["perimeter.not-in-roster", "perimeter.no-site"]
    assert world.tc.registry.node("n1")["state"] == "quarantined"


def test_a_site_claim_against_the_roster_is_untrusted(world):
    world.node("n1")
    verdict, _ = world.attest("n1", claimed_site="site2")
    assert codes(verdict) == ["perimeter.roster-site"]


def test_the_operator_roster_refuses_unknown_sites_and_duplicates(world):
    assert reason(world.tc.roster_add, "sha256:" + "e" * 64, "site9") == "roster.unknown-site"
    world.tc.roster_add("sha256:" + "e" * 64, "site1", "n7")
    assert reason(world.tc.roster_add, "sha256:" + "e" * 64, "site2") == "roster.duplicate"
    assert reason(world.tc.roster_add, "sha256:" + "f" * 64, "site2", "n7") == "roster.duplicate"
    kinds = [e["kind"] for e in world.tc.registry.audit_entries()]
    assert kinds == ["roster.add"]


# -- evidence: host key, asset tag ------------------------------------------------------------
def test_evidence_without_an_ssh_host_key_is_untrusted(world):
    world.node("n1")
    node = world.nodes["n1"]
    evidence = node.tpm.evidence(world.tc.nonce("n1"))
    evidence.ssh_host_key = ""
    verdict, _ = world.tc.verify("n1", "site1", "127.0.1.7", evidence)
    assert codes(verdict) == ["node.ssh-host-key"]


@pytest.mark.parametrize("tag, code, says", [
    (AssetTag(attributes=AssetTag().attributes & ~0x40000000 | 0x2), "perimeter.asset-tag-index", "OS owner"),  # owner-made
    (AssetTag(attributes=AssetTag().attributes & ~0x800), "perimeter.asset-tag-index", "write-locked"),  # not locked
    (AssetTag(index=0x01500002), "perimeter.asset-tag-index", "not the site's index 0x01500001"),  # another index
    (AssetTag(name_of=0x01500002), "perimeter.asset-tag-index", "not the site's index"),  # certified another name
    (AssetTag(offset=1), "perimeter.asset-tag-index", "only part"),
    (AssetTag(size=5), "perimeter.asset-tag-index", "only part"),  # a prefix of a longer tag
    (AssetTag(nonce=bytes(32)), "perimeter.asset-tag-nonce", "nonce"),
    (AssetTag(value=b"site3-rack-z"), "perimeter.asset-tag", "b'site3-rack-z', the site needs 'site2-rack-a'"),
])
def test_a_forged_asset_tag_is_untrusted(world, tag, code, says):
    world.node("n3", site="site2")
    verdict, _ = world.attest("n3", tag=tag)
    assert codes(verdict) == [code]
    assert says in verdict.reasons[0]["message"]


def test_an_asset_tag_certified_from_another_offset_is_not_the_whole_tag(world):
    """A certification claiming offset 1 yet carrying all 12 bytes of a 12-byte index: no TPM makes
    it, and the TC does not read it as the whole tag either."""
    import struct

    from .attestkit import sign, tpm2b

    world.node("n3", site="site2")
    node = world.nodes["n3"]
    tag = AssetTag()
    evidence = node.tpm.evidence(world.tc.nonce("n3"), tag=tag)
    name = tpm2.parse_nv_public(tag.nv_public()).name
    body = struct.pack(">IH", tpm2.TPM_GENERATED, tpm2.ST_ATTEST_NV) + tpm2b(b"\x00\x0b" + bytes(32))
    body += tpm2b(evidence.nonce) + struct.pack(">QIIB", 1, 1, 0, 1) + struct.pack(">Q", 0x2000)
    body += tpm2b(name) + struct.pack(">H", 1) + tpm2b(tag.value)
    evidence.asset_attest, evidence.asset_signature = body, sign(node.tpm.key, body)
    verdict, _ = world.tc.verify("n3", "site2", "127.0.2.7", evidence)
    assert codes(verdict) == ["perimeter.asset-tag-index"] and "only part" in verdict.reasons[0]["message"]


@pytest.mark.parametrize("forgery, says", [
    ("another-key", "not certified by the node's attestation key"),
    ("a-quote", "not certified by the node's attestation key"),
    ("not-tpm-generated", "not certified by the node's attestation key"),
    ("unparsable", "does not parse"),
])
def test_an_asset_tag_the_nodes_ak_did_not_certify_as_nv_is_untrusted(world, forgery, says):
    from .attestkit import Node, quote_attest, sign

    world.node("n3", site="site2")
    node = world.nodes["n3"]
    evidence = node.tpm.evidence(world.tc.nonce("n3"), tag=AssetTag())
    if forgery == "another-key":
        evidence.asset_signature = sign(Node().key, evidence.asset_attest)
    elif forgery == "a-quote":
        evidence.asset_attest = quote_attest(evidence.nonce, "sha256", [0], bytes(32))
        evidence.asset_signature = sign(node.tpm.key, evidence.asset_attest)
    elif forgery == "not-tpm-generated":
        evidence.asset_attest = b"\x00\x00\x00\x00" + evidence.asset_attest[4:]
        evidence.asset_signature = sign(node.tpm.key, evidence.asset_attest)
    else:
        evidence.asset_attest = evidence.asset_attest[:-3]
    verdict, _ = world.tc.verify("n3", "site2", "127.0.2.7", evidence)
    assert codes(verdict) == ["perimeter.asset-tag"] and says in verdict.reasons[0]["message"]


def test_a_missing_asset_tag_is_untrusted(world):
    world.node("n3", site="site2")
    verdict, _ = world.attest("n3", tag=None)
    assert codes(verdict) == ["perimeter.asset-tag"] and "certified none" in verdict.reasons[0]["message"]


# -- quarantine sticks ---------------------------------------------------------------------------
def test_a_quarantined_node_is_admitted_again_only_after_the_operators_release(world):
    world.node("n1")
    verdict, _ = world.attest("n1", log_extra=[(4, b"rogue")])
    assert codes(verdict) == ["build.unknown"] and world.tc.registry.node("n1")["state"] == "quarantined"
    with pytest.raises((AdmissionRefused, Conflict)) as info:
        world.admit("n1")
    assert info.value.reason == "admit.quarantined"
    assert world.tc.release_node("n1", "fixed") and world.tc.registry.node("n1")["state"] == "enrolled"
    world.admit("n1")
    assert world.tc.registry.node("n1")["state"] == "admitted"
    assert not world.tc.release_node("n1")  # only a quarantined node is released


def test_readmit_after_reboot_needs_a_higher_reset_count(world):
    world.tc.perimeter = dataclasses.replace(world.tc.perimeter, attestation=dataclasses.replace(
        world.tc.perimeter.attestation, readmit="after-reboot"))
    world.node("n1")
    world.attest("n1", log_extra=[(4, b"rogue")])
    with pytest.raises(Conflict):
        world.admit("n1")  # same boot: still out
    world.nodes["n1"].tpm.reset += 1
    world.admit("n1")
    assert world.tc.registry.node("n1")["state"] == "admitted"


def test_admission_on_an_attestation_older_than_the_quarantine_is_refused(world):
    world.node("n1")
    _, attestation = world.attest("n1")
    world.tc.quarantine("n1", "operator.evict")
    world.tc.release_node("n1")
    certificate = dict(world.tc.registry.certificate("n1") or {}, attestation=attestation, serial="x", build="b")
    with pytest.raises(Conflict) as info:
        world.tc.registry.admit("n1", certificate)
    assert info.value.reason == "admit.quarantined"


# -- requests: the image's owner, one copy ------------------------------------------------------
def test_requests_are_refused_with_their_reasons(world):
    bundle = world.image("acme")
    assert reason(world.tc.accept_request, world.request("acme", bundle, signer="mallory"), bundle) == "request.signature"
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    assert reason(world.tc.accept_request, world.request("acme", bundle, created=old), bundle) == "request.stale"
    other = world.image("acme")
    assert reason(world.tc.accept_request, world.request("acme", other), bundle) == "request.image"
    legacy = world.image("acme", version=1)
    assert reason(world.tc.accept_request, world.request("acme", legacy), legacy) == "request.image"
    envelope = world.request("acme", bundle, name="web")
    world.tc.accept_request(envelope, bundle)
    assert reason(world.tc.accept_request, envelope, bundle) == "request.replayed"
    assert reason(world.tc.accept_request, world.request("acme", bundle, name="web2"), bundle) == "request.vm-exists"
    malformed = {"request": {"customer": "ed25519:AAAA"}, "signature": "!!"}
    assert reason(world.tc.accept_request, malformed, bundle) == "request.signature"


def test_another_customer_cannot_take_an_image_by_copying_its_sealed_key(world):
    victim = world.image("acme")
    stolen = world.image("mallory")
    stolen["descriptor"] = dict(stolen["descriptor"], vm_id=victim["descriptor"]["vm_id"],
                                wrapped_key=victim["descriptor"]["wrapped_key"], disk=victim["descriptor"]["disk"])
    from tccdeploy.crypto.canonical import SEALED_IMAGE, signed_bytes

    stolen["signature"] = base64.b64encode(world.keys["mallory"].sign(signed_bytes(SEALED_IMAGE, stolen["descriptor"]))).decode()
    assert reason(world.tc.accept_request, world.request("mallory", stolen), stolen) == "request.image-owner"
    world.tc.accept_request(world.request("acme", victim), victim)  # acme's own image is acme's
    assert reason(world.tc.accept_request, world.request("mallory", stolen), stolen) == "request.image-owner"
    assert [e["kind"] for e in world.tc.registry.audit_entries()] == ["request.refused", "request", "request.refused"]


def test_a_vm_name_is_the_customers_once(world):
    world.node("n1")
    world.launched("acme", "n1", name="web")
    bundle = world.image("acme")
    assert reason(world.tc.accept_request, world.request("acme", bundle, name="web"), bundle) == "request.duplicate-vm"


def test_a_launch_failed_after_its_release_blocks_the_image_until_the_node_reboots(world):
    world.node("n1")
    bundle = world.image("acme")
    record = world.tc.accept_request(world.request("acme", bundle), bundle)
    world.tc.release_key(record["id"], "n1")
    world.tc.fail_request(record["id"])  # the engine says it failed: the node may run it all the same
    assert reason(world.tc.accept_request, world.request("acme", bundle), bundle) == "request.vm-exists"
    world.nodes["n1"].tpm.reset += 1  # a TPM reset proves every VM of the old boot gone
    world.attest("n1")
    world.tc.accept_request(world.request("acme", bundle), bundle)


# -- key release -------------------------------------------------------------------------------
def test_key_release_refusals(world):
    world.node("n1")
    world.node("n2", admit=False)
    record = world.accepted("acme")
    assert reason(world.tc.release_key, "nosuch", "n1") == "release.unknown-request"
    assert reason(world.tc.release_key, record["id"], "n2") == "release.not-admitted"
    assert reason(world.tc.release_key, record["id"], "n9") == "release.not-admitted"
    policy = world.tc.perimeter.attestation
    world.tc.perimeter = dataclasses.replace(world.tc.perimeter, attestation=dataclasses.replace(policy, max_quote_age=0))
    time.sleep(0.01)
    assert reason(world.tc.release_key, record["id"], "n1") == "release.not-fresh"
    world.tc.perimeter = dataclasses.replace(world.tc.perimeter, attestation=policy)
    builds = world.tc.builds
    world.tc.builds = [dataclasses.replace(b, status="revoked") for b in builds]  # a SIGHUP revoked the build
    assert reason(world.tc.release_key, record["id"], "n1") == "release.build-revoked"
    world.tc.builds = builds
    world.tc.registry.backend.transaction  # noqa: B018 - (the certificate expires below)
    with world.tc.registry.transaction() as db:
        db.execute("UPDATE certificates SET not_after = 0 WHERE node = 'n1'")
    assert reason(world.tc.release_key, record["id"], "n1") == "release.no-certificate"
    world.admit("n1")
    world.node("n3")
    world.tc.release_key(record["id"], "n1")
    assert reason(world.tc.release_key, record["id"], "n3") == "release.already"  # one node at a time
    assert world.tc.registry.request(record["id"])["state"] == "released"
    world.tc.fail_request(record["id"])
    assert reason(world.tc.release_key, record["id"], "n1") == "release.already"  # failed: settled


def test_a_release_key_sealed_for_another_tc_is_refused(world, tmp_path):
    world.node("n1")
    bundle = world.image("acme")
    record = world.tc.accept_request(world.request("acme", bundle), bundle)
    with world.tc.registry.transaction() as db:  # the stored key altered after acceptance
        db.execute("UPDATE requests SET wrapped_key = ? WHERE id = ?", (base64.b64encode(bytes(384)).decode(), record["id"]))
    assert reason(world.tc.release_key, record["id"], "n1") == "release.unwrap"


@pytest.mark.parametrize("constraints, where, message", [
    ({"sites": ["site2"]}, "site1", "site site1 not in"),
    ({"builds": ["tvmm-2026.2"]}, "site1", "build tvmm-2026.1 not in"),
    ({"minBuildVersion": "2026.2"}, "site1", "older than 2026.2"),
])
def test_a_release_outside_the_constraints_is_refused(world, constraints, where, message):
    world.node("n1", site=where)
    record = world.accepted("acme", constraints=constraints)
    with pytest.raises(Refused) as info:
        world.tc.release_key(record["id"], "n1")
    assert info.value.reason == "placement.constraint" and message in str(info.value)
    assert world.tc.registry.request(record["id"])["state"] == "accepted"


def test_anti_affinity_and_capacity_are_the_tcs(world):
    world.node("n1")
    world.launched("acme", "n1", constraints={"antiAffinityGroup": "db"})
    record = world.accepted("acme", constraints={"antiAffinityGroup": "db"})
    assert reason(world.tc.release_key, record["id"], "n1") == "placement.constraint"
    ek = "sha256:" + hashlib.sha256(b"n1").hexdigest()
    world.tc.roster_remove(ek)
    world.tc.roster_add(ek, "site1", "n1", capacity=1)
    other = world.accepted("acme")
    with pytest.raises(Refused) as info:
        world.tc.release_key(other["id"], "n1")
    assert info.value.reason == "placement.constraint" and "full (1/1 VMs)" in str(info.value)


def test_a_release_refused_says_where_the_key_went_and_which_node_may_still_hold_it(world, monkeypatch):
    from tccdeploy.coordinator import keybroker

    world.node("n1")
    world.node("n2")
    record = world.accepted("acme")
    world.tc.release_key(record["id"], "n1")
    with pytest.raises(Refused) as info:
        world.tc.release_key(record["id"], "n2")
    assert info.value.reason == "release.already" and "went to n1: ask again for n1" in str(info.value)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + keybroker.RELEASE_EXPIRY + 1)
    world.attest("n2")
    with pytest.raises(Refused) as info:
        world.tc.release_key(record["id"], "n2")
    assert info.value.reason == "release.unproven-copy" and "reboot n1 first" in str(info.value)


def test_a_release_another_process_made_meanwhile_is_refused_not_made_twice(world, monkeypatch):
    world.node("n1")
    record = world.accepted("acme")
    monkeypatch.setattr(world.tc.registry, "record_release", lambda *args, **kwargs: False)  # the other won
    with pytest.raises(Refused) as info:
        world.tc.release_key(record["id"], "n1")
    assert info.value.reason == "release.already" and "concurrently" in str(info.value)


def test_the_launch_ticket_is_what_the_node_takes_signed_by_the_tcs_ticket_key(world):
    import jsonschema

    from tccdeploy.crypto import ticket as tickets

    world.node("n1")
    record = world.accepted("acme", name="web")
    release = world.tc.release_key(record["id"], "n1")
    jsonschema.validate(release["ticket"], tickets.SIGNED)  # the node's own schema for it
    body = tickets.verify(release["ticket"], world.tc.identity().certificate)
    assert (body["v"], body["kind"], body["node"], body["name"], body["vm_id"]) == (1, "launch", "n1", "web",
                                                                                       record["vm_id"])
    assert body["runtime_pcr"] == world.tc.perimeter.attestation.runtime_pcr
    assert body["expires"] - body["issued"] == tickets.TTL


# -- launch records, receipts and VM state ----------------------------------------------------
def test_a_launch_is_recorded_once_from_the_tcs_rows(world):
    world.node("n1")
    world.node("n2")
    record = world.accepted("acme")
    release = world.tc.release_key(record["id"], "n1")
    assert reason(world.tc.record_launch, release, "n2", world.started("n1", release)) == "launch.no-release"
    forged = dict(release, certificate_serial="beef", attestation=1)
    receipt = world.tc.record_launch(forged, "n1", world.started("n1", release))
    assert receipt["receipt"]["node_certificate_serial"] == release["certificate_serial"]  # the TC's, not the engine's
    assert receipt["receipt"]["customer"] == "acme" and receipt["receipt"]["tvmm_build"] == "tvmm-2026.1"
    assert reason(world.tc.record_launch, release, "n1", world.started("n1", release)) == "launch.replayed"
    assert world.tc.registry.receipt(record["id"]) == receipt
    evidence = receipt["receipt"]["launch_evidence"]
    assert evidence["ticket"] == release["ticket"]["ticket"]["id"] and evidence["events"][-1]["event"] == "launched"


def _evidence_case(world, node, release, change: str) -> dict:  # type: ignore[no-untyped-def]
    software = world.nodes[node].tpm
    ticket = release["ticket"]
    body = ticket["ticket"]
    launched = {"event": "launched", "vm_id": body["vm_id"], "image_sha256": body["image_sha256"],
                "ticket": body["id"], "vcpus": body["vcpus"], "memory_mib": body["memory_mib"]}
    if change == "missing":
        return {"running": True}
    if change == "other-ticket":  # evidence the node made for an earlier launch
        return {"running": True, "evidence": software.runtime_evidence(ticket, quoted_for="0" * 32)}
    if change == "other-ak":
        from tests.attestkit import Node

        return {"running": True, "evidence": Node().runtime_evidence(ticket)}
    if change == "other-pcr":
        return {"running": True, "evidence": software.runtime_evidence(ticket, pcr=16)}
    if change == "other-vm":
        return {"running": True, "evidence": software.runtime_evidence(ticket, events=[dict(launched, vm_id="f" * 32)])}
    if change == "not-last":  # launched, then destroyed: not running any more
        return {"running": True, "evidence": software.runtime_evidence(
            ticket, events=[launched, {"event": "destroyed", "vm_id": body["vm_id"], "ticket": "x"}])}
    evidence = software.runtime_evidence(ticket)
    if change == "log":  # an event list that is not what the PCR holds
        evidence["events"] = evidence["events"] + [dict(launched, ticket="y")]
    elif change == "value":
        evidence["value"] = "00" * 32
    elif change == "malformed":
        evidence["attest"] = "!!"
    elif change in ("reboot", "restart"):  # a TPM reset, or a Restart (same resetCount, PCRs cleared)
        counter = "reset" if change == "reboot" else "restart"
        setattr(software, counter, getattr(software, counter) + 1)
        evidence = software.runtime_evidence(ticket)
        setattr(software, counter, getattr(software, counter) - 1)
    return {"running": True, "evidence": evidence}


@pytest.mark.parametrize(("change", "code"), [
    ("missing", "runtime.missing"), ("other-ticket", "runtime.nonce"),
    ("other-ak", "runtime.signature"), ("other-pcr", "runtime.pcr"), ("value", "runtime.pcr"),
    ("other-vm", "launch.evidence-event"), ("not-last", "launch.evidence-event"), ("log", "runtime.log"),
    ("malformed", "runtime.malformed"), ("reboot", "launch.evidence-reboot"), ("restart", "launch.evidence-reboot"),
])
def test_a_launch_is_recorded_only_on_the_nodes_tpm_evidence_for_its_ticket(world, change: str, code: str):
    world.node("n1")
    record = world.accepted("acme")
    release = world.tc.release_key(record["id"], "n1")
    assert reason(world.tc.record_launch, release, "n1", _evidence_case(world, "n1", release, change)) == code
    assert world.tc.registry.request(record["id"])["state"] == "released" and world.tc.registry.vm(record["vm_id"]) is None
    assert world.tc.record_launch(release, "n1", world.started("n1", release))["receipt"]["vm_id"] == record["vm_id"]


def test_the_engines_word_only_pauses_and_resumes_a_vm(world):
    world.node("n1")
    record = world.launched("acme", "n1")
    world.tc.set_vm_state(record["vm_id"], "stopped")
    world.tc.set_vm_state(record["vm_id"], "running")
    for state in ("starting", "destroyed", "off", "suspended"):
        assert reason(world.tc.set_vm_state, record["vm_id"], state) == "vm.state-transition"
    assert world.tc.registry.vm(record["vm_id"])["state"] == "running"
    assert reason(world.tc.set_vm_state, "nosuch", "stopped") == "vm.state-transition"


# -- migration ----------------------------------------------------------------------------------
def test_migration_refusals(world):
    world.node("n1")
    world.node("n2")
    world.node("n3", site="site2")
    record = world.launched("acme", "n1", name="web", constraints={"sites": ["site1"]})
    assert reason(world.tc.migration_begin, "nosuch", "n2") == "migrate.unknown-vm"
    assert reason(world.tc.migration_begin, "web", "n1") == "migrate.same-node"
    assert reason(world.tc.migration_begin, "web", "n3") == "placement.constraint"
    begun = world.tc.migration_begin("web", "n2")
    world.tc.quarantine("n2", "test")
    assert reason(world.tc.migration_end, begun["migration"], record["vm_id"], True) == "migrate.destination-untrusted"
    assert world.tc.vm("web").node == "n1"
    world.tc.migration_end(begun["migration"], record["vm_id"], False, "destination lost trust")
    assert world.tc.vm("web").node == "n1"


def test_a_migration_is_committed_only_on_the_destinations_evidence_of_arrival(world):
    world.node("n1")
    world.node("n2")
    record = world.launched("acme", "n1", name="web")
    begun = world.tc.migration_begin("web", "n2")
    ticket = begun["in_ticket"]
    body = ticket["ticket"]
    arrived = {"event": "migrated-in", "vm_id": record["vm_id"], "migration": body["migration"], "source": "n1",
               "ticket": body["id"], "image_sha256": body["image_sha256"]}
    destination = world.nodes["n2"].tpm
    end = world.tc.migration_end
    assert reason(end, begun["migration"], record["vm_id"], True) == "runtime.missing"
    assert reason(end, begun["migration"], record["vm_id"], True, "",
                  destination.runtime_evidence(ticket, events=[arrived], quoted_for=begun["out_ticket"]["ticket"]["id"])) \
        == "runtime.nonce"
    assert reason(end, begun["migration"], record["vm_id"], True, "",
                  world.nodes["n1"].tpm.runtime_evidence(ticket, events=[arrived])) == "runtime.signature"  # the source's TPM
    assert reason(end, begun["migration"], record["vm_id"], True, "", destination.runtime_evidence(
        ticket, events=[arrived, {"event": "migrated-out", "vm_id": record["vm_id"], "ticket": "x"}])) \
        == "migrate.evidence-event"  # it arrived, and left again
    assert world.tc.vm("web").node == "n1"
    end(begun["migration"], record["vm_id"], True, "", destination.runtime_evidence(ticket, events=[arrived]))
    assert world.tc.vm("web").node == "n2"


# -- the customer's queries ------------------------------------------------------------------------
def test_customer_queries_are_signed_fresh_and_used_once(world):
    record = world.accepted("acme")
    acme, mallory = world.keys["acme"], world.keys["mallory"]
    query = sign_customer_query(acme, record["id"], "status")
    assert check_customer_query(world.tc.registry, record["id"], "status", query["time"], query["signature"])["id"] \
        == record["id"]
    assert reason(check_customer_query, world.tc.registry, record["id"], "status", query["time"], query["signature"]) == "query.replayed"
    assert reason(check_customer_query, world.tc.registry, "nosuch", "status", query["time"], query["signature"]) == "query.unknown-request"
    other = sign_customer_query(mallory, record["id"], "status")
    assert reason(check_customer_query, world.tc.registry, record["id"], "status", other["time"], other["signature"]) == "query.signature"
    as_receipt = sign_customer_query(acme, record["id"], "status")
    assert reason(check_customer_query, world.tc.registry, record["id"], "receipt", as_receipt["time"], as_receipt["signature"]) == "query.signature"
    old = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)).isoformat(timespec="seconds")
    stale = {"time": old, "signature": base64.b64encode(acme.sign(b"x")).decode()}
    assert reason(check_customer_query, world.tc.registry, record["id"], "status", stale["time"], stale["signature"]) == "query.expired"
    bad = {"time": "yesterday", "signature": "!!"}
    assert reason(check_customer_query, world.tc.registry, record["id"], "status", bad["time"], bad["signature"]) == "query.signature"


# -- the audit log holds every decision, signed ---------------------------------------------------
def test_every_decision_is_audited_with_a_verifying_signature(world):
    from tccdeploy.coordinator import audit

    world.node("n1")
    world.launched("acme", "n1")
    kinds = [e["kind"] for e in world.tc.registry.audit_entries()]
    assert kinds == ["attestation", "request", "key-release", "launch"]
    assert audit.verify(world.tc.registry, tc=world.tc.identity()).ok


def test_a_receipt_carries_the_launch_evidence_and_verify_checks_it_again(world):
    from tccdeploy.coordinator import receipts

    world.node("n1")
    record = world.accepted("acme")
    release = world.tc.release_key(record["id"], "n1")
    envelope = world.tc.record_launch(release, "n1", world.started("n1", release))
    ca = world.tc.identity().certificate
    body = receipts.verify(envelope, ca)
    assert body["version"] == 4 and body["launch_evidence"]["ticket"] == release["ticket"]["ticket"]["id"]
    assert body["customer_key_id"] == world.tc.registry.image_owner(record["vm_id"])["key_id"]
    # Evidence that does not hold cannot ride in a receipt, even one the TC signed.
    for damage, code in (("events", "receipt.evidence"), ("vm", "receipt.evidence-event"),
                         ("image", "receipt.evidence-event"), ("quote", "receipt.evidence"),
                         ("missing", "receipt.evidence-missing"), ("no-ticket", "receipt.evidence-malformed"),
                         ("pcr-not-a-number", "receipt.evidence-malformed"), ("ak-not-base64", "receipt.evidence-malformed"),
                         ("another-launch", "receipt.evidence-event")):
        evidence = dict(body["launch_evidence"])
        altered = {k: v for k, v in body.items() if k not in ("type", "version", "tc")}
        if damage == "events":
            evidence["events"] = evidence["events"] + [evidence["events"][-1]]
        elif damage == "vm":
            altered["vm_id"] = "f" * 32
        elif damage == "image":
            altered["image_sha256"] = "f" * 64
        elif damage == "quote":
            evidence["ticket"] = "0" * 32
        elif damage == "no-ticket":
            del evidence["ticket"]
        elif damage == "pcr-not-a-number":
            evidence["runtime_pcr"] = "fifteen"
        elif damage == "ak-not-base64":
            evidence["ak_public"] = "!"
        elif damage == "another-launch":  # the node's own quote, for another ticket it was given: the event names it
            other = world.tc.release_key(world.accepted("acme")["id"], "n1")
            forged = world.nodes["n1"].tpm.runtime_evidence(
                release["ticket"], events=[dict(evidence["events"][-1], ticket=other["ticket"]["ticket"]["id"])])
            evidence.update(quote=forged["attest"], signature=forged["signature"], pcr_value=forged["value"],
                            events=forged["events"])
        altered["launch_evidence"] = evidence
        if damage == "missing":
            altered["launch_evidence"] = None
        signed = receipts.sign(world.tc.identity(), altered)  # (the keys present: a version 4 receipt)
        with pytest.raises(receipts.ReceiptError) as info:
            receipts.verify(signed, ca)
        assert info.value.reason == code, damage


@pytest.mark.parametrize(("damage", "code"), [
    ("not-tpm-generated", "runtime.signature"), ("not-a-quote", "runtime.signature"),
    ("events-not-a-list", "runtime.malformed"), ("too-many-events", "runtime.malformed"),
    ("event-not-an-object", "runtime.malformed"), ("attest-not-base64", "runtime.malformed"),
    ("signature-not-base64", "runtime.malformed"), ("not-an-object", "runtime.missing"),
    ("event-not-encodable", "runtime.malformed"), ("as-many-events-as-allowed", ""),
])
def test_runtime_evidence_of_the_wrong_form_is_refused_by_name(world, damage: str, code: str):
    from tccdeploy.coordinator import runtime, tpm2
    from tccdeploy.crypto.runtime import qualifier, replay
    from tests.attestkit import certify_attest, quote_attest, sign

    node = world.node("n1").tpm
    events = [{"event": "launched", "vm_id": "a" * 32, "ticket": "t"}]
    value = replay(events)
    magic = 0x12345678 if damage == "not-tpm-generated" else tpm2.TPM_GENERATED
    attest = quote_attest(qualifier("t"), "sha256", [15], hashlib.sha256(value).digest(), magic=magic)
    if damage == "not-a-quote":  # a TPM2_Certify the AK made, presented as the quote
        attest = certify_attest(qualifier("t"), b"\x00\x0b" + bytes(32))
    evidence: object = {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(sign(node.key, attest)).decode(),
                        "value": value.hex(), "events": events}
    if damage == "events-not-a-list":
        evidence["events"] = {"0": events[0]}  # type: ignore[index]
    elif damage == "too-many-events":
        evidence["events"] = events * (runtime.MAX_EVENTS + 1)  # type: ignore[index]
    elif damage == "event-not-an-object":
        evidence["events"] = ["launched"]  # type: ignore[index]
    elif damage == "attest-not-base64":
        evidence["attest"] = evidence["attest"] + "!"  # type: ignore[index]
    elif damage == "signature-not-base64":
        evidence["signature"] = "*" + evidence["signature"]  # type: ignore[index]
    elif damage == "not-an-object":
        evidence = [evidence]
    elif damage == "event-not-encodable":  # canonical JSON has no NaN: the list cannot be replayed
        evidence["events"] = [{"event": "launched", "vcpus": float("nan")}]  # type: ignore[index]
    elif damage == "as-many-events-as-allowed":
        many = events * runtime.MAX_EVENTS
        value = replay(many)
        attest = quote_attest(qualifier("t"), "sha256", [15], hashlib.sha256(value).digest())
        evidence = {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(sign(node.key, attest)).decode(),
                    "value": value.hex(), "events": many}
        assert len(runtime.verify(evidence, node.ak_public, 15, "t").events) == runtime.MAX_EVENTS
        return
    with pytest.raises(Refused) as info:
        runtime.verify(evidence, node.ak_public, 15, "t")
    assert info.value.reason == code


def test_vms_on_other_nodes_do_not_count_against_a_node(world):
    """The placement check weighs the VMs the registry places on this node only (issue 20 reads
    those, not the fleet's)."""
    world.node("n1")
    world.node("n2")
    world.launched("acme", "n2", constraints={"antiAffinityGroup": "db"})
    record = world.accepted("acme", constraints={"antiAffinityGroup": "db"})
    assert world.tc.release_key(record["id"], "n1")["node"] == "n1"


def test_a_key_release_reads_the_nodes_identity_and_roster_once(world, monkeypatch):
    """Its capacity, its rollout name and its roster entry come from one read (identity and roster
    joined), its state, newest verdict and certificate from one more, the request and its image's
    owner from a third (issue 20's hot path)."""
    world.node("n1")
    record = world.accepted("acme")
    reads: list[str] = []
    for name in ("identity", "roster", "request", "image_owner", "standing", "node", "attestations", "certificate",
                 "identity_and_roster", "request_and_owner"):
        original = getattr(world.tc.registry, name)
        monkeypatch.setattr(world.tc.registry, name, lambda *a, _f=original, _n=name, **k: reads.append(_n) or _f(*a, **k))
    vms_asked: list[object] = []
    from tccdeploy.coordinator.store import Registry

    original_placed = Registry._placed_sql
    monkeypatch.setattr(Registry, "_placed_sql", lambda self, node: vms_asked.append(node) or original_placed(self, node))
    original_vms = world.tc.registry.vms
    monkeypatch.setattr(world.tc.registry, "vms", lambda *a, **k: vms_asked.append(("fleet", k)) or original_vms(*a, **k))
    world.tc.release_key(record["id"], "n1")
    assert sorted(reads) == ["identity_and_roster", "request_and_owner", "standing"]
    assert vms_asked == ["n1"]  # the node's own VMs and those on their way, not the fleet's


def test_a_release_handed_another_requests_row_reads_its_own(world):
    """keybroker.release takes the caller's read of the request only when it is that request's."""
    from tccdeploy.coordinator import keybroker

    world.node("n1")
    first, second = world.accepted("acme"), world.accepted("acme")
    tc = world.tc
    released = keybroker.release(tc.registry, tc.identity(), tc.perimeter, tc.baseline(), second["id"], "n1",
                                 None, request=tc.registry.request(first["id"]))
    assert released["request"]["id"] == second["id"] and released["ticket"]["ticket"]["request"] == second["id"]
    assert tc.registry.request(first["id"])["state"] == "accepted"


def test_a_release_handed_another_images_owner_reads_its_own(world):
    """keybroker.release takes the caller's read of the image's owner only when it is that
    request's image: the key's label and the ticket name the owner of this VM's image."""
    from tccdeploy.coordinator import keybroker

    world.node("n1")
    first, second = world.accepted("acme"), world.accepted("acme")
    tc = world.tc
    assert first["vm_id"] != second["vm_id"]
    other = dict(tc.registry.image_owner(first["vm_id"]), key_id="someone-elses-key")
    released = keybroker.release(tc.registry, tc.identity(), tc.perimeter, tc.baseline(), second["id"], "n1",
                                 None, owner=other)
    assert released["ticket"]["ticket"]["customer"] == tc.registry.image_owner(second["vm_id"])["key_id"]
