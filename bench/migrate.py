"""Benchmark: encrypted migration and containment, each against its peer in the same run.

1. STREAM encryption throughput (64 KiB chunks, AES-256-GCM) against `openssl speed -evp
   aes-256-gcm` (16 KiB blocks) on this CPU: the ceiling for the cipher itself.
2. Migrating the same 64 MiB VM between two lab nodes: `tccdeploy migrate` (destination
   re-attested, keys re-wrapped, stream encrypted and relayed as ciphertext, disk copied
   encrypted) against plain QEMU migration through `ssh cat` into the destination's
   `-incoming` (no attestation, no encryption beyond SSH), with the plain disk copied by scp.
3. Migrating a VM with 1 GiB of dirty RAM (--dirty-mib): the guest (bench/fillram.S, a boot
   sector) fills its RAM with xorshift32 output, so QEMU sends every page, and the same guest is
   migrated by `tccdeploy migrate` and by plain QEMU through `ssh cat`. Both run under TCG:
   under this machine's nested KVM a guest's first write to a page costs about 11 ms (measured:
   90 pages/s), so filling 1 GiB in a KVM guest would take 48 minutes; TCG fills it in 2 s, and
   the migration stream does not depend on the accelerator. For the TVMM service to choose TCG,
   /dev/kvm is made 0600 (root only) for this part and restored after.
4. Containment: from `lab tamper` on a node running a VM to the node quarantined and the VM
   powered off, in one enforcement round (a node whose boot changed cannot open the TC's
   migration key, so its VMs are stopped, not moved).
Run: .venv/bin/python bench/migrate.py [--dirty-mib 1024] [--json]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tccdeploy.coordinator.identity import init as tc_init  # noqa: E402
from tccdeploy.coordinator.identity import load as tc_load  # noqa: E402
from tccdeploy.coordinator.service import Coordinator  # noqa: E402
from tccdeploy.crypto import bundle as bundles  # noqa: E402
from tccdeploy.crypto import customer  # noqa: E402
from tccdeploy.crypto.request import sign_request  # noqa: E402
from tccdeploy.crypto.stream import Encryptor  # noqa: E402
from tccdeploy.engine.attestation import attest, enroll  # noqa: E402
from tccdeploy.engine.enforce import enforce_round  # noqa: E402
from tccdeploy.engine.launch import launch  # noqa: E402
from tccdeploy.engine.migrate import migrate  # noqa: E402
from tccdeploy.engine.runner import Engine  # noqa: E402
from tccdeploy.lab.lab import Lab  # noqa: E402
from tccdeploy.manifest.loader import (
    load_inventory,  # noqa: E402
    load_manifests,  # noqa: E402
)
from tccdeploy.tvmm.qmp import QMP  # noqa: E402


def stream_throughput() -> tuple[float, float]:
    # As the node's service encrypts a migration: 1 MiB reads sealed into one reused buffer.
    data = memoryview(os.urandom(256 * 1024 * 1024))
    enc = Encryptor(os.urandom(32))
    out = bytearray(enc.output_size(2 << 20))
    start = time.perf_counter()
    for i in range(0, len(data), 1 << 20):
        enc.update_into(data[i:i + (1 << 20)], out)
    enc.finish()
    ours = len(data) / (time.perf_counter() - start) / 1e6
    out = subprocess.run(["openssl", "speed", "-seconds", "2", "-evp", "aes-256-gcm"], capture_output=True, text=True).stdout
    line = next(row for row in out.splitlines() if row.startswith("AES-256-GCM"))
    peer = float(re.findall(r"([\d.]+)k", line)[-1]) * 1000 / 1e6
    return ours, peer


def ssh(lab: Lab, node, command: str, stdin=None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(["ssh", "-F", "/dev/null", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(lab.ssh_port),
                           f"tccnode@{node.address}", command], capture_output=True, text=True, check=True, stdin=stdin)


FILL_END, FILL_DONE = 0x1F0, 0x7DF4


def fill_image(work: str, dirty_mib: int) -> str:
    """A raw disk whose boot sector fills dirty_mib MiB of RAM above 1 MiB (bench/fillram.S)."""
    obj, binary, disk = (os.path.join(work, name) for name in ("fillram.o", "fillram.bin", "fill.raw"))
    subprocess.run(["as", "--32", "-o", obj, str(Path(__file__).with_name("fillram.S"))], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", binary, obj], check=True)
    sector = bytearray(Path(binary).read_bytes())
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa", "fillram.S did not assemble to a boot sector"
    sector[FILL_END:FILL_END + 4] = (0x100000 + dirty_mib * 1024 * 1024).to_bytes(4, "little")
    with open(disk, "wb") as fh:
        fh.write(sector)
        fh.truncate(8 * 1024 * 1024)
    return disk


def wait_filled(qmp_socket: str, timeout: float = 300) -> float:
    """Seconds until the guest says its RAM is filled (its flag byte, read over QMP)."""
    qmp = QMP(qmp_socket)
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout:
            shown = qmp.execute("human-monitor-command", **{"command-line": f"xp /1bx {FILL_DONE:#x}"})
            if shown.strip().endswith("0x01"):
                return time.monotonic() - start
            time.sleep(0.2)
    finally:
        qmp.close()
    raise SystemExit(f"the guest did not fill its RAM in {timeout:.0f} s")


class TCGOnly:
    """/dev/kvm readable by root only while in use, so the nodes' TVMM services choose TCG."""

    def __enter__(self) -> TCGOnly:
        self.mode = os.stat("/dev/kvm").st_mode & 0o777 if os.path.exists("/dev/kvm") else None
        if self.mode is not None:
            os.chmod("/dev/kvm", 0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            os.chmod("/dev/kvm", self.mode)


def plain_migration(lab: Lab, work: str, image: str | None = None, memory_mib: int = 64, accel: str = "kvm") -> float:
    """QEMU to QEMU through `ssh cat`, relayed by the controller as tccdeploy's engine relays:
    source QEMU -> fifo -> ssh cat | ssh cat -> fifo -> destination QEMU -incoming."""
    src, dst = lab.node("node1"), lab.node("node2")
    base = f"{lab.node_dir(src, 'home')}/plain"
    dbase = f"{lab.node_dir(dst, 'home')}/plain"
    if image:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", image, f"{work}/plain.qcow2"], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{work}/plain.qcow2", "8M"], check=True)
    for node, folder in ((src, base), (dst, dbase)):
        ssh(lab, node, f"rm -rf {folder}; mkdir -p {folder} && mkfifo {folder}/fifo")
    subprocess.run(["install", "-o", "tccnode", "-m", "0600", f"{work}/plain.qcow2", f"{base}/disk.qcow2"], check=True)
    common = f"qemu-system-x86_64 -machine pc -accel {accel} -m {memory_mib} -nodefaults -display none -daemonize"
    ssh(lab, src, f"{common} -drive file={base}/disk.qcow2,if=virtio -qmp unix:{base}/qmp.sock,server=on,wait=off -pidfile {base}/pid")
    if image:
        wait_filled(f"{base}/qmp.sock")
    start = time.perf_counter()
    copy = f"ssh -F /dev/null -i {lab.ssh_key} -o UserKnownHostsFile={lab.known_hosts} -o BatchMode=yes -p {lab.ssh_port}"
    subprocess.run(f"{copy} tccnode@{src.address} 'cat {base}/disk.qcow2' | {copy} tccnode@{dst.address} "
                   f"'cat > {dbase}/disk.qcow2'", shell=True, check=True)
    ssh(lab, dst, f"{common} -drive file={dbase}/disk.qcow2,if=virtio -qmp unix:{dbase}/qmp.sock,server=on,wait=off "
                  f"-pidfile {dbase}/pid -incoming defer")
    qmp_dst = QMP(f"{dbase}/qmp.sock")
    qmp_dst.execute("migrate-incoming", uri=f"exec:cat {dbase}/fifo")
    relay = subprocess.Popen(f"{copy} tccnode@{src.address} 'cat {base}/fifo' | {copy} tccnode@{dst.address} "
                             f"'cat > {dbase}/fifo'", shell=True)
    qmp_src = QMP(f"{base}/qmp.sock")
    qmp_src.execute("stop")
    qmp_src.execute("migrate", uri=f"exec:cat > {base}/fifo")
    deadline = time.monotonic() + 600
    while qmp_src.execute("query-migrate").get("status") not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.01)
    qmp_src.close()
    relay.wait(timeout=600)
    while qmp_dst.execute("query-status")["status"] == "inmigrate" and time.monotonic() < deadline:
        time.sleep(0.01)
    qmp_dst.execute("cont")
    elapsed = time.perf_counter() - start
    qmp_dst.execute("quit")
    qmp_dst.close()
    for node, folder in ((src, base), (dst, dbase)):
        ssh(lab, node, f"kill $(cat {folder}/pid) 2>/dev/null; rm -rf {folder}")
    return elapsed


