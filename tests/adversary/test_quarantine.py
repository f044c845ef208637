"""A quarantined node stays out until the TC's operator lets it back: the engine cannot release it."""

from __future__ import annotations

import json

import pytest

from .conftest import World

pytestmark = pytest.mark.slow


def test_a_quarantined_node_cannot_readmit_itself(world: World):
    lab = world.lab
    try:
        lab.tamper("node2")
        enforced = world.engine_cmd("enforce", "--once", "-i", lab.inventory_dir, "-l", "node2")
        assert enforced.returncode == 2 and world.node_state("node2") == "quarantined", enforced.stdout
        lab.reset("node2")  # a clean boot again: the engine now tries to slip it back in
        again = world.engine_cmd("attest", "--admit", "node2", "-i", lab.inventory_dir, "--json")
        result = json.loads(again.stdout)[0]
        assert result["result"]["verdict"] == "trusted"  # the boot is fine...
        assert result["reason"] == "admit.quarantined" and world.node_state("node2") == "quarantined"  # ...it stays out
        playbook = world.root / "readmit.yml"
        playbook.write_text("- hosts: node2\n  gather_facts: false\n  tasks:\n    - attest: {admit: true}\n")
        applied = world.engine_cmd("apply", str(playbook), "-i", lab.inventory_dir)
        assert applied.returncode == 2 and "admit.quarantined" in applied.stdout, applied.stdout  # the same decision
        assert world.node_state("node2") == "quarantined"
        released = world.operator("nodes", "release", "node2", "--note", "implant removed, disk re-imaged")
        assert released.returncode == 0, released.stderr
        world.admit("node2")
        assert world.node_state("node2") == "admitted"
        with world.api() as client:
            kinds = [e["kind"] for e in client.get("/v1/audit?node=node2").json()]
        last = {kind: i for i, kind in enumerate(kinds)}
        assert last["node.release"] > last["admission.refused"]
        assert kinds[-1] == "admission"
    finally:
        world.restore("node2")
