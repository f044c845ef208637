"""The lab's real-boot nodes: QEMU guests that boot OVMF, systemd-boot and Debian's kernel on a
swtpm vTPM, run the TVMM service from their measured initramfs, and answer SSH on their own
127.K.S.N address (QEMU user networking, forwarded from that address; the guest reaches nothing
else: restrict=on).

They sit beside the lab's fast nodes, with the same users, the same engine key and TPMs from the
same vendor CA; what differs is that nothing here measures anything: the firmware, systemd-boot
and the kernel's EFI stub do. Their references are written as an operator would: the TVMM build
by `build predict` on the image's files (systemd-boot boot path), the platform (the firmware's
PCRs) from the first node's own boot, as captured from a golden node.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING

from ..bootpaths import SYSTEMD_BOOT
from . import nodeimage, procs, realboot, secureboot, tpm
from .tpm import LabError

if TYPE_CHECKING:
    from .lab import Lab, Node

PLATFORM = "lab-ovmf-q35"  # the real-boot nodes' hardware model: QEMU q35 with Debian's OVMF
PLATFORM_PCRS = (0, 1, 2, 3, 5, 6, 7)
BUILD = "tvmm-rb-2026.1"  # Debian's point-release kernel (kernel_package(previous=True))
BUILD_VERSION = "2026.1.0-realboot"
NEXT_BUILD = "tvmm-rb-2026.2"  # the security update's kernel: a candidate on rboot1, for a rollout
NEXT_BUILD_VERSION = "2026.2.0-realboot"
BUILDS = {BUILD: (BUILD_VERSION, True), NEXT_BUILD: (NEXT_BUILD_VERSION, False)}  # name -> (version, previous kernel)
ROLLOUT_NODES = ["rboot1"]  # where NEXT_BUILD may run while it is a candidate


def options(build: str) -> str:
    """The loader entry's options for build: its name on the command line, where `tvmm_deploy`
    reads which build runs (measured in PCRs 9 and 12 with the rest of the line)."""
    return f"console=ttyS0 quiet tccdeploy.build={build}"


OPTIONS = options(BUILD)
POLICY_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)  # a lab with real-boot nodes: every firmware PCR too
ADDRESS_BASE = 100  # real-boot node i is 127.K.1.(100 + i)
MEMORY_MB = 1536  # the OS in its initramfs (about 400 MiB unpacked), QEMU and a small customer VM
STATE_DISK_MB = 256  # the service's state and the VMs' encrypted disks (sparse on the host)
BOOT_DISK_MB = 512  # the builds the provider installs for the next boot (sparse on the host)
BOOT_DIR = "/boot/tccdeploy"  # where the boot disk is mounted in the node (the inventory's tcc_boot_dir)
BOOT_TIMEOUT = 420.0  # under TCG with two nodes on two cores
UP_MARKER = "TCCDEPLOY-NODE-UP"
ARTIFACTS = ("bootloader", "kernel", "initrd")


def artifact_dir(lab: Lab, build: str = BUILD) -> str:
    return lab.path("artifacts", build)


def signing_keys(lab: Lab) -> secureboot.Keys:
    """The lab's secure-boot keys, as the machines' owner holds them."""
    return secureboot.keys(lab.path("ca", "secureboot"))


def prepare_image(lab: Lab) -> None:
    """Each build's files, once per lab: Debian's systemd-boot and a Debian kernel, both signed
    with the lab's db key, and the node initramfs with every build's kernel modules (cached by
    what goes into it)."""
    initrd = nodeimage.cached_node_initramfs(lab.progress, [realboot.kernel_package(previous=p) for _, p in BUILDS.values()])
    signing = signing_keys(lab)
    bootloader = None
    for build, (_, previous) in BUILDS.items():
        folder = artifact_dir(lab, build)
        os.makedirs(folder, exist_ok=True)
        kernel = realboot.kernel_package(previous=previous)
        # One signed boot loader for every build, as a vendor ships one: sbsign stamps the second of
        # signing, so signing it per build made the builds' boot loaders differ or not by the clock.
        if bootloader is None:
            bootloader = os.path.join(folder, "bootloader")
            secureboot.sign(realboot.SYSTEMD_BOOT_EFI, bootloader, signing)
        else:
            shutil.copyfile(bootloader, os.path.join(folder, "bootloader"))
        secureboot.sign(realboot.kernel_image(lab.progress, kernel), os.path.join(folder, "kernel"), signing)
        shutil.copyfile(initrd, os.path.join(folder, "initrd"))


def machine(lab: Lab, node: Node) -> realboot.Machine:
    provision = lab.node_dir(node, "provision")
    return realboot.Machine(
        lab.node_dir(node), memory_mb=MEMORY_MB,
        network=["-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:{node.address}:{lab.ssh_port}-:22",
                 "-device", "virtio-net-pci,netdev=n0,romfile="],
        fw_cfg={f"{nodeimage.FW_CFG}/{item}": os.path.join(provision, item)
                for item in ("node", "host_key", "authorized_keys")},
        data_disk=lab.node_dir(node, "state.img"), boot_disk=lab.node_dir(node, "boot.img"),
        secure_boot=node.secure_boot, signing=signing_keys(lab) if node.secure_boot else None,
    )


def provision(lab: Lab, node: Node, public_key: str) -> None:
    """What the provider gives the machine when racking it: its name, host key, the engine's key."""
    folder = lab.node_dir(node, "provision")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with open(os.path.join(folder, "node"), "w") as fh:
        fh.write(node.name)
    shutil.copyfile(lab.node_dir(node, "ssh_host_ed25519_key"), os.path.join(folder, "host_key"))
    os.chmod(os.path.join(folder, "host_key"), 0o600)
    with open(os.path.join(folder, "authorized_keys"), "w") as fh:
        fh.write(public_key)


