"""Real-boot nodes against a hostile provider: what really boots is what the TC judges.

Two real-boot lab nodes (QEMU guests: Debian's secure-boot OVMF with the lab's keys enrolled,
systemd-boot and kernels the lab signed, on a swtpm vTPM,
the TVMM service and QEMU in the measured initramfs; lab/realnodes.py) are enrolled and attested
like any node. Their TVMM build in the lab's manifests was predicted from the image's files and
their platform captured from a golden boot; `build capture` through the TC (a fresh quote) gives
the same build, and the firmware's log replays to the PCRs the kernel reads, in every bank, as
tpm2_eventlog replays it. A newer kernel rolls out on one node through rollout-tvmm.yml (its VM,
nested in the node, drained to the other), admitted as a candidate, then approved; when the old
build is revoked, the other node's VMs are evacuated to it. Then the provider, root on the
host, changes what rboot1 boots (the other build's signed kernel, which secure boot admits, a
file added to the initramfs, another command line; in its NVRAM, secure boot off and its own
certificate in db) while a VM runs there, and cuts both nodes' power: the changed boot is refused
at the events it departs at, decoded (SecureBoot disabled, the db variable and the host's
certificate), and enforcement quarantines it
without believing what it says of its VM; rboot2 comes back trusted with nothing the service
wrote lost (the engine's replay of a launch ticket it spent just before is refused), its TPM's
reset count ending the VM that ran there.

Slow, so the module boots its pair of nodes once and reboots them twice (the rollout, the power
cut): about a minute to come up (the images and initrds cached after the first run), each reboot
about a minute under TCG, each VM launch or migration some 20 s (TCG inside TCG). It is ordered
first in the suite (tests/conftest.py), so with two workers it runs beside the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tccdeploy.baseline import captured, departures
from tccdeploy.bootpaths import SYSTEMD_BOOT
from tccdeploy.cli import main
from tccdeploy.coordinator import audit
from tccdeploy.coordinator.service import Coordinator
from tccdeploy.engine import migrate as migrating
from tccdeploy.engine.attestation import attest, enroll
from tccdeploy.engine.enforce import Report, enforce_round
from tccdeploy.engine.helper import RemoteError
from tccdeploy.engine.launch import launch
from tccdeploy.engine.runner import Engine
from tccdeploy.eventdecode import describe
from tccdeploy.eventlog import parse
from tccdeploy.lab import nodeimage, realboot, realnodes
from tccdeploy.lab.lab import Lab
from tccdeploy.manifest.loader import load_inventory, load_paths

from ..conftest import REPO, lab_directory
from ..tcworld import coordinator_with_customer, sealed_request

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
    root: Path  # the customer's key, the TC's certificates, sealed images
    first_boot: realboot.Probe  # what rboot1's init printed of its first boot
    admitted: dict[str, dict]  # the attestation of the first boots
    vms: dict[str, dict] = field(default_factory=dict)  # launched by the tests: name -> TC record
    tickets: dict[str, dict] = field(default_factory=dict)  # vm_id -> the launch ticket the TC signed
    rollout: dict = field(default_factory=dict)  # what the rollout of NEXT_BUILD and the revocation showed
    after_tamper: dict[str, dict] | None = None  # the enforcement round's attestations after the reboot
    report: Report | None = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "swtpm", "mmdebstrap", "tpm2_eventlog"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install)")
    if not os.path.isfile(realboot.OVMF_CODE):
        pytest.skip("OVMF is not installed (scripts/install)")
    lab = Lab(lab_directory())
    lab.up(nodes=1, sites=1, outside=0, lab_index=61, real_boot=len(NODES))
    root = tmp_path_factory.mktemp("realboot")
    coordinator, _ = coordinator_with_customer(lab, root)
    (root / "disk.raw").write_bytes(bytes(2 * 1024 * 1024))
    try:
        with _engine(lab, coordinator, *NODES) as engine:  # one service session per node: each costs seconds under TCG
            results = engine.run(enroll(coordinator))
            assert [r.status for r in results] == ["changed", "changed"], [r.msg for r in results]
            admitted = _attested(engine, coordinator, admit=True)
        first_boot = realnodes.booted(lab, lab.node("rboot1"))
        yield World(lab, coordinator, root, first_boot, admitted)
    finally:
        coordinator.close()
        lab.down()


@pytest.fixture(scope="module")
def rolled_out(world: World) -> World:
    """The provider rolls out NEXT_BUILD (a newer Debian kernel, its initramfs; a candidate whose
    rollout names rboot1) with playbooks/rollout-tvmm.yml on rboot1: drain its VMs, install the
    files by digest on its boot disk, make it the next boot, power-cycle it, attest and admit.
    Then the TC's operator approves NEXT_BUILD, revokes BUILD for a round (rboot2 runs it: its VMs
    must leave), and approves BUILD again, releasing rboot2."""
    lab, coordinator = world.lab, world.coordinator
    with _engine(lab, coordinator, "rboot1") as engine:
        world.vms["moved"] = _start_vm(world, "rboot1", engine=engine)  # the drain and then the evacuation move it
        assert _vm_status(world, "rboot1", world.vms["moved"]["vm_id"], engine) == "running"  # nested: QEMU in the guest
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "tccdeploy"), "apply",
                           "playbooks/rollout-tvmm.yml", "-i", lab.inventory_dir, "-m", lab.manifests_dir,
                           "--state", coordinator.state, "-T", str(TIMEOUT), "-e", f"new_build={realnodes.NEXT_BUILD}",
                           "-e", "targets=rboot1", "-v"], capture_output=True, text=True, timeout=1800, cwd=REPO)
    world.rollout["playbook"] = proc
    world.rollout["vms_after_rollout"] = {v.name: v.node for v in coordinator.vms() if v.state == "running"}
    builds = coordinator.builds
    approved = [dataclasses.replace(b, status="approved") if b.name == realnodes.NEXT_BUILD else b for b in builds]
    with _engine(lab, coordinator, "rboot1") as engine:
        world.rollout["candidate"] = _attested(engine, coordinator)
        coordinator.builds = approved
        world.rollout["approved"] = _attested(engine, coordinator)
    coordinator.builds = [dataclasses.replace(b, status="revoked") if b.name == realnodes.BUILD else b for b in approved]
    try:
        with _engine(lab, coordinator, *NODES) as engine:
            world.rollout["revoked"] = enforce_round(engine, coordinator)
    finally:
        coordinator.builds = approved
    coordinator.release_node("rboot2", "test: the operator approved its build again")
    world.rollout["readmitted"] = _attest(lab, coordinator, admit=True, nodes=("rboot2",))
    return world


@pytest.fixture(scope="module")
def rebooted(rolled_out: World) -> World:
    """After the rollout, with a VM running on each node, rboot1 is made to boot another kernel,
    initramfs and command line, with secure boot off and the host's certificate in db; both nodes lose power seconds after rboot2's service recorded
    the launch ticket it used, and boot again; then an enforcement round."""
    world = rolled_out
    running = [v for v in world.coordinator.vms() if v.node == "rboot1" and v.state == "running"]
    world.vms["on-tampered"] = world.coordinator.registry.vm(running[0].name) if running else _start_vm(world, "rboot1")
    world.vms["before-the-cut"] = _start_vm(world, "rboot2")  # its used ticket written seconds before the cut
    for what in ("kernel", "initrd", "cmdline", "secureboot", "efivar"):
        world.lab.tamper("rboot1", boot=what)
    world.lab.power_cycle(list(NODES))
    with _engine(world.lab, world.coordinator, *NODES) as engine:
        world.report = enforce_round(engine, world.coordinator)
    world.after_tamper = {r.host: {"status": r.status, "msg": r.msg, **(r.data or {})} for r in world.report.attested}
    return world


def _engine(lab: Lab, coordinator: Coordinator, *nodes: str) -> Engine:
    return Engine(load_inventory(lab.inventory_dir).select(",".join(nodes)), state=coordinator.state, timeout=TIMEOUT)


def _start_vm(world: World, *nodes: str, engine: Engine | None = None) -> dict:
    """A customer's sealed VM launched on one of nodes (the engine's host list holds only them)."""
    name = f"vm-{secrets.token_hex(3)}"
    envelope = sealed_request(world.root, name)
    if engine is not None:
        launch(engine, _KeepingTickets(world), envelope, envelope["bundle"])
    else:
        with _engine(world.lab, world.coordinator, *nodes) as fresh:
            launch(fresh, _KeepingTickets(world), envelope, envelope["bundle"])
    record = world.coordinator.registry.vm(name)
    assert record is not None and record["node"] in nodes and record["state"] == "running", record
    return record


class _KeepingTickets:
    """The TC as the engine sees it, keeping each launch ticket it signs (a hostile engine keeps
    them all, to replay)."""

    def __init__(self, world: World):
        self._world = world

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._world.coordinator, name)

    def release_key(self, request_id: str, node: str) -> dict:
        release = self._world.coordinator.release_key(request_id, node)
        self._world.tickets[release["ticket"]["ticket"]["vm_id"]] = release["ticket"]
        return release


def _vm_status(world: World, node: str, vm_id: str, engine: Engine | None = None) -> str:
    if engine is not None:
        return migrating._call_fresh(engine, node, "vm_status", {"vm_id": vm_id})["status"]
    with _engine(world.lab, world.coordinator, *NODES) as fresh:
        return migrating._call_fresh(fresh, node, "vm_status", {"vm_id": vm_id})["status"]


def _attest(lab: Lab, coordinator: Coordinator, admit: bool = False, nodes: tuple[str, ...] = NODES) -> dict[str, dict]:
    with _engine(lab, coordinator, *nodes) as engine:
        return _attested(engine, coordinator, admit)


def _attested(engine: Engine, coordinator: Coordinator, admit: bool = False) -> dict[str, dict]:
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


def test_real_boot_nodes_boot_with_secure_boot_on_under_the_owners_keys(world):
    """The firmware verified systemd-boot and the kernel against the lab's db (PCR 7: secure boot
    on, the owner's keys, the one db certificate that admitted both images)."""
    pcr7 = [(e.type_name, describe(e)) for e in parse(world.first_boot.eventlog).events if e.pcr == 7]
    assert pcr7[0] == ("EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: enabled")
    assert [d.split(" ", 1)[0] for _, d in pcr7[1:5]] == ["PK", "KEK", "db", "dbx"]
    assert "1 entry: X.509 CN=tccdeploy lab image signing" in pcr7[3][1]
    authorities = [d for kind, d in pcr7 if kind == "EV_EFI_VARIABLE_AUTHORITY"]
    assert len(authorities) == 1 and authorities[0].endswith("X.509 CN=tccdeploy lab image signing,O=tccdeploy lab")
    artifacts = realnodes.artifact_dir(world.lab)
    for name in ("bootloader", "kernel"):  # signed by sbsign with the lab's db key
        proc = subprocess.run(["sbverify", "--cert", realnodes.signing_keys(world.lab).db_cert, os.path.join(artifacts, name)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


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


def test_a_new_kernel_rolls_out_through_the_playbook_as_a_candidate_then_approved(rolled_out):
    """rollout-tvmm.yml on a real-boot node: its VM drained to the other one, the build's files
    deployed by digest on its boot disk and booted (the node's firmware, systemd-boot and the new
    kernel measure them), admitted as the candidate its rollout names, then trusted once approved."""
    proc = rolled_out.rollout["playbook"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "rboot1" in proc.stdout and "failed=0" in proc.stdout, proc.stdout[-2000:]
    # the new build shares the boot loader and the initramfs with the running one, which the node's boot
    # disk holds since it was installed: only the new kernel (and its command line) crossed the network
    task = json.loads(re.search(r"TASK \[Install the build.*?\n\S+: \[rboot1\] => (\{.*\})\n", proc.stdout).group(1))
    assert task["reused"] == {"bootloader": realnodes.BUILD, "initrd": realnodes.BUILD}, task
    assert task["installed"] == ["bootloader", "cmdline", "initrd", "kernel"], task  # missing from its folder
    assert task["uploaded"] == ["cmdline", "kernel"], task
    assert set(rolled_out.rollout["vms_after_rollout"].values()) == {"rboot2"}  # drained before the reboot
    rolled_out.lab.load()  # the reboot command was another process
    assert rolled_out.lab.node("rboot1").build == realnodes.NEXT_BUILD
    candidate = rolled_out.rollout["candidate"]["rboot1"]
    assert (candidate["verdict"], candidate["build"], candidate["platform"]) == \
        ("trusted", realnodes.NEXT_BUILD, realnodes.PLATFORM), candidate
    assert candidate["warnings"] == ["build.candidate"], candidate
    approved = rolled_out.rollout["approved"]["rboot1"]
    assert (approved["verdict"], approved["build"], approved["warnings"]) == ("trusted", realnodes.NEXT_BUILD, []), approved
    assert rolled_out.coordinator.node("rboot2").build == realnodes.BUILD  # not in the rollout: untouched


def test_a_real_boot_node_whose_build_is_revoked_is_evacuated_to_the_node_on_the_new_build(rolled_out):
    report = rolled_out.rollout["revoked"]
    assert report.quarantined == [{"node": "rboot2", "reason": "build.revoked"}]
    assert report.vms and all(v["result"] == "evacuated to rboot1" for v in report.vms), report.vms
    for outcome in report.vms:
        record = rolled_out.coordinator.registry.vm(outcome["vm"])
        assert (record["node"], record["state"]) == ("rboot1", "running")
        assert _vm_status(rolled_out, "rboot1", outcome["vm_id"]) == "running"
    assert rolled_out.rollout["readmitted"]["rboot2"]["admitted"] is True
    # the VM launched nested in rboot1 moved twice between the real-boot nodes, each an encrypted
    # migration the TC started and committed: the drain to rboot2, the evacuation back
    vm = rolled_out.vms["moved"]
    kinds = [e["kind"] for e in rolled_out.coordinator.registry.audit_entries(vm=vm["vm_id"])]
    assert kinds.count("migration.start") == 2 and kinds.count("migration.commit") == 2, kinds
    assert [m["destination"] for m in rolled_out.coordinator.registry.migrations() if m["vm_id"] == vm["vm_id"]] == \
        ["rboot2", "rboot1"]
    assert audit.verify(rolled_out.coordinator.registry).ok


def test_a_launch_ticket_used_seconds_before_a_power_cut_stays_used(rebooted):
    """First after the reboot (the ticket lives five minutes). The engine kept the ticket rboot2 launched a VM with just before its power was cut; the
    node's record of it was on its disk in time, so the replay, which would run the VM again
    while the TC holds it off, is refused."""
    vm = rebooted.vms["before-the-cut"]
    ticket = rebooted.tickets[vm["vm_id"]]
    with _engine(rebooted.lab, rebooted.coordinator, "rboot2") as engine:
        with pytest.raises(RemoteError) as refused:
            engine.session(engine.hosts[0]).tvmm("launch", {"ticket": ticket}, timeout=TIMEOUT)
    assert refused.value.reason == "ticket.replayed", refused.value
    assert _vm_status(rebooted, "rboot2", vm["vm_id"]) != "running"


def test_a_tampered_boot_is_refused_at_each_event_that_changed_and_a_power_cut_loses_nothing(rebooted, capsys):
    lab, coordinator = rebooted.lab, rebooted.coordinator
    results = rebooted.after_tamper
    assert results is not None
    tampered, cut = results["rboot1"], results["rboot2"]
    assert tampered["status"] == "failed" and tampered["reasons"] == ["platform.unknown", "build.unknown"], tampered
    # secure boot off and the host's certificate in db: PCR 7's events, each decoded (the variable,
    # its value, the certificates' subjects); with secure boot off no image was verified, so the
    # db entry that admitted them is missing too
    assert (f"closest platform {realnodes.PLATFORM}: PCR 7 event 0 (a different event: EV_EFI_VARIABLE_DRIVER_CONFIG "
            "SecureBoot (EFI_GLOBAL_VARIABLE), 1 bytes: disabled); PCR 7 event 3 (a different event: "
            "EV_EFI_VARIABLE_DRIVER_CONFIG db (EFI_IMAGE_SECURITY_DATABASE)") in tampered["msg"], tampered["msg"]
    assert f"X.509 CN={realnodes.HOST_KEYS} image signing" in tampered["msg"], tampered["msg"]
    assert "PCR 7 event 6 (a missing event)" in tampered["msg"], tampered["msg"]
    # rboot1 ran NEXT_BUILD: the host put BUILD's kernel back (signed by the owner: secure boot
    # would admit it even if it were on), with its own initramfs and command line. The kernel is BUILD's, so BUILD is the
    # closest, departing at the command line (PCR 9's first event: the EFI stub's tag for it)
    assert f"closest build {realnodes.BUILD}: PCR 9 event 0 (a different event: EV_EVENT_TAG LOADED_IMAGE::LoadOptions" \
        in tampered["msg"], tampered["msg"]
    assert tampered["platform"] is None
    # rboot2 lost power seconds after its enrollment wrote the AK's record: it kept its AK
    assert cut["status"] in ("ok", "changed") and cut["verdict"] == "trusted", cut
    for node, state in (("rboot1", "quarantined"), ("rboot2", "admitted")):
        record = coordinator.node(node)
        assert record is not None and record.state == state, (node, record)
    capsys.readouterr()
    assert _capture(lab, coordinator, "rboot1", "--diff", realnodes.NEXT_BUILD) == 1
    diff = capsys.readouterr().out
    assert f"firmware: matches no platform; the closest is {realnodes.PLATFORM}:" in diff, diff
    assert "PCR 7 event 0: changed: EV_EFI_VARIABLE_DRIVER_CONFIG: SecureBoot" in diff and "disabled" in diff, diff
    assert "PCR 7 event 3: changed: EV_EFI_VARIABLE_DRIVER_CONFIG: db" in diff, diff
    assert "PCR 4 event 3: changed: EV_EFI_BOOT_SERVICES_APPLICATION" in diff and "\\vmlinuz" in diff, diff
    assert "PCR 9 event 0: changed: EV_EVENT_TAG" in diff and realnodes.TAMPER_OPTION in diff, diff
    assert "PCR 9 event 1: changed: EV_EVENT_TAG: Linux initrd" in diff, diff
    assert "PCR 12 event 0: changed: EV_IPL" in diff, diff
    # The power cut ended the VM on rboot1 before the tampered boot: evacuation finds nothing to
    # move and the power-off is answered by a boot the TC does not trust, so the TC keeps the VM
    # live (no second copy anywhere, no key to rboot1) until rboot1 proves it gone from a trusted boot.
    assert rebooted.report is not None and rebooted.report.quarantined == [{"node": "rboot1", "reason": "platform.unknown"}]
    (outcome,) = rebooted.report.vms
    vm = rebooted.vms["on-tampered"]
    assert (outcome["vm"], outcome["policy"]) == (vm["name"], "evacuate"), outcome
    assert outcome["evacuation_error"].startswith("tvmm.vm-not-running"), outcome
    assert outcome["result"].endswith("(vm.end-boot-untrusted)"), outcome
    record = coordinator.registry.vm(vm["name"])
    assert (record["node"], record["state"]) == ("rboot1", "running")
    kinds = [e["kind"] for e in coordinator.registry.audit_entries(vm=vm["vm_id"])]
    assert kinds[-2:] == ["vm-end.refused", "vm.enforce"], kinds
    # rboot2's TPM counted the power cut (its resetCount, in a quote from its trusted boot): the VM
    # migrated there is off, as it is
    for name in ("before-the-cut",):
        if name in rebooted.vms:
            assert coordinator.registry.vm(rebooted.vms[name]["name"])["state"] == "off", name


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
             "head -c 4 /sys/kernel/security/tpm0/binary_bios_measurements; echo rc=$?; "
             f"socat -T 5 STDIO UNIX-CONNECT:{nodeimage.SERVICE_SOCKET} </dev/null; echo rc=$?; "
             "cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -c 'tccdeploy-tvmm[.]pyz daemon'; id -u")
    admin = _ssh(lab, "tccnode", "rboot1", probe)
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout.count("rc=1") + admin.stdout.count("rc=2") == 4, admin.stdout  # each one refused
    assert "Permission denied" in admin.stderr and admin.stdout.strip().endswith("991")
    assert admin.stdout.split()[-2] != "0", admin.stdout  # the service started at boot runs, out of its reach
    tvmm = _ssh(lab, "tcctvmm", "rboot1", "cat /dev/tpmrm0; sh -c id")
    assert tvmm.stdout.startswith('{"hello": "tccdeploy-tvmm"') and "uid=" not in tvmm.stdout, tvmm.stdout

