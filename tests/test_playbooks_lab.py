"""The shipped playbooks on the lab, through `tccdeploy apply` as an operator runs them: site.yml
predicted by --check without a registry change and idempotent on the second run, a rolling TVMM
upgrade that keeps VMs running and stops at the first untrusted node, enforcement, and the
recap ansible-playbook gives for an unreachable node."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tccdeploy.crypto import bundle as bundles
from tccdeploy.crypto import customer
from tccdeploy.crypto.request import sign_request
from tccdeploy.engine import migrate as migrating
from tccdeploy.engine.runner import Engine
from tccdeploy.lab import procs
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory

from .conftest import REPO
from .helpers_apply import ansible_playbook, apply, recap
from .labvms import kill_everywhere
from .tcworld import coordinator_with_customer

pytestmark = pytest.mark.slow
PLAYBOOKS = REPO / "playbooks"
NODES = ("node1", "node2", "node3", "node4")
TARGETS = "node1:node2:node3:node4"


@pytest.fixture
def world(lab: Lab, tmp_path):
    """A fresh TC with one customer; afterwards its VMs are destroyed and every node is back on
    the lab's build (these tests reboot nodes into other builds)."""
    tc, state = coordinator_with_customer(lab, tmp_path)
    tc.close()

    class World:
        root, lab_ = tmp_path, lab

    w = World()
    w.state = state
    w.args = ["-i", lab.inventory_dir, "-m", lab.manifests_dir]
    yield w
    registry = sqlite3.connect(str(Path(state) / "registry.sqlite"))
    vms = registry.execute("SELECT vm_id, node FROM vms WHERE state != 'destroyed'").fetchall()
    registry.close()
    for vm_id, _node in vms:
        kill_everywhere(lab, vm_id)
    for name in NODES:
        lab.reset(name)


def dump(state: str) -> str:
    db = sqlite3.connect(str(Path(state) / "registry.sqlite"))
    try:
        return "\n".join(db.iterdump())
    finally:
        db.close()


def registry_rows(state: str, query: str) -> list[tuple]:
    db = sqlite3.connect(str(Path(state) / "registry.sqlite"))
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def signed_request(world, name: str) -> str:  # type: ignore[no-untyped-def]
    (world.root / "disk.raw").write_bytes(bytes(1024 * 1024))
    image = world.root / f"{name}.sealed"
    bundles.seal(str(world.root / "disk.raw"), bundles.load_tc(str(world.root / "tc.pem")),
                 customer.load(str(world.root / "customer.pem")), str(image), name)
    path = world.root / f"{name}.yml"
    path.write_text(f"apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {{name: {name}}}\n"
                    f"spec: {{image: {image.name}, vcpus: 1, memoryMiB: 64, constraints: {{antiAffinityGroup: web}}}}\n")
    import json

    out = world.root / f"{name}.signed.json"
    out.write_text(json.dumps(sign_request(str(path), str(world.root / "customer.pem"))))
    return str(out)


def vm_running_where_registered(world, lab: Lab) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """name -> node for every VM, after checking QEMU runs it there, once."""
    out = {}
    with Engine(load_inventory(lab.inventory_dir).select(TARGETS), state=world.state) as engine:
        quarantined = {n for (n,) in registry_rows(world.state, "SELECT name FROM nodes WHERE state = 'quarantined'")}
        for vm_id, name, node, state in registry_rows(world.state, "SELECT vm_id, name, node, state FROM vms"):
            if node in quarantined:  # powered off by enforcement (a tampered node): no QEMU anywhere
                assert not [p for p in procs.processes_mentioning(vm_id) if procs.cmdline(p).startswith("qemu-system")]
                continue
            assert state == "running"
            status = migrating._call_fresh(engine, node, "vm_status", {"vm_id": vm_id})
            assert status["status"] == "running", (name, node)
            assert len([p for p in procs.processes_mentioning(vm_id) if procs.cmdline(p).startswith("qemu-system")]) == 1
            out[name] = node
    return out