def manufacture(lab: Lab, node: Node) -> None:
    """The vTPM with its EK certificate from the lab's vendor CA, the firmware's NVRAM, and the EK
    certificate written down (the roster's), read through a short-lived swtpm before QEMU owns it."""
    m = machine(lab, node)
    m.prepare(lab.path("ca", "rogue" if node.rogue_tpm else "manufacturer"))
    installed = _installed_build(lab, node)
    try:
        for disk, size, label, uid, content in ((m.data_disk, STATE_DISK_MB, "tvmm-state", nodeimage.TVMM_UID, None),
                                                (m.boot_disk, BOOT_DISK_MB, "tvmm-boot", nodeimage.NODE_UID, installed)):
            with open(disk, "wb") as fh:  # type: ignore[arg-type]
                fh.truncate(size * 2**20)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", f"root_owner={uid}:{uid}",
                            *(("-d", content) if content else ()), disk], check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(installed, ignore_errors=True)
    sock = lab.node_dir(node, "ek.sock")
    proc = procs.spawn(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={m.path('tpm')}",
                        "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
                        "--flags", "not-need-init,startup-clear"], lab.node_dir(node, "ek.out"))
    try:
        if not procs.wait_socket(sock, proc):
            raise LabError(f"swtpm of {node.name} did not start to read its EK certificate")
        certificate = tpm.ek_certificate(sock)
    finally:
        procs.stop([proc.pid])
    with open(lab.node_dir(node, "ek.der"), "wb") as fh:
        fh.write(certificate)


def _installed_build(lab: Lab, node: Node, build: str = BUILD) -> str:
    """The boot disk's first content, as the machine's installation left it: the build it boots
    (`<build>/<artifact>`, its cmdline) made the next boot, owned by the node's admin login. A
    rollout then uploads only the files a new build does not share with it (`tvmm_deploy` finds
    those by digest on the node): a new kernel, not the initramfs again."""
    root = lab.node_dir(node, "boot-disk.partial")
    shutil.rmtree(root, ignore_errors=True)
    folder = os.path.join(root, build)
    os.makedirs(folder)
    for name in ARTIFACTS:
        shutil.copyfile(os.path.join(artifact_dir(lab, build), name), os.path.join(folder, name))
    with open(os.path.join(folder, "cmdline"), "w") as fh:
        fh.write(SYSTEMD_BOOT.command_line(options(build)))
    with open(os.path.join(root, "next"), "w") as fh:
        fh.write(build + "\n")
    for path in (root, folder, *(os.path.join(folder, n) for n in os.listdir(folder)), os.path.join(root, "next")):
        os.chown(path, nodeimage.NODE_UID, nodeimage.NODE_UID)
    return root


def ek_certificate(lab: Lab, node: Node) -> bytes:
    with open(lab.node_dir(node, "ek.der"), "rb") as fh:
        return fh.read()


def install(lab: Lab, node: Node, build: str = BUILD) -> None:
    """Write the node's ESP from the build's files (what its disk holds)."""
    folder = artifact_dir(lab, build)
    files = {}
    for name in ARTIFACTS:
        with open(os.path.join(folder, name), "rb") as fh:
            files[name] = fh.read()
    realboot.write_esp(machine(lab, node).esp, files["bootloader"], files["kernel"], files["initrd"], options(build))
    node.build = build


