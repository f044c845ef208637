"""The boot paths `build predict` knows, and the real-boot lab's pieces: the initramfs and ESP it writes, its nodes' plan and tampers.

The digests' formulas are proven against real boots (tests/test_realboot.py, the captured boot in
the corpus); these pin each piece fast."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from tccdeploy.bootpaths import FIXED, PE, SYSTEMD_BOOT, TEXT, UTF16, Step, boot_path, step_digest
from tccdeploy.lab import realboot, secureboot
from tccdeploy.lab.tpm import LabError


def test_systemd_boot_measures_the_entrys_options_after_the_initrd_it_names():
    assert SYSTEMD_BOOT.command_line("console=ttyS0 quiet") == "initrd=\\initrd.img console=ttyS0 quiet"
    assert SYSTEMD_BOOT.artifacts == ["bootloader", "kernel", "initrd"]
    assert [(s.pcr, s.type) for s in SYSTEMD_BOOT.steps] == [
        (4, "EV_EFI_ACTION"), (4, "EV_SEPARATOR"), (4, "EV_EFI_BOOT_SERVICES_APPLICATION"),
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION"), (12, "EV_IPL"), (9, "EV_EVENT_TAG"), (9, "EV_EVENT_TAG")]
    assert boot_path("lab").command_line("ro") == "ro"
    assert boot_path("lab").artifacts == ["bootloader", "kernel", "initrd", "hypervisor", "tvmm-service"]
    with pytest.raises(KeyError):
        boot_path("grub")


def test_each_way_of_measuring_gives_its_digest():
    files = {"initrd": b"an initrd", "kernel": b"not a PE image"}
    assert step_digest(Step(9, "EV_IPL", UTF16, "cmdline"), files, "ro") == hashlib.sha256("ro\0".encode("utf-16-le")).digest()
    assert step_digest(Step(8, "EV_IPL", TEXT, "cmdline"), files, "ro") == hashlib.sha256(b"ro").digest()
    assert step_digest(Step(4, "EV_SEPARATOR", FIXED, data=b"\0" * 4), files, "") == hashlib.sha256(b"\0" * 4).digest()
    assert step_digest(Step(9, "EV_IPL", "file", "initrd"), files, "", "sha1") == hashlib.sha1(b"an initrd").digest()
    # a file that is not PE/COFF is measured whole (the lab's stand-in images)
    assert step_digest(Step(4, "EV_EFI_BOOT_SERVICES_APPLICATION", PE, "kernel"), files, "") == \
        hashlib.sha256(b"not a PE image").digest()
    assert SYSTEMD_BOOT.steps[0].data == b"Calling EFI Application from Boot Option"


def test_the_initramfs_is_a_newc_cpio_with_parents_first_and_the_same_bytes_every_time():
    entries = {"bin/busybox": realboot.regular(b"\x7fELF", 0o755), "init": realboot.regular(b"#!/bin/sh\n", 0o755),
               "bin/sh": realboot.symlink("busybox")}
    image = realboot.initramfs(entries)
    assert image == realboot.initramfs(dict(reversed(entries.items())))
    assert image[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame, which Debian's kernels unpack (CONFIG_RD_ZSTD)
    archive = subprocess.run(["zstd", "-d", "-c"], input=image, capture_output=True, check=True).stdout
    names, offset = [], 0
    while True:
        header = archive[offset:offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, uid, mtime, size, namesize = fields[1], fields[2], fields[5], fields[6], fields[11]
        name = archive[offset + 110:offset + 110 + namesize - 1].decode()
        offset += 110 + namesize
        offset += -offset % 4
        data = archive[offset:offset + size]
        offset += size + (-size % 4)
        if name == "TRAILER!!!":
            break
        names.append((name, stat.S_IFMT(mode), uid, mtime, data))
    assert offset == len(archive)
    assert [n[0] for n in names] == ["bin", "bin/busybox", "bin/sh", "init"]
    assert names[0][1] == stat.S_IFDIR and names[2][1] == stat.S_IFLNK and names[2][4] == b"busybox"
    assert {n[2] for n in names} == {0} and {n[3] for n in names} == {0}


def test_the_esp_has_one_loader_entry_naming_the_paths_the_boot_path_assumes(tmp_path):
    realboot.write_esp(str(tmp_path), b"sd-boot", b"kernel", b"initrd", "console=ttyS0")
    entry = (tmp_path / "loader/entries/tvmm.conf").read_text()
    assert "linux /vmlinuz\ninitrd /initrd.img\noptions console=ttyS0\n" in entry
    assert (tmp_path / "EFI/BOOT/BOOTX64.EFI").read_bytes() == b"sd-boot"
    assert "timeout 0" in (tmp_path / "loader/loader.conf").read_text()


def test_a_boots_console_is_read_or_refused_with_what_it_printed():
    console = ("noise\nTCCDEPLOY-CMDLINE initrd=\\initrd.img ro\nTCCDEPLOY-LOG-BEGIN\n 03 00\n 00 01\nTCCDEPLOY-LOG-END\n"
               "TCCDEPLOY-PCR sha256 4 " + "ab" * 32 + "\nTCCDEPLOY-DONE\n")
    probe = realboot.read_probe(console)
    assert probe.cmdline == "initrd=\\initrd.img ro" and probe.eventlog == b"\x03\x00\x00\x01"
    assert probe.pcrs == {"sha256": {4: b"\xab" * 32}}
    with pytest.raises(LabError, match="did not finish printing its measurements; its console ended with 'kernel panic'"):
        realboot.read_probe("kernel panic")
    with pytest.raises(LabError, match="no command line or event log"):
        realboot.read_probe("TCCDEPLOY-DONE")


def test_the_accelerator_is_what_the_environment_says_or_tcg_once_kvm_failed(tmp_path, monkeypatch):
    monkeypatch.setenv(realboot.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(realboot.ACCEL_ENV, "tcg")
    assert realboot.accelerator() == "tcg"
    monkeypatch.delenv(realboot.ACCEL_ENV)
    realboot._remember_kvm_unusable("KVM internal error. Suberror: 1")
    assert realboot.accelerator() == "tcg"
    assert "KVM internal error" in (tmp_path / "kvm-unusable").read_text()


def test_a_kvm_that_cannot_run_ovmf_is_recognized_by_what_qemu_says():
    assert realboot.kvm_failure("KVM internal error. Suberror: 1\nemulation failure") == "KVM internal error"
    smm = ("qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n"
           "qemu-system-x86_64: System Management Mode not supported by this hypervisor.")
    assert realboot.kvm_failure(smm) == "System Management Mode not supported by this hypervisor"
    assert realboot.kvm_failure("qemu-system-x86_64: -drive file=x: Could not open 'x'") is None


def test_real_boot_nodes_are_planned_in_site_1_after_the_others_on_their_own_model_and_build():
    from tccdeploy.lab import realnodes
    from tccdeploy.lab.lab import plan

    nodes = plan(2, 1, 1, 0, 7, real_boot=2)
    assert [(n.name, n.address, n.site, n.real_boot) for n in nodes] == [
        ("node1", "127.7.1.1", "site1", False), ("node2", "127.7.1.2", "site1", False),
        ("outside1", "127.7.9.1", None, False), ("rboot1", "127.7.1.101", "site1", True),
        ("rboot2", "127.7.1.102", "site1", True)]
    assert {(n.model, n.build) for n in nodes if n.real_boot} == {(realnodes.PLATFORM, realnodes.BUILD)}
    with pytest.raises(LabError, match="--real-boot must be 0 to 3"):
        plan(1, 1, 0, 0, 7, real_boot=4)


def test_a_real_boot_tamper_changes_exactly_what_the_node_boots_next(tmp_path):
    from tccdeploy.lab import realnodes
    from tccdeploy.lab.lab import Lab, Node

    lab = Lab(str(tmp_path))
    node = Node("rboot1", "127.7.1.101", "site1", "site1", real_boot=True)
    node.build = realnodes.BUILD
    esp = tmp_path / "nodes" / "rboot1" / "esp"
    realboot.write_esp(str(esp), b"sd-boot", b"MZ kernel", b"initrd", realnodes.OPTIONS)
    other = tmp_path / "artifacts" / realnodes.NEXT_BUILD
    other.mkdir(parents=True)
    (other / "kernel").write_bytes(b"MZ the other build's kernel, signed by the owner")
    before = {p.relative_to(esp): p.read_bytes() for p in esp.rglob("*") if p.is_file()}
    realnodes.tamper(lab, node, "cmdline")
    entry = (esp / "loader/entries/tvmm.conf").read_text()
    assert f"options {realnodes.OPTIONS} {realnodes.TAMPER_OPTION}\n" in entry
    realnodes.tamper(lab, node, "kernel")  # what secure boot admits: a kernel the owner signed, not this build's
    assert (esp / "vmlinuz").read_bytes() == b"MZ the other build's kernel, signed by the owner"
    realnodes.tamper(lab, node, "initrd")
    assert (esp / "initrd.img").read_bytes().startswith(b"initrd070701")  # a second archive, appended
    changed = {p.relative_to(esp) for p in esp.rglob("*") if p.is_file() and p.read_bytes() != before[p.relative_to(esp)]}
    assert {str(p) for p in changed} == {"loader/entries/tvmm.conf", "vmlinuz", "initrd.img"}
    assert node.tampered == 3
    with pytest.raises(LabError, match="unknown real-boot tamper 'bios'"):
        realnodes.tamper(lab, node, "bios")


def test_a_real_boot_nodes_nvram_has_the_owners_keys_and_the_host_can_change_it(tmp_path):
    """The NVRAM the lab enrolls: secure boot on, PK/KEK the owner's platform key, db its image
    key; the secureboot tamper turns SecureBootEnable off, efivar adds the host's certificate to db."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from virt.firmware.varstore.edk2 import Edk2VarStore

    from tccdeploy.lab import realnodes
    from tccdeploy.lab.lab import Lab, Node

    if not os.path.isfile(realboot.OVMF_VARS):
        pytest.skip("OVMF is not installed (scripts/install)")
    lab = Lab(str(tmp_path))
    node = Node("rboot1", "127.7.1.101", "site1", "site1", real_boot=True)
    machine = realnodes.machine(lab, node)
    os.makedirs(machine.folder)
    machine.reset_nvram()
    keys = realnodes.signing_keys(lab)
    assert all(os.stat(path).st_mode & 0o777 == 0o600 for path in (keys.pk_key, keys.db_key))

    def variables() -> dict:
        return Edk2VarStore(machine.nvram).get_varlist()

    def der(path: str) -> bytes:
        with open(path, "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read()).public_bytes(serialization.Encoding.DER)

    enrolled = variables()
    assert enrolled["SecureBootEnable"].data == b"\x01" and enrolled["CustomMode"].data == b"\x00"
    assert der(keys.pk_cert) in enrolled["PK"].data and der(keys.pk_cert) in enrolled["KEK"].data
    assert der(keys.db_cert) in enrolled["db"].data
    realnodes.tamper(lab, node, "secureboot")
    assert variables()["SecureBootEnable"].data == b"\x00"
    realnodes.tamper(lab, node, "efivar")
    host = secureboot.keys(lab.path("ca", "host-secureboot"), realnodes.HOST_KEYS)
    db = variables()["db"].data
    assert der(keys.db_cert) in db and der(host.db_cert) in db
    assert node.tampered == 2
    machine.reset_nvram()  # a reinstall: as enrolled
    assert variables()["SecureBootEnable"].data == b"\x01" and der(host.db_cert) not in variables()["db"].data


def test_real_boot_nodes_boot_the_secure_boot_firmware_under_smm_unless_the_lab_says_off(tmp_path):
    from tccdeploy.lab import realnodes
    from tccdeploy.lab.lab import Lab, plan

    lab = Lab(str(tmp_path))
    on, off = plan(1, 1, 0, 0, 7, real_boot=1)[-1], plan(1, 1, 0, 0, 7, real_boot=1, secure_boot=False)[-1]
    argv = realnodes.machine(lab, on).qemu_argv("tcg")
    assert argv[argv.index("-machine") + 1] == "q35,smm=on" and "driver=cfi.pflash01,property=secure,value=on" in argv
    assert f"if=pflash,format=raw,unit=0,file={secureboot.OVMF_CODE},readonly=on" in argv
    argv = realnodes.machine(lab, off).qemu_argv("tcg")
    assert argv[argv.index("-machine") + 1] == "q35" and "driver=cfi.pflash01,property=secure,value=on" not in argv
    assert f"if=pflash,format=raw,unit=0,file={realboot.OVMF_CODE},readonly=on" in argv
    with pytest.raises(LabError, match="secure boot is off already"):
        realnodes.tamper(lab, off, "secureboot")
