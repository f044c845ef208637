"""Decisions are safe to ask for again, and asking again is no way around them (issue 15).

The same evidence sent twice (its first answer lost) gets the verdict recorded for it, not a
replay verdict that would quarantine a healthy node; other evidence on a used nonce is a replay.

The answer to a release can be lost in flight (a replica killed after its commit, a dropped
connection): the engine asks again, and the same node gets a fresh ticket that supersedes the
last, whichever the node then uses. A hostile engine may claim such a loss for any node: only the
node the key went to gets it again; another node gets it only once the release expired unused and
the first node rebooted (until then it may still launch the VM)."""

from __future__ import annotations

import pytest

from tccdeploy.coordinator import keybroker

from ..brokerkit import reason


@pytest.fixture
def world(broker_world):
    broker_world.node("n1")
    broker_world.node("n2")
    return broker_world


def kinds(world, since: int) -> list[str]:
    return [e["kind"] for e in world.tc.registry.audit_entries()[since:]]


def test_a_release_lost_in_flight_is_given_again_to_the_same_node_and_either_ticket_launches_once(world):
    record = world.accepted("acme")
    first = world.tc.release_key(record["id"], "n1")
    second = world.tc.release_key(record["id"], "n1")  # the engine never got the first answer
    assert second["ticket"]["ticket"]["id"] != first["ticket"]["ticket"]["id"]
    last = world.tc.registry.audit_entries()[-1]
    assert last["kind"] == "key-release" and last["data"]["supersedes"] == first["ticket"]["ticket"]["id"]
    # The node took the first ticket after all: its evidence names that one, and it is believed.
    receipt = world.tc.record_launch(second, "n1", world.started("n1", first))
    assert receipt["receipt"]["launch_evidence"]["ticket"] == first["ticket"]["ticket"]["id"]
    assert reason(world.tc.record_launch, second, "n1", world.started("n1", second)) == "launch.replayed"
    assert reason(world.tc.release_key, record["id"], "n1") == "release.already"  # launched: settled


def test_another_node_gets_the_key_only_after_the_release_expired_and_its_node_rebooted(world, clock):
    record = world.accepted("acme")
    world.tc.release_key(record["id"], "n1")
    assert reason(world.tc.release_key, record["id"], "n2") == "release.already"  # claiming a loss is not enough
    before = len(world.tc.registry.audit_entries())
    clock(keybroker.RELEASE_EXPIRY + 1)
    assert world.tc.expire_releases() == [record["id"]]
    assert world.tc.registry.request(record["id"])["state"] == "accepted"
    assert kinds(world, before) == ["release.expired"]
    world.attest("n2")  # (fresh after the clock moved)
    # n1 may still hold the first ticket (its clock is not the TC's): n2 must wait for n1's reboot.
    assert reason(world.tc.release_key, record["id"], "n2") == "release.unproven-copy"
    assert world.tc.registry.request(record["id"])["state"] == "accepted"
    world.nodes["n1"].tpm.reset += 1
    world.attest("n1")
    release = world.tc.release_key(record["id"], "n2")
    world.tc.record_launch(release, "n2", world.started("n2", release))
    assert world.tc.registry.vm(record["vm_id"])["node"] == "n2"


def test_a_launch_on_an_expired_release_is_not_recorded(world, clock):
    record = world.accepted("acme")
    stale = world.tc.release_key(record["id"], "n1")
    clock(keybroker.RELEASE_EXPIRY + 1)
    world.tc.expire_releases()
    assert reason(world.tc.record_launch, stale, "n1", world.started("n1", stale)) == "launch.replayed"
    assert world.tc.registry.vm(record["vm_id"]) is None


def test_the_same_release_is_given_a_bounded_number_of_times(world):
    record = world.accepted("acme")
    for _ in range(8):
        world.tc.release_key(record["id"], "n1")
    assert reason(world.tc.release_key, record["id"], "n1") == "release.reissue-limit"


def test_the_same_evidence_sent_again_gets_its_recorded_verdict_and_other_evidence_on_its_nonce_is_a_replay(world):
    before = len(world.tc.registry.attestations("n1", limit=100))
    nonce = world.tc.nonce("n1")
    evidence = world.nodes["n1"].tpm.evidence(nonce)
    verdict, first = world.tc.verify("n1", "site1", "127.0.1.7", evidence)
    assert verdict.trusted
    again, second = world.tc.verify("n1", "site1", "127.0.1.7", evidence)  # the answer was lost: asked again
    assert (again.trusted, second) == (True, first)
    assert world.tc.registry.node("n1")["state"] == "admitted"
    assert len(world.tc.registry.attestations("n1", limit=100)) == before + 1  # one verdict
    world.nodes["n1"].tpm.restart += 1  # another quote (the engine's own pick) on the used nonce
    replay, third = world.tc.verify("n1", "site1", "127.0.1.7", world.nodes["n1"].tpm.evidence(nonce))
    assert third != first and [r["code"] for r in replay.reasons] == ["nonce.replayed"]


def test_a_verdict_not_recorded_leaves_its_nonce_unused(world, monkeypatch):
    """A crash between the checks and the record (here: the record fails) uses no nonce, so the
    engine's retry is judged, not refused as a replay."""
    nonce = world.tc.nonce("n1")
    evidence = world.nodes["n1"].tpm.evidence(nonce)
    real = world.tc.registry.add_attestation

    def crash(*args, **kwargs):
        raise RuntimeError("the TC died here")

    monkeypatch.setattr(world.tc.registry, "add_attestation", crash)
    with pytest.raises(RuntimeError):
        world.tc.verify("n1", "site1", "127.0.1.7", evidence)
    monkeypatch.setattr(world.tc.registry, "add_attestation", real)
    verdict, _ = world.tc.verify("n1", "site1", "127.0.1.7", evidence)
    assert verdict.trusted, verdict.reasons


def test_a_release_past_its_expiry_expires_when_next_asked_for_even_before_the_sweep(world, clock):
    record = world.accepted("acme")
    world.tc.release_key(record["id"], "n1")
    clock(keybroker.RELEASE_EXPIRY + 1)
    world.attest("n2")
    before = len(world.tc.registry.audit_entries())
    assert reason(world.tc.release_key, record["id"], "n2") == "release.unproven-copy"
    assert "release.expired" in kinds(world, before)
    world.attest("n1")
    again = world.tc.release_key(record["id"], "n1")  # the same node takes it again, after its expiry too
    assert world.tc.registry.request(record["id"])["state"] == "released" and again["ticket"]
