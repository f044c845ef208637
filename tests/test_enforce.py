"""Enforcement on the lab: a node that stops proving its boot is quarantined in one round, and
its VMs stop running there."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.crypto import bundle as bundles
from tccdeploy.crypto import customer
from tccdeploy.crypto.request import sign_request
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.enforce import enforce_round
from tccdeploy.engine.launch import launch
from tccdeploy.engine.runner import Engine
from tccdeploy.lab import procs
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_manifests

pytestmark = pytest.mark.slow


def _coordinator(lab: Lab, state: str, manifests_dir: str | None = None, **policy) -> Coordinator:  # type: ignore[no-untyped-def]
    manifests = load_manifests([manifests_dir or lab.manifests_dir])
    perimeter = manifests.perimeter
    if policy:
        perimeter = dataclasses.replace(perimeter, attestation=dataclasses.replace(perimeter.attestation, **policy))
    return Coordinator(perimeter, manifests.builds, state, rosters=manifests.rosters, platforms=manifests.platforms)


@pytest.fixture
def admitted(lab: Lab, tmp_path: Path):
    state = str(tmp_path / "tc")
    tc_init(state)
    tc = _coordinator(lab, state)
    with Engine(load_inventory(lab.inventory_dir).select("node1,node2,node3,node4"), state=state) as engine:
        engine.run(enroll(tc))
        results = engine.run(attest(tc, admit_nodes=True))
        assert all(r.status == "changed" for r in results), [r.msg for r in results]
    tc.close()
    return state


def test_a_healthy_fleet_stays_admitted(lab: Lab, admitted: str):
    tc = _coordinator(lab, admitted)
    with Engine(load_inventory(lab.inventory_dir).select("all"), state=admitted) as engine:
        report = enforce_round(engine, tc)
    assert len(report.attested) == 4 and report.quarantined == []
    tc.close()


def test_a_tampered_node_is_quarantined_and_its_vm_powered_off(lab: Lab, lab_node, admitted: str, tmp_path: Path):
    lab_node("node2")
    tc = _coordinator(lab, admitted, on_failure="stop")
    key, _ = customer.init(str(tmp_path / "customer.pem"))
    tc.add_customer("acme", customer.public_text(key.public_key()))
    from tccdeploy.coordinator.identity import load as tc_load

    (tmp_path / "tc.pem").write_text(tc_load(admitted).bundle_pem)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1024 * 1024))
    bundles.seal(str(raw), bundles.load_tc(str(tmp_path / "tc.pem")), key, str(tmp_path / "vm.sealed"), "vm")
    (tmp_path / "vm.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: vm}\n"
                                     "spec: {image: vm.sealed, vcpus: 1, memoryMiB: 64}\n")
    inventory = load_inventory(lab.inventory_dir)
    with Engine(inventory.select("node2"), state=admitted) as engine:
        envelope = sign_request(str(tmp_path / "vm.yml"), str(tmp_path / "customer.pem"))
        result = launch(engine, tc, envelope, envelope["bundle"])
        assert result.node == "node2"
    vm_id = envelope["request"]["image"]["vm_id"]
    qemu = [p for p in procs.processes_mentioning(vm_id) if procs.cmdline(p).startswith("qemu-system")]
    assert qemu and all(procs.alive(p) for p in qemu)
    lab.tamper("node2")
    with Engine(inventory.select("all"), state=admitted) as engine:
        report = enforce_round(engine, tc)
    assert report.quarantined == [{"node": "node2", "reason": "build.unknown"}]
    assert tc.registry.node("node2")["state"] == "quarantined" and tc.registry.certificate("node2") is None
    # powered off; the TC keeps it live in its records until the node proves it gone: a tampered
    # node's evidence proves nothing
    assert report.vms[0]["result"].startswith("powered off") and "vm.end-boot-untrusted" in report.vms[0]["result"]
    assert tc.registry.vm("vm")["state"] == "running"
    assert not any(procs.alive(p) for p in qemu)
    assert {r.host for r in report.attested if r.status == "ok"} == {"node1", "node3", "node4"}
    tc.close()


def test_a_build_revoked_in_the_manifests_evicts_its_nodes_at_the_next_round(lab: Lab, admitted: str, tmp_path: Path):
    manifests = Path(lab.path("manifests-revoked"))  # beside the lab's own, so relative paths still hold
    shutil.rmtree(manifests, ignore_errors=True)
    shutil.copytree(lab.manifests_dir, manifests)
    build = manifests / "builds" / "tvmm-2026.1.yml"
    build.write_text(build.read_text().replace("status: approved", "status: revoked"))
    tc = _coordinator(lab, admitted, str(manifests))
    with Engine(load_inventory(lab.inventory_dir).select("all"), state=admitted) as engine:
        report = enforce_round(engine, tc)
    assert sorted(q["node"] for q in report.quarantined) == ["node1", "node2", "node3", "node4"]
    assert {q["reason"] for q in report.quarantined} == {"build.revoked"}
    tc.close()
    shutil.rmtree(manifests)


def test_an_unreachable_node_is_quarantined_after_the_grace_period(lab: Lab, lab_node, admitted: str):
    lab_node("node3")
    lab.stop_ssh("node3")
    tc = _coordinator(lab, admitted, grace_period=0)
    with Engine(load_inventory(lab.inventory_dir).select("all"), state=admitted, timeout=3) as engine:
        report = enforce_round(engine, tc)
    assert report.quarantined == [{"node": "node3", "reason": "node.unreachable (refused)"}]
    assert tc.registry.node("node3")["state"] == "quarantined"
    tc.close()


def test_enforce_once_from_the_command_line(lab: Lab, admitted: str):
    env = dict(os.environ, TCCDEPLOY_STATE=admitted)
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "enforce", "--once", "-i", lab.inventory_dir,
                           "-m", lab.manifests_dir], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 admitted node(s) re-attested, 4 trusted, 0 quarantined" in proc.stdout


def test_enforce_limited_to_part_of_the_fleet_leaves_the_rest_alone(lab: Lab, admitted: str):
    """Engines splitting the fleet by patterns (issue 20): the admitted nodes outside this engine's
    pattern are another engine's, not quarantined as node.not-in-inventory (which they were)."""
    env = dict(os.environ, TCCDEPLOY_STATE=admitted)
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "enforce", "--once", "-i", lab.inventory_dir,
                           "-m", lab.manifests_dir, "node1,node2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 admitted node(s) re-attested, 2 trusted, 0 quarantined" in proc.stdout
    tc = _coordinator(lab, admitted)
    assert {n.name: n.state for n in tc.nodes()} == dict.fromkeys(("node1", "node2", "node3", "node4"), "admitted")
    tc.close()


def test_the_enforce_loop_runs_rounds_and_stops_cleanly_on_sigterm(lab: Lab, admitted: str):
    import signal
    import time

    env = dict(os.environ, TCCDEPLOY_STATE=admitted)
    proc = subprocess.Popen([sys.executable, "-m", "tccdeploy", "enforce", "--interval", "0.5", "-i", lab.inventory_dir,
                             "-m", lab.manifests_dir, "-l", "node1,node2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline and seen.count("enforce round") < 2:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert seen.count("enforce round") >= 2
