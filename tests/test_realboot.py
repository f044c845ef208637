"""A real UEFI boot is what `build predict` computes from its files.

OVMF boots systemd-boot from an ESP, systemd-boot boots Debian's current kernel through its EFI
stub, with an initramfs that prints the event log and the PCRs the kernel reads from the swtpm
vTPM, then powers off (lab/realboot.py). Nothing here writes a measurement: the firmware,
systemd-boot and the stub do. The same boot is then taken as `build capture` takes it (the
events of the build's PCRs) and compared with `build predict --boot-path systemd-boot` on the
files the machine booted. (Real tampers, booted on the lab's real-boot nodes and refused by the
TC, are in tests/adversary/test_realboot.py.)

Slow: each boot is about 20 s under TCG (KVM cannot run OVMF on this kind of machine); the
kernel and busybox are downloaded once into the lab's cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tccdeploy.baseline import captured, departures
from tccdeploy.bootpaths import SYSTEMD_BOOT
from tccdeploy.cli import main
from tccdeploy.eventlog import parse
from tccdeploy.lab import realboot
from tccdeploy.lab.ca import make_ca
from tccdeploy.manifest.loader import load_paths

pytestmark = pytest.mark.slow

BUILD_PCRS = (4, 9, 12)
PLATFORM_PCRS = (0, 1, 2, 3, 5, 6, 7)
OPTIONS = "console=ttyS0 quiet"
DRTM_PCRS = range(17, 23)
IMA_PCR = 10  # the kernel's IMA extends it (boot_aggregate) and logs it in its own log, not the firmware's


def _boot(folder: Path, ca: Path, files: dict[str, bytes], options: str) -> realboot.Probe:
    machine = realboot.Machine(str(folder))
    machine.prepare(str(ca))
    realboot.write_esp(machine.esp, files["bootloader"], files["kernel"], files["initrd"], options)
    return realboot.read_probe(machine.run(timeout=240))


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "swtpm", "apt-get"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install)")
    if not Path(realboot.OVMF_CODE).is_file():
        pytest.skip("OVMF is not installed (scripts/install)")
    folder = tmp_path_factory.mktemp("realboot")
    make_ca(str(folder / "ca"), "tccdeploy test TPM vendor")
    files = {"bootloader": Path(realboot.SYSTEMD_BOOT_EFI).read_bytes(),
             "kernel": Path(realboot.kernel_image()).read_bytes(),
             "initrd": realboot.probe_initramfs(realboot.busybox())}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    first = _boot(folder / "first", folder / "ca", files, OPTIONS)
    return folder, first


def _predict(folder: Path, options: str, name: str, **replace: Path) -> dict:
    files = {"bootloader": folder / "bootloader", "kernel": folder / "kernel", "initrd": folder / "initrd", **replace}
    out = folder / "predicted"
    assert main(["build", "predict", "--boot-path", "systemd-boot", *(f"{k}={v}" for k, v in files.items()),
                 "--cmdline", options, "--name", name, "--version", "1.0.0", "--rollout", "rb1", "--out", str(out)]) == 0
    return yaml.safe_load((out / f"{name}.yml").read_text())


def _build(folder: Path, doc: dict):  # type: ignore[no-untyped-def]
    """The build as the TC loads it: schema, artifact files and digests checked."""
    path = folder / "predicted" / f"{doc['metadata']['name']}.yml"
    if not path.exists():  # a captured build: written where predict writes
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    loaded = load_paths([str(path)])
    assert not loaded.errors, loaded.errors
    (build,) = loaded.builds
    return build


def test_the_real_boots_log_replays_to_the_vtpms_pcrs_in_every_bank_and_tpm2_eventlog_agrees(booted):
    folder, first = booted
    log = parse(first.eventlog)
    assert set(first.pcrs) == {"sha1", "sha256"} == set(log.algorithms)
    for bank in log.algorithms:
        replayed = log.replay(bank)
        for pcr, value in first.pcrs[bank].items():
            if pcr == IMA_PCR:
                continue
            if pcr in DRTM_PCRS:  # no dynamic launch: still at their reset value, all ones
                assert value == b"\xff" * len(value), f"{bank} PCR {pcr}"
                continue
            assert replayed.get(pcr, bytes(len(value))) == value, f"{bank} PCR {pcr}"
    (folder / "first.bin").write_bytes(first.eventlog)
    proc = subprocess.run(["tpm2_eventlog", str(folder / "first.bin")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pcrs = yaml.safe_load(proc.stdout)["pcrs"]
    for bank in log.algorithms:
        for pcr, value in pcrs[bank].items():
            assert int(value) == int.from_bytes(first.pcrs[bank][pcr], "big"), f"tpm2_eventlog {bank} PCR {pcr}"


def test_build_predict_on_the_booted_files_is_the_build_captured_from_the_boot(booted):
    folder, first = booted
    log = parse(first.eventlog)
    assert first.cmdline == SYSTEMD_BOOT.command_line(OPTIONS)  # what the kernel got
    predicted = _predict(folder, OPTIONS, "rb-predicted")
    capture, platform = captured(log, "sha256", [*PLATFORM_PCRS, *BUILD_PCRS], PLATFORM_PCRS, "rb1", "rb-captured",
                                 "1.0.0", "ovmf-q35")
    assert platform is not None and [p["pcr"] for p in platform["spec"]["measurements"]["pcrs"]] == [0, 1, 2, 3, 5, 6, 7]

    def digests(doc: dict) -> dict[int, list[tuple[str, str]]]:
        artifacts = doc["spec"]["artifacts"] if "artifacts" in doc["spec"] else {}
        return {p["pcr"]: [(e.get("digest") or artifacts[e["artifact"]]["sha256"], e["type"]) for e in p["events"]]
                for p in doc["spec"]["measurements"]["pcrs"]}

    assert digests(predicted) == digests(capture)
    assert sorted(digests(predicted)) == list(BUILD_PCRS)
    assert departures(log, "sha256", BUILD_PCRS, _build(folder, predicted)) == []
    assert departures(log, "sha256", BUILD_PCRS, _build(folder, capture)) == []
    initrd = predicted["spec"]["artifacts"]["initrd"]["sha256"]
    assert initrd == hashlib.sha256((folder / "initrd").read_bytes()).hexdigest()
    assert predicted["spec"]["artifacts"]["cmdline"]["value"] == first.cmdline


def test_another_command_line_is_predicted_to_depart_on_pcrs_9_and_12(booted):
    folder, first = booted
    build = _build(folder, _predict(folder, OPTIONS + " tccdeploy.debug=1", "rb-debug"))
    changed = departures(parse(first.eventlog), "sha256", BUILD_PCRS, build)
    assert [(d.pcr, d.index, d.kind) for d in changed] == [(9, 0, "changed"), (12, 0, "changed")]
    assert OPTIONS in " ".join(changed[1].lines("sha256"))  # the departure shows the line that booted


def test_another_initrd_or_kernel_is_predicted_to_depart_where_the_chain_measures_it(booted, tmp_path):
    folder, first = booted
    log = parse(first.eventlog)
    other = tmp_path / "initrd"
    other.write_bytes((folder / "initrd").read_bytes() + b"\0" * 512)
    build = _build(folder, _predict(folder, OPTIONS, "rb-other-initrd", initrd=other))
    assert [(d.pcr, d.index) for d in departures(log, "sha256", BUILD_PCRS, build)] == [(9, 1)]
    build = _build(folder, _predict(folder, OPTIONS, "rb-other-kernel", kernel=folder / "bootloader"))
    assert [(d.pcr, d.index) for d in departures(log, "sha256", BUILD_PCRS, build)] == [(4, 3)]
