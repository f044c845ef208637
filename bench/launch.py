"""Benchmark: encrypted launch and sealing, each against its plain peer in the same run.

1. Request to VM running (the disk already on the node, as the issue asks: upload excluded):
   accept the signed request, placement, fresh re-attestation, key release, TPM unwrap, QEMU
   start with the LUKS disk opened over QMP; against plain `qemu-system-x86_64` starting the
   same image unencrypted on the same machine (to its QMP 'running').
2. Sealing throughput: `tccdeploy image seal` of a 256 MiB image against `qemu-img convert`
   of the same image to a LUKS qcow2 with seal's iteration time (the fair peer) and to plain qcow2.
3. Upload (--upload-mib, 1024 by default; 4096 for issue 20's figure): an encrypted disk of that
   size into a lab node's TVMM service (`upload_disk`: blocks on the service's session, then the
   node checks its digest) against plain `ssh cat > file` of the same file to the same node.
Run: .venv/bin/python bench/launch.py [--upload-mib N] [--seal-mib N] [--json]
(issue 20's 4 GiB figures: --upload-mib 4096 --seal-mib 4096)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
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
from tccdeploy.engine import launch as launching  # noqa: E402
from tccdeploy.engine.attestation import attest, enroll  # noqa: E402
from tccdeploy.engine.lifecycle import end_vm  # noqa: E402
from tccdeploy.engine.runner import Engine  # noqa: E402
from tccdeploy.lab.lab import Lab  # noqa: E402
from tccdeploy.manifest.loader import (
    load_inventory,  # noqa: E402
    load_manifests,  # noqa: E402
)
from tccdeploy.tvmm.qmp import QMP  # noqa: E402

REQUEST = "apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {{name: {name}}}\nspec: {{image: {image}, vcpus: 1, memoryMiB: 64}}\n"


def luks_convert(raw: str, target: str) -> float:
    """The fair peer of sealing: qemu-img convert to a LUKS qcow2 with seal's own iteration time
    and hash (the passphrase through a pipe, as seal passes Kvm), with nothing else (no digest,
    no wrap, no signature); its seconds."""
    for _attempt in range(10):
        read_end, write_end = os.pipe()
        os.write(write_end, base64.b64encode(os.urandom(32)))
        os.close(write_end)
        start = time.perf_counter()
        proc = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "--object",
                               f"secret,id=k,file=/dev/fd/{read_end}", "-o",
                               f"encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time={bundles.LUKS_ITER_TIME_MS},"
                               f"encrypt.hash-alg={bundles.LUKS_HASH}", raw, target],
                              pass_fds=(read_end,), capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        os.close(read_end)
        if proc.returncode == 0:
            return elapsed
        if not bundles.pbkdf_flake(proc.returncode, proc.stderr):
            raise SystemExit(f"qemu-img convert to LUKS failed: {proc.stderr.strip()}")
        if os.path.exists(target):
            os.unlink(target)
    raise SystemExit("qemu-img convert to LUKS kept failing to time its key derivation")


def plain_start(disk: str, work: str) -> float:
    qmp = os.path.join(work, "plain.sock")
    accel = "kvm" if os.access("/dev/kvm", os.W_OK) else "tcg"
    start = time.perf_counter()
    subprocess.run(["qemu-system-x86_64", "-machine", "pc", "-accel", accel, "-m", "64", "-nodefaults", "-display", "none",
                    "-drive", f"file={disk},format=qcow2,if=virtio", "-qmp", f"unix:{qmp},server=on,wait=off",
                    "-pidfile", os.path.join(work, "plain.pid"), "-daemonize"], check=True)
    client = QMP(qmp)
    assert client.execute("query-status")["status"] == "running"
    elapsed = time.perf_counter() - start
    client.execute("quit")
    client.close()
    return elapsed


def upload(lab: Lab, session, work: str, mib: int, rounds: int = 2) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds for upload_disk (stream, then the node's digest check), the digest check alone,
    plain `ssh cat` of the same file, and paramiko (the engine's SSH library) into cat: the best
    of rounds, each round running every way once, in turn. Every copy writes a new file and
    keeps it, as the service keeps the disk: on this machine (a VM) the page cache's first
    touch of memory never used before costs 2.4 s of CPU a GiB against 0.2 s for pages freed by
    a deleted file, so a copy deleted after each round would be measured on warm memory and the
    service's on cold."""
    import hashlib
    import secrets

    blob = os.path.join(work, "upload.bin")
    digest = hashlib.sha256()
    with open(blob, "wb") as fh:
        for _ in range(mib):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            fh.write(piece)
    node = lab.node(session.host.name)
    times: dict[str, list[float]] = {"ours": [], "check": [], "ssh_cat": [], "paramiko_cat": []}
    for number in range(rounds):
        vm_id = secrets.token_hex(16)
        start = time.perf_counter()
        launching.upload_disk(session, vm_id, blob, digest.hexdigest())
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        session.tvmm("disk_commit", {"vm_id": vm_id, "sha256": digest.hexdigest()}, timeout=600)  # whole: again
        times["check"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with open(blob, "rb") as fh:
            subprocess.run(["ssh", "-F", "/dev/null", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}",
                            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(lab.ssh_port),
                            f"tccnode@{node.address}", f"cat > upload-{number}.bin"], stdin=fh, check=True)
        times["ssh_cat"].append(time.perf_counter() - start)
        # the engine's own SSH library (paramiko) into the same `cat`, without the service
        connection = session.connection
        connection.connect()
        start = time.perf_counter()
        channel = connection.open_process(f"cat > upload-paramiko-{number}.bin")
        with open(blob, "rb") as fh:
            for piece in iter(lambda: fh.read(1 << 20), b""):
                channel.sendall(piece)
        channel.shutdown_write()
        if channel.recv_exit_status() != 0:
            raise SystemExit("paramiko cat failed")
        channel.close()
        times["paramiko_cat"].append(time.perf_counter() - start)
    # the copies' files sit in the lab user's home, which outlives the lab: removed here
    subprocess.run(["ssh", "-F", "/dev/null", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}",
                    "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(lab.ssh_port),
                    f"tccnode@{node.address}", "rm -f upload-*.bin upload-paramiko-*.bin"], check=True)
    os.unlink(blob)
    return {name: min(values) for name, values in times.items()}