def test_site_check_mode_predicts_the_run_changes_nothing_and_a_second_run_changes_nothing(lab: Lab, world):
    before = dump(world.state)
    check = apply(str(PLAYBOOKS / "site.yml"), *world.args, "--check", "--diff", state=world.state)
    assert dump(world.state) == before  # not a row, not a nonce
    predicted = recap(check.stdout)
    for name in NODES:
        assert predicted[name] == {"ok": 3, "changed": 2, "unreachable": 0, "failed": 0, "skipped": 0, "rescued": 0,
                                   "ignored": 0}, check.stdout
    assert predicted["roguetpm1"]["failed"] == predicted["outside1"]["failed"] == 1
    assert "+EK " in check.stdout  # --diff shows the identity that would be enrolled

    first = apply(str(PLAYBOOKS / "site.yml"), *world.args, state=world.state)
    assert recap(first.stdout) == predicted, first.stdout
    assert first.returncode == 2  # the refused nodes fail, as in ansible-playbook
    lines = first.stdout.split("PLAY RECAP", 1)[1]
    assert "roguetpm1                  : ek.untrusted-manufacturer" in lines
    assert "outside1                   : perimeter.not-in-roster" in lines
    assert sorted(registry_rows(world.state, "SELECT name FROM nodes WHERE state = 'admitted'")) == [(n,) for n in NODES]

    second = apply(str(PLAYBOOKS / "site.yml"), *world.args, state=world.state)
    assert all(stats["changed"] == 0 for stats in recap(second.stdout).values()), second.stdout
    assert second.returncode == 2


def test_rollout_moves_every_node_to_the_new_build_with_vms_kept_running(lab: Lab, world):
    assert apply(str(PLAYBOOKS / "site.yml"), *world.args, "-l", TARGETS, state=world.state).returncode == 0
    for name in ("web-1", "web-2"):
        launched = apply(str(PLAYBOOKS / "launch.yml"), *world.args, "-e", f"request={signed_request(world, name)}",
                         state=world.state)
        assert launched.returncode == 0, launched.stdout
    placed = vm_running_where_registered(world, lab)

    rollout = apply(str(PLAYBOOKS / "rollout-tvmm.yml"), *world.args, "-e", "new_build=tvmm-2026.2",
                    "-e", f"targets={TARGETS}", state=world.state)
    assert rollout.returncode == 0, rollout.stdout
    assert sorted(registry_rows(world.state, "SELECT name, state, build FROM nodes")) == \
        [(n, "admitted", "tvmm-2026.2") for n in NODES]
    assert all(lab.load().node(n).build == "tvmm-2026.2" for n in NODES)  # booted from the deployed files
    after = vm_running_where_registered(world, lab)
    assert set(after) == set(placed)  # both still run (somewhere trusted), each exactly once
    assert rollout.stdout.count("changed: [node") >= 3 * len(NODES) - 1  # drain (where VMs ran), deploy, admit

    again = apply(str(PLAYBOOKS / "rollout-tvmm.yml"), *world.args, "-e", "new_build=tvmm-2026.2",
                  "-e", f"targets={TARGETS}", state=world.state)
    assert all(stats["changed"] == 0 for stats in recap(again.stdout).values()), again.stdout
    relaunch = apply(str(PLAYBOOKS / "launch.yml"), *world.args, "-e", f"request={world.root / 'web-1.signed.json'}",
                     state=world.state)
    assert recap(relaunch.stdout)["localhost"]["changed"] == 0 and relaunch.returncode == 0  # a request runs once


def test_rollout_stops_at_the_first_node_whose_new_boot_is_untrusted(lab: Lab, world):
    assert apply(str(PLAYBOOKS / "site.yml"), *world.args, "-l", TARGETS, state=world.state).returncode == 0
    lab.tamper("node2", persistent=True)  # dormant: node2 attests fine until it reboots
    rollout = apply(str(PLAYBOOKS / "rollout-tvmm.yml"), *world.args, "-e", "new_build=tvmm-2026.2",
                    "-e", f"targets={TARGETS}", state=world.state)
    assert rollout.returncode == 2
    stats = recap(rollout.stdout)
    assert set(stats) == {"node1", "node2"} and stats["node2"]["failed"] == 1
    assert "node2                      : build.unknown" in rollout.stdout
    nodes = {n: (s, b) for n, s, b in registry_rows(world.state, "SELECT name, state, build FROM nodes")}
    assert nodes["node1"] == ("admitted", "tvmm-2026.2")
    assert nodes["node2"][0] == "quarantined"
    assert nodes["node3"] == nodes["node4"] == ("admitted", "tvmm-2026.1")
    assert lab.load().node("node3").build == "tvmm-2026.1"  # never touched