def dirty_migration(lab: Lab, engine: Engine, tc: Coordinator, work: str, dirty_mib: int) -> dict[str, float]:
    """The same guest with dirty_mib MiB of dirty RAM, migrated node1 -> node2 by tccdeploy and by
    plain QEMU through ssh cat (both under TCG, see the docstring)."""
    image = fill_image(work, dirty_mib)
    memory = dirty_mib + 64
    key = os.path.join(work, "customer.pem")
    bundles.seal(image, bundles.load_tc(os.path.join(work, "tc.pem")), customer.load(key), os.path.join(work, "big.sealed"),
                 "big")
    Path(work, "big.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: big}\n"
                                     f"spec: {{image: big.sealed, vcpus: 1, memoryMiB: {memory}}}\n")
    envelope = sign_request(os.path.join(work, "big.yml"), key)
    node = launch(engine, tc, envelope, envelope["bundle"]).node
    vm_id = tc.registry.vm("big")["vm_id"]
    filled = wait_filled(lab.node_dir(lab.node(node), "tvmm", "vms", vm_id, "qmp.sock"))
    start = time.perf_counter()
    moved = migrate(engine, tc, "big", "auto")  # a trusted node (containment quarantined one)
    ours = time.perf_counter() - start
    plain = plain_migration(lab, work, image, memory, "tcg")
    return {"dirty_mib": dirty_mib, "fill_s": round(filled, 1), "migrate_dirty_s": round(ours, 2),
            "plain_dirty_s": round(plain, 2), "dirty_ratio": round(ours / plain, 2),
            "ciphertext_mib": round(moved["ciphertext_bytes"] / 2**20, 1)}


