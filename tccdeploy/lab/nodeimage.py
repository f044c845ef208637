"""The real-boot node's operating system: a Debian 12 userland in the measured initramfs.

A real-boot lab node boots OVMF -> systemd-boot -> Debian's kernel (lab/realboot.py), and its
whole operating system is the initramfs: Debian's OpenSSH, Python and TPM libraries (from
`mmdebstrap`, built once into the lab's cache and rebuilt only when this recipe changes), the
Python packages the TVMM service needs (copied from tccdeploy's own environment: the same
Debian 12 ABI), the TVMM service itself and the sshd configuration that forces the TVMM user into
it. The kernel's EFI stub measures the initrd into PCR 9, so everything the node runs is in the
measured boot: there is no root file system on disk for an operator to change behind the TPM's
back, and `build predict` computes the build from the image's files.

What differs per node is not measured and holds no code: its name, its SSH host key and the
engine's public key, which the lab hands the guest through QEMU's fw_cfg (as a provider
provisions a machine when racking it). The TVMM user's forced command is in the measured
sshd_config, so no key given there reaches more than the service.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from ..bundles import service_bundle
from ..tvmm import daemon
from . import realboot
from .realboot import Entry, directory, regular, symlink
from .tpm import LabError

Progress = Callable[[str], None]

SUITE = "bookworm"
PACKAGES = (
    "openssh-server", "python3", "busybox", "kmod", "ca-certificates",
    "libtss2-esys-3.0.2-0", "libtss2-fapi1", "libtss2-mu0", "libtss2-rc0", "libtss2-sys1",
    "libtss2-tctildr0", "libtss2-tcti-device0",
    "qemu-system-x86",  # the customers' VMs (TCG: no nested KVM), with SeaBIOS for their machine
    "socat",  # joins the TVMM user's SSH sessions to the service started at boot (tvmm/daemon.py)
)
PYTHON_PACKAGES = ("cryptography", "tpm2_pytss", "cffi", "_cffi_backend", "pycparser", "packaging")
# and what each depends on; crc32c_generic is ext4's soft dependency (crc32c-intel needs SSE4.2,
# which QEMU's default CPU under TCG lacks)
MODULES = ("virtio_pci", "virtio_net", "qemu_fw_cfg", "virtio_blk", "crc32c_generic", "ext4")
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
         "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf", "usr/share/zoneinfo")
_QEMU_DATA = "usr/share/qemu/"
_QEMU_MODULES = "usr/lib/x86_64-linux-gnu/qemu/"
UNUSED = (
    # Perl and the package manager: Debian's essential set, which the node never runs
    "usr/share/perl", "usr/lib/x86_64-linux-gnu/perl", "usr/bin/perl", "usr/lib/x86_64-linux-gnu/libperl.so",
    "var/lib/dpkg", "usr/bin/apt", "usr/bin/dpkg", "usr/lib/apt", "usr/lib/dpkg", "usr/lib/x86_64-linux-gnu/libapt-",
    "usr/share/iso-codes", "usr/share/xml", "usr/share/bash-completion", "usr/share/common-licenses",
    "usr/lib/x86_64-linux-gnu/gconv", "var/log", "var/cache", "usr/lib/udev/hwdb", "usr/bin/udevadm",
    # QEMU for the customers' x86_64 VMs only (-machine pc, -nodefaults, no display, no NIC): not the
    # other targets, their firmware and ROMs, or the display, audio and USB modules
    "usr/libexec/qemu-system-i386", "usr/bin/qemu-system-i386", "usr/bin/qemu-system-x86_64-microvm",
    "usr/bin/qemu-storage-daemon", "usr/bin/qemu-pr-helper", "usr/lib/ipxe",
    *(_QEMU_DATA + name for name in ("skiboot.lid", "openbios-", "slof.bin", "hppa-firmware", "opensbi-",
                                     "palcode-", "s390-", "keymaps", "trace-events-all", "canyonlands.dtb",
                                     "bamboo.dtb", "vof.bin", "npcm7xx_bootrom.bin", "QEMU,", "petalogix", "u-boot")),
    *(_QEMU_MODULES + name for name in ("audio-", "chardev-", "hw-display-", "hw-s390x-", "hw-usb-", "ui-")),
)  # what the node never runs or reads: left out of its initrd (a smaller initrd is read, measured and unpacked faster)
SERVICE_PATH = "usr/lib/tccdeploy/tccdeploy-tvmm.pyz"
CONNECT_PATH = "usr/lib/tccdeploy/tvmm-connect"  # the TVMM user's forced command
SERVICE_SOCKET = "/run/tccdeploy-tvmm/service.sock"
SERVICE_CONFIG = "/etc/tccdeploy/tvmm.json"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
GUEST_ADDRESS = "10.0.2.15"  # QEMU user networking's guest
TVMM_UID = 990
NODE_UID = 991
FW_CFG = "opt/tccdeploy"  # the per-node provisioning items: node, host_key, authorized_keys

INIT = """#!/bin/sh
# tccdeploy real-boot node: mount, load the NIC and fw_cfg drivers, take this machine's
# provisioning, hand the TPM to the TVMM user, start sshd. Written by tccdeploy/lab/nodeimage.py.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
mkdir -p /dev/pts /run/sshd /tmp /var/lib/tccdeploy-tvmm && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p /run/sshd
chmod 1777 /tmp
# the modules of the kernel that booted (the initramfs carries them for each kernel the builds boot)
mods=/usr/lib/tccdeploy/modules/$(uname -r)
for m in $(cat $mods/order); do insmod $mods/$m || echo "insmod $m failed"; done
# The TVMM service's state (its AK, used tickets, VMs) on the machine's data disk: kept across
# reboots as a server's disk is; it holds no code, and nothing on it is executed. The boot disk
# is the provider's (the admin login's): the builds it installs for the next boot.
for i in $(seq 1 50); do [ -e /dev/vdc ] && break; sleep 0.1; done
mount -t ext4 -o nosuid,nodev,noexec LABEL=tvmm-state /var/lib/tccdeploy-tvmm \
  || echo "TCCDEPLOY: no state disk: the TVMM service's state ends at power-off" > /dev/ttyS0
