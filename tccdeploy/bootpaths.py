"""Boot paths: what a boot chain extends into a build's PCRs, in order, and how each digest is made.

`build predict` computes a build's reference measurements from its files alone, so it must know
the chain that will measure them: which events, on which PCRs, in which order, and whether a
file is hashed whole (sha256), as a PE/COFF image (Authenticode, as UEFI firmware measures EFI
applications), or a command line as text or as UTF-16. Each path here is written down once and
checked against a real boot of it (tests/adversary/test_realboot.py, and the captured boot in
tests/vectors/eventlogs/tccdeploy/).

- `lab`: the local lab's stand-in chain (PCRs 4, 8, 9, 11; lab/builds.py).
- `systemd-boot`: UEFI firmware (edk2/OVMF, as the TCG PC Client Platform Firmware Profile has
  it) starting systemd-boot (Debian 12's 252) from the ESP, which starts a Linux kernel (6.1 and
  later) through its EFI stub, with the initrd and command line of its loader entry:
  - PCR 4: the firmware's "Calling EFI Application from Boot Option", its separator, then the
    Authenticode digests of systemd-boot and of the kernel (firmware measures every image
    LoadImage starts). The boot loader's and kernel's file names are not in the digests.
  - PCR 12: systemd-boot measures the command line it passes, UTF-16LE with its NUL; the line is
    `initrd=\\initrd.img ` followed by the entry's options.
  - PCR 9: the stub measures the same command line (LOADED_IMAGE::LoadOptions, tag 0x8F3B22ED)
    and the initrd it loaded, by the file's digest (tag 0x8F3B22EC).
  The firmware's other events (PCRs 0-3, 5-7: its code, variables, boot entries, secure boot
  keys, ExitBootServices) are the platform's: capture them from a node of the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

FILE = "file"  # the file's digest
PE = "pe"  # the Authenticode digest of a PE/COFF image (the file's digest when it is not one)
TEXT = "text"  # the command line's text (UTF-8, no NUL), as GRUB and the lab measure it
UTF16 = "utf16"  # the command line in UTF-16LE with its NUL, as systemd-boot and the EFI stub do
FIXED = "fixed"  # bytes the chain always measures (separators, firmware action strings)

SEPARATOR_DATA = b"\x00\x00\x00\x00"
CALLING_BOOT_OPTION = b"Calling EFI Application from Boot Option"
ESP_KERNEL = "vmlinuz"  # where the systemd-boot path's loader entry finds the kernel and initrd
ESP_INITRD = "initrd.img"


@dataclass(frozen=True)
class Step:
    """One event of the chain: the PCR, the event type, what it measures and how."""

    pcr: int
    type: str
    how: str
    source: str = ""  # an artifact name, or "cmdline"; empty for FIXED
    data: bytes = b""  # FIXED: the bytes measured
    description: str = ""


@dataclass(frozen=True)
class BootPath:
    name: str
    summary: str
    steps: tuple[Step, ...]
    initrd_prefix: str = ""  # what the boot loader puts before the entry's options

    @property
    def artifacts(self) -> list[str]:
        """The files the path measures, in order of first measurement."""
        out: list[str] = []
        for step in self.steps:
            if step.source and step.source != "cmdline" and step.source not in out:
                out.append(step.source)
        return out

    def command_line(self, options: str) -> str:
        """The command line the kernel gets (and the chain measures) for a boot entry's options."""
        return self.initrd_prefix + options


def _lab_path() -> BootPath:
    from .lab.builds import BUILD_SEQUENCE

    steps = []
    for pcr, event_type, artifact in BUILD_SEQUENCE:
        if artifact is None:
            steps.append(Step(pcr, event_type, FIXED, data=SEPARATOR_DATA, description="separator"))
        elif artifact == "cmdline":
            steps.append(Step(pcr, event_type, TEXT, "cmdline"))
        elif event_type == "EV_EFI_BOOT_SERVICES_APPLICATION":
            steps.append(Step(pcr, event_type, PE, artifact))
        else:
            steps.append(Step(pcr, event_type, FILE, artifact))
    return BootPath("lab", "the local lab's boot chain: PCRs 4, 8, 9, 11", tuple(steps))


SYSTEMD_BOOT = BootPath(
    "systemd-boot",
    "UEFI firmware -> systemd-boot -> Linux EFI stub: PCRs 4, 9, 12",
    (
        Step(4, "EV_EFI_ACTION", FIXED, data=CALLING_BOOT_OPTION, description=CALLING_BOOT_OPTION.decode()),
        Step(4, "EV_SEPARATOR", FIXED, data=SEPARATOR_DATA, description="separator"),
        Step(4, "EV_EFI_BOOT_SERVICES_APPLICATION", PE, "bootloader"),
        Step(4, "EV_EFI_BOOT_SERVICES_APPLICATION", PE, "kernel"),
        Step(12, "EV_IPL", UTF16, "cmdline", description="the command line systemd-boot passes (UTF-16)"),
        Step(9, "EV_EVENT_TAG", UTF16, "cmdline", description="LOADED_IMAGE::LoadOptions (UTF-16)"),
        Step(9, "EV_EVENT_TAG", FILE, "initrd", description="Linux initrd"),
    ),
    initrd_prefix=f"initrd=\\{ESP_INITRD} ",
)


def boot_path(name: str) -> BootPath:
    if name == "lab":
        return _lab_path()
    if name == SYSTEMD_BOOT.name:
        return SYSTEMD_BOOT
    raise KeyError(name)


NAMES = ("lab", SYSTEMD_BOOT.name)


def step_digest(step: Step, files: Mapping[str, bytes], cmdline: str, bank: str = "sha256") -> bytes:
    """What the chain extends for step, given the artifacts' bytes and the measured command line."""
    from .pe import authenticode, is_pe

    if step.how == FIXED:
        return hashlib.new(bank, step.data).digest()
    if step.how == TEXT:
        return hashlib.new(bank, cmdline.encode()).digest()
    if step.how == UTF16:
        return hashlib.new(bank, (cmdline + "\x00").encode("utf-16-le")).digest()
    data = files[step.source]
    if step.how == PE and is_pe(data):
        return authenticode(data, bank)
    return hashlib.new(bank, data).digest()