def install_next(lab: Lab, node: Node) -> str | None:
    """What the node's firmware finds on its next boot: the build its OS made the next boot on its
    boot disk (`tvmm_deploy`: `<boot dir>/next` and the build's files), written to the ESP as the
    node's own update would write it. Read with debugfs while the machine is off. None: no next
    build set; the ESP stays as it is."""
    disk = machine(lab, node).boot_disk
    assert disk is not None
    # What the guest fsynced may still be in the ext4 journal only (a power cut, not an unmount):
    # replay it first, as the node's own mount would, or debugfs reads the disk as it was before.
    fsck = subprocess.run(["e2fsck", "-p", disk], capture_output=True, text=True, timeout=300)
    if fsck.returncode >= 4:
        raise LabError(f"{node.name}'s boot disk does not check clean: {(fsck.stdout + fsck.stderr).strip()[-300:]}")
    build = _debugfs_cat(disk, "/next").decode().strip()
    if not build:
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", build):
        raise LabError(f"{node.name}'s boot disk names no valid build in /next: {build!r}")
    files = {name: _debugfs_cat(disk, f"/{build}/{name}") for name in (*ARTIFACTS, "cmdline")}
    missing = [name for name, data in files.items() if not data]
    if missing:
        raise LabError(f"{node.name} cannot boot {build}: {', '.join(missing)} missing on its boot disk "
                       "(the node would not come up)")
    prefix = SYSTEMD_BOOT.command_line("")
    cmdline = files["cmdline"].decode().strip()
    if not cmdline.startswith(prefix):
        raise LabError(f"{node.name}'s {build} cmdline does not start with {prefix!r}: systemd-boot could not pass it")
    realboot.write_esp(machine(lab, node).esp, files["bootloader"], files["kernel"], files["initrd"],
                       cmdline[len(prefix):])
    node.build = build
    return build


