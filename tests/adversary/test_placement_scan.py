"""Releases an engine leaves in flight cost a decision on another node nothing.

A key release judges placement (anti-affinity, capacity) inside its serialized write, over the
VMs on the node and those on their way. The engine decides how many releases it asks for and
never launches (each stays in flight until it expires); had the decision read every release in
flight in the fleet to find its node's, an engine could slow every placement of the TC, every
node's, by leaving releases on a few. The registry finds them by node (schema step 22)."""

from __future__ import annotations

from pathlib import Path

from tccdeploy.coordinator.store import Registry


def test_a_placement_decision_reads_no_release_of_another_node(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry.sqlite"))
    try:
        plans: list[str] = []

        def explain(sql: str, params: tuple) -> list:
            rows = registry.backend.db.execute("EXPLAIN QUERY PLAN " + sql, params)
            plans.extend(" ".join(map(str, row)) for row in rows)
            return []

        registry._placed_on(explain, "victim")
        releases = [line for line in plans if " r " in f" {line} " or "releases" in line]
        assert releases and all("(node=?)" in line for line in releases if "releases" in line), plans
        assert not any("SCAN" in line for line in plans), plans  # every part found by an index
    finally:
        registry.close()
