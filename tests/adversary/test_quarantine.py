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


OPERATOR_ONLY = [
    ("POST", "/v1/nodes/node2/release", {}), ("POST", "/v1/nodes/node2/replace-tpm", {}),
    ("POST", "/v1/roster", {"site": "site1", "ek": "sha256:" + "a" * 64}), ("DELETE", "/v1/roster/x", None),
    ("POST", "/v1/keys/audit/rotate", {}), ("POST", "/v1/audit/checkpoint", {}), ("POST", "/v1/customers", {}),
    ("POST", "/v1/engines", {}),
]


def test_the_operators_decisions_have_no_route_for_an_engine(world: World):
    """Releasing a node, changing the roster or a node's TPM, rotating the TC's keys: the TC
    operator's commands on the TC's machine, never reachable with an engine certificate."""
    before, audited = world.decisions(), world.audit_count()
    with world.api() as client:
        paths = client.get("/openapi.json").json()["paths"]
        operator = [p for p in paths if p.startswith("/v1/nodes/") and p.endswith("/release")
                    or any(w in p for w in ("roster", "rotate", "replace", "customers", "engines", "checkpoint"))]
        assert not operator, operator
        for method, path, body in OPERATOR_ONLY:
            response = client.request(method, path, json=body)
            assert response.status_code in (404, 405), (method, path, response.status_code)
    assert world.decisions() == before and world.audit_count() == audited
