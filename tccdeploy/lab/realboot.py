"""Real boots: UEFI firmware, a vTPM, systemd-boot and a Debian kernel under QEMU.

The lab's default nodes share this machine's kernel, and their "boot" is the lab extending
PCRs. A real boot is measured by the firmware itself: OVMF (edk2) measures its code, its
variables and every EFI application into a swtpm vTPM on a CRB interface, systemd-boot and the
kernel's EFI stub add the command line and initrd, and Linux exposes the log as a server's does.
That is what `build predict` must agree with, so this module builds such boots from Debian's
own packages and runs them:

- the files come from Debian: OVMF and systemd-boot from the packages scripts/install puts on
  this machine, the kernel (linux-image-amd64's current package) fetched with
  `apt-get download` into a cache (TCCDEPLOY_LAB_CACHE, default /var/cache/tccdeploy-lab) and
  unpacked there, never installed on this machine;
- the ESP is a folder QEMU presents as a FAT disk; its loader entry names /vmlinuz and
  /initrd.img (bootpaths.ESP_KERNEL, ESP_INITRD), the layout the systemd-boot boot path assumes;
- the initramfs is written here as a deterministic newc cpio (fixed owners, times and order), so
  the same files give the same initrd digest on every machine;
- the NVRAM (a copy of OVMF's VARS) is the machine's own, and the ESP's disk has bootindex 0, so
  the firmware's boot order, and with it PCR 4's events, is the same at every boot;
- with secure boot (lab/secureboot.py), the firmware is Debian's secure-boot OVMF under SMM, the
  NVRAM has the owner's keys enrolled, and the images are signed with them.

KVM is used where it works; on this kind of machine KVM starts but OVMF stops with "KVM internal
error" (nested virtualization without the CPU features it needs), so the run is repeated under
TCG with a warning, and the cache remembers it (TCCDEPLOY_LAB_ACCEL=kvm|tcg decides instead).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..bootpaths import ESP_INITRD, ESP_KERNEL
from . import procs, secureboot
from .tpm import LabError

CACHE_ENV = "TCCDEPLOY_LAB_CACHE"
ACCEL_ENV = "TCCDEPLOY_LAB_ACCEL"
DEFAULT_CACHE = "/var/cache/tccdeploy-lab"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SYSTEMD_BOOT_EFI = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
QEMU = "qemu-system-x86_64"
# What QEMU says when this host's KVM cannot run OVMF: a guest paused on an internal error (a
# nested KVM without unrestricted guest), or QEMU gone at once (a nested KVM without SMM).
KVM_FAILURES = ("KVM internal error", "System Management Mode not supported by this hypervisor")
KVM_PROBE_SECONDS = 5.0  # OVMF fails under KVM here within the first second
Progress = Callable[[str], None]


def cache_dir() -> str:
    path = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


# -- Debian packages ---------------------------------------------------------------------------
def kernel_package(previous: bool = False) -> str:
    """The kernel package linux-image-amd64 depends on now (e.g. linux-image-6.1.0-57-amd64), or
    with previous the one the version before it depended on (Debian keeps the point release's
    beside the security update's): the lab's real-boot build boots that one, so a rollout has a
    newer kernel to move to."""
    packages = kernel_packages()
    if previous and len(packages) < 2:
        raise LabError("apt knows only one linux-image-amd64 version: the real-boot lab needs the point release's and "
                       "a newer one (bookworm and bookworm-security in the sources)")
    return packages[1] if previous else packages[0]


def kernel_packages() -> list[str]:
    """The kernel packages the known versions of linux-image-amd64 depend on, newest first."""
    out = _output(["apt-cache", "show", "linux-image-amd64"])
    found: list[tuple[str, str]] = []
    for block in out.split("\n\n"):
        version = re.search(r"^Version: (\S+)", block, re.M)
        depends = re.search(r"^Depends: (linux-image-[0-9][^\s,]*-amd64)", block, re.M)
        if version and depends and depends.group(1) not in (p for _, p in found):
            found.append((version.group(1), depends.group(1)))
    if not found:
        raise LabError("apt knows no linux-image-amd64 kernel: run `apt-get update` (scripts/install does)")
    found.sort(key=lambda item: _version_key(item[0]), reverse=True)
    return [package for _, package in found]


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version.split(":")[-1])]


def unpacked(package: str, progress: Progress | None = None) -> str:
    """The folder holding package's files (its candidate version), downloaded and unpacked once."""
    debs = os.path.join(cache_dir(), "debs")
    os.makedirs(debs, exist_ok=True)
    version = _candidate(package)
    stem = f"{package}_{version.replace(':', '%3a')}"
    root = os.path.join(cache_dir(), "packages", stem)
    if os.path.isdir(root):
        return root
    found = [f for f in os.listdir(debs) if f.startswith(stem + "_") and f.endswith(".deb")]
    if not found:
        if progress:
            progress(f"downloading {package} {version} from Debian")
        proc = subprocess.run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise LabError(f"apt-get download {package} failed: {proc.stderr.strip()[-300:]}")
        found = [f for f in os.listdir(debs) if f.startswith(stem + "_") and f.endswith(".deb")]
        if not found:
            raise LabError(f"apt-get download {package}={version} wrote no {stem}_*.deb in {debs}")
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    _output(["dpkg-deb", "-x", os.path.join(debs, found[0]), partial])
    os.replace(partial, root)
    return root


def _candidate(package: str) -> str:
    match = re.search(r"Candidate: (\S+)", _output(["apt-cache", "policy", package]))
    if not match or match.group(1) == "(none)":
        raise LabError(f"apt knows no package {package}: run `apt-get update` (scripts/install does)")
    return match.group(1)


def kernel_image(progress: Progress | None = None, package: str | None = None) -> str:
    """Path of a Debian kernel (default: the current one; vmlinuz: a PE/COFF image with the EFI stub)."""
    package = package or kernel_package()
    root = unpacked(package, progress)
    path = os.path.join(root, "boot", "vmlinuz-" + package.removeprefix("linux-image-"))
    if not os.path.isfile(path):
        raise LabError(f"{package} has no {path}")
    return path


# -- initramfs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One file of an initramfs: a regular file (data), a directory, or a symlink (target)."""

    mode: int  # including the file type bits
    data: bytes = b""
    mtime: int = 0  # 0 but where a file's time matters (Python checks .pyc files against it)


def directory(mode: int = 0o755) -> Entry:
    return Entry(stat.S_IFDIR | mode)


def regular(data: bytes, mode: int = 0o644, mtime: int = 0) -> Entry:
    return Entry(stat.S_IFREG | mode, data, mtime)


def symlink(target: str) -> Entry:
    return Entry(stat.S_IFLNK | 0o777, target.encode())


def cpio(entries: Mapping[str, Entry]) -> bytes:
    """A newc cpio archive of entries (path without leading slash -> entry): parents first, owned
    by root, each with its entry's time, so the same entries give the same bytes."""
    out = io.BytesIO()

    def record(ino: int, name: str, mode: int, data: bytes, mtime: int = 0) -> None:
        encoded = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\x00" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))

    for ino, name in enumerate(sorted(entries), start=1):
        entry = entries[name]
        record(ino, name.strip("/"), entry.mode, entry.data, entry.mtime)
    record(0, "TRAILER!!!", 0, b"")
    return out.getvalue()


ZSTD_LEVEL = 10  # a fifth smaller than gzip -6, unpacked three times faster; -19 saves 7 MiB more in 100 s


def initramfs(entries: Mapping[str, Entry]) -> bytes:
    """The cpio, zstd-compressed (the same entries give the same bytes, whatever the threads).

    The initrd's size is paid at every boot under TCG: systemd-boot reads it, the kernel's EFI
    stub hashes it into PCR 9 in each bank, and the kernel unpacks it; zstd makes the first two a
    fifth cheaper than gzip and the third a third of gzip's time."""
    if shutil.which("zstd") is None:
        raise LabError("zstd is not installed: run scripts/install (it compresses the real-boot nodes' initramfs)")
    proc = subprocess.run(["zstd", "-q", f"-{ZSTD_LEVEL}", "-T0", "-c"], input=cpio(_with_parents(entries)),
                          capture_output=True, timeout=600)
    if proc.returncode != 0:
        raise LabError(f"zstd failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def _with_parents(entries: Mapping[str, Entry]) -> dict[str, Entry]:
    out = {name.strip("/"): entry for name, entry in entries.items()}
    for name in list(out):
        parent = os.path.dirname(name)
        while parent and parent not in out:
            out[parent] = directory()
            parent = os.path.dirname(parent)
    return out


# -- the ESP -----------------------------------------------------------------------------------
def write_esp(folder: str, bootloader: bytes, kernel: bytes, initrd: bytes, options: str) -> None:
    """An ESP as systemd-boot reads it: the removable-media path, one loader entry, no menu."""
    os.makedirs(os.path.join(folder, "EFI", "BOOT"), exist_ok=True)
    os.makedirs(os.path.join(folder, "loader", "entries"), exist_ok=True)
    files = {
        "EFI/BOOT/BOOTX64.EFI": bootloader,
        ESP_KERNEL: kernel,
        ESP_INITRD: initrd,
        "loader/loader.conf": b"default tvmm.conf\ntimeout 0\nconsole-mode keep\neditor no\n",
        "loader/entries/tvmm.conf": (f"title tccdeploy TVMM\nlinux /{ESP_KERNEL}\ninitrd /{ESP_INITRD}\n"
                                     f"options {options}\n").encode(),
    }
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)


# -- running a machine -------------------------------------------------------------------------
@dataclass
class Machine:
    """One real-boot machine's files: its vTPM state, NVRAM, ESP and console log, in folder."""

    folder: str
    memory_mb: int = 512
    network: list[str] | None = None  # QEMU -netdev/-device arguments; None: no NIC
    fw_cfg: dict[str, str] | None = None  # fw_cfg item name -> file: the machine's provisioning
    data_disk: str | None = None  # a raw disk image for the machine's state (not a boot option)
    boot_disk: str | None = None  # a raw disk image where the machine's OS keeps builds to boot next
    secure_boot: bool = False  # Debian's secure-boot OVMF (with SMM), the owner's keys enrolled
    signing: secureboot.Keys | None = None  # the owner's keys, for the NVRAM (secure_boot)

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    @property
    def esp(self) -> str:
        return self.path("esp")

    @property
    def console(self) -> str:
        return self.path("console.log")

    def console_text(self) -> str:
        """What the guest printed on its serial console so far (empty before it starts)."""
        return _read(self.console)

    @property
    def nvram(self) -> str:
        return self.path("vars.fd")

    @property
    def firmware(self) -> str:
        return secureboot.OVMF_CODE if self.secure_boot else OVMF_CODE

    def prepare(self, ca_dir: str) -> None:
        """Manufacture the vTPM (EK certificate from the CA in ca_dir) and write the NVRAM: OVMF's
        template, with the owner's keys enrolled and secure boot on where the machine has it."""
        from .tpm import manufacture

        for what in (self.firmware, OVMF_VARS, SYSTEMD_BOOT_EFI):
            if not os.path.isfile(what):
                raise LabError(f"{what} is missing: run scripts/install (it installs ovmf and systemd-boot-efi)")
        os.makedirs(self.path("tpm"), mode=0o700, exist_ok=True)
        os.makedirs(self.esp, exist_ok=True)
        manufacture(self.path("tpm"), ca_dir, self.path("swtpm_setup.log"))
        self.reset_nvram()

    def reset_nvram(self) -> None:
        """The NVRAM as the machine left the factory (and its owner enrolled the keys)."""
        if self.secure_boot:
            if self.signing is None:
                raise LabError("a secure-boot machine needs the owner's keys to enroll")
            secureboot.enroll(OVMF_VARS, self.nvram, self.signing)
        else:
            shutil.copyfile(OVMF_VARS, self.nvram)

    def swtpm_argv(self) -> list[str]:
        return ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.path('tpm')}",
                "--ctrl", f"type=unixio,path={self.path('swtpm.sock')}", "--log", f"file={self.path('swtpm.log')},level=1"]

    def qemu_argv(self, accel: str) -> list[str]:
        argv = [
            QEMU, "-name", "tccdeploy-realboot,debug-threads=on", "-accel", accel,
            "-machine", secureboot.MACHINE if self.secure_boot else "q35", *(secureboot.QEMU_ARGS if self.secure_boot else ()),
            "-m", str(self.memory_mb), "-smp", "1", "-display", "none", "-no-reboot", "-no-user-config",
            "-nodefaults", "-serial", f"file:{self.console}", "-monitor", "none",
            "-drive", f"if=pflash,format=raw,unit=0,file={self.firmware},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.nvram}",
            "-chardev", f"socket,id=chrtpm,path={self.path('swtpm.sock')}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
            "-drive", f"file=fat:{self.esp},format=raw,if=none,id=esp,readonly=on",
            "-device", "virtio-blk-pci,drive=esp,bootindex=0",
        ]
        for name, disk in (("data", self.data_disk), ("boot", self.boot_disk)):
            if disk:
                argv += ["-drive", f"file={disk},format=raw,if=none,id={name}", "-device", f"virtio-blk-pci,drive={name}"]
        for name, file in (self.fw_cfg or {}).items():
            argv += ["-fw_cfg", f"name={name},file={file}"]
        return argv + (self.network or [])

    def start(self, progress: Progress | None = None) -> tuple[subprocess.Popen, subprocess.Popen]:
        """Start the vTPM and the machine (QEMU, then swtpm); under TCG when KVM fails."""
        accel = accelerator()
        qemu, tpm = self._start(accel)
        if accel == "kvm":
            deadline = time.monotonic() + KVM_PROBE_SECONDS
            while time.monotonic() < deadline:
                exited = qemu.poll() is not None
                failure = kvm_failure(_read(self.path("qemu.log")))
                if failure:
                    procs.stop([qemu.pid, tpm.pid])
                    _remember_kvm_unusable(_read(self.path("qemu.log")))
                    if progress:
                        progress(f"warning: KVM cannot run OVMF here ({failure}); booting under TCG (slower)")
                    return self._start("tcg")
                if exited:
                    break
                time.sleep(0.2)
        return qemu, tpm

    def _start(self, accel: str) -> tuple[subprocess.Popen, subprocess.Popen]:
        for name in ("console.log", "qemu.log", "swtpm.sock"):
            if os.path.exists(self.path(name)):
                os.unlink(self.path(name))
        tpm = procs.spawn(self.swtpm_argv(), self.path("swtpm.out"))
        if not procs.wait_socket(self.path("swtpm.sock"), tpm):
            procs.stop([tpm.pid])
            raise LabError(f"swtpm did not start: {_read(self.path('swtpm.out'))[-300:]}")
        return procs.spawn(self.qemu_argv(accel), self.path("qemu.log")), tpm