mount -t ext4 -o nosuid,nodev,noexec LABEL=tvmm-boot /boot/tccdeploy \
  || echo "TCCDEPLOY: no boot disk: builds cannot be installed for the next boot" > /dev/ttyS0
cfg=/sys/firmware/qemu_fw_cfg/by_name/opt/tccdeploy
for i in $(seq 1 50); do [ -e $cfg/node/raw ] && break; sleep 0.1; done
cat $cfg/node/raw > /etc/tccdeploy/node
install -m 0600 $cfg/host_key/raw /etc/ssh/ssh_host_ed25519_key
install -m 0644 $cfg/authorized_keys/raw /etc/ssh/authorized_keys
hostname "$(cat /etc/tccdeploy/node)"
printf '{"node": "%s"}\\n' "$(cat /etc/tccdeploy/node)" > /etc/tccdeploy/tvmm.json
# The TPM and the firmware's event log are the TVMM user's alone (on a server: udev and tmpfiles).
chown tccnode:tccnode /home/tccnode /boot/tccdeploy
chown tcctvmm:tcctvmm /dev/tpmrm0 /var/lib/tccdeploy-tvmm && chmod 0600 /dev/tpmrm0 && chmod 0700 /var/lib/tccdeploy-tvmm
chown tcctvmm /sys/kernel/security/tpm0/binary_bios_measurements
chmod 0600 /dev/tpm0
# The TVMM service, started once (seconds of imports under TCG); each SSH session of the TVMM
# user is joined to it by the forced command and served by a process of its own.
mkdir -m 0700 /run/tccdeploy-tvmm && chown tcctvmm:tcctvmm /run/tccdeploy-tvmm
setpriv --reuid=tcctvmm --regid=tcctvmm --init-groups env HOME=/var/lib/tccdeploy-tvmm \
  /usr/bin/python3 /usr/lib/tccdeploy/tccdeploy-tvmm.pyz daemon --socket /run/tccdeploy-tvmm/service.sock \
  --config /etc/tccdeploy/tvmm.json < /dev/null > /dev/ttyS0 2>&1 &
