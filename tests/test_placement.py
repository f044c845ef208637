"""Placement's proposal (engine/placement.py): which admitted node, and why each other one is not.
Pure logic over the TC's records; the TC judges the chosen node again (tests/test_trusted_checks.py)."""

from __future__ import annotations

from types import SimpleNamespace

from tccdeploy.coordinator.records import NodeRecord, VMRecord
from tccdeploy.engine.placement import DEFAULT_CAPACITY, rank

BUILDS = [SimpleNamespace(name="tvmm-2026.1", version="2026.1"), SimpleNamespace(name="tvmm-2026.2", version="2026.2")]


def node(name: str, state: str = "admitted", site: str = "site1", build: str = "tvmm-2026.1") -> NodeRecord:
    return NodeRecord(name=name, state=state, site=site, build=build)


def vm(name: str, on: str, state: str = "running", group: str | None = None, customer: str = "acme") -> VMRecord:
    return VMRecord(vm_id=name * 4, name=name, customer=customer, node=on, state=state, anti_affinity=group)


def test_the_least_loaded_eligible_node_wins_then_the_name():
    nodes = [node("n3"), node("n1"), node("n2")]
    vms = [vm("a", "n1"), vm("b", "n1"), vm("c", "n3")]
    ranked = rank({}, nodes, vms, {}, BUILDS, "acme")
    assert [(c.node, c.load, c.eligible, c.reasons) for c in ranked] == [
        ("n2", 0, True, ("eligible",)), ("n3", 1, True, ("eligible",)), ("n1", 2, True, ("eligible",))]
    assert rank({}, list(reversed(nodes)), list(reversed(vms)), {}, BUILDS, "acme") == ranked  # same inputs, same answer


def test_ineligible_nodes_come_last_each_with_why():
    nodes = [node("a-quarantined", "quarantined"), node("b-site2", site="site2"), node("c-old"), node("d-ok", build="tvmm-2026.2")]
    spec = {"constraints": {"sites": ["site1"], "minBuildVersion": "2026.2"}}
    ranked = rank(spec, nodes, [], {}, BUILDS, "acme")
    assert ranked[0].node == "d-ok" and ranked[0].eligible
    why = {c.node: c.reasons for c in ranked[1:]}
    assert why["a-quarantined"] == ("not admitted (quarantined)", "build tvmm-2026.1 older than 2026.2")
    assert why["b-site2"] == ("site site2 not in ['site1']", "build tvmm-2026.1 older than 2026.2")
    assert why["c-old"] == ("build tvmm-2026.1 older than 2026.2",)
    assert not any(c.eligible for c in ranked[1:])


def test_capacity_counts_only_live_vms_and_defaults_to_four():
    busy = [vm(f"v{i}", "n1") for i in range(DEFAULT_CAPACITY)]
    assert DEFAULT_CAPACITY == 4
    assert rank({}, [node("n1")], busy, {}, BUILDS, "acme")[0].reasons == ("full (4/4 VMs)",)
    assert rank({}, [node("n1")], busy, {"n1": 5}, BUILDS, "acme")[0].eligible
    gone = [vm(f"v{i}", "n1", state="destroyed") for i in range(8)] + [vm("m", "n1", state="migrating")]
    assert rank({}, [node("n1")], gone, {"n1": 1}, BUILDS, "acme")[0].load == 0


def test_anti_affinity_is_per_customer():
    spec = {"constraints": {"antiAffinityGroup": "db"}}
    mine, theirs = vm("db1", "n1", group="db"), vm("x", "n2", group="db", customer="globex")
    ranked = {c.node: c for c in rank(spec, [node("n1"), node("n2")], [mine, theirs], {}, BUILDS, "acme")}
    assert ranked["n1"].reasons == ("already runs a VM of anti-affinity group db",)
    assert ranked["n2"].eligible
