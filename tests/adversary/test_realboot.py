"""Real-boot nodes against a hostile provider: what really boots is what the TC judges.

Two real-boot lab nodes (QEMU guests: Debian's OVMF, systemd-boot and kernel on a swtpm vTPM,
the TVMM service in the measured initramfs; lab/realnodes.py) are enrolled and attested like
any node. Their TVMM build in the lab's manifests was predicted from the image's files and their
platform captured from a golden boot; `build capture` through the TC (a fresh quote) gives the
same build, and the firmware's log replays to the PCRs the kernel reads, in every bank, as
tpm2_eventlog replays it. Then the provider, root on the host, changes what rboot1 boots
(another kernel, a file added to the initramfs, another command line) and cuts both nodes' power
seconds after their enrollment and first attestation: the changed boot is refused at the event
it departs at, decoded; rboot2 comes back trusted with nothing the service wrote lost.

Slow, so the module boots its pair of nodes once and reboots them once: about a minute to come
up (the image and its initrd cached after the first run), and the reboot about a minute under TCG.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest
import yaml

from tccdeploy.baseline import captured, departures
from tccdeploy.bootpaths import SYSTEMD_BOOT
from tccdeploy.cli import main
from tccdeploy.coordinator.identity import init as tc_init
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.runner import Engine
from tccdeploy.eventlog import parse
from tccdeploy.lab import realboot, realnodes
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_manifests, load_paths

from ..conftest import lab_directory

pytestmark = pytest.mark.slow

NODES = ("rboot1", "rboot2")
TIMEOUT = 180  # a session's operations under TCG: Python starts in seconds, not milliseconds
BUILD_PCRS = (4, 9, 12)
DRTM_PCRS = range(17, 23)
IMA_PCR = 10  # the kernel's IMA extends it (boot_aggregate) and logs it in its own log, not the firmware's


@dataclass
class World:
    lab: Lab
    coordinator: Coordinator
    first_boot: realboot.Probe  # what rboot1's init printed of its first boot
    admitted: dict[str, dict]  # the attestation of the first boots
    after_tamper: dict[str, dict] | None = None  # the attestation after rboot1's tamper and the power cut


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "swtpm", "mmdebstrap", "tpm2_eventlog"):
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
        first_boot = realnodes.booted(lab, lab.node("rboot1"))
        yield World(lab, coordinator, first_boot, _attest(lab, coordinator, admit=True))
    finally:
        coordinator.close()
        lab.down()


@pytest.fixture(scope="module")
def rebooted(world: World) -> World:
    """rboot1 boots another kernel, initramfs and command line; both lose power seconds after
    their enrollment (the first attestation is all that ran since) and boot again."""
    for what in ("kernel", "initrd", "cmdline"):
        world.lab.tamper("rboot1", boot=what)
    world.lab.power_cycle(list(NODES))
    world.after_tamper = _attest(world.lab, world.coordinator)
    return world


def _attest(lab: Lab, coordinator: Coordinator, admit: bool = False) -> dict[str, dict]:
    with Engine(load_inventory(lab.inventory_dir).select(",".join(NODES)), state=coordinator.state,
                timeout=TIMEOUT) as engine:
        return {r.host: {"status": r.status, "msg": r.msg, **(r.data or {})}
                for r in engine.run(attest(coordinator, admit_nodes=admit))}


def _capture(lab: Lab, coordinator: Coordinator, *args: str) -> int:
    return main(["build", "capture", *args, "-i", lab.inventory_dir, "-m", lab.manifests_dir,
                 "--state", coordinator.state, "-T", str(TIMEOUT)])


def _events(doc: dict) -> dict[int, list[tuple[str, str]]]:
    artifacts = doc["spec"].get("artifacts", {})
    return {p["pcr"]: [(e.get("digest") or artifacts[e["artifact"]]["sha256"], e["type"]) for e in p["events"]]
            for p in doc["spec"]["measurements"]["pcrs"]}


def test_real_boot_nodes_are_admitted_on_the_predicted_build_and_the_captured_platform(world):
    for node, result in world.admitted.items():
        assert result["status"] == "changed", (node, result["msg"])
        assert (result["verdict"], result["build"], result["platform"], result["admitted"]) == \
               ("trusted", realnodes.BUILD, realnodes.PLATFORM, True), node


def test_the_real_boots_log_replays_to_the_vtpms_pcrs_in_every_bank_and_tpm2_eventlog_agrees(world, tmp_path):
    boot = world.first_boot
    log = parse(boot.eventlog)
    assert set(boot.pcrs) == {"sha1", "sha256"} == set(log.algorithms)
    for bank in log.algorithms:
        replayed = log.replay(bank)
        for pcr, value in boot.pcrs[bank].items():
            if pcr == IMA_PCR:
                continue
            if pcr in DRTM_PCRS:  # no dynamic launch: still at their reset value, all ones
                assert value == b"\xff" * len(value), f"{bank} PCR {pcr}"
                continue
            assert replayed.get(pcr, bytes(len(value))) == value, f"{bank} PCR {pcr}"
    (tmp_path / "boot.bin").write_bytes(boot.eventlog)
    proc = subprocess.run(["tpm2_eventlog", str(tmp_path / "boot.bin")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pcrs = yaml.safe_load(proc.stdout)["pcrs"]
    for bank in log.algorithms:
        for pcr, value in pcrs[bank].items():
            assert int(value) == int.from_bytes(boot.pcrs[bank][pcr], "big"), f"tpm2_eventlog {bank} PCR {pcr}"


def test_build_capture_through_the_tc_is_the_build_predicted_from_the_images_files(world, tmp_path, capsys):
    lab, coordinator = world.lab, world.coordinator
    assert _capture(lab, coordinator, "rboot2", "--name", "rb-captured", "--out", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"matches platform {realnodes.PLATFORM} already" in err and f"matches build {realnodes.BUILD} already" in err
    captured_doc = yaml.safe_load((tmp_path / "rb-captured.yml").read_text())
    with open(lab.path("manifests", "builds", f"{realnodes.BUILD}.yml")) as fh:
        predicted = yaml.safe_load(fh)
    assert _events(captured_doc) == _events(predicted)
    assert sorted(_events(predicted)) == list(BUILD_PCRS)
    assert _capture(lab, coordinator, "rboot2", "--diff", realnodes.BUILD) == 0
    # and offline, from the log rboot1's init printed: the same events, the same files
    log = parse(world.first_boot.eventlog)
    offline, platform = captured(log, "sha256", [*realnodes.PLATFORM_PCRS, *BUILD_PCRS], realnodes.PLATFORM_PCRS,
                                 "rboot1", "rb-offline", "1.0.0", "ovmf-q35")
    assert platform is not None and [p["pcr"] for p in platform["spec"]["measurements"]["pcrs"]] == [0, 1, 2, 3, 5, 6, 7]
    assert _events(offline) == _events(predicted)
    assert world.first_boot.cmdline == SYSTEMD_BOOT.command_line(realnodes.OPTIONS)  # what the kernel got
    assert predicted["spec"]["artifacts"]["cmdline"]["value"] == world.first_boot.cmdline
    initrd = os.path.join(realnodes.artifact_dir(lab), "initrd")
    with open(initrd, "rb") as fh:
        assert predicted["spec"]["artifacts"]["initrd"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()


def _predict(world: World, out: str, name: str, options: str = realnodes.OPTIONS, **replace: str):  # type: ignore[no-untyped-def]
    """`build predict` on the image's files (some replaced), loaded as the TC loads a build."""
    folder = realnodes.artifact_dir(world.lab)
    files = {name: os.path.join(folder, name) for name in realnodes.ARTIFACTS} | replace
    assert main(["build", "predict", "--boot-path", "systemd-boot", *(f"{k}={v}" for k, v in files.items()),
                 "--cmdline", options, "--name", name, "--version", "1.0.0", "--rollout", "rb1", "--out", out]) == 0
    loaded = load_paths([os.path.join(out, f"{name}.yml")])
    assert not loaded.errors, loaded.errors
    (build,) = loaded.builds
    return build