def test_enforce_playbook_quarantines_a_tampered_node_and_stops_its_vm(lab: Lab, world):
    """The node's TPM no longer opens the migration key, so the VM cannot be evacuated: it is
    powered off where it was (fail closed)."""
    assert apply(str(PLAYBOOKS / "site.yml"), *world.args, "-l", TARGETS, state=world.state).returncode == 0
    launched = apply(str(PLAYBOOKS / "launch.yml"), *world.args, "-e", f"request={signed_request(world, 'web-9')}",
                     state=world.state)
    node = vm_running_where_registered(world, lab)["web-9"]
    assert f"web-9 runs on {node}" in launched.stdout
    lab.tamper(node)
    result = apply(str(PLAYBOOKS / "enforce.yml"), *world.args, "-l", TARGETS, state=world.state)
    assert result.returncode == 2
    assert recap(result.stdout)[node]["failed"] == 1 and "build.unknown" in result.stdout
    assert registry_rows(world.state, f"SELECT state FROM nodes WHERE name = '{node}'") == [("quarantined",)]
    vm_id, state = registry_rows(world.state, "SELECT vm_id, state FROM vms WHERE name = 'web-9'")[0]
    # Powered off; the TC keeps it live in its records, as the tampered node's word proves nothing.
    assert state == "running" and "tvmm.tk-refused" in result.stdout, result.stdout
    assert "vm.end-boot-untrusted" in result.stdout, result.stdout
    assert not [p for p in procs.processes_mentioning(vm_id) if procs.cmdline(p).startswith("qemu-system")]


def test_copy_is_by_digest_idempotent_and_check_mode_only_shows_the_diff(lab: Lab, world, tmp_path):
    source = tmp_path / "motd"
    source.write_text("trusted cloud\n")
    playbook = tmp_path / "copy.yml"
    playbook.write_text("- hosts: node1:node3\n  gather_facts: false\n  tasks:\n"
                        "    - name: motd\n      copy: {src: motd, dest: '{{ tcc_boot_dir }}/../motd', mode: '0644'}\n"
                        "    - name: read\n      command: {cmd: cat motd, chdir: '{{ tcc_boot_dir }}/..'}\n"
                        "      register: motd\n      changed_when: false\n"
                        "    - name: check\n      fail: {msg: wrong}\n      when: motd.stdout != 'trusted cloud'\n")
    first = apply(str(playbook), *world.args, state=world.state)
    assert first.returncode == 0 and recap(first.stdout)["node1"]["changed"] == 1, first.stdout
    second = apply(str(playbook), *world.args, state=world.state)
    assert recap(second.stdout)["node1"]["changed"] == 0
    source.write_text("trusted cloud, v2\n")
    check = apply(str(playbook), *world.args, "--check", "--diff", "--tags", "all", state=world.state)
    assert "-trusted cloud\n+trusted cloud, v2" in check.stdout
    target = Path(lab.node_dir(lab.node("node1"), "home", "motd"))
    assert target.read_text() == "trusted cloud\n"  # check mode changed nothing


def test_an_unreachable_node_gets_the_recap_and_exit_status_ansible_playbook_gives(lab: Lab, lab_node, world, tmp_path):
    lab_node("node3")
    lab.stop_ssh("node3")
    playbook = tmp_path / "echo.yml"
    playbook.write_text("- hosts: node1:node3\n  gather_facts: false\n  tasks:\n"
                        "    - name: echo\n      command: echo hi\n    - name: again\n      command: echo again\n")
    ours = apply(str(playbook), *world.args, state=world.state)
    theirs = ansible_playbook(str(playbook), "-i", lab.inventory_dir, "-e", "ansible_python_interpreter=/usr/bin/python3")
    assert recap(ours.stdout) == recap(theirs.stdout) == {
        "node1": {"ok": 2, "changed": 2, "unreachable": 0, "failed": 0, "skipped": 0, "rescued": 0, "ignored": 0},
        "node3": {"ok": 0, "changed": 0, "unreachable": 1, "failed": 0, "skipped": 0, "rescued": 0, "ignored": 0},
    }, theirs.stdout + theirs.stderr
    assert ours.returncode == theirs.returncode == 4
    assert "fatal: [node3]: UNREACHABLE!" in ours.stdout


def test_check_mode_does_not_even_create_the_registry(lab: Lab, tmp_path):
    from tccdeploy.coordinator.identity import init as tc_init

    state = tmp_path / "tc"
    tc_init(str(state))
    before = sorted(p.name for p in state.iterdir())
    result = apply(str(PLAYBOOKS / "site.yml"), "-i", lab.inventory_dir, "-m", lab.manifests_dir, "--check",
                   "-l", "node1", state=str(state))
    assert recap(result.stdout)["node1"]["changed"] == 2
    assert sorted(p.name for p in state.iterdir()) == before


