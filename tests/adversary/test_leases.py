"""Issue 20's node leases against a hostile engine (a valid engine certificate, root on its own
machine): leases coordinate honest engines and must give a hostile one nothing. It cannot keep a
failing node admitted by holding its lease (the TC's verdict quarantines whoever leases), cannot
end or take another engine's lease, cannot hold one past a round, and cannot lease in another
engine's name over HTTPS (the name is its certificate's, not the body's)."""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from tccdeploy.coordinator.refusals import Refused
from tccdeploy.coordinator.store import Registry
from tccdeploy.engine.attestation import attest

from ..conftest import REPO
from ..enginekit import Fleet, tampered_boot
from ..tcservice import BIN, Service


@pytest.fixture
def fleet(tmp_path):  # type: ignore[no-untyped-def]
    made = Fleet(tmp_path / "fleet", ["n1", "n2"], on_failure="evacuate")
    yield made
    made.close()


def test_holding_every_lease_does_not_keep_a_failing_node_admitted(fleet):
    fleet.tc.lease_nodes(["n1", "n2"], 600, engine="hostile")
    tampered_boot(fleet.services["n1"])
    (result,) = fleet.engine.run(attest(fleet.tc), [h for h in fleet.engine.hosts if h.name == "n1"])
    assert result.status == "failed"
    assert fleet.tc.node("n1").state == "quarantined"  # the verdict's own quarantine waits for no lease


def test_another_engines_lease_can_be_neither_ended_nor_taken(fleet):
    fleet.tc.lease_nodes(["n1"], 120, engine="engine-a")
    assert fleet.tc.release_leases(["n1"], engine="hostile") == 0
    assert fleet.tc.lease_nodes(["n1"], 120, engine="hostile") == {
        "granted": {}, "held": {"n1": {"engine": "engine-a", "until": pytest.approx(fleet.tc.registry.lease_of("n1")["until"])}},
        "unknown": []}
    with pytest.raises(Refused) as refused:
        fleet.tc.quarantine("n1", "node.unreachable", engine="hostile")
    assert refused.value.reason == "node.leased" and fleet.tc.node("n1").state == "admitted"
    vm = fleet.launch("n1")
    with pytest.raises(Refused) as refused:
        fleet.tc.migration_begin(vm.name, "n2", engine="hostile")
    assert refused.value.reason == "node.leased" and fleet.tc.migrations() == []
    assert fleet.tc.quarantine("n1", "node.unreachable", engine="engine-a")  # the holder acts


def test_names_the_tc_does_not_know_are_not_stored(fleet):
    """A hostile engine leasing made-up names (20,000 a call) would otherwise fill the registry."""
    names = [f"made-up-{i}" for i in range(2000)]
    answer = fleet.tc.lease_nodes([*names, "n1"], 60, engine="hostile")
    assert answer["unknown"] == names and list(answer["granted"]) == ["n1"]
    assert fleet.tc.registry._all("SELECT node FROM node_leases") == [{"node": "n1"}]


@pytest.mark.parametrize("seconds", [0, -1, 601, 1e9, math.inf, math.nan])
def test_a_lease_of_no_time_or_longer_than_a_round_is_refused(fleet, seconds):
    with pytest.raises(Refused) as refused:
        fleet.tc.lease_nodes(["n1"], seconds, engine="hostile")
    assert refused.value.reason == "lease.duration" and fleet.tc.registry.lease_of("n1") is None


def test_over_https_an_engine_leases_in_its_certificates_name_only(tmp_path):
    service = Service(tmp_path / "tc", str(REPO / "examples"))
    try:
        env = dict(os.environ, TCCDEPLOY_STATE=str(service.state))
        subprocess.run([str(BIN / "tccdeploy"), "tc", "engines", "add", "ops2", "-o", str(tmp_path / "ops2")], env=env,
                       check=True, capture_output=True)
        second = (str(tmp_path / "ops2" / "engine-cert.pem"), str(tmp_path / "ops2" / "engine-key.pem"))
        registry = Registry(str(service.state / "registry.sqlite"))  # n1, as an enrollment records it
        registry.enroll("n1", "site1", "127.0.1.7", {"ek_certificate": b"c", "ek_fingerprint": "f", "ek_public": b"e",
                                                     "ak_public": b"a", "ak_name": b"n", "ssh_host_key": "h",
                                                     "manufacturer": "m"})
        registry.close()
        with service.client() as ops, service.client(cert_files=second) as ops2:
            granted = ops.post("/v1/leases", json={"nodes": ["n1"], "seconds": 60}).json()
            assert list(granted["granted"]) == ["n1"]
            claimed = ops2.post("/v1/leases", json={"nodes": ["n1"], "seconds": 60, "engine": "ops"})
            assert claimed.status_code == 400  # no engine name in the body: it is the certificate's
            held = ops2.post("/v1/leases", json={"nodes": ["n1"], "seconds": 60}).json()
            assert held["granted"] == {} and held["held"]["n1"]["engine"] == "ops"
            refused = ops2.post("/v1/nodes/n1/quarantine", json={"reason": "node.unreachable"})
            assert refused.status_code == 403 and refused.json()["error"] == "node.leased"
            assert ops2.post("/v1/leases/end", json={"nodes": ["n1"]}).json() == {"ended": 0}
            assert ops.post("/v1/leases/end", json={"nodes": ["n1"]}).json() == {"ended": 1}
            too_long = ops.post("/v1/leases", json={"nodes": ["n1"], "seconds": 3600})
            assert too_long.status_code == 400
    finally:
        service.stop()