busybox ip link set lo up
busybox ip link set eth0 up
busybox ip addr add 10.0.2.15/24 dev eth0
busybox ip route add default via 10.0.2.2
# The lab reads its golden node's boot here (as an operator's capture would): the command line,
# the firmware's event log and the PCRs as this kernel reads them. Trust comes from quotes.
# Gathered while sshd starts (reading 48 PCRs takes seconds under TCG) and written to the console
# in one write, so no line sshd logs there can fall inside it.
(
  {
    echo "TCCDEPLOY-CMDLINE $(cat /proc/cmdline)"
    echo TCCDEPLOY-LOG-BEGIN; od -An -tx1 -v /sys/kernel/security/tpm0/binary_bios_measurements; echo TCCDEPLOY-LOG-END
    for bank in sha1 sha256 sha384 sha512; do
      [ -d /sys/class/tpm/tpm0/pcr-$bank ] || continue
      for i in $(seq 0 23); do echo "TCCDEPLOY-PCR $bank $i $(cat /sys/class/tpm/tpm0/pcr-$bank/$i)"; done
    done
    echo TCCDEPLOY-DONE
  } > /run/tccdeploy-probe
  dd if=/run/tccdeploy-probe of=/dev/ttyS0 bs=16M 2>/dev/null
) &
echo "TCCDEPLOY-NODE-UP $(cat /etc/tccdeploy/node)" > /dev/ttyS0
exec /usr/sbin/sshd -D -e
"""

SSHD_CONFIG = """# sshd of a tccdeploy real-boot node (in the measured initramfs)
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
AllowUsers tccnode tcctvmm
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTTY yes
PrintMotd no
PrintLastLog no
MaxStartups 200:30:400
MaxSessions 50
ClientAliveInterval 15
Subsystem sftp internal-sftp
SetEnv TCCDEPLOY_NODE_DIR=/home/tccnode
Match User tcctvmm
    ForceCommand /usr/lib/tccdeploy/tvmm-connect
    PermitTTY no
"""


def recipe() -> dict:
    """What the cached root file system is built from; a change rebuilds it."""
    return {"suite": SUITE, "packages": list(PACKAGES), "prune": list(PRUNE), "variant": "minbase", "version": 1}


def rootfs(progress: Progress | None = None) -> str:
    """The Debian userland, built with mmdebstrap once per recipe into the lab's cache."""
    key = hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.join(realboot.cache_dir(), f"rootfs-{SUITE}-{key}")
    if os.path.isdir(root):
        return root
    if shutil.which("mmdebstrap") is None:
        raise LabError("mmdebstrap is not installed: run scripts/install")
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    if progress:
        progress(f"building the real-boot nodes' Debian {SUITE} userland with mmdebstrap (once; a few minutes)")
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet", f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*", SUITE, partial]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise LabError(f"mmdebstrap failed: {proc.stderr.strip()[-800:]}")
    for sub in PRUNE:
        shutil.rmtree(os.path.join(partial, sub), ignore_errors=True)
    os.replace(partial, root)
    if progress:
        progress(f"built {root} in {time.monotonic() - started:.0f} s ({_size(root) / 2**20:.0f} MiB)")
    return root


