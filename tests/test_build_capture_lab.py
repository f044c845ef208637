"""`tccdeploy build capture` on the lab (real sshd, swtpm, the TVMM service): the build captured
from a node's TPM-proven boot is the lab's own, the TC admits the node on it and refuses it once
the node is tampered with; --diff names the departure; a hidden tamper (a log that does not
explain the PCRs) is never captured."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tccdeploy.cli import main
from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.engine.attestation import enroll
from tccdeploy.engine.runner import Engine
from tccdeploy.lab.builds import LAB_BUILDS, build_manifest
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_manifests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tc(lab: Lab, tmp_path_factory):
    state = str(tmp_path_factory.mktemp("tc"))
    tc_init(state)
    coordinator = Coordinator.from_manifests(load_manifests([lab.manifests_dir]), state)
    with Engine(load_inventory(lab.inventory_dir).select("node1,node2"), state=state) as engine:
        assert all(r.status != "failed" for r in engine.run(enroll(coordinator)))
    yield coordinator
    coordinator.close()


def capture(lab: Lab, tc: Coordinator, *extra: str) -> int:
    return main(["build", "capture", *extra, "-i", lab.inventory_dir, "-m", lab.manifests_dir, "--state", tc.state])


def test_a_captured_build_is_the_lab_build_and_admits_its_node_until_tampered(lab: Lab, lab_node, tc: Coordinator,
                                                                               tmp_path, capsys):
    node = lab_node("node2")
    out = tmp_path / "captured"
    assert capture(lab, tc, node.name, "--name", "golden", "--version", "2027.1.0", "--out", str(out)) == 0
    assert "matches platform lab-model-b already: no platform written" in capsys.readouterr().err
    written = yaml.safe_load((out / "golden.yml").read_text())
    expected = build_manifest(next(b for b in LAB_BUILDS if b.name == node.build))
    got = {e["pcr"]: [x["digest"] for x in e["events"]] for e in written["spec"]["measurements"]["pcrs"]}
    want = {e["pcr"]: [x.get("digest") or expected["spec"]["artifacts"][x["artifact"]]["sha256"] for x in e["events"]]
            for e in expected["spec"]["measurements"]["pcrs"]}
    assert got == want and written["spec"]["rollout"] == {"nodes": [node.name]}

    manifests = tmp_path / "manifests"
    shutil.copytree(lab.manifests_dir, manifests)
    shutil.copytree(lab.path("ca", "manufacturer"), tmp_path / "ca" / "manufacturer")  # the perimeter's ../ca
    shutil.rmtree(manifests / "builds")
    (manifests / "builds").mkdir()
    shutil.copy(out / "golden.yml", manifests / "builds" / "golden.yml")
    golden = Coordinator.from_manifests(load_manifests([str(manifests)]), tc.state)
    try:
        with Engine(load_inventory(lab.inventory_dir).select(node.name), state=tc.state) as engine:
            from tccdeploy.engine.attestation import attest

            (result,) = engine.run(attest(golden))
            assert result.status == "ok" and result.data["build"] == "golden", result.msg
            assert result.data["warnings"] == ["build.candidate"]
            lab.tamper(node.name)
            engine.sessions.pop(node.name).close()
            (result,) = engine.run(attest(golden))
            assert result.status == "failed" and result.data["reasons"] == ["build.unknown"]
    finally:
        golden.close()


def test_diff_names_the_event_a_tampered_node_added(lab: Lab, lab_node, tc: Coordinator, capsys):
    node = lab_node("node1")
    assert capture(lab, tc, node.name, "--diff", node.build) == 0
    assert f"{node.name} against {node.build} (approved):" in capsys.readouterr().out
    lab.tamper(node.name)
    assert capture(lab, tc, node.name, "--diff", node.build) == 1
    shown = capsys.readouterr().out
    assert "firmware: platform lab-model-a" in shown
    assert "PCR 4 event 3: an extra EV_EFI_BOOT_SERVICES_APPLICATION: image of" in shown


def test_a_log_that_does_not_explain_the_pcrs_is_never_captured(lab: Lab, lab_node, tc: Coordinator, tmp_path, capsys):
    node = lab_node("node1")
    lab.tamper(node.name, hide=True)  # measured into PCR 4, left out of the log
    assert capture(lab, tc, node.name, "--out", str(tmp_path / "x")) == 2
    assert "eventlog.replay" in capsys.readouterr().err and not (tmp_path / "x").exists()
