"""A hostile engine (or a customer it registered) against the TC's lookup of a VM by name or id.

A VM's name is its customer's choice, and the provider is a customer too: it may name its own VM
with another VM's id (32 hex digits), or give it the name another customer's VM has. The TC used
to take the newest live VM whose id or name matched, so a migration, a suspension or an end
ticket asked for one VM acted on another (found in review). An id now always wins, a name two
live VMs share names neither, and a ticket names a VM by its id only."""

from __future__ import annotations

import pytest

from tccdeploy.engine.enforce import enforce_round
from tccdeploy.engine.migrate import drain

from ..brokerkit import reason
from ..enginekit import Fleet, tampered_boot


@pytest.fixture
def world(broker_world):
    broker_world.customer("mallory")
    for node in ("n1", "n2", "n3"):
        broker_world.node(node)
    return broker_world


def test_a_vm_named_with_another_vms_id_does_not_stand_in_for_it(world):
    victim = world.launched("acme", "n1", name="db")
    world.launched("mallory", "n2", name=victim["vm_id"])  # launched later: the newest match
    assert world.tc.registry.vm(victim["vm_id"])["vm_id"] == victim["vm_id"]
    migration = world.tc.migration_begin(victim["vm_id"], "n3")
    assert (migration["vm"]["vm_id"], migration["vm"]["node"]) == (victim["vm_id"], "n1")


def test_a_name_two_customers_share_is_refused_not_taken_for_the_newest(world):
    world.launched("acme", "n1", name="web")
    world.launched("mallory", "n2", name="web")
    assert reason(world.tc.registry.vm, "web") == "vm.ambiguous"
    assert reason(world.tc.suspend_begin, "web") == "vm.ambiguous"
    assert reason(world.tc.migration_begin, "web", "n3") == "vm.ambiguous"
    assert world.tc.registry.migrations() == []
    assert all(world.tc.registry.suspensions(vm["vm_id"]) == [] for vm in world.tc.registry.vms())


def test_an_end_ticket_names_a_vm_by_its_id_not_by_a_name(world):
    """An end ticket asked with a name was issued for that string on the node of the VM the name
    matched: a ticket naming no VM the TC holds."""
    world.launched("acme", "n1", name="web")
    assert reason(world.tc.vm_end_ticket, "web", "n1", "destroy") == "vm.end-not-here"


def test_a_name_held_by_one_live_vm_still_names_it(world):
    record = world.launched("acme", "n1", name="web")
    assert world.tc.registry.vm("web")["vm_id"] == record["vm_id"]


@pytest.fixture
def fleet(tmp_path):  # type: ignore[no-untyped-def]
    made = Fleet(tmp_path / "fleet", ["n1", "n2", "n3"], on_failure="evacuate")
    made.world.customer("mallory")
    yield made
    made.close()


def test_a_name_another_customer_shares_does_not_turn_an_evacuation_into_a_power_off(fleet):
    """Enforcement and drain moved a VM by its name: once a second VM took the same name (any
    customer's choice), the move was refused as ambiguous and the policy fell back to powering
    the VM off (found in review)."""
    victim = fleet.launch("n1", name="web")
    fleet.launch("n2", name="web", owner="mallory")
    tampered_boot(fleet.services["n1"])
    report = enforce_round(fleet.engine, fleet.tc)
    assert [(v["vm_id"], v["result"]) for v in report.vms] == [(victim.vm_id, "evacuated to n3")]
    assert fleet.where(victim) == ("n3", "running")
    assert [m["ok"] for m in drain(fleet.engine, fleet.tc, "n3")] == [True]
    assert fleet.where(victim)[1] == "running" and fleet.where(victim)[0] != "n3"