def kvm_failure(log: str) -> str | None:
    """Which of KVM_FAILURES QEMU's log shows (None: none)."""
    return next((f for f in KVM_FAILURES if f in log), None)


def accelerator() -> str:
    """kvm where /dev/kvm opens and the cache has not seen it fail; tcg otherwise (or as told)."""
    chosen = os.environ.get(ACCEL_ENV)
    if chosen in ("kvm", "tcg"):
        return chosen
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or os.path.exists(os.path.join(cache_dir(), "kvm-unusable")):
        return "tcg"
    return "kvm"


def _remember_kvm_unusable(log: str) -> None:
    with open(os.path.join(cache_dir(), "kvm-unusable"), "w") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {QEMU} under KVM:\n{log[-2000:]}")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _output(argv: Iterable[str]) -> str:
    argv = list(argv)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


# -- what a booted machine printed of its boot ---------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """What a boot printed on the console (the real-boot node's init does, lab/nodeimage.py): the
    kernel's command line, the firmware's event log and the PCRs per bank as the kernel reads them."""

    cmdline: str
    eventlog: bytes
    pcrs: dict[str, dict[int, bytes]]


PROBE_END = "TCCDEPLOY-DONE"


def read_probe(console: str) -> Probe:
    if PROBE_END not in console:
        raise LabError(f"the boot did not finish printing its measurements; its console ended with {console[-500:]!r}")
    cmdline = re.search(r"TCCDEPLOY-CMDLINE (.*)", console)
    log = re.search(r"TCCDEPLOY-LOG-BEGIN\r?\n(.*?)TCCDEPLOY-LOG-END", console, re.S)
    if not cmdline or not log:
        raise LabError("the boot's console has no command line or event log")
    pcrs: dict[str, dict[int, bytes]] = {}
    for bank, index, value in re.findall(r"TCCDEPLOY-PCR (\w+) (\d+) ([0-9A-Fa-f]+)", console):
        pcrs.setdefault(bank, {})[int(index)] = bytes.fromhex(value)
    return Probe(cmdline.group(1).strip(), bytes.fromhex("".join(log.group(1).split())), pcrs)