def _size(root: str) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def _tree(root: str, under: str = "", leave_out: tuple[str, ...] = ()) -> dict[str, Entry]:
    """Every file, directory and symlink below root as initramfs entries (owners become root),
    but those whose path starts with one of leave_out."""
    out: dict[str, Entry] = {}
    linked: dict[tuple[int, int], str] = {}  # a hard-linked file's first path: the others link to it
    for folder, dirs, files in sorted(os.walk(root)):
        rel = os.path.relpath(folder, root)
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            target = os.path.normpath(os.path.join(under, rel, name))
            if leave_out and target.startswith(leave_out):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                out[target] = symlink(os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[target] = directory(stat.S_IMODE(info.st_mode))
            elif stat.S_ISREG(info.st_mode) and info.st_nlink > 1 and (info.st_dev, info.st_ino) in linked:
                out[target] = symlink("/" + linked[(info.st_dev, info.st_ino)])  # not its bytes twice
            elif stat.S_ISREG(info.st_mode):
                if info.st_nlink > 1:
                    linked[(info.st_dev, info.st_ino)] = target
                with open(path, "rb") as fh:  # Python's byte code stays valid only with its source's time
                    out[target] = regular(fh.read(), stat.S_IMODE(info.st_mode), int(info.st_mtime))
    return out


def _modules(kernel_root: str) -> list[tuple[str, bytes]]:
    """MODULES and their dependencies (from each module's own modinfo), in load order."""
    found: dict[str, str] = {}
    for folder, _, files in os.walk(os.path.join(kernel_root, "lib", "modules")):
        for name in files:
            if name.endswith(".ko"):
                found[name[:-3].replace("-", "_")] = os.path.join(folder, name)
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in found:
            raise LabError(f"the kernel has no module {name}")
        with open(found[name], "rb") as fh:
            match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", fh.read())
        for dep in (match.group(1).decode().split(",") if match and match.group(1) else []):
            visit(dep.replace("-", "_"))
        order.append(name)

    for module in MODULES:
        visit(module)
    out = []
    for name in order:
        with open(found[name], "rb") as fh:
            out.append((f"{name}.ko", fh.read()))
    return out


def _python_packages() -> dict[str, Entry]:
    """The service's third-party packages, from the environment tccdeploy runs in (Debian 12's
    Python 3.11 ABI, as the guest's)."""
    import importlib.util

    out: dict[str, Entry] = {}
    for name in PYTHON_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise LabError(f"Python package {name} is not installed here: run scripts/install")
        if spec.submodule_search_locations:
            folder = list(spec.submodule_search_locations)[0]
            out.update(_tree(folder, f"{SITE_PACKAGES}/{name}"))
        else:
            with open(spec.origin, "rb") as fh:
                out[f"{SITE_PACKAGES}/{os.path.basename(spec.origin)}"] = regular(fh.read(), 0o644)
    return out


CACHED_INITRDS = 3  # the newest ones kept in the lab's cache (another checkout's, a mutant's)


def cached_node_initramfs(progress: Progress | None = None, kernels: Sequence[str] | None = None) -> str:
    """The node initrd's path in the lab's cache, made only when what goes into it changed.

    The key covers every input: the root file system (its folder is named by its recipe), the
    kernel package, this Python and its packages' versions, the TVMM service's bundle and the
    source of this module and of the cpio writer. Making it takes seconds (zstd) at every
    lab up otherwise; a stale initrd would make the lab boot code that is not the tree's."""
    import importlib.metadata

    service = service_bundle()[0]
    kernels = list(kernels or realboot.kernel_packages())
    key = hashlib.sha256()
    for part in (rootfs(progress), *kernels, sys.version, json.dumps(PYTHON_PACKAGES)):
        key.update(part.encode() + b"\0")
    for dist in ("cryptography", "tpm2-pytss", "cffi", "pycparser", "packaging"):
        key.update(f"{dist}=={importlib.metadata.version(dist)}\0".encode())
    for source in (__file__, realboot.__file__):
        with open(source, "rb") as fh:
            key.update(hashlib.sha256(fh.read()).digest())
    key.update(hashlib.sha256(service).digest())
    path = os.path.join(realboot.cache_dir(), f"initrd-{key.hexdigest()[:24]}.img")
    if not os.path.isfile(path):
        started = time.monotonic()
        data = node_initramfs(progress, service, kernels)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as fh:
            fh.write(data)
        os.replace(partial, path)
        if progress:
            progress(f"real-boot image: initrd {len(data) / 2**20:.0f} MiB, made in {time.monotonic() - started:.0f} s")
    os.utime(path)  # the newest used: kept by the pruning below
    _prune(realboot.cache_dir(), "initrd-", CACHED_INITRDS)
    return path


def _prune(folder: str, prefix: str, keep: int) -> None:
    found = sorted((os.path.getmtime(os.path.join(folder, n)), n) for n in os.listdir(folder)
                   if n.startswith(prefix) and n.endswith(".img"))
    for _, name in found[:-keep]:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:  # another lab pruned it first
            pass


def node_initramfs(progress: Progress | None = None, service: bytes | None = None,
                   kernels: Sequence[str] | None = None) -> bytes:
    """The real-boot node's initrd: the userland, the modules of each of kernels (Debian kernel
    packages; default every one apt knows), the TVMM service, init. One initrd serves every
    kernel, so under secure boot another signed kernel with it boots and is measured (a tamper
    secure boot cannot see), and a kernel rollout changes only the kernel and its command line."""
    if sys.version_info[:2] != (3, 11):
        raise LabError("the real-boot image copies this Python's packages into Debian 12's Python 3.11: "
                       f"run tccdeploy with Debian 12's python3 (this is {sys.version.split()[0]})")
    entries = _tree(rootfs(progress), leave_out=UNUSED)
    for sub in ("etc/ssh/ssh_host_ecdsa_key", "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_rsa_key"):
        for suffix in ("", ".pub"):
            entries.pop(sub + suffix, None)  # mmdebstrap made these: every node gets its own
    entries.update(_python_packages())
    for kernel in kernels or realboot.kernel_packages():
        kernel_root = realboot.unpacked(kernel, progress)
        (release,) = os.listdir(os.path.join(kernel_root, "lib", "modules"))
        modules = _modules(kernel_root)
        for name, data in modules:
            entries[f"usr/lib/tccdeploy/modules/{release}/{name}"] = regular(data)
        entries[f"usr/lib/tccdeploy/modules/{release}/order"] = regular(("\n".join(n for n, _ in modules) + "\n").encode())
    entries[SERVICE_PATH] = regular(service if service is not None else service_bundle()[0])
    entries[CONNECT_PATH] = regular(daemon.connect_script(SERVICE_SOCKET, "/usr/bin/python3", "/" + SERVICE_PATH,
                                                          SERVICE_CONFIG).encode(), 0o755)
    entries["init"] = regular(INIT.encode(), 0o755)
    entries["etc/ssh/sshd_config"] = regular(SSHD_CONFIG.encode())
    entries["etc/passwd"] = regular(_with_users(entries["etc/passwd"].data, "passwd"))
    entries["etc/group"] = regular(_with_users(entries["etc/group"].data, "group"))
    entries["etc/shadow"] = regular(_with_users(entries["etc/shadow"].data, "shadow"), 0o640)
    entries["home/tccnode"] = directory(0o700)
    entries["var/lib/tccdeploy-tvmm"] = directory(0o700)
    entries["boot/tccdeploy"] = directory(0o755)
    entries["etc/tccdeploy"] = directory(0o755)  # the node's name and the service's config, written by init
    entries["etc/hostname"] = regular(b"tccdeploy-node\n")
    return realboot.initramfs(entries)


def _with_users(data: bytes, kind: str) -> bytes:
    lines = [line for line in data.decode().splitlines() if not line.startswith(("tccnode:", "tcctvmm:"))]
    if kind == "passwd":
        lines += [f"tcctvmm:x:{TVMM_UID}:{TVMM_UID}:tccdeploy TVMM:/var/lib/tccdeploy-tvmm:/bin/sh",
                  f"tccnode:x:{NODE_UID}:{NODE_UID}:tccdeploy node admin:/home/tccnode:/bin/sh"]
    elif kind == "group":
        lines += [f"tcctvmm:x:{TVMM_UID}:", f"tccnode:x:{NODE_UID}:"]
    else:  # "*": no password can match, and not locked ("!" would make sshd refuse the key too)
        lines += ["tcctvmm:*:20000:0:99999:7:::", "tccnode:*:20000:0:99999:7:::"]
    return ("\n".join(lines) + "\n").encode()

