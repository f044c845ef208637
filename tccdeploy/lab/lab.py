"""The local lab: real nodes on one machine, each with its own sshd, swtpm and boot.

A lab node is a loopback address (127.K.S.N: lab K, site S, node N; site 9 is outside the
perimeter) with:
- its own OpenSSH sshd bound to that address only, key-only login as the lab user;
- its own swtpm on a unix socket only the node's TVMM user can open, manufactured with an EK
  certificate from the lab's TPM vendor CA, or from a second "rogue" CA the perimeter does not
  trust;
- the split of a real node: an admin login (`tccnode`, the provider's, where the engine runs its
  helper) that reaches neither the TPM nor the VMs, and the TVMM user (`tcctvmm`) that owns
  them, reached over SSH only through the forced command of the measured TVMM service;
- a boot: the lab measures a TVMM build's artifacts into the PCRs and writes the matching
  TCG2 event log where the node helper reads it.

Everything lives in one directory with a state file; every process is recorded by PID as soon
as it starts, so `down` stops exactly what `up` started, even after a crash.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import yaml

from ..eventlog import EventLogWriter, image_load_event
from ..tvmm import daemon
from . import procs, realnodes, tpm
from .builds import (
    ARTIFACTS,
    DEFAULT_MODEL,
    LAB_BUILDS,
    LAB_PLATFORMS,
    POLICY_PCRS,
    artifact_bytes,
    boot_events,
    build_manifest,
    lab_build,
    platform_manifest,
)
from .ca import make_ca
from .tpm import LabError

LAB_USER = "tccnode"  # the node's admin login: the provider's, what the engine runs its helper as
LAB_HOME = "/var/lib/tccdeploy-lab/home"
TVMM_USER = "tcctvmm"  # the node's TVMM user: alone reaches the TPM, the VMs and QMP
TVMM_HOME = "/var/lib/tccdeploy-lab/tvmm"
SSH_PORT = 2222
MAX_SOCKET_PATH = 100  # a unix socket's path is at most 107 bytes; the TPM's control socket adds 5
OUTSIDE_SITE = 9
DEFAULT_BUILD = "tvmm-2026.1"
STATE_FILE = "lab.json"
ASSET_TAG_INDEX = 0x01500001
TAMPER_PCR = 4
SERVICE_FILE = "tccdeploy-tvmm.pyz"
CONNECT_FILE = "tvmm-connect"  # the TVMM user's forced command
SERVICE_SOCKET = "service.sock"
REQUIRED_TOOLS = {
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    "swtpm_ioctl": "swtpm-tools",
    "swtpm_localca": "swtpm-tools",
    "ssh-keygen": "openssh-client",
}
SSHD = "/usr/sbin/sshd"
Progress = Callable[[str], None]


@dataclass
class Node:
    name: str
    address: str
    site: str | None  # None: outside the perimeter
    group: str
    rogue_tpm: bool = False
    build: str = DEFAULT_BUILD
    asset_tag: str | None = None
    sshd_pid: int | None = None
    swtpm_pid: int | None = None
    ssh: str = "running"  # running | stopped
    frozen: list[int] = field(default_factory=list)
    boots: int = 0
    tampered: int = 0
    implant: bool = False  # a persistent rogue component: measured again at every boot
    model: str = DEFAULT_MODEL  # the hardware model: its firmware is what PCR 0 shows
    modified: bool = False  # the last boot loaded files other than the lab's own for its build
    real_boot: bool = False  # a QEMU guest that really boots (lab/realnodes.py)
    secure_boot: bool = True  # a real-boot node's firmware: secure boot on, the lab's keys enrolled
    qemu_pid: int | None = None
    service_pid: int | None = None  # the TVMM service its boot started (tccdeploy-tvmm daemon)

    @property
    def state(self) -> str:
        if self.frozen:
            return "frozen"
        if self.ssh != "running":
            return "ssh-stopped"
        return "tampered" if self.tampered or self.implant else "running"


def plan(nodes: int, sites: int, outside: int, rogue: int, lab_index: int, real_boot: int = 0,
         secure_boot: bool = True) -> list[Node]:
    """Name and address every node: site nodes first (spread evenly), then rogue TPMs, outside,
    then real-boot nodes (site 1, 127.K.1.101 and up)."""
    if not 1 <= sites <= 8:
        raise LabError(f"--sites must be 1 to 8 (site {OUTSIDE_SITE} is outside the perimeter), not {sites}")
    if nodes < 1 or nodes > 200 * sites:
        raise LabError(f"--nodes must be 1 to {200 * sites} for {sites} site(s), not {nodes}")
    if not 0 <= outside <= 50 or not 0 <= rogue <= 50:
        raise LabError("--outside and --rogue-tpm must be 0 to 50")
    if not 0 <= real_boot <= 3:
        raise LabError(f"--real-boot must be 0 to 3 (each is a QEMU guest with {realnodes.MEMORY_MB} MiB), not {real_boot}")
    if not 0 <= lab_index <= 255:
        raise LabError(f"--lab-index must be 0 to 255, not {lab_index}")
    out: list[Node] = []
    per_site = [nodes // sites + (1 if s < nodes % sites else 0) for s in range(sites)]
    n = 0
    for s, count in enumerate(per_site, start=1):
        for i in range(1, count + 1):
            n += 1
            tag = asset_tag_value(s)
            model = LAB_PLATFORMS[(n - 1) % len(LAB_PLATFORMS)].name  # the hardware models alternate
            out.append(Node(f"node{n}", f"127.{lab_index}.{s}.{i}", f"site{s}", f"site{s}", asset_tag=tag, model=model))
    for i in range(1, rogue + 1):
        out.append(Node(f"roguetpm{i}", f"127.{lab_index}.1.{200 + i}", "site1", "site1", rogue_tpm=True,
                        asset_tag=asset_tag_value(1)))
    for i in range(1, outside + 1):
        out.append(Node(f"outside{i}", f"127.{lab_index}.{OUTSIDE_SITE}.{i}", None, "outside"))
    for i in range(1, real_boot + 1):
        out.append(Node(f"rboot{i}", f"127.{lab_index}.1.{realnodes.ADDRESS_BASE + i}", "site1", "site1",
                        build=realnodes.BUILD, model=realnodes.PLATFORM, real_boot=True, secure_boot=secure_boot))
    return out


def asset_tag_value(site: int) -> str | None:
    """Sites after the first carry an asset tag in their TPMs (so both cases are exercised)."""
    return f"site{site}-rack-a" if site >= 2 else None


class Lab:
    """A lab directory and what runs for it. Methods raise LabError with a fix-it message."""

    def __init__(self, directory: str, progress: Progress | None = None):
        self.dir = os.path.abspath(directory)
        self.progress = progress or (lambda message: None)
        self.nodes: list[Node] = []
        self.meta: dict = {}

    # -- paths --------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def node_dir(self, node: Node, *parts: str) -> str:
        return self.path("nodes", node.name, *parts)

    @property
    def ssh_key(self) -> str:
        return self.path("ssh", "id_ed25519")

    @property
    def known_hosts(self) -> str:
        return self.path("ssh", "known_hosts")

    @property
    def inventory_dir(self) -> str:
        return self.path("inventory")

    @property
    def manifests_dir(self) -> str:
        return self.path("manifests")

    @property
    def ssh_port(self) -> int:
        return int(self.meta.get("ssh_port", SSH_PORT))

    def tpm_socket(self, node: Node) -> str:
        """The node's TPM: a unix socket in the TVMM user's private folder."""
        return self.node_dir(node, "tvmm", "tpm.sock")

    def service_socket(self, node: Node) -> str:
        """Where the service its boot started listens (in the same private folder)."""
        return self.node_dir(node, "tvmm", SERVICE_SOCKET)

    def tcti(self, node: Node) -> str:
        return tpm.tcti(self.tpm_socket(node))

    def service_dir(self, node: Node, *parts: str) -> str:
        """Where the node's booted TVMM service is installed (root's, read-only to the node's users)."""
        return self.node_dir(node, "service", *parts)

    # -- state --------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self.path(STATE_FILE))

    def load(self) -> Lab:
        try:
            with open(self.path(STATE_FILE)) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise LabError(f"no lab in {self.dir}: start one with `tccdeploy lab up --dir {self.dir}`") from None
        except (OSError, ValueError) as exc:
            raise LabError(f"lab state {self.path(STATE_FILE)} is unreadable ({exc}); "
                           f"`tccdeploy lab down --dir {self.dir}` cleans it up") from None
        self.meta = data["meta"]
        self.nodes = [Node(**n) for n in data["nodes"]]
        return self

    def save(self) -> None:
        tmp = self.path(STATE_FILE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"meta": self.meta, "nodes": [asdict(n) for n in self.nodes]}, fh, indent=2)
        os.replace(tmp, self.path(STATE_FILE))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time per directory (two `lab up` racing would share ports)."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.path(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @property
    def fast_nodes(self) -> list[Node]:
        """The nodes whose boot the lab measures (sshd and swtpm on this machine)."""
        return [n for n in self.nodes if not n.real_boot]

    @property
    def real_nodes(self) -> list[Node]:
        """The real-boot nodes (QEMU guests; lab/realnodes.py)."""
        return [n for n in self.nodes if n.real_boot]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes) or "none"
        raise LabError(f"no node {name!r} in the lab at {self.dir} (nodes: {names})")

    # -- up -----------------------------------------------------------------------------
    def up(
        self,
        nodes: int = 6,
        sites: int = 2,
        outside: int = 1,
        rogue: int = 0,
        lab_index: int = 0,
        python: str | None = None,
        ssh_port: int = SSH_PORT,
        build: str = DEFAULT_BUILD,
        real_boot: int = 0,
        secure_boot: bool = True,
    ) -> Lab:
        """Bring the lab up; on any failure stop what started and remove the directory.
        secure_boot: the real-boot nodes' firmware has it on (the lab's keys enrolled), or off."""
        planned = plan(nodes, sites, outside, rogue, lab_index, real_boot, secure_boot)
        try:
            lab_build(build)
        except KeyError:
            raise LabError(f"unknown build {build!r}; lab builds: {', '.join(b.name for b in LAB_BUILDS)}") from None
        if self.exists():
            self._refuse_existing()
        if os.path.isdir(self.dir) and set(os.listdir(self.dir)) - {".lock"}:
            raise LabError(f"{self.dir} exists and is not a lab; give an empty or new --dir")
        _preflight(planned, ssh_port)
        _check_reachable(self.dir)
        longest = max((len(self.path("nodes", n.name, "tvmm", SERVICE_SOCKET)) for n in planned), default=0)
        if longest > MAX_SOCKET_PATH:
            raise LabError(f"the lab directory {self.dir} is too deep for the nodes' TPM sockets ({longest} bytes, "
                           f"at most {MAX_SOCKET_PATH}); give a shorter --dir")
        python = python or _default_python()
        started = time.monotonic()
        try:
            with self.locked():
                self.meta = {
                    "version": 1, "created": time.time(), "lab_index": lab_index, "sites": sites,
                    "ssh_port": ssh_port, "user": LAB_USER, "tvmm_user": TVMM_USER, "python": python,
                    "default_build": build,
                }
                self.nodes = planned
                for node in self.fast_nodes:
                    node.build = build
                self._prepare(python)
                self.save()
                self._manufacture()
                self._start_tpms()
                self._boot_all()
                self._start_sshds()
                self._write_known_hosts()
                self._write_manifests()
                self._write_inventory()
                self.meta["up_seconds"] = round(time.monotonic() - started, 2)
                self.save()
        except BaseException as exc:
            self.progress("failed; stopping what was started")
            self._teardown()
            if isinstance(exc, LabError):
                raise
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise LabError(f"lab up failed: {exc}") from exc
        return self

    def _refuse_existing(self) -> None:
        try:
            self.load()
        except LabError:
            raise LabError(f"a broken lab is in {self.dir}; run `tccdeploy lab down --dir {self.dir}` first") from None
        live = [n.name for n in self.nodes if procs.belongs(n.sshd_pid, self.dir) or procs.belongs(n.swtpm_pid, self.dir)]
        what = f"{len(live)} node(s) running" if live else "not running"
        raise LabError(f"a lab already exists in {self.dir} ({what}); run `tccdeploy lab down --dir {self.dir}` first")

    def _prepare(self, python: str) -> None:
        self.progress("preparing directories, keys, CAs and artifacts")
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        for sub in ("ssh", "ca"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)
        os.makedirs(self.path("nodes"), mode=0o755, exist_ok=True)
        ensure_lab_user()
        ensure_tvmm_user()
        _check_python(python)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tccdeploy-lab-engine", "-f", self.ssh_key])
        make_ca(self.path("ca", "manufacturer"), "tccdeploy Lab TPM Vendor")
        make_ca(self.path("ca", "rogue"), "Rogue TPM Vendor")
        for build in LAB_BUILDS:
            folder = self.path("artifacts", build.name)
            os.makedirs(folder, exist_ok=True)
            for artifact in ARTIFACTS:
                with open(os.path.join(folder, artifact), "wb") as fh:
                    fh.write(artifact_bytes(build.name, artifact))
        with open(self.ssh_key + ".pub") as fh:
            public_key = fh.read()
        uid = pwd.getpwnam(LAB_USER).pw_uid
        tvmm = pwd.getpwnam(TVMM_USER)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        if self.real_nodes:
            realnodes.prepare_image(self)
        for node in self.real_nodes:
            os.makedirs(self.node_dir(node), mode=0o755, exist_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.name} host key",
                  "-f", self.node_dir(node, "ssh_host_ed25519_key")])
            realnodes.provision(self, node, public_key)
        for node in self.fast_nodes:
            ndir = self.node_dir(node)
            os.makedirs(ndir, mode=0o755, exist_ok=True)
            os.makedirs(self.node_dir(node, "tpm"), mode=0o700, exist_ok=True)
            home = self.node_dir(node, "home")
            os.makedirs(home, mode=0o700, exist_ok=True)
            os.chown(home, uid, -1)
            private = self.node_dir(node, "tvmm")  # the TPM socket, the service's state and its VMs
            os.makedirs(private, mode=0o700, exist_ok=True)
            os.chown(private, tvmm.pw_uid, tvmm.pw_gid)
            os.makedirs(self.service_dir(node), mode=0o755, exist_ok=True)
            _write_world_readable(self.service_dir(node, "config.json"), json.dumps({
                "node": node.name, "tpm": self.tcti(node), "state_dir": private,
                "eventlog": self.node_dir(node, "eventlog.bin")}, indent=2).encode())
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.name} host key",
                  "-f", self.node_dir(node, "ssh_host_ed25519_key")])
            with open(self.node_dir(node, f"authorized_keys.{LAB_USER}"), "w") as fh:
                fh.write(public_key)
            # The engine's key, for the TVMM user, can run the booted service and nothing else: the
            # forced command joins the session to the service the boot started (or serves it alone).
            _write_world_readable(self.service_dir(node, CONNECT_FILE), daemon.connect_script(
                self.service_socket(node), python, self.service_dir(node, SERVICE_FILE),
                self.service_dir(node, "config.json"), shutil.which("socat") or "/usr/bin/socat").encode(), 0o755)
            with open(self.node_dir(node, f"authorized_keys.{TVMM_USER}"), "w") as fh:
                fh.write(f'restrict,command="{self.service_dir(node, CONNECT_FILE)}" {public_key}')
            with open(self.node_dir(node, "sshd_config"), "w") as fh:
                fh.write(self._sshd_config(node))
            self._install_boot_dir(node, node.build, uid)

    def boot_dir(self, node: Node) -> str:
        """The node's boot directory: its boot loader reads `next` and the build's artifacts here,
        and the node's user (like an operator with root on a real host) may change them."""
        return self.node_dir(node, "home", "boot")

    def _install_boot_dir(self, node: Node, build: str, uid: int) -> None:
        folder = os.path.join(self.boot_dir(node), build)
        os.makedirs(folder, mode=0o755, exist_ok=True)
        for artifact in ARTIFACTS:
            with open(os.path.join(folder, artifact), "wb") as fh:
                fh.write(artifact_bytes(build, artifact))
        with open(os.path.join(self.boot_dir(node), "next"), "w") as fh:
            fh.write(build + "\n")
        for root, dirs, files in os.walk(self.boot_dir(node)):
            for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
                os.chown(name, uid, -1)

    def _sshd_config(self, node: Node) -> str:
        ndir = self.node_dir(node)
        return "\n".join([
            "# sshd for lab node " + node.name + " (written by tccdeploy lab)",
            f"ListenAddress {node.address}:{self.ssh_port}",
            f"HostKey {ndir}/ssh_host_ed25519_key",
            "PidFile none",
            f"AuthorizedKeysFile {ndir}/authorized_keys.%u",
            f"AllowUsers {LAB_USER} {TVMM_USER}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "UsePAM no",
            # The keys file is root-owned 0644; StrictModes would also refuse a lab under /tmp.
            "StrictModes no",
            "UseDNS no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PermitTTY yes",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxStartups 200:30:400",
            "MaxSessions 50",
            "ClientAliveInterval 15",
            "Subsystem sftp internal-sftp",
            f"SetEnv TCCDEPLOY_NODE={node.name} TCCDEPLOY_NODE_DIR={ndir}/home",
            "",
        ])

    def _manufacture(self) -> None:
        self.progress(f"manufacturing {len(self.nodes)} TPMs (EK certificates from the lab CA)")

        def one(node: Node) -> None:
            if node.real_boot:
                realnodes.manufacture(self, node)
                return
            ca = self.path("ca", "rogue" if node.rogue_tpm else "manufacturer")
            tpm.manufacture(self.node_dir(node, "tpm"), ca, self.node_dir(node, "swtpm_setup.log"))

        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            list(pool.map(one, self.nodes))

    def _start_tpms(self) -> None:
        self.progress("starting swtpm for every node")
        started = []
        uid = pwd.getpwnam(TVMM_USER).pw_uid
        for node in self.fast_nodes:
            proc = procs.spawn(
                tpm.swtpm_argv(self.node_dir(node, "tpm"), self.tpm_socket(node), uid, self.node_dir(node, "swtpm.log")),
                self.node_dir(node, "swtpm.out"),
            )
            node.swtpm_pid = proc.pid
            self.save()
            started.append((node, proc))
        for node, proc in started:
            if not procs.wait_socket(self.tpm_socket(node), proc):
                raise LabError(f"swtpm of {node.name} did not start on {self.tpm_socket(node)}: "
                               f"{_tail(self.node_dir(node, 'swtpm.out'))}")
        for node in self.fast_nodes:
            if node.asset_tag:
                _provision_asset_tag(self.tpm_socket(node), node.asset_tag)

    def _boot_all(self) -> None:
        self.progress(f"booting every node into {self.meta['default_build']} (measured boot + event log)")
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda n: self._boot(n, n.build, reset=False), self.fast_nodes))
        for node in self.real_nodes:
            realnodes.install(self, node)
        if self.real_nodes:
            realnodes.boot(self, self.real_nodes)

    def _read_boot_dir(self, node: Node) -> tuple[str, dict[str, bytes]]:
        """What the node's boot loader would load: the `next` build's artifacts, as they are on disk."""
        boot = self.boot_dir(node)
        try:
            with open(os.path.join(boot, "next")) as fh:
                build = fh.read().strip()
        except OSError:
            build = node.build
        contents = {}
        for artifact in ARTIFACTS:
            path = os.path.join(boot, build, artifact)
            try:
                with open(path, "rb") as fh:
                    contents[artifact] = fh.read()
            except OSError:
                raise LabError(f"{node.name} cannot boot {build}: {path} is missing (the node would not come up)") from None
        return build, contents

    def _boot(self, node: Node, build: str, reset: bool, contents: dict[str, bytes] | None = None) -> None:
        """Measure build's boot chain into node's TPM and write the matching event log.

        contents: the artifacts' bytes as the boot loader read them (default: the lab's own
        copy of build), so what was deployed is what gets measured."""
        if reset:
            tpm.power_cycle(self.tpm_socket(node))
        writer = EventLogWriter(list(tpm.BANKS))
        measurements = []
        for pcr, event_type, measured, data in boot_events(build, node.model, contents):
            digests = writer.digests_of(measured)
            writer.add_digests(pcr, event_type, digests, data)
            measurements.append((pcr, digests))
        if node.implant:
            rogue = b"persistent rogue kernel module of " + node.name.encode()
            digests = {bank: hashlib.new(bank, rogue).digest() for bank in tpm.BANKS}
            writer.add_digests(TAMPER_PCR, "EV_EFI_BOOT_SERVICES_APPLICATION", digests, image_load_event(len(rogue)))
            measurements.append((TAMPER_PCR, digests))
        tpm.extend(self.tpm_socket(node), measurements)
        tpm.disable_platform_hierarchy(self.tpm_socket(node))  # as firmware does before the OS
        # What was measured is what runs: the boot installs the service it measured, where only
        # root may change it, and the TVMM user's forced command runs that file.
        service = contents["tvmm-service"] if contents is not None else artifact_bytes(build, "tvmm-service")
        _write_world_readable(self.service_dir(node, SERVICE_FILE), service)
        _write_world_readable(self.node_dir(node, "eventlog.bin"), writer.to_bytes())
        self._start_service(node)
        cmdline = contents["cmdline"] if contents is not None else artifact_bytes(build, "cmdline")
        _write_world_readable(self.node_dir(node, "cmdline"), cmdline + b"\n")  # the node's /proc/cmdline
        node.build = build
        node.boots += 1
        node.tampered = 0
        node.modified = contents is not None and any(contents[a] != artifact_bytes(build, a) for a in ARTIFACTS)

    def restart_service(self, name: str) -> Node:
        """Start a fast node's TVMM service again, so it reads its configuration again (what a
        machine does at a boot: a test that swaps the node's TPM changes that file)."""
        with self.locked():
            self.load()
            node = self.node(name)
            if node.real_boot:
                raise LabError(f"{name} is a real-boot node: its init starts the service (`tccdeploy lab reboot {name}`)")
            self._start_service(node)
            self.save()
            return node

    def _start_service(self, node: Node) -> None:
        """Start the booted TVMM service as the TVMM user, as the node's init would (its earlier
        one stopped with everything else on the node at the reboot)."""
        if procs.belongs(node.service_pid, self.dir):
            procs.stop([*procs.children(node.service_pid), node.service_pid])  # type: ignore[list-item]
        user = pwd.getpwnam(TVMM_USER)
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                self.meta["python"], self.service_dir(node, SERVICE_FILE), "daemon",
                "--socket", self.service_socket(node), "--config", self.service_dir(node, "config.json")]
        proc = procs.spawn(argv, self.node_dir(node, "service.log"))
        node.service_pid = proc.pid
        deadline = time.monotonic() + 30
        while not os.path.exists(self.service_socket(node)):  # until then sessions are served alone
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the TVMM service of {node.name} did not start: {_tail(self.node_dir(node, 'service.log'))}")
            time.sleep(0.02)

    def _start_sshds(self) -> None:
        self.progress("starting sshd for every node")
        started = [(node, self._spawn_sshd(node)) for node in self.fast_nodes]
        for node, proc in started:
            self._wait_sshd(node, proc)

    def _spawn_sshd(self, node: Node) -> subprocess.Popen:
        proc = procs.spawn([SSHD, "-D", "-e", "-f", self.node_dir(node, "sshd_config")], self.node_dir(node, "sshd.log"))
        node.sshd_pid = proc.pid
        node.ssh = "running"
        self.save()
        return proc

    def _wait_sshd(self, node: Node, proc: subprocess.Popen) -> None:
        if not procs.wait_listening(node.address, self.ssh_port, proc):
            raise LabError(f"sshd of {node.name} did not start on {node.address}:{self.ssh_port}: "
                           f"{_tail(self.node_dir(node, 'sshd.log'))}")

    def _write_known_hosts(self) -> None:
        lines = []
        for node in self.nodes:
            with open(self.node_dir(node, "ssh_host_ed25519_key.pub")) as fh:
                key_type, key = fh.read().split()[:2]
            host = node.address if self.ssh_port == 22 else f"[{node.address}]:{self.ssh_port}"
            lines.append(f"{host} {key_type} {key}\n")
        with open(self.known_hosts, "w") as fh:
            fh.writelines(lines)

    def _write_manifests(self) -> None:
        os.makedirs(self.path("manifests", "builds"), exist_ok=True)
        os.makedirs(self.path("manifests", "platforms"), exist_ok=True)
        sites = []
        for s in range(1, int(self.meta["sites"]) + 1):
            site: dict = {"name": f"site{s}", "networks": [f"127.{self.meta['lab_index']}.{s}.0/24"]}
            tag = asset_tag_value(s)
            if tag:
                site["assetTag"] = {"nvIndex": f"0x{ASSET_TAG_INDEX:08x}", "value": tag}
            sites.append(site)
        perimeter = {
            "apiVersion": "tccdeploy/v1",
            "kind": "Perimeter",
            "metadata": {"name": "lab", "description": f"the local lab in {self.dir}"},
            "spec": {
                "sites": sites,
                "manufacturerCAs": [{"name": "lab-tpm-vendor", "certificate": "../ca/manufacturer/cert.pem"}],
                "attestation": {"bank": "sha256", "pcrs": list(self.policy_pcrs), "runtimePcr": 15, "maxQuoteAgeSeconds": 300,
                                "intervalSeconds": 60, "onFailure": "evacuate"},
            },
        }
        _write_yaml(self.path("manifests", "perimeter.yml"), perimeter, "perimeter.schema.json")
        self._write_roster()
        for build in LAB_BUILDS:
            _write_yaml(self.path("manifests", "builds", f"{build.name}.yml"),
                        build_manifest(build, artifact_dir="../../artifacts"), "tvmmbuild.schema.json")
        for platform in LAB_PLATFORMS:
            _write_yaml(self.path("manifests", "platforms", f"{platform.name}.yml"), platform_manifest(platform),
                        "platform.schema.json")
        if self.real_nodes:
            builds, platform = realnodes.manifests(self, self.real_nodes[0])
            for build in builds:
                _write_yaml(self.path("manifests", "builds", f"{build['metadata']['name']}.yml"), build,
                            "tvmmbuild.schema.json")
            _write_yaml(self.path("manifests", "platforms", f"{realnodes.PLATFORM}.yml"), platform, "platform.schema.json")

    @property
    def policy_pcrs(self) -> tuple[int, ...]:
        """The perimeter's PCR selection: the lab's, and every firmware PCR when real-boot nodes
        are in the lab (their firmware measures into PCRs 0-7, their boot chain 4, 9 and 12)."""
        return realnodes.POLICY_PCRS if self.real_nodes else POLICY_PCRS

    def _write_roster(self) -> None:
        """The TC operator's roster: every machine racked in a site (the outside hosts are not),
        by its EK certificate's fingerprint, under its node name."""
        from ..coordinator.roster import ek_identities

        sites: dict[str, list[dict]] = {}
        for node in self.nodes:
            if node.site is None:
                continue
            certificate = realnodes.ek_certificate(self, node) if node.real_boot else tpm.ek_certificate(self.tpm_socket(node))
            ek = ek_identities(certificate)[0]
            sites.setdefault(node.site, []).append({"ek": ek, "name": node.name})
        roster = {"apiVersion": "tccdeploy/v1", "kind": "NodeRoster",
                  "metadata": {"name": "lab", "description": "the machines racked in the lab's sites"},
                  "spec": {"sites": [{"name": s, "nodes": n} for s, n in sorted(sites.items())]}}
        _write_yaml(self.path("manifests", "roster.yml"), roster, "noderoster.schema.json")

    def _write_inventory(self) -> None:
        os.makedirs(self.path("inventory", "group_vars"), exist_ok=True)
        children: dict = {}
        for node in self.nodes:
            group = children.setdefault(node.group, {"hosts": {}})
            if node.site and "vars" not in group:
                group["vars"] = {"tcc_site": node.site}
            group["hosts"][node.name] = {"ansible_host": node.address, "tcc_python": "/usr/bin/python3",
                                         "tcc_boot_dir": realnodes.BOOT_DIR} if node.real_boot \
                else {"ansible_host": node.address, "tcc_boot_dir": self.boot_dir(node),
                      "tcc_proc_cmdline": self.node_dir(node, "cmdline")}
        # Put the vars first in each group, as people write them.
        ordered = {g: ({"vars": b["vars"]} if "vars" in b else {}) | {"hosts": b["hosts"]} for g, b in children.items()}
        _write_yaml(self.path("inventory", "hosts.yml"), {"all": {"children": ordered}}, "inventory.schema.json")
        common = {
            "ansible_port": self.ssh_port,
            "ansible_user": LAB_USER,
            "tcc_tvmm_user": TVMM_USER,
            "ansible_ssh_private_key_file": self.ssh_key,
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes",
            "tcc_known_hosts": self.known_hosts,
            "tcc_python": self.meta["python"],
            "tcc_build": self.meta["default_build"],
            # Out of band, from the controller, as an IPMI power cycle would be.
            "tcc_reboot_command": f"{sys.executable} -m tccdeploy lab reboot --dir {self.dir} --next-boot "
                                  "{{ inventory_hostname }}",
            "tcc_capacity": 4,
        }
        _write_yaml(self.path("inventory", "group_vars", "all.yml"), common, "hostvars.schema.json")

    # -- down ---------------------------------------------------------------------------
    def down(self) -> list[int]:
        """Stop everything the lab started (by PID) and remove its directory. Safe to repeat."""
        if not os.path.isdir(self.dir):
            return []
        if not self.exists() and not os.path.isfile(self.path(".lock")) and not os.path.isdir(self.path("nodes")):
            raise LabError(f"{self.dir} is not a lab directory (no {STATE_FILE}); not removing it")
        with self.locked():
            try:
                self.load()
            except LabError:
                self.nodes = []
            return self._teardown()

    def _teardown(self) -> list[int]:
        stopped: set[int] = set()
        # A crashed `up` may leave swtpm_setup still spawning helpers: sweep until nothing is left.
        for _ in range(10):
            pids: set[int] = set()
            for node in self.nodes:
                for pid in (node.sshd_pid, node.swtpm_pid, node.qemu_pid, node.service_pid):
                    if procs.belongs(pid, self.dir):
                        pids.add(pid)  # type: ignore[arg-type]
            pids.update(p for p in procs.processes_mentioning(self.dir) if _is_lab_process(p))
            for pid in list(pids):
                pids.update(procs.children(pid))
            pids -= {os.getpid()}
            if not pids:
                break
            left = procs.stop(sorted(pids))
            if left:
                raise LabError(f"could not stop PIDs {left}; stop them by hand, then run lab down again")
            stopped |= pids
        shutil.rmtree(self.dir, ignore_errors=True)
        return sorted(stopped)

    # -- status and faults ----------------------------------------------------------------
    def status(self) -> list[dict]:
        rows = []
        for node in self.nodes:
            sshd_up = procs.belongs(node.qemu_pid if node.real_boot else node.sshd_pid, self.dir)
            tpm_up = procs.belongs(node.swtpm_pid, self.dir)
            state = node.state
            if not tpm_up or (node.ssh == "running" and not sshd_up):
                state = "down"
            rows.append({
                "name": node.name, "address": node.address, "site": node.site or "-",
                "sshd_pid": node.sshd_pid if sshd_up else None, "swtpm_pid": node.swtpm_pid if tpm_up else None,
                "build": node.build, "state": state, "rogue_tpm": node.rogue_tpm, "boots": node.boots,
            })
        return rows

    def pcrs(self, name: str) -> list[dict]:
        """Each policy PCR as the TPM reports it next to the replay of the node's event log."""
        from ..eventlog import parse_file

        node = self.node(name)
        if node.real_boot:
            raise LabError(f"{name} is a real-boot node: its TPM is the guest's; `tccdeploy attest {name}` reads it "
                           "through a quote")
        live = tpm.read_pcrs(self.tpm_socket(node), "sha256", list(POLICY_PCRS))
        replayed = parse_file(self.node_dir(node, "eventlog.bin")).replay("sha256", list(POLICY_PCRS))
        return [
            {"pcr": p, "tpm": live[p].hex(), "eventlog": replayed[p].hex(), "match": live[p] == replayed[p]}
            for p in POLICY_PCRS
        ]

    def _node_processes(self, node: Node) -> list[int]:
        """What runs "on" a node besides its TPM: sshd and its sessions, and any process (QEMU,
        helpers) whose command line names the node's directory."""
        pids: set[int] = set()
        if procs.belongs(node.sshd_pid, self.dir):
            pids.add(node.sshd_pid)  # type: ignore[arg-type]
            pids.update(procs.children(node.sshd_pid))  # type: ignore[arg-type]
        ndir = self.node_dir(node) + os.sep
        for pid in procs.processes_mentioning(ndir):
            if pid != node.swtpm_pid and _is_lab_process(pid):
                pids.add(pid)
                pids.update(procs.children(pid))
        return sorted(pids)

    def reboot(self, name: str, build: str | None = None, next_boot: bool = False) -> Node:
        """Reboot a node: everything on it stops, its TPM resets, it boots `build` (default: the
        same), or with next_boot what its boot directory says (as `tcc_reboot_command` does)."""
        with self.locked():
            self.load()
            node = self.node(name)
            if node.real_boot:
                if build is not None and build != node.build:
                    raise LabError(f"{name} is a real-boot node: it boots what its ESP holds, not a lab build "
                                   "(install another with tvmm_deploy, then `lab reboot --next-boot`)")
                realnodes.reboot(self, [node], next_boot=next_boot)
                self.save()
                return node
            contents = None
            if next_boot:
                build, contents = self._read_boot_dir(node)
            elif build is not None:
                try:
                    lab_build(build)
                except KeyError:
                    raise LabError(f"unknown build {build!r}; lab builds: {', '.join(b.name for b in LAB_BUILDS)}") from None
            if node.frozen:
                raise LabError(f"{name} is frozen; `tccdeploy lab thaw {name}` first")
            procs.stop(self._node_processes(node))
            self._boot(node, build or node.build, reset=True, contents=contents)
            proc = self._spawn_sshd(node)
            self._wait_sshd(node, proc)
            self.save()
            return node

    def power_cycle(self, names: list[str]) -> list[Node]:
        """Cut the power of several real-boot nodes at once and boot them again (in parallel)."""
        with self.locked():
            self.load()
            nodes = [self.node(name) for name in names]
            fast = [n.name for n in nodes if not n.real_boot]
            if fast:
                raise LabError(f"{', '.join(fast)}: not real-boot node(s); use `tccdeploy lab reboot`")
            realnodes.reboot(self, nodes)
            self.save()
            return nodes

    def tamper(self, name: str, hide: bool = False, persistent: bool = False, boot: str | None = None) -> Node:
        """Measure an extra, rogue component into PCR 4 (logged, unless hide: then the log lies).

        persistent: an implant in the boot chain instead, dormant until the next boot and measured
        at every boot from then on, so the node attests fine now and fails after a reboot."""
        with self.locked():
            self.load()
            node = self.node(name)
            if node.real_boot or boot is not None:
                if not node.real_boot:
                    raise LabError(f"{name} is not a real-boot node: --boot tampers with what a real-boot node boots")
                if boot is None:
                    raise LabError(f"{name} is a real-boot node: say what to change with --boot "
                                   f"({', '.join(realnodes.TAMPERS)}), then `tccdeploy lab reboot {name}`")
                realnodes.tamper(self, node, boot)
                self.save()
                return node
            if persistent:
                node.implant = True
                self.save()
                return node
            rogue = b"rogue kernel module " + os.urandom(16)
            digests = {bank: hashlib.new(bank, rogue).digest() for bank in tpm.BANKS}
            tpm.extend(self.tpm_socket(node), [(TAMPER_PCR, digests)])
            if not hide:
                path = self.node_dir(node, "eventlog.bin")
                with open(path, "rb") as fh:
                    raw = fh.read()
                writer = EventLogWriter(list(tpm.BANKS))
                writer.add_digests(TAMPER_PCR, "EV_EFI_BOOT_SERVICES_APPLICATION", digests, image_load_event(len(rogue)))
                _write_world_readable(path, raw + writer.to_bytes()[len(writer.header()):])
            node.tampered += 1
            self.save()
            return node

    def reset(self, name: str) -> Node:
        """Undo every fault on a node: thaw it, start its sshd, reboot it into the lab's build (a
        real-boot node: its ESP written again from the build's files, then rebooted)."""
        self.load()
        node = self.node(name)
        if node.real_boot:
            with self.locked():
                self.load()
                node = self.node(name)
                realnodes.restore(self, node)
                self.save()
            return self.reboot(name)
        if node.frozen:
            self.thaw(name)
        if node.ssh != "running" or not procs.belongs(node.sshd_pid, self.dir):
            self.start_ssh(name)
        self.load()
        node = self.node(name)
        default = self.meta["default_build"]
        with open(os.path.join(self.boot_dir(node), "next"), "w") as fh:
            fh.write(default + "\n")
        if node.tampered or node.implant or node.modified or node.build != default:
            with self.locked():
                self.load()
                self.node(name).implant = False
                self.save()
            node = self.reboot(name, default)
        tpm.reset_lockout(self.tpm_socket(node))
        return node

    def stop_ssh(self, name: str) -> Node:
        with self.locked():
            self.load()
            node = self.node(name)
            if procs.belongs(node.sshd_pid, self.dir):
                procs.stop([node.sshd_pid, *procs.children(node.sshd_pid)])  # type: ignore[list-item]
            node.ssh = "stopped"
            node.sshd_pid = None
            self.save()
            return node

    def start_ssh(self, name: str) -> Node:
        with self.locked():
            self.load()
            node = self.node(name)
            if procs.belongs(node.sshd_pid, self.dir):
                return node
            proc = self._spawn_sshd(node)
            self._wait_sshd(node, proc)
            self.save()
            return node

    def freeze(self, name: str) -> Node:
        """SIGSTOP the node's sshd, sessions, TPM and VMs: connections hang rather than fail."""
        with self.locked():
            self.load()
            node = self.node(name)
            pids = self._node_processes(node)
            if procs.belongs(node.swtpm_pid, self.dir):
                pids.append(node.swtpm_pid)  # type: ignore[arg-type]
            procs.signal_all(pids, signal.SIGSTOP)
            node.frozen = sorted(set(node.frozen) | set(pids))
            self.save()
            return node

    def thaw(self, name: str) -> Node:
        with self.locked():
            self.load()
            node = self.node(name)
            procs.signal_all([p for p in node.frozen if procs.alive(p)], signal.SIGCONT)
            node.frozen = []
            self.save()
            return node


