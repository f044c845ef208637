"""The engine's decisions against software nodes and the real TC (tests/enginekit.py): what an
enforcement round does with a failed, unreachable or unknown node and its VMs under each policy,
how a migration chooses its destination, rolls back when a step fails, and how repair settles a
migration an engine crash left behind. The same on the lab: tests/test_enforce.py, test_migrate.py."""

from __future__ import annotations

import pytest

from tccdeploy.coordinator.refusals import Refused
from tccdeploy.engine.enforce import enforce_round
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.migrate import migrate, repair

from .enginekit import Fleet, tampered_boot
from .enginekit import interrupted as _interrupted


@pytest.fixture
def make(tmp_path):  # type: ignore[no-untyped-def]
    """Two admitted software nodes under a TC whose attestation policy has these changes."""
    made: list[Fleet] = []

    def fleet(**policy) -> Fleet:  # type: ignore[no-untyped-def]
        made.append(Fleet(tmp_path / str(len(made)), ["n1", "n2"], **policy))
        return made[-1]

    yield fleet
    for each in made:
        each.close()


@pytest.fixture
def fleet(make) -> Fleet:  # type: ignore[no-untyped-def]
    return make()


def states(fleet: Fleet) -> dict[str, str]:
    return {n.name: n.state for n in fleet.tc.nodes()}


def test_a_round_over_trusted_nodes_changes_nothing(fleet):
    vm = fleet.launch("n1")
    report = enforce_round(fleet.engine, fleet.tc)
    assert sorted((r.host, r.status) for r in report.attested) == [("n1", "ok"), ("n2", "ok")]
    assert report.quarantined == [] and report.vms == []
    assert states(fleet) == {"n1": "admitted", "n2": "admitted"} and fleet.where(vm) == ("n1", "running")


def test_a_node_that_boots_something_else_is_quarantined_and_its_vm_evacuated(make):
    fleet = make(on_failure="evacuate")
    vm = fleet.launch("n1")
    tampered_boot(fleet.services["n1"])
    report = enforce_round(fleet.engine, fleet.tc)
    assert report.quarantined == [{"node": "n1", "reason": "build.unknown"}]
    assert states(fleet) == {"n1": "quarantined", "n2": "admitted"}
    assert [(v["vm"], v["policy"], v["result"]) for v in report.vms] == [(vm.name, "evacuate", "evacuated to n2")]
    assert fleet.where(vm) == ("n2", "running")
    assert fleet.services["n2"].vms[vm.vm_id] == "running" and vm.vm_id not in fleet.services["n1"].vms
    assert fleet.tc.migrations()[-1].state == "committed"


def test_a_failed_evacuation_is_rolled_back_and_the_vm_powered_off(make):
    fleet = make(on_failure="evacuate")
    """Fail closed: the VM must not keep running on the untrusted node. The TC still keeps it live
    in its records: the quarantined node's word that it stopped is not believed."""
    vm = fleet.launch("n1")
    tampered_boot(fleet.services["n1"])
    fleet.services["n2"].fail["migrate_in_finish"] = RemoteError("tvmm.qemu", "the incoming QEMU died")
    report = enforce_round(fleet.engine, fleet.tc)
    (outcome,) = report.vms
    assert outcome["result"].startswith("powered off (evacuation failed: ")
    assert "vm.end-boot-untrusted" in outcome["result"] and "the incoming QEMU died" in outcome["evacuation_error"]
    assert fleet.tc.migrations()[-1].state == "aborted"
    assert fleet.services["n1"].vms[vm.vm_id] == "off"  # resumed by the abort, then powered off
    assert vm.vm_id not in fleet.services["n2"].vms  # the destination's copy dropped by its settle ticket
    assert fleet.where(vm) == ("n1", "running")


def test_policy_stop_powers_the_vm_off(make):
    fleet = make(on_failure="stop")
    vm = fleet.launch("n1")
    tampered_boot(fleet.services["n1"])
    (outcome,) = enforce_round(fleet.engine, fleet.tc).vms
    assert outcome["policy"] == "stop" and outcome["result"].startswith("powered off")
    assert fleet.services["n1"].vms[vm.vm_id] == "off" and "migrate_out_start" not in fleet.services["n1"].calls


def test_policy_quarantine_leaves_the_vm_and_says_so(make):
    fleet = make(on_failure="quarantine")
    vm = fleet.launch("n1")
    tampered_boot(fleet.services["n1"])
    (outcome,) = enforce_round(fleet.engine, fleet.tc).vms
    assert outcome["result"] == "left running (policy quarantine)"
    assert fleet.services["n1"].vms[vm.vm_id] == "running" and "vm_end" not in fleet.services["n1"].calls


