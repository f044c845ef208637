"""One TPM is one node, its identity changes only by the TC operator's decision, and a refused
enrollment changes nothing, at the TC or on the node."""

from __future__ import annotations

import base64

import pytest

from tccdeploy.coordinator.roster import ek_identities

from .conftest import World, refused

pytestmark = pytest.mark.slow


def _identity(world: World, name: str, new_ak: bool = True) -> dict[str, str]:
    """node's EK certificate and public, and (new_ak) a fresh AK from its TPM, as the engine gets them."""
    session = world.session(name)
    identity = session.tvmm("identity", {})
    out = {"ek_certificate": identity["ek_certificate"], "ek_public": identity["ek_public"]}
    if new_ak:
        out["ak_public"] = session.tvmm("ak_create", {})["ak_public"]
    return out


def _begin(world: World, as_node: str, identity: dict[str, str], site: str | None, address: str,
           host_key: str = "SHA256:anything"):  # type: ignore[no-untyped-def]
    return world.post("/v1/enrollments", {"node": as_node, **identity, "ssh_host_key": host_key, "site": site,
                                          "address": address})


def _attests(world: World, name: str) -> bool:
    result = world.engine_cmd("attest", name, "-i", world.lab.inventory_dir, "--json")
    return result.returncode == 0


def test_a_tpm_enrolled_as_one_node_cannot_enroll_as_another(world: World):
    """A relayed ("cuckoo") TPM: node1's genuine TPM answers for node9 too."""
    before, audited = world.decisions(), world.audit_count()
    refused(_begin(world, "node9", _identity(world, "node1"), "site1", "127.0.0.1"), "perimeter.roster-name")
    # An unnamed roster entry (a machine racked without a name yet) still enrolls once only.
    outside = world.lab.node("outside1")
    ek = ek_identities(base64.b64decode(_identity(world, "outside1", new_ak=False)["ek_certificate"]))[1]
    site1_address = world.lab.node("node1").address.rsplit(".", 1)[0] + ".50"
    assert world.operator("roster", "add", "site1", ek).returncode == 0
    try:
        identity = _identity(world, "outside1")
        # Its address is outside site1: the consistency check refuses the true one...
        refused(_begin(world, "machine-a", identity, "site1", outside.address), "perimeter.address")
        challenge = _begin(world, "machine-a", identity, "site1", site1_address)
        assert challenge.status_code == 200, challenge.text  # ...and an in-site claim passes it: it proves nothing
        answer = world.session("outside1").tvmm("ak_activate", {"credential": challenge.json()["credential"],
                                                               "secret": challenge.json()["secret"]})
        done = world.post("/v1/enrollments/finish", {"node": "machine-a", "answer": answer["secret"]})
        assert done.status_code == 200, done.text
        refused(_begin(world, "machine-b", _identity(world, "outside1"), "site1", site1_address), "ek.duplicate")
    finally:
        world.operator("nodes", "replace-tpm", "machine-a", "--note", "test over")
        world.operator("roster", "remove", ek)
    kinds = world.audit_kinds_since(audited)
    assert kinds.count("enrollment.refused") >= 3 and "roster.add" in kinds and "enrollment" in kinds
    after = world.decisions()
    assert after["identities"] == before["identities"] and after["roster"] == before["roster"]


def test_an_empty_ssh_host_key_is_refused(world: World):
    before = world.decisions()
    refused(_begin(world, "node1", _identity(world, "node1", new_ak=False) | {"ak_public": "AAAA"}, "site1",
                   world.lab.node("node1").address, host_key=""), "request.schema")
    evidence = world.quote("node1", world.nonce("node1"))
    refused(world.post("/v1/attestations", {"node": "node1", "site": "site1", "address": world.lab.node("node1").address,
                                            "evidence": evidence | {"ssh_host_key": ""}}), "request.schema")
    missing = {k: v for k, v in evidence.items() if k != "ssh_host_key"}
    refused(world.post("/v1/attestations", {"node": "node1", "site": "site1", "address": world.lab.node("node1").address,
                                            "evidence": missing}), "request.schema")
    assert world.decisions() == before and world.node_state("node1") == "admitted"


def test_enrolling_an_admitted_node_again_changes_nothing(world: World):
    """Enrollment is not a reset: not of the node's state, its site, its address or its AK."""
    before = world.decisions()
    identity = _identity(world, "node1")  # a fresh AK: the engine hopes to swap it in
    response = _begin(world, "node1", identity, "site1", world.lab.node("node1").address.rsplit(".", 1)[0] + ".99")
    assert response.status_code == 200 and response.json() == {"enrolled": True}
    again = world.engine_cmd("enroll", "node1", "-i", world.lab.inventory_dir, "--json")
    assert again.returncode == 0 and '"changed": false' in again.stdout.replace('"changed":false', '"changed": false')
    assert world.decisions() == before and world.node_state("node1") == "admitted"
    assert _attests(world, "node1")  # the node kept the AK the TC knows


def test_a_refused_enrollment_changes_nothing(world: World):
    """Another TPM under node2's name (the operator never racked it, or it is node1's): refused,
    and node2's record and its AK at the TC and on the node are as they were."""
    before, audited = world.decisions(), world.audit_count()
    address = world.lab.node("node2").address
    refused(_begin(world, "node2", _identity(world, "outside1"), "site1", address), "perimeter.not-in-roster")
    refused(_begin(world, "node2", _identity(world, "node1"), "site1", address), "perimeter.roster-name")
    refused(world.post("/v1/enrollments", {"node": "node2", **_identity(world, "node2"), "ssh_host_key": "h",
                                           "address": address, "force": True}), "request.schema")  # no engine flag
    assert world.decisions() == before
    assert world.audit_kinds_since(audited) == ["enrollment.refused", "enrollment.refused"]
    for name in ("node1", "node2"):
        assert _attests(world, name)