# -- helpers ---------------------------------------------------------------------------


def _preflight(nodes: list[Node], ssh_port: int) -> None:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(f"{SSHD} (Debian package openssh-server)")
    if missing:
        raise LabError("missing: " + ", ".join(missing) + "; run scripts/install (or apt-get install them)")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it runs sshd and creates the lab user); run it as root")
    busy = []
    for node in nodes:
        if not procs.port_free(node.address, ssh_port):
            busy.append(f"{node.address}:{ssh_port}")
    if busy:
        raise LabError(
            f"address(es) already in use: {', '.join(busy[:5])}{' ...' if len(busy) > 5 else ''}; "
            "another lab may be running (use --lab-index for a second lab) or another program holds the port"
        )


def _check_reachable(directory: str) -> None:
    """The lab user must reach the node folders (sshd reads keys as that user; the helper works there)."""
    parent = os.path.dirname(directory)
    while True:
        try:
            mode = os.stat(parent).st_mode
        except FileNotFoundError:
            parent = os.path.dirname(parent)
            continue
        if not mode & 0o001:
            raise LabError(
                f"{parent} is not traversable by other users, so the lab user cannot reach {directory}; "
                "put the lab in a folder whose parents are world-traversable (e.g. --dir /var/tmp/tccdeploy-lab)"
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


USERS_LOCK = "/run/lock/tccdeploy-lab-users.lock"


def _ensure_user(name: str, home: str, shell: str, comment: str, mode: int) -> pwd.struct_passwd:
    """A system user for the lab, created once (no password, but not locked: key login works),
    in the kvm group where there is one; left for later labs. Two labs coming up at once (two
    test workers, two operators) take a machine-wide lock: useradd refuses a user another
    useradd is creating, and both edit /etc/passwd."""
    os.makedirs(os.path.dirname(USERS_LOCK), exist_ok=True)
    fd = os.open(USERS_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            pwd.getpwnam(name)
        except KeyError:
            os.makedirs(os.path.dirname(home), mode=0o755, exist_ok=True)
            _run(["useradd", "--system", "--home-dir", home, "--no-create-home", "--shell", shell, "--comment", comment,
                  name])
            _run(["usermod", "--password", "*", name])
        entry = pwd.getpwnam(name)
        os.makedirs(home, mode=mode, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        if os.path.exists("/dev/kvm") and name not in _kvm_members():
            subprocess.run(["usermod", "-a", "-G", "kvm", name], capture_output=True)
    finally:
        os.close(fd)
    return entry


def _kvm_members() -> list[str]:
    import grp

    try:
        return list(grp.getgrnam("kvm").gr_mem)
    except KeyError:
        return []


def ensure_lab_user() -> None:
    """The admin login of every lab node, with empty shell start-up files: root's ~/.bashrc on
    these machines runs `pyenv init` (0.25 s per SSH command)."""
    _ensure_user(LAB_USER, LAB_HOME, "/bin/bash", "tccdeploy lab node login", 0o755)
    for rc in (".bashrc", ".profile", ".bash_profile"):
        path = os.path.join(LAB_HOME, rc)
        if not os.path.exists(path) or os.path.getsize(path):
            with open(path, "w"):
                pass


def ensure_tvmm_user() -> None:
    """The TVMM user of every lab node: owns the nodes' TPM sockets, the service's state and the
    VMs; logs in only through the service's forced command. /bin/sh: no start-up files run."""
    _ensure_user(TVMM_USER, TVMM_HOME, "/bin/sh", "tccdeploy lab TVMM service", 0o700)


def _default_python() -> str:
    return sys.executable


def _check_python(python: str) -> None:
    """The TVMM service runs as the TVMM user under this Python; it must be able to import tpm2_pytss."""
    proc = subprocess.run(
        ["runuser", "-u", TVMM_USER, "--", python, "-c", "import tpm2_pytss, cryptography"],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(
            f"the TVMM user {TVMM_USER!r} cannot run {python} with tpm2_pytss ({reason}); the nodes' Python must be "
            "readable by that user: create .venv from /usr/bin/python3 (scripts/install does), or pass --python"
        )


def _provision_asset_tag(sock: str, value: str) -> None:
    """Write the site's asset tag at racking time, as platform firmware or the TC's provisioning
    does: a platform-created NV index, written once and locked for good (WRITEDEFINE), which the
    OS owner (the provider's root) can neither create nor rewrite."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC

    data = value.encode()
    attrs = (TPMA_NV.PLATFORMCREATE | TPMA_NV.PPWRITE | TPMA_NV.WRITEDEFINE | TPMA_NV.PPREAD | TPMA_NV.OWNERREAD
             | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA)
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(nvIndex=ASSET_TAG_INDEX, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=len(data))
    )
    with ESAPI(tpm.tcti(sock)) as esys:
        handle = esys.nv_define_space(None, public, auth_handle=ESYS_TR.PLATFORM)
        esys.nv_write(handle, data, 0, auth_handle=ESYS_TR.PLATFORM)
        esys.nv_write_lock(handle, auth_handle=ESYS_TR.PLATFORM)


def _is_lab_process(pid: int) -> bool:
    argv0 = os.path.basename(procs.cmdline(pid).split(" ", 1)[0])
    return argv0.startswith(("sshd", "swtpm", "qemu-system", "python", "tccdeploy", "ssh-keygen", "certtool"))


def _write_world_readable(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_yaml(path: str, data: dict, schema: str) -> None:
    with open(path, "w") as fh:
        fh.write(f"# Written by `tccdeploy lab up`; schema: schemas/{schema}\n")
        yaml.safe_dump(data, fh, sort_keys=False, width=120)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{argv[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as fh:
            return " | ".join(fh.read().strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"
