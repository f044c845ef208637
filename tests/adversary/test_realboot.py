"""Real-boot nodes against a hostile provider: what really boots is what the TC judges.

Two real-boot lab nodes (QEMU guests: Debian's OVMF, systemd-boot and kernel on a swtpm vTPM,
the TVMM service in the measured initramfs; lab/realnodes.py) are enrolled and attested like
any node. Their TVMM build in the lab's manifests was predicted from the image's files and their
platform captured from a golden boot; `build capture` through the TC (a fresh quote) gives the
same build. Then the provider, root on the host, changes what the nodes boot: another kernel,
another command line, a file added to the initramfs; it power-cycles them, and cuts the power
right after an enrollment. Each changed boot is refused with the event it departs at, decoded;
nothing the service wrote before the power cut is lost.

Slow: one lab for the module (about a minute to come up, the image cached after the first run),
and each reboot about half a minute under TCG.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tccdeploy.cli import main
from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.runner import Engine
from tccdeploy.lab import realboot, realnodes
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_manifests

from ..conftest import lab_directory

pytestmark = pytest.mark.slow

NODES = ("rboot1", "rboot2")
TIMEOUT = 180  # a session's operations under TCG: Python starts in seconds, not milliseconds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "swtpm", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install)")
    if not os.path.isfile(realboot.OVMF_CODE):
        pytest.skip("OVMF is not installed (scripts/install)")
    lab = Lab(lab_directory())
    lab.up(nodes=1, sites=1, outside=0, lab_index=61, real_boot=len(NODES))
    state = str(tmp_path_factory.mktemp("tc"))
    tc_init(state)
    coordinator = Coordinator.from_manifests(load_manifests([lab.manifests_dir]), state)
    try:
        with Engine(load_inventory(lab.inventory_dir).select(",".join(NODES)), state=state, timeout=TIMEOUT) as engine:
            results = engine.run(enroll(coordinator))
        assert [r.status for r in results] == ["changed", "changed"], [r.msg for r in results]
        # The provider cuts rboot2's power seconds after its enrollment wrote the AK's record.
        lab.reboot("rboot2")
        yield lab, coordinator
    finally:
        coordinator.close()
        lab.down()


def _attest(lab: Lab, coordinator: Coordinator, admit: bool = False) -> dict[str, dict]:
    with Engine(load_inventory(lab.inventory_dir).select(",".join(NODES)), state=coordinator.state,
                timeout=TIMEOUT) as engine:
        return {r.host: {"status": r.status, "msg": r.msg, **(r.data or {})}
                for r in engine.run(attest(coordinator, admit_nodes=admit))}


def _capture(lab: Lab, coordinator: Coordinator, *args: str) -> int:
    return main(["build", "capture", *args, "-i", lab.inventory_dir, "-m", lab.manifests_dir,
                 "--state", coordinator.state, "-T", str(TIMEOUT)])


def test_real_boot_nodes_are_admitted_on_the_predicted_build_and_the_captured_platform_even_after_a_power_cut(world):
    lab, coordinator = world
    for node, result in _attest(lab, coordinator, admit=True).items():
        assert result["status"] == "changed", (node, result["msg"])  # rboot2 kept its AK through the power cut
        assert (result["verdict"], result["build"], result["platform"], result["admitted"]) == \
               ("trusted", realnodes.BUILD, realnodes.PLATFORM, True), node
        record = coordinator.node(node)
        assert record is not None and (record.state, record.build, record.platform) == \
            ("admitted", realnodes.BUILD, realnodes.PLATFORM)


def test_build_capture_through_the_tc_is_the_build_predicted_from_the_images_files(world, tmp_path, capsys):
    lab, coordinator = world
    assert _capture(lab, coordinator, "rboot1", "--name", "rb-captured", "--out", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"matches platform {realnodes.PLATFORM} already" in err and f"matches build {realnodes.BUILD} already" in err
    captured = yaml.safe_load((tmp_path / "rb-captured.yml").read_text())
    with open(lab.path("manifests", "builds", f"{realnodes.BUILD}.yml")) as fh:
        predicted = yaml.safe_load(fh)

    def events(doc: dict) -> dict[int, list[tuple[str, str]]]:
        artifacts = doc["spec"].get("artifacts", {})
        return {p["pcr"]: [(e.get("digest") or artifacts[e["artifact"]]["sha256"], e["type"]) for e in p["events"]]
                for p in doc["spec"]["measurements"]["pcrs"]}

    assert events(captured) == events(predicted)
    assert sorted(events(predicted)) == [4, 9, 12]
    assert _capture(lab, coordinator, "rboot1", "--diff", realnodes.BUILD) == 0


def test_another_kernel_initramfs_or_command_line_really_booted_is_refused_at_the_event_that_changed(world, capsys):
    lab, coordinator = world
    lab.tamper("rboot1", boot="kernel")
    lab.tamper("rboot1", boot="initrd")
    lab.tamper("rboot2", boot="cmdline")
    lab.power_cycle(list(NODES))
    results = _attest(lab, coordinator)
    for node, pcr_event in (("rboot1", "PCR 4 event 3"), ("rboot2", "PCR 9 event 0")):
        result = results[node]
        assert result["status"] == "failed" and result["reasons"] == ["build.unknown"], (node, result)
        assert f"closest build {realnodes.BUILD}: {pcr_event} (a different event)" in result["msg"], result["msg"]
        assert result["platform"] == realnodes.PLATFORM  # the firmware is still the approved one
    capsys.readouterr()
    assert _capture(lab, coordinator, "rboot1", "--diff", realnodes.BUILD) == 1
    diff = capsys.readouterr().out
    assert "PCR 4 event 3: changed: EV_EFI_BOOT_SERVICES_APPLICATION" in diff and "\\vmlinuz" in diff, diff
    assert "PCR 9 event 1: changed: EV_EVENT_TAG: Linux initrd" in diff, diff
    assert "PCR 9 event 0" not in diff and "PCR 12" not in diff
    assert _capture(lab, coordinator, "rboot2", "--diff", realnodes.BUILD) == 1
    diff = capsys.readouterr().out
    assert "PCR 9 event 0: changed: EV_EVENT_TAG" in diff and realnodes.TAMPER_OPTION in diff, diff
    assert "PCR 12 event 0: changed: EV_IPL" in diff and "PCR 9 event 1" not in diff


def _ssh(lab: Lab, user: str, node: str, command: str) -> subprocess.CompletedProcess:
    address = lab.node(node).address
    return subprocess.run(["ssh", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(lab.ssh_port),
                           f"{user}@{address}", command], input="", capture_output=True, text=True, timeout=TIMEOUT)


def test_the_engines_logins_on_a_real_boot_node_reach_neither_the_tpm_nor_the_state_and_run_only_the_service(world):
    """A hostile engine holds the key both logins accept (provisioned through fw_cfg): the admin
    login runs any command but cannot open the TPM, read the service's state or the firmware's
    log; the TVMM login runs the measured service whatever command it asks for (the forced
    command is in the measured initramfs, not in anything the provider provisions)."""
    lab, _ = world
    probe = ("cat /dev/tpmrm0 </dev/null; echo rc=$?; ls /var/lib/tccdeploy-tvmm; echo rc=$?; "
             "head -c 4 /sys/kernel/security/tpm0/binary_bios_measurements; echo rc=$?; id -u")
    admin = _ssh(lab, "tccnode", "rboot1", probe)
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout.count("rc=1") + admin.stdout.count("rc=2") == 3, admin.stdout  # each one refused
    assert "Permission denied" in admin.stderr and admin.stdout.strip().endswith("991")
    tvmm = _ssh(lab, "tcctvmm", "rboot1", "cat /dev/tpmrm0; sh -c id")
    assert tvmm.stdout.startswith('{"hello": "tccdeploy-tvmm"') and "uid=" not in tvmm.stdout, tvmm.stdout