def main() -> int:
    dirty_mib = int(sys.argv[sys.argv.index("--dirty-mib") + 1]) if "--dirty-mib" in sys.argv else 1024
    ours_stream, openssl_stream = stream_throughput()
    work = tempfile.mkdtemp(prefix="tccdeploy-bench-mig-")
    os.chmod(work, 0o755)
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-mig-lab-"))
    try:
        lab.up(nodes=3, sites=1, outside=0, lab_index=245)
        state = os.path.join(work, "tc")
        tc_init(state)
        Path(work, "tc.pem").write_text(tc_load(state).bundle_pem)
        manifests = load_manifests([lab.manifests_dir])
        tc = Coordinator.from_manifests(manifests, state)
        key, _ = customer.init(os.path.join(work, "customer.pem"))
        tc.add_customer("bench", customer.public_text(key.public_key()))
        raw = os.path.join(work, "disk.raw")
        with open(raw, "wb") as fh:
            fh.truncate(8 * 1024 * 1024)
        bundles.seal(raw, bundles.load_tc(os.path.join(work, "tc.pem")), key, os.path.join(work, "vm.sealed"), "vm")
        Path(work, "vm.yml").write_text("apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: vm}\n"
                                        "spec: {image: vm.sealed, vcpus: 1, memoryMiB: 64}\n")
        ours, plain = [], []
        with Engine(load_inventory(lab.inventory_dir).select("all"), state=state) as engine:
            engine.run(enroll(tc))
            engine.run(attest(tc, admit_nodes=True))
            envelope = sign_request(os.path.join(work, "vm.yml"), os.path.join(work, "customer.pem"))
            node = launch(engine, tc, envelope, envelope["bundle"]).node
            for target in ("node2", "node3", "node1"):
                if target == node:
                    continue
                start = time.perf_counter()
                migrate(engine, tc, "vm", target)
                ours.append(time.perf_counter() - start)
                node = target
            for _ in range(2):
                plain.append(plain_migration(lab, work))
            # containment: tamper the node running the VM; one round quarantines it and stops the VM
            running_on = tc.registry.vm("vm")["node"]
            lab.tamper(running_on)
            engine.sessions.pop(running_on).close()
            start = time.perf_counter()
            report = enforce_round(engine, tc)
            containment = time.perf_counter() - start
            moved = tc.registry.vm("vm")
            with TCGOnly():  # after containment: its figure is of one VM, as before
                dirty = dirty_migration(lab, engine, tc, work, dirty_mib) if dirty_mib else {}
        tc.close()
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    result = {"stream_mb_s": round(ours_stream, 1), "openssl_aes256gcm_mb_s": round(openssl_stream, 1),
              "migrate_s": round(statistics.median(ours), 2), "plain_ssh_cat_s": round(statistics.median(plain), 2),
              "migrate_ratio": round(statistics.median(ours) / statistics.median(plain), 2), **dirty,
              "containment_s": round(containment, 2), "vm_state": moved["state"],
              "quarantined": [q["node"] for q in report.quarantined]}
    if "--json" in sys.argv:
        print(json.dumps({"benchmark": "migrate", **result}))
        return 0
    print(f"STREAM encryption (64 KiB chunks)   {result['stream_mb_s']:8.1f} MB/s; openssl speed aes-256-gcm "
          f"(16 KiB) {result['openssl_aes256gcm_mb_s']:.1f} MB/s ({ours_stream / openssl_stream:.0%} of it)")
    print(f"migrating a 64 MiB VM: tccdeploy migrate {result['migrate_s']:.2f} s; plain QEMU through ssh cat "
          f"{result['plain_ssh_cat_s']:.2f} s (ratio {result['migrate_ratio']}x)")
    if dirty:
        print(f"migrating {dirty_mib} MiB of dirty RAM (TCG guests): tccdeploy migrate {dirty['migrate_dirty_s']:.2f} s "
              f"({dirty['ciphertext_mib']} MiB of ciphertext); plain QEMU through ssh cat {dirty['plain_dirty_s']:.2f} s "
              f"(ratio {dirty['dirty_ratio']}x)")
    print(f"containment: tamper -> node quarantined and VM {result['vm_state']} in one round: "
          f"{result['containment_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