def test_drain_then_evict_move_the_vm_and_take_the_node_out_once(lab: Lab, world, tmp_path):
    assert apply(str(PLAYBOOKS / "site.yml"), *world.args, "-l", TARGETS, state=world.state).returncode == 0
    apply(str(PLAYBOOKS / "launch.yml"), *world.args, "-e", f"request={signed_request(world, 'web-7')}", state=world.state)
    node = vm_running_where_registered(world, lab)["web-7"]
    drained = apply(str(PLAYBOOKS / "drain.yml"), *world.args, "-l", node, "--diff", state=world.state)
    assert drained.returncode == 0 and recap(drained.stdout)[node]["changed"] == 1, drained.stdout
    assert vm_running_where_registered(world, lab)["web-7"] != node
    assert recap(apply(str(PLAYBOOKS / "drain.yml"), *world.args, "-l", node, state=world.state).stdout)[node]["changed"] == 0

    playbook = tmp_path / "evict.yml"
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n"
                        "    - name: out\n      evict: {reason: maintenance.disk}\n"
                        "    - name: on the controller\n      command: touch {{ playbook_dir }}/ran-{{ inventory_hostname }}\n"
                        "      delegate_to: localhost\n"
                        "    - name: still reachable\n      wait_for_ssh: {timeout: 10}\n")
    check = apply(str(playbook), *world.args, "-l", node, "--check", "--diff", state=world.state)
    assert "-admitted\n+quarantined" in check.stdout
    assert registry_rows(world.state, f"SELECT state FROM nodes WHERE name = '{node}'") == [("admitted",)]
    evicted = apply(str(playbook), *world.args, "-l", node, "-vv", state=world.state)
    assert evicted.returncode == 0 and recap(evicted.stdout)[node]["changed"] == 2, evicted.stdout
    assert f"task path: {playbook}:4" in evicted.stdout  # -vv
    assert (tmp_path / f"ran-{node}").exists()  # delegate_to: localhost ran on the controller
    assert registry_rows(world.state, f"SELECT state FROM nodes WHERE name = '{node}'") == [("quarantined",)]
    kinds = registry_rows(world.state, f"SELECT data FROM audit WHERE kind = 'quarantine' AND node = '{node}'")
    assert any("maintenance.disk" in k[0] for k in kinds)
    again = apply(str(playbook), *world.args, "-l", node, state=world.state)
    assert recap(again.stdout)[node]["changed"] == 1  # only the command; the node stays out


def test_site_yml_through_a_served_tc_gives_the_same_recap_as_embedded(lab: Lab, tmp_path):
    from .tcservice import Service

    service = Service(tmp_path / "tc", lab.manifests_dir)
    try:
        args = ["-i", lab.inventory_dir, "--tc", service.url, "--engine-dir", str(service.engine_dir)]
        engine_state = str(tmp_path / "engine")
        before = dump(str(tmp_path / "tc"))
        check = apply(str(PLAYBOOKS / "site.yml"), *args, "--check", state=engine_state)
        assert dump(str(tmp_path / "tc")) == before  # check mode asks the served TC only questions
        first = apply(str(PLAYBOOKS / "site.yml"), *args, state=engine_state)
        second = apply(str(PLAYBOOKS / "site.yml"), *args, state=engine_state)
    finally:
        service.stop()
    predicted, done = recap(check.stdout), recap(first.stdout)
    assert predicted == done, first.stdout
    for name in NODES:
        assert done[name]["changed"] == 2 and done[name]["failed"] == 0
    assert done["roguetpm1"]["failed"] == done["outside1"]["failed"] == 1 and first.returncode == 2
    assert "roguetpm1                  : ek.untrusted-manufacturer" in first.stdout
    assert all(stats["changed"] == 0 for stats in recap(second.stdout).values()), second.stdout
    assert sorted(registry_rows(str(tmp_path / "tc"), "SELECT name FROM nodes WHERE state = 'admitted'")) == \
        [(n,) for n in NODES]


def test_a_candidate_rolls_out_only_on_the_nodes_its_rollout_names(lab: Lab, world):
    """tvmm-2026.3 is a candidate whose rollout names node1: the rollout installs it there and the
    TC admits it; node2 is refused before anything is drained or installed, and keeps its build."""
    assert apply(str(PLAYBOOKS / "site.yml"), *world.args, "-l", TARGETS, state=world.state).returncode == 0
    rollout = apply(str(PLAYBOOKS / "rollout-tvmm.yml"), *world.args, "-e", "new_build=tvmm-2026.3",
                    "-e", "targets=node1:node2", state=world.state)
    assert rollout.returncode == 2, rollout.stdout
    assert "node2                      : build.not-in-rollout" in rollout.stdout
    stats = recap(rollout.stdout)
    assert stats["node1"]["failed"] == 0 and stats["node2"]["changed"] == 0
    nodes = {n: (s, b) for n, s, b in registry_rows(world.state, "SELECT name, state, build FROM nodes")}
    assert nodes["node1"] == ("admitted", "tvmm-2026.3") and nodes["node2"] == ("admitted", "tvmm-2026.1")
    assert lab.load().node("node1").build == "tvmm-2026.3" and lab.load().node("node2").build == "tvmm-2026.1"