def _debugfs_cat(disk: str, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", disk], capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise LabError(f"debugfs could not read {disk}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def boot(lab: Lab, nodes: list[Node]) -> None:
    """Power the machines on and wait until each one's sshd answers."""
    started = time.monotonic()
    machines = {}
    for node in nodes:
        m = machine(lab, node)
        qemu, swtpm = m.start(lab.progress)
        node.qemu_pid, node.swtpm_pid = qemu.pid, swtpm.pid
        node.boots += 1
        lab.save()
        machines[node.name] = (m, qemu)
    lab.progress(f"booting {len(nodes)} real-boot node(s) (OVMF, systemd-boot, Linux; about a minute under TCG)")
    for node in nodes:
        m, qemu = machines[node.name]
        deadline = time.monotonic() + BOOT_TIMEOUT
        while UP_MARKER not in m.console_text():
            if qemu.poll() is not None:
                raise LabError(f"{node.name} stopped while booting (QEMU exit {qemu.returncode}: "
                               f"{realboot._read(m.path('qemu.log')).strip()[-400:] or 'no message'}); console: "
                               f"{m.console_text()[-600:]!r}")
            if time.monotonic() > deadline:
                raise LabError(f"{node.name} did not boot in {BOOT_TIMEOUT:.0f} s; console: "
                               f"{m.console_text()[-600:]!r}")
            time.sleep(0.5)
        if not _ssh_answers(node.address, lab.ssh_port, qemu, timeout=60):
            raise LabError(f"{node.name} booted but no sshd answers on {node.address}:{lab.ssh_port}")
    lab.progress(f"real-boot node(s) up in {time.monotonic() - started:.0f} s")


def _ssh_answers(address: str, port: int, qemu: subprocess.Popen, timeout: float) -> bool:
    """Until the guest's sshd sends its banner: QEMU accepts on the forwarded port at once and
    drops the connection while nothing listens in the guest."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and qemu.poll() is None:
        try:
            with socket.create_connection((address, port), timeout=5) as conn:
                conn.settimeout(5)
                if conn.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


PROBE_TIMEOUT = 120.0  # init prints the probe while sshd serves (after the node is up)


def booted(lab: Lab, node: Node) -> realboot.Probe:
    """What the node's init printed of its last boot: command line, firmware event log, PCRs (the
    lab's view of the golden node; anything trusted reads them through the engine and a quote)."""
    m = machine(lab, node)
    deadline = time.monotonic() + PROBE_TIMEOUT
    while realboot.PROBE_END not in m.console_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    return realboot.read_probe(m.console_text())


def manifests(lab: Lab, golden: Node) -> tuple[list[dict], dict]:
    """([TVMMBuild predicted from each build's files], Platform captured from golden's boot): BUILD
    approved, NEXT_BUILD a candidate on ROLLOUT_NODES."""
    from ..baseline import captured, predicted
    from ..eventlog import parse

    builds = []
    for name, (version, _) in BUILDS.items():
        folder = artifact_dir(lab, name)
        build = predicted({a: os.path.join(folder, a) for a in ARTIFACTS}, options(name), name, version,
                          SYSTEMD_BOOT, lab.path("manifests", "builds"))
        if name == BUILD:
            build["spec"]["status"] = "approved"
            build["metadata"]["description"] = "the lab's real-boot TVMM build, predicted from the image's files"
        else:
            build["spec"]["rollout"] = {"nodes": list(ROLLOUT_NODES)}
            build["metadata"]["description"] = ("the next real-boot build (a newer Debian kernel), predicted from its "
                                                f"files: a candidate on {', '.join(ROLLOUT_NODES)}")
        builds.append(build)
    _, platform = captured(parse(booted(lab, golden).eventlog), "sha256", POLICY_PCRS, PLATFORM_PCRS, golden.name, BUILD,
                           BUILD_VERSION, PLATFORM)
    assert platform is not None
    model = "with secure boot (the lab's keys)" if golden.secure_boot else "(no secure boot)"
    platform["spec"] = {"model": f"QEMU q35, Debian OVMF {model}", "version": _ovmf_version(),
                        "status": "approved", "measurements": platform["spec"]["measurements"]}
    platform["metadata"]["description"] = f"the real-boot nodes' firmware, captured from {golden.name}'s boot"
    return builds, platform


def _ovmf_version() -> str:
    """Debian's ovmf version as a manifest version (2022.11-6+deb12u2 -> 2022.11.6)."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "ovmf"], capture_output=True, text=True)
    numbers = re.findall(r"\d+", proc.stdout)[:3]
    return ".".join(numbers) if numbers else "0.0.0"


# -- faults: what root on the host can do to a real-boot node ---------------------------------
TAMPERS = {
    "cmdline": "a kernel option added to the loader entry (measured in PCRs 9 and 12)",
    "initrd": "a file added to the initramfs, as an appended cpio archive (measured in PCR 9)",
    "kernel": "another signed kernel: the other build's, which secure boot admits (a rollback; PCR 4)",
    **secureboot.TAMPERS,
}
TAMPER_OPTION = "tccdeploy.tampered=1"
HOST_KEYS = "the provider's host"  # whose certificate the efivar tamper enrolls in db


def tamper(lab: Lab, node: Node, what: str) -> None:
    """Change what the node's ESP or NVRAM holds; the node boots it at its next reboot (`lab reboot`)."""
    m = machine(lab, node)
    esp = m.esp
    if what == "secureboot" and not node.secure_boot:
        raise LabError(f"{node.name}'s secure boot is off already (lab up --secure-boot off): nothing to turn off")
    if what in secureboot.TAMPERS:
        secureboot.tamper(m.nvram, what, secureboot.keys(lab.path("ca", "host-secureboot"), HOST_KEYS).db_cert)
    elif what == "cmdline":
        entry = os.path.join(esp, "loader", "entries", "tvmm.conf")
        with open(entry) as fh:
            text = fh.read()
        with open(entry, "w") as fh:
            fh.write(re.sub(r"(?m)^options (.*)$", lambda m: f"options {m.group(1)} {TAMPER_OPTION}", text))
    elif what == "initrd":
        implant = realboot.cpio({"usr/lib/tccdeploy/implant": realboot.regular(b"a rogue component\n", 0o755)})
        with open(os.path.join(esp, "initrd.img"), "ab") as fh:
            fh.write(implant)
    elif what == "kernel":  # the host cannot sign a kernel of its own: it boots another the owner signed
        other = next(name for name in BUILDS if name != node.build)
        shutil.copyfile(os.path.join(artifact_dir(lab, other), "kernel"), os.path.join(esp, "vmlinuz"))
    else:
        raise LabError(f"unknown real-boot tamper {what!r}; choose one of: {', '.join(TAMPERS)}")
    node.tampered += 1


def restore(lab: Lab, node: Node) -> None:
    """Put the build's own files back on the node's ESP and its NVRAM as enrolled (a reinstall)."""
    install(lab, node, node.build or BUILD)
    machine(lab, node).reset_nvram()
    node.tampered = 0


def reboot(lab: Lab, nodes: list[Node], next_boot: bool = False) -> None:
    """Power-cycle the machines at once: QEMU and its vTPM stop (a power cut: what the guest had
    not written is lost, and the PCRs reset), then each boots its ESP again; with next_boot, the
    ESP first gets the build the node's OS made its next boot (install_next)."""
    procs.stop([pid for node in nodes for pid in (node.qemu_pid, node.swtpm_pid) if procs.belongs(pid, lab.dir)])
    for node in nodes:
        node.qemu_pid = node.swtpm_pid = None
    lab.save()
    if next_boot:
        for node in nodes:
            install_next(lab, node)
    boot(lab, nodes)
