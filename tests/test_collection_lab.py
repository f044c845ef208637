"""The Ansible collection (collections/ansible_collections/tccdeploy/tccp) as an operator who
keeps ansible-playbook uses it: built and installed with ansible-galaxy, then the shipped
playbooks (site.yml, launch.yml, drain.yml) run by ansible-playbook against the lab and a
served TC, and by `tccdeploy apply` against another served TC on the same nodes: the same
recap, the same TC registry (nodes admitted, the VM launched and drained off its node).

TCCDEPLOY_TEST_ANSIBLE_BIN=/path/to/venv/bin runs the Ansible side from another virtualenv (one
with only ansible-core and tccdeploy installed), as a user who keeps Ansible apart would."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tccdeploy.lab.lab import Lab

from .conftest import REPO
from .helpers_apply import ANSIBLE_BIN, BIN, ansible_playbook, apply, recap
from .labvms import kill_everywhere
from .tcservice import Service

pytestmark = pytest.mark.slow
PLAYBOOKS = REPO / "playbooks"
COLLECTION = REPO / "collections" / "ansible_collections" / "tccdeploy" / "tccp"
NODES = ("node1", "node2", "node3", "node4")


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tccdeploy"), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The collection built into a tarball and installed where only ANSIBLE_COLLECTIONS_PATH finds it."""
    root = tmp_path_factory.mktemp("collection")
    built = subprocess.run([str(ANSIBLE_BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION), "--output-path",
                            str(root)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = next(root.glob("tccdeploy-tccp-*.tar.gz"))
    done = subprocess.run([str(ANSIBLE_BIN / "ansible-galaxy"), "collection", "install", str(tarball), "-p",
                           str(root / "path")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "path"


def registry(state: Path, query: str) -> list[tuple]:
    db = sqlite3.connect(str(state / "registry.sqlite"))
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def flow(lab: Lab, root: Path, tool: str, collections: Path) -> dict:
    """site.yml, then launch.yml with a signed request, then drain.yml on the VM's node, by one
    tool against its own served TC; what each step gave and what the TC recorded."""
    root.mkdir()
    service = Service(root / "tc", lab.manifests_dir)
    admin = dict(os.environ, TCCDEPLOY_STATE=str(root / "tc"), NO_COLOR="1")
    customer = dict(os.environ, TCCDEPLOY_CUSTOMER_KEY=str(root / "customer.pem"), NO_COLOR="1")
    engine_state = str(root / "engine")
    env_for_ansible = {"TCCDEPLOY_TC": service.url, "TCCDEPLOY_ENGINE_DIR": str(service.engine_dir),
                       "TCCDEPLOY_STATE": engine_state, "ANSIBLE_COLLECTIONS_PATH": str(collections)}

    def play(playbook: str, *args: str) -> subprocess.CompletedProcess:
        if tool == "apply":
            return apply(str(PLAYBOOKS / playbook), "-i", lab.inventory_dir, "--tc", service.url,
                         "--engine-dir", str(service.engine_dir), *args, state=engine_state)
        return ansible_playbook(str(PLAYBOOKS / playbook), "-i", lab.inventory_dir, *args, env=env_for_ansible)

    vm_ids = []
    try:
        assert run(admin, "tc", "show", "-o", str(root / "tc.pem")).returncode == 0
        public = run(customer, "customer", "init", "--key", str(root / "customer.pem")).stdout.strip().splitlines()[-1]
        assert run(admin, "tc", "customers", "add", "acme", public).returncode == 0
        (root / "disk.raw").write_bytes(bytes(1024 * 1024))
        assert run(customer, "image", "seal", str(root / "disk.raw"), "--tc", str(root / "tc.pem"),
                   "-o", str(root / "web.sealed"), "--name", "web").returncode == 0
        (root / "web.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: web}\n"
                                      "spec: {image: web.sealed, vcpus: 1, memoryMiB: 64}\n")
        assert run(customer, "request", "sign", str(root / "web.yml"), "-o", str(root / "web.json")).returncode == 0

        site = play("site.yml")
        launched = play("launch.yml", "-e", f"request={root / 'web.json'}")
        (node,) = registry(root / "tc", "SELECT node FROM vms WHERE state = 'running'")[0]
        vm_ids = [v for (v,) in registry(root / "tc", "SELECT vm_id FROM vms")]
        drained = play("drain.yml", "-l", node)
        inventory = {}
        if tool == "ansible":  # the dynamic inventory plugin: the TC's nodes by state and build
            config = root / "lab.tcc.yml"
            config.write_text(f"plugin: tccdeploy.tccp.tc\nurl: {service.url}\nengine_dir: {service.engine_dir}\n")
            listed = subprocess.run([str(ANSIBLE_BIN / "ansible-inventory"), "-i", str(config), "--list"], capture_output=True,
                                    text=True, timeout=120, env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections)))
            assert listed.returncode == 0, listed.stderr
            inventory = json.loads(listed.stdout)
        return {
            "inventory": inventory,
            "site": (recap(site.stdout), site.returncode), "launch": (recap(launched.stdout), launched.returncode),
            "drain": (recap(drained.stdout), drained.returncode), "first": node,
            "admitted": sorted(n for (n,) in registry(root / "tc", "SELECT name FROM nodes WHERE state = 'admitted'")),
            "vms": [(n, s, where != node) for n, s, where in registry(root / "tc", "SELECT name, state, node FROM vms")],
            "output": site.stdout + launched.stdout + drained.stdout + site.stderr,
        }
    finally:
        service.stop()
        for vm_id in vm_ids:
            kill_everywhere(lab, vm_id)
        for name in NODES:
            lab.reset(name)


def test_ansible_playbook_with_the_collection_does_what_apply_does(lab: Lab, installed: Path, tmp_path):
    ours = flow(lab, tmp_path / "apply", "apply", installed)
    theirs = flow(lab, tmp_path / "ansible", "ansible", installed)
    assert theirs["site"] == ours["site"], theirs["output"]
    assert theirs["launch"] == ours["launch"], theirs["output"]
    assert theirs["drain"] == ours["drain"], theirs["output"]
    assert theirs["admitted"] == ours["admitted"] == list(NODES)
    assert theirs["vms"] == ours["vms"] == [("web", "running", True)], (theirs["vms"], ours["vms"])
    for name in NODES:
        assert ours["site"][0][name]["failed"] == 0 and ours["site"][0][name]["changed"] == 2
    assert ours["drain"][0][ours["first"]]["changed"] == 1
    groups = theirs["inventory"]
    assert sorted(groups["tcc_admitted"]["hosts"]) == list(NODES)
    builds = [g for g in groups if g.startswith("tcc_build_")]
    assert builds and sorted(h for g in builds for h in groups[g]["hosts"]) == list(NODES)