def test_a_migration_under_way_is_ended_only_by_the_engine_leasing_its_source(fleet):
    """Engine A evacuates n1 under its lease. Another engine's repair took every started migration
    for an interrupted one and aborted it (its round start did so to A's evacuation), and a hostile
    engine could end A's migration at will (found in review): now the TC refuses an end from an
    engine other than the one leasing the source, and repair leaves such a migration alone."""
    from tccdeploy.engine.migrate import repair

    fleet.tc.lease_nodes(["n1"], 120, engine="engine-a")
    vm = fleet.launch("n1")
    begun = fleet.tc.migration_begin(vm.name, "n2", engine="engine-a")
    with pytest.raises(Refused) as refused:
        fleet.tc.migration_end(begun["migration"], vm.vm_id, commit=False, reason="mine now", engine="hostile")
    assert refused.value.reason == "node.leased"
    assert repair(fleet.engine, fleet.tc) == []  # this engine ("local") does not lease n1: not its migration
    assert [m.state for m in fleet.tc.migrations()] == ["started"]
    assert fleet.tc.registry.lease_of("n1")["engine"] == "engine-a"  # its lease untouched
    fleet.tc.release_leases(["n1"], engine="engine-a")  # A's round ended (or A died): the migration is a leftover
    (repaired,) = repair(fleet.engine, fleet.tc)
    assert (repaired["action"], repaired["node"]) == ("rolled back", "n1")
    assert fleet.tc.registry.lease_of("n1") is None  # the repair's lease given back


def test_an_engine_removed_by_the_operator_holds_no_lease(fleet):
    """Its leases outlived its certificate by up to a round: a removed (hostile) engine kept the
    other engines off the nodes it had leased (found in review)."""
    fleet.tc.registry.add_engine("hostile", "abc", "fp")
    fleet.tc.lease_nodes(["n1", "n2"], 600, engine="hostile")
    assert fleet.tc.registry.revoke_engine("hostile")
    assert fleet.tc.registry.lease_of("n1") is None and fleet.tc.registry.lease_of("n2") is None
    assert list(fleet.tc.lease_nodes(["n1"], 60, engine="engine-a")["granted"]) == ["n1"]


def test_a_lease_call_that_lands_after_its_engine_is_removed_leases_nothing(fleet):
    """The API checks the engine's certificate when a call arrives; a lease call checked just
    before `tc engines remove` committed wrote its leases after the removal ended the engine's
    others, keeping the other engines off those nodes for a round (found in review). The lease's
    own write now checks the engine is still there."""
    fleet.tc.registry.add_engine("hostile", "abc", "fp")
    assert fleet.tc.registry.revoke_engine("hostile")  # between the API's check and the lease's write
    with pytest.raises(Refused) as refused:
        fleet.tc.lease_nodes(["n1", "n2"], 600, engine="hostile")
    assert refused.value.reason == "lease.engine-removed"
    assert fleet.tc.registry.lease_of("n1") is None and fleet.tc.registry.lease_of("n2") is None
    with pytest.raises(Refused) as refused:
        fleet.tc.lease_nodes(["n1"], 60, engine="never-added")
    assert refused.value.reason == "lease.engine-removed"


def test_a_migration_started_after_its_engine_is_removed_leases_nothing(fleet):
    """A migration's start leases its source to its engine: asked just before the removal, it
    leased the source to the removed engine for six minutes after (found in review)."""
    vm = fleet.launch("n1")
    fleet.tc.registry.add_engine("hostile", "abc", "fp")
    assert fleet.tc.registry.revoke_engine("hostile")
    with pytest.raises(Refused) as refused:
        fleet.tc.migration_begin(vm.vm_id, "n2", engine="hostile")
    assert refused.value.reason == "lease.engine-removed"
    assert fleet.tc.registry.lease_of("n1") is None and fleet.tc.registry.migrations() == []


def test_a_migration_started_without_a_lease_leases_its_source_to_its_engine(fleet):
    """`tccdeploy migrate` and `drain` take no round lease: another engine's repair took such a
    migration under way for an interrupted one and aborted it (found in review). Its start now
    leases the source to the engine that started it, for its tickets' life."""
    from tccdeploy.engine.migrate import repair

    vm = fleet.launch("n1")
    begun = fleet.tc.migration_begin(vm.name, "n2", engine="engine-a")
    lease = fleet.tc.registry.lease_of("n1")
    assert lease is not None and lease["engine"] == "engine-a"
    assert repair(fleet.engine, fleet.tc) == []  # ("local" is another engine here)
    with pytest.raises(Refused) as refused:
        fleet.tc.migration_end(begun["migration"], vm.vm_id, commit=False, engine="hostile")
    assert refused.value.reason == "node.leased"
    assert [m.state for m in fleet.tc.migrations()] == ["started"]


def test_a_rounds_repair_decides_under_the_rounds_lease_and_keeps_it(fleet):
    """A repair used to lease each source for itself and give it back after: inside a round that
    already leased the source, it ended the round's own lease, and other engines could take the
    node mid-round (found in review)."""
    from tccdeploy.engine.migrate import repair

    vm = fleet.launch("n1")
    fleet.tc.lease_nodes(["n1"], 600)  # the round's lease ("local", this fleet's engine)
    until = fleet.tc.registry.lease_of("n1")["until"]
    fleet.tc.migration_begin(vm.name, "n2")  # then the engine died before moving it
    (repaired,) = repair(fleet.engine, fleet.tc, held=frozenset({"n1"}))
    assert repaired["action"] == "rolled back"
    lease = fleet.tc.registry.lease_of("n1")
    assert lease is not None and lease["engine"] == "local" and lease["until"] >= until  # kept, and not shortened