def test_a_vm_on_an_unreachable_quarantined_node_is_reported_not_lost(make):
    fleet = make(on_failure="stop")
    fleet.launch("n1")
    fleet.services["n1"].down = True
    fleet.tc.registry.backend.db.execute("UPDATE attestations SET time = time - 1000 WHERE node = 'n1'")
    fleet.tc.registry.backend.db.commit()
    report = enforce_round(fleet.engine, fleet.tc)
    assert report.quarantined[0]["node"] == "n1" and report.quarantined[0]["reason"].startswith("node.unreachable")
    assert report.vms[0]["result"].startswith("could not reach the node to stop it")


def test_an_unreachable_node_within_its_grace_period_stays_admitted(fleet):
    fleet.services["n1"].down = True
    report = enforce_round(fleet.engine, fleet.tc)
    assert [r.status for r in report.attested if r.host == "n1"] == ["unreachable"]
    assert report.quarantined == [] and states(fleet)["n1"] == "admitted"


def test_an_unreachable_node_past_its_grace_period_is_quarantined(make):
    fleet = make(grace_period=0)
    fleet.services["n1"].down = True
    report = enforce_round(fleet.engine, fleet.tc)
    assert report.quarantined == [{"node": "n1", "reason": "node.unreachable (connect)"}]
    assert states(fleet)["n1"] == "quarantined"


def test_an_admitted_node_the_inventory_no_longer_has_is_quarantined(fleet):
    fleet.engine.hosts = [h for h in fleet.engine.hosts if h.name != "n2"]
    report = enforce_round(fleet.engine, fleet.tc)
    assert report.quarantined == [{"node": "n2", "reason": "node.not-in-inventory"}]
    assert enforce_round(fleet.engine, fleet.tc, only={"n1"}).quarantined == []  # a round over some nodes only


# -- migration ---------------------------------------------------------------------------------
def test_a_migration_moves_the_vm_and_both_ends_settle(fleet):
    vm = fleet.launch("n1")
    moved = migrate(fleet.engine, fleet.tc, vm.name)
    assert (moved["from"], moved["to"]) == ("n1", "n2") and moved["ciphertext_bytes"] > 0
    assert fleet.where(vm) == ("n2", "running")
    assert fleet.services["n2"].vms[vm.vm_id] == "running" and vm.vm_id not in fleet.services["n1"].vms
    assert fleet.services["n1"].pending == {} and fleet.services["n2"].pending == {}


@pytest.mark.parametrize("step", ["disk_receive", "migrate_in_start", "migrate_in_stream", "migrate_in_finish"])
def test_a_migration_that_fails_at_any_step_rolls_back_to_the_running_source(fleet, step):
    vm = fleet.launch("n1")
    fleet.services["n2"].fail[step] = RemoteError("tvmm.io", f"{step} failed")
    with pytest.raises(RemoteError, match=f"{step} failed"):
        migrate(fleet.engine, fleet.tc, vm.name, "n2")
    assert fleet.tc.migrations()[-1].state == "aborted"
    assert fleet.where(vm) == ("n1", "running") and fleet.services["n1"].vms[vm.vm_id] == "running"
    assert vm.vm_id not in fleet.services["n2"].vms and fleet.services["n1"].pending == {}


def test_a_source_that_dies_mid_stream_rolls_back_and_its_vm_stays_paused_until_repair(fleet):
    """The abort is recorded; the source's settle ticket cannot reach it now, so it stays paused
    (it cannot resume on the engine's word); repair brings the ticket later."""
    vm = fleet.launch("n1")
    fleet.services["n1"].fail["migrate_out_stream"] = RemoteError("tvmm.io", "the source's QEMU died")
    fleet.services["n1"].fail["migrate_out_end"] = RemoteError("tvmm.io", "still down")
    with pytest.raises(RemoteError):
        migrate(fleet.engine, fleet.tc, vm.name, "n2")
    assert fleet.services["n1"].vms[vm.vm_id] == "paused"
    del fleet.services["n1"].fail["migrate_out_end"]
    assert repair(fleet.engine, fleet.tc)[0]["action"] == "settled source (abort)"
    assert fleet.services["n1"].vms[vm.vm_id] == "running" and fleet.where(vm) == ("n1", "running")


def test_a_round_reports_the_migration_end_it_settled_by_vm_and_node(fleet, capsys):
    """An end left unsettled (here: a node that lost the record of its settlement in a power cut
    comes back asking) is settled at the start of the next round, and reported as any VM outcome:
    by the VM's name and node, which `enforce` prints."""
    vm = fleet.launch("n1")
    fleet.services["n1"].fail["migrate_out_stream"] = RemoteError("tvmm.io", "the source's QEMU died")
    fleet.services["n1"].fail["migrate_out_end"] = RemoteError("tvmm.io", "still down")
    with pytest.raises(RemoteError):
        migrate(fleet.engine, fleet.tc, vm.name, "n2")
    del fleet.services["n1"].fail["migrate_out_end"]
    report = enforce_round(fleet.engine, fleet.tc)
    (outcome,) = report.vms
    assert (outcome["vm"], outcome["node"], outcome["result"]) == (vm.name, "n1", "interrupted migration settled source (abort)")
    from tccdeploy.commands.provider import print_round  # what `enforce` prints of a round

    print_round(1, report)
    assert f"VM {vm.name} on n1: interrupted migration settled source (abort)" in capsys.readouterr().out