def raw_image(path: str, mib: int) -> None:
    """A raw disk of mib MiB, its first quarter random data (so conversion has work to do), the
    rest a hole."""
    with open(path, "wb") as fh:
        fh.truncate(mib * 1024 * 1024)
        fh.seek(0)
        for _ in range(mib // 4 // 64):
            fh.write(os.urandom(64 * 1024 * 1024))


def seal_large(work: str, tc_keys, key, mib: int) -> dict:  # type: ignore[no-untyped-def]
    """One round of seal, qemu-img convert to LUKS qcow2 and to plain qcow2 at mib MiB (each
    file removed before the next is written: 4 GiB three times is a lot of disk)."""
    raw = os.path.join(work, "large.raw")
    raw_image(raw, mib)
    start = time.perf_counter()
    bundles.seal(raw, tc_keys, key, os.path.join(work, "large-seal"), "vm-large")
    sealed = time.perf_counter() - start
    shutil.rmtree(os.path.join(work, "large-seal"))
    luks = luks_convert(raw, os.path.join(work, "large-luks.qcow2"))
    os.unlink(os.path.join(work, "large-luks.qcow2"))
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(work, "large.qcow2")], check=True)
    plain = time.perf_counter() - start
    os.unlink(os.path.join(work, "large.qcow2"))
    os.unlink(raw)
    return {"large_seal_mib": mib, "large_seal_mib_s": round(mib / sealed, 1), "large_luks_mib_s": round(mib / luks, 1),
            "large_convert_mib_s": round(mib / plain, 1), "large_seal_vs_luks": round(sealed / luks, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-mib", type=int, default=1024, help="size of the upload measured (0: none)")
    parser.add_argument("--seal-mib", type=int, default=256,
                        help="also seal an image this large once, against its peers (256: only the 3 rounds at 256 MiB)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    upload_mib = args.upload_mib
    work = tempfile.mkdtemp(prefix="tccdeploy-bench-launch-")
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-launch-lab-"))
    large: dict = {}
    try:
        raw = os.path.join(work, "disk.raw")
        raw_image(raw, 256)
        state = os.path.join(work, "tc")
        tc_init(state)
        Path(work, "tc.pem").write_text(tc_load(state).bundle_pem)
        key, _ = customer.init(os.path.join(work, "customer.pem"))
        tc_keys = bundles.load_tc(os.path.join(work, "tc.pem"))
        seal_s, convert_s, luks_s = [], [], []
        for i in range(3):
            start = time.perf_counter()
            bundles.seal(raw, tc_keys, key, os.path.join(work, f"seal{i}"), f"vm{i}")
            seal_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(work, f"plain{i}.qcow2")], check=True)
            convert_s.append(time.perf_counter() - start)
            luks_s.append(luks_convert(raw, os.path.join(work, f"luks{i}.qcow2")))
        if args.seal_mib != 256:
            print(f"sealing {args.seal_mib} MiB once ...", file=sys.stderr, flush=True)
            large = seal_large(work, tc_keys, key, args.seal_mib)
        lab.up(nodes=1, sites=1, outside=0, lab_index=240)
        manifests = load_manifests([lab.manifests_dir])
        tc = Coordinator.from_manifests(manifests, state)
        tc.add_customer("bench", customer.public_text(key.public_key()))
        ours, plain = [], []
        steps: list[dict[str, float]] = []
        with Engine(load_inventory(lab.inventory_dir).select("all"), state=state) as engine:
            engine.run(enroll(tc))
            engine.run(attest(tc, admit_nodes=True))
            uploaded = launching.upload_disk

            def pre_uploaded(session, vm_id, local, sha256):  # type: ignore[no-untyped-def]
                return session.tvmm("disk_commit", {"vm_id": vm_id, "sha256": sha256})

            for i in range(3):
                request = Path(work, f"vm{i}.yml")
                request.write_text(REQUEST.format(name=f"vm{i}", image=f"seal{i}"))
                envelope = sign_request(str(request), os.path.join(work, "customer.pem"))
                descriptor = bundles.load(envelope["bundle"])["descriptor"]
                session = engine.session(engine.hosts[0])
                uploaded(session, descriptor["vm_id"], os.path.join(envelope["bundle"], "disk.qcow2"), descriptor["disk"]["sha256"])
                launching.upload_disk = pre_uploaded  # the disk is on the node: time the launch itself
                try:
                    start = time.perf_counter()
                    launched = launching.launch(engine, tc, envelope, envelope["bundle"])
                    ours.append(time.perf_counter() - start)
                    steps.append(launched.steps)
                finally:
                    launching.upload_disk = uploaded
                end_vm(session, tc, descriptor["vm_id"], session.host.name, "destroy")
                plain.append(plain_start(os.path.join(work, f"plain{i}.qcow2"), work))
            sent = upload(lab, engine.session(engine.hosts[0]), work, upload_mib) if upload_mib else None
        tc.close()
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    size = 256
    result = {
        "launch_s": round(statistics.median(ours), 3), "plain_qemu_start_s": round(statistics.median(plain), 3),
        "launch_ratio": round(statistics.median(ours) / statistics.median(plain), 1),
        "seal_mib_s": round(size / statistics.median(seal_s), 1), "qemu_img_convert_mib_s": round(size / statistics.median(convert_s), 1),
        "qemu_img_luks_mib_s": round(size / statistics.median(luks_s), 1),
        "seal_vs_luks": round(statistics.median(seal_s) / statistics.median(luks_s), 2),
        # where request -> running goes, median of each step (the node's own steps within "node launch")
        "launch_steps_s": {name: round(statistics.median(s.get(name, 0.0) for s in steps), 4) for name in steps[0]},
    }
    result.update(large)
    if sent:
        result.update({"upload_mib": upload_mib, "upload_mib_s": round(upload_mib / sent["ours"], 1),
                       "upload_digest_check_s": round(sent["check"], 2), "ssh_cat_mib_s": round(upload_mib / sent["ssh_cat"], 1),
                       "upload_ratio": round(sent["ours"] / sent["ssh_cat"], 2),
                       "paramiko_cat_mib_s": round(upload_mib / sent["paramiko_cat"], 1)})
    if args.json:
        print(json.dumps({"benchmark": "launch", **result}))
        return 0
    print("request to VM running (disk already on the node), median of 3:")
    print(f"  tccdeploy (accept, place, re-attest, release, TPM unwrap, QEMU + LUKS)  {result['launch_s']:6.3f} s")
    print(f"  plain qemu-system start of the same image, unencrypted                {result['plain_qemu_start_s']:6.3f} s"
          f"   ratio {result['launch_ratio']}x")
    print("  its steps (median; 'node: ...' are the TVMM service's own, within 'node launch'):")
    for name, seconds in result["launch_steps_s"].items():
        print(f"    {name:<40} {1000 * seconds:8.1f} ms")
    print("sealing a 256 MiB image:")
    print(f"  tccdeploy image seal (LUKS qcow2, digest, wrap, sign)  {result['seal_mib_s']:7.1f} MiB/s")
    print(f"  qemu-img convert to LUKS qcow2 (the same iteration time) {result['qemu_img_luks_mib_s']:7.1f} MiB/s"
          f"   seal takes {result['seal_vs_luks']}x its time")
    print(f"  qemu-img convert to plain qcow2                         {result['qemu_img_convert_mib_s']:7.1f} MiB/s")
    if large:
        print(f"sealing a {large['large_seal_mib']} MiB image, once:")
        print(f"  tccdeploy image seal                                    {large['large_seal_mib_s']:7.1f} MiB/s")
        print(f"  qemu-img convert to LUKS qcow2 (the same iteration time) {large['large_luks_mib_s']:7.1f} MiB/s"
              f"   seal takes {large['large_seal_vs_luks']}x its time")
        print(f"  qemu-img convert to plain qcow2                         {large['large_convert_mib_s']:7.1f} MiB/s")
    if sent:
        print(f"uploading {upload_mib} MiB of ciphertext to a node (best of 2 rounds, each way once a round):")
        print(f"  tccdeploy (blocks on the service's session, then the node's digest check of "
              f"{result['upload_digest_check_s']:.2f} s)  {result['upload_mib_s']:7.1f} MiB/s")
        print(f"  ssh cat > file                                          {result['ssh_cat_mib_s']:7.1f} MiB/s"
              f"   ratio {result['upload_ratio']}x the time")
        print(f"  paramiko (the engine's SSH library) into cat > file     {result['paramiko_cat_mib_s']:7.1f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