def test_another_command_line_initrd_or_kernel_is_predicted_to_depart_where_the_chain_measures_it(world, tmp_path):
    log = parse(world.first_boot.eventlog)
    assert departures(log, "sha256", BUILD_PCRS, _predict(world, str(tmp_path), "rb-same")) == []
    build = _predict(world, str(tmp_path), "rb-debug", realnodes.OPTIONS + " tccdeploy.debug=1")
    changed = departures(log, "sha256", BUILD_PCRS, build)
    assert [(d.pcr, d.index, d.kind) for d in changed] == [(9, 0, "changed"), (12, 0, "changed")]
    assert realnodes.OPTIONS in " ".join(changed[1].lines("sha256"))  # the departure shows the line that booted
    other = tmp_path / "initrd"
    with open(os.path.join(realnodes.artifact_dir(world.lab), "initrd"), "rb") as fh:
        other.write_bytes(fh.read() + b"\0" * 512)
    build = _predict(world, str(tmp_path), "rb-other-initrd", initrd=str(other))
    assert [(d.pcr, d.index) for d in departures(log, "sha256", BUILD_PCRS, build)] == [(9, 1)]
    bootloader = os.path.join(realnodes.artifact_dir(world.lab), "bootloader")
    build = _predict(world, str(tmp_path), "rb-other-kernel", kernel=bootloader)
    assert [(d.pcr, d.index) for d in departures(log, "sha256", BUILD_PCRS, build)] == [(4, 3)]