def test_no_destination_and_an_untrusted_destination_are_refused_before_anything_moves(fleet):
    vm = fleet.launch("n1")
    tampered_boot(fleet.services["n2"])
    with pytest.raises(Refused) as info:
        migrate(fleet.engine, fleet.tc, vm.name, "n2")
    assert info.value.reason == "migrate.destination-untrusted"
    with pytest.raises(Refused) as info:
        migrate(fleet.engine, fleet.tc, vm.name)  # n2 is quarantined now: no other node qualifies
    assert info.value.reason == "migrate.no-destination" and "n2: not admitted (quarantined)" in str(info.value)
    assert fleet.tc.migrations() == [] and fleet.services["n1"].vms[vm.vm_id] == "running"




def test_repair_commits_a_migration_the_destinations_tpm_shows_arrived(fleet):
    vm = fleet.launch("n1")
    _interrupted(fleet, vm, arrived=True)
    (done,) = [r for r in repair(fleet.engine, fleet.tc) if r["vm_id"] == vm.vm_id]
    assert done["action"] == "committed" and done["node"] == "n2"
    assert fleet.where(vm)[0] == "n2" and vm.vm_id not in fleet.services["n1"].vms


def test_repair_rolls_back_a_migration_the_destination_never_finished(fleet):
    vm = fleet.launch("n1")
    _interrupted(fleet, vm, arrived=False)
    (done,) = [r for r in repair(fleet.engine, fleet.tc) if r["vm_id"] == vm.vm_id]
    assert done["action"] == "rolled back" and done["node"] == "n1"
    assert fleet.where(vm) == ("n1", "running") and fleet.services["n1"].vms[vm.vm_id] == "running"
    assert vm.vm_id not in fleet.services["n2"].vms


def test_a_node_another_engine_leases_is_left_to_it_and_the_rest_are_enforced(fleet):
    """Issue 20: two engines' rounds overlap; the node the other leases is neither attested nor
    acted on by this one, and this round's leases end with it."""
    fleet.tc.lease_nodes(["n1"], 120, engine="engine-b")
    tampered_boot(fleet.services["n1"])
    report = enforce_round(fleet.engine, fleet.tc)
    assert report.leased == [{"node": "n1", "engine": "engine-b"}]
    assert [(r.host, r.status) for r in report.attested] == [("n2", "ok")] and report.quarantined == []
    assert states(fleet) == {"n1": "admitted", "n2": "admitted"}  # n1 is engine-b's to judge this round
    assert fleet.tc.registry.lease_of("n2") is None and fleet.tc.registry.lease_of("n1")["engine"] == "engine-b"


def test_shards_split_the_fleet_between_engines_without_overlap(make):
    from tccdeploy.engine.enforce import in_shard, parse_shard

    fleet = make()
    attested = [sorted(r.host for r in enforce_round(fleet.engine, fleet.tc, shard=(k, 2)).attested) for k in (1, 2)]
    assert sorted(attested[0] + attested[1]) == ["n1", "n2"] and not set(attested[0]) & set(attested[1])
    assert attested[0] == [n for n in ("n1", "n2") if in_shard(n, (1, 2))]
    names = [f"node-{i}" for i in range(1000)]
    counts = [sum(in_shard(n, (k, 3)) for n in names) for k in (1, 2, 3)]
    assert sum(counts) == 1000 and min(counts) > 250  # every node in one shard, the shards about even
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0", ""):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_an_evacuation_refused_because_another_engine_leases_the_node_does_not_power_the_vm_off(make):
    """Fails without the node.leased branch: the evacuation's refusal fell back to powering off
    the VM that the other engine, holding the node, is handling."""
    from tccdeploy.engine.enforce import handle_vms

    fleet = make(on_failure="evacuate")
    vm = fleet.launch("n1")
    fleet.tc.quarantine("n1", "node.unreachable")
    fleet.tc.lease_nodes(["n1"], 120, engine="engine-b")
    (outcome,) = handle_vms(fleet.engine, fleet.tc, "n1", {h.name: h for h in fleet.engine.hosts})
    assert "left to the engine that leases n1" in outcome["result"]
    assert fleet.where(vm) == ("n1", "running") and fleet.services["n1"].vms[vm.vm_id] == "running"