def test_a_tampered_boot_is_refused_at_each_event_that_changed_and_a_power_cut_loses_nothing(rebooted, capsys):
    lab, coordinator = rebooted.lab, rebooted.coordinator
    results = rebooted.after_tamper
    assert results is not None
    tampered, cut = results["rboot1"], results["rboot2"]
    assert tampered["status"] == "failed" and tampered["reasons"] == ["build.unknown"], tampered
    assert f"closest build {realnodes.BUILD}: PCR 4 event 3 (a different event)" in tampered["msg"], tampered["msg"]
    assert tampered["platform"] == realnodes.PLATFORM  # the firmware is still the approved one
    # rboot2 lost power seconds after its enrollment wrote the AK's record: it kept its AK
    assert cut["status"] in ("ok", "changed") and cut["verdict"] == "trusted", cut
    for node, state in (("rboot1", "quarantined"), ("rboot2", "admitted")):
        record = coordinator.node(node)
        assert record is not None and record.state == state, (node, record)
    capsys.readouterr()
    assert _capture(lab, coordinator, "rboot1", "--diff", realnodes.BUILD) == 1
    diff = capsys.readouterr().out
    assert "PCR 4 event 3: changed: EV_EFI_BOOT_SERVICES_APPLICATION" in diff and "\\vmlinuz" in diff, diff
    assert "PCR 9 event 0: changed: EV_EVENT_TAG" in diff and realnodes.TAMPER_OPTION in diff, diff
    assert "PCR 9 event 1: changed: EV_EVENT_TAG: Linux initrd" in diff, diff
    assert "PCR 12 event 0: changed: EV_IPL" in diff, diff


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
    lab = world.lab
    probe = ("cat /dev/tpmrm0 </dev/null; echo rc=$?; ls /var/lib/tccdeploy-tvmm; echo rc=$?; "
             "head -c 4 /sys/kernel/security/tpm0/binary_bios_measurements; echo rc=$?; id -u")
    admin = _ssh(lab, "tccnode", "rboot1", probe)
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout.count("rc=1") + admin.stdout.count("rc=2") == 3, admin.stdout  # each one refused
    assert "Permission denied" in admin.stderr and admin.stdout.strip().endswith("991")
    tvmm = _ssh(lab, "tcctvmm", "rboot1", "cat /dev/tpmrm0; sh -c id")
    assert tvmm.stdout.startswith('{"hello": "tccdeploy-tvmm"') and "uid=" not in tvmm.stdout, tvmm.stdout
