"""Benchmark: attestation, against tpm2-tools and Ansible in the same run.

1. One node's evidence: a real swtpm quote (made with tpm2-tools) over the policy's PCRs and a
   100-event TCG log. tccdeploy's verifier (signature, nonce, PCR digest, log replay, build
   match, perimeter) runs in-process; tpm2_checkquote checks the same quote, PCRs and log as a
   command (signature, nonce, digest, log replay).
2. The fleet: `tccdeploy attest` (fresh nonce, quote, log, full verification, verdict stored)
   on 10 and 30 lab nodes, against Ansible merely running tpm2_createprimary + tpm2_quote on
   the same nodes (no verification at all).
Run: .venv/bin/python bench/attest.py [--sizes 10,30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from tccdeploy.coordinator import tpm2  # noqa: E402
from tccdeploy.coordinator.store import NonceCheck  # noqa: E402
from tccdeploy.coordinator.verifier import Evidence, verify  # noqa: E402
from tccdeploy.eventlog import EventLogWriter  # noqa: E402
from tccdeploy.lab import procs, tpm  # noqa: E402
from tccdeploy.lab.builds import POLICY_PCRS  # noqa: E402
from tccdeploy.lab.lab import TVMM_USER, Lab  # noqa: E402
from tccdeploy.manifest.loader import load_manifests  # noqa: E402
from tccdeploy.manifest.models import ReferenceEvent  # noqa: E402

BIN = Path(sys.executable).parent
EXTRA_EVENTS = 92  # + the lab boot's 8 = a 100-event log
AK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc


def single(lab_index: int, iterations: int) -> dict:
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-attest-"))
    work = tempfile.mkdtemp(prefix="tccdeploy-bench-quote-")
    try:
        lab.up(nodes=1, sites=1, outside=0, lab_index=lab_index)
        node = lab.nodes[0]
        # Grow the boot to 100 events: extra components measured into PCR 11, logged.
        writer = EventLogWriter(list(tpm.BANKS))
        extra = []
        for i in range(EXTRA_EVENTS):
            digests = writer.add(11, "EV_IPL", f"module-{i}".encode())
            extra.append((11, digests))
        tpm.extend(lab.tpm_socket(node), extra)
        log_path = lab.node_dir(node, "eventlog.bin")
        with open(log_path, "rb") as fh:
            raw = fh.read()
        with open(log_path, "wb") as fh:
            fh.write(raw + writer.to_bytes()[len(writer.header()):])
        tcti = lab.tcti(node)
        flush = ["tpm2_flushcontext", "-T", tcti, "-t"]
        nonce = os.urandom(16)
        ak = f"{work}/ak.ctx"
        for cmd in (
            ["tpm2_createprimary", "-Q", "-T", tcti, "-C", "e", "-G", "ecc256:ecdsa-sha256:null", "-a", AK_ATTRS, "-c", ak], flush,
            ["tpm2_readpublic", "-Q", "-T", tcti, "-c", ak, "-f", "pem", "-o", f"{work}/ak.pem"], flush,
            ["tpm2_readpublic", "-Q", "-T", tcti, "-c", ak, "-f", "tss", "-o", f"{work}/ak.tss"], flush,
            ["tpm2_quote", "-Q", "-T", tcti, "-c", ak, "-l", "sha256:" + ",".join(map(str, POLICY_PCRS)), "-q", nonce.hex(),
             "-m", f"{work}/q.msg", "-s", f"{work}/q.sig", "-o", f"{work}/q.pcrs", "-g", "sha256"], flush,
        ):
            run(cmd)
        checkquote = ["tpm2_checkquote", "-u", f"{work}/ak.pem", "-m", f"{work}/q.msg", "-s", f"{work}/q.sig",
                      "-f", f"{work}/q.pcrs", "-e", log_path, "-g", "sha256", "-q", nonce.hex()]
        peer = []
        for _ in range(20):
            start = time.perf_counter()
            run(checkquote)
            peer.append(time.perf_counter() - start)
        manifests = load_manifests([lab.manifests_dir])
        base = next(b for b in manifests.builds if b.name == node.build)
        refs = base.pcrs[11] + tuple(ReferenceEvent(d["sha256"].hex()) for _, d in extra)
        builds = [dataclasses.replace(base, pcrs={**base.pcrs, 11: refs})] + [b for b in manifests.builds if b is not base]
        values = tpm.read_pcrs(lab.tpm_socket(node), "sha256", list(POLICY_PCRS))
        with open(log_path, "rb") as fh:
            eventlog = fh.read()
        identity = {"ak_public": Path(f"{work}/ak.tss").read_bytes(), "ssh_host_key": "SHA256:bench"}
        evidence = Evidence(Path(f"{work}/q.msg").read_bytes(), Path(f"{work}/q.sig").read_bytes(), values, eventlog, nonce,
                            nonce_check=NonceCheck(True), ssh_host_key="SHA256:bench")
        verdict = verify(evidence, manifests.perimeter, builds, identity, node.site, node.address, platforms=manifests.platforms)
        if not verdict.trusted:
            raise SystemExit(f"bench evidence not trusted: {verdict.reasons}")
        start = time.perf_counter()
        for _ in range(iterations):
            verify(evidence, manifests.perimeter, builds, identity, node.site, node.address, platforms=manifests.platforms)
        ours = (time.perf_counter() - start) / iterations
        events = len(tpm2.parse_attest(evidence.attest).pcr_selection) and (8 + EXTRA_EVENTS)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    return {"events": events, "tccdeploy_verify_ms": round(ours * 1000, 3),
            "tpm2_checkquote_ms": round(statistics.median(peer) * 1000, 2),
            "ratio": round(statistics.median(peer) / ours, 1)}


def fleet(size: int, repeat: int, lab_index: int) -> dict:
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-fleet-"))
    state = tempfile.mkdtemp(prefix="tccdeploy-bench-tc-")
    control = tempfile.mkdtemp(prefix="tccdeploy-bench-cp-")
    home = tempfile.mkdtemp(prefix="tccdeploy-bench-home-")
    env = dict(os.environ, TCCDEPLOY_STATE=state, ANSIBLE_SSH_CONTROL_PATH_DIR=control, ANSIBLE_HOME=home,
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_DEPRECATION_WARNINGS="False")
    try:
        lab.up(nodes=size, sites=1, outside=0, lab_index=lab_index)
        inventory, manifests = lab.inventory_dir, lab.manifests_dir
        run([str(BIN / "tccdeploy"), "tc", "init"], env)
        run([str(BIN / "tccdeploy"), "enroll", "-i", inventory, "-m", manifests], env)
        ours = []
        for _ in range(repeat):
            start = time.perf_counter()
            run([str(BIN / "tccdeploy"), "attest", "-i", inventory, "-m", manifests, "-f", "20"], env)
            ours.append(time.perf_counter() - start)
        # The peer needs a login that reaches the TPM, which only the TVMM user does (and its key
        # for the engine runs the service only): the bench gives Ansible a key of its own for that
        # user, unrestricted, for the span of the benchmark.
        peer_key = os.path.join(control, "peer_ed25519")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", peer_key], env)
        with open(peer_key + ".pub") as fh:
            peer_public = fh.read()
        for node in lab.nodes:
            with open(lab.node_dir(node, f"authorized_keys.{TVMM_USER}"), "a") as fh:
                fh.write(peer_public)
        node_dir = lab.path("nodes", "{{ inventory_hostname }}", "tvmm")
        quote = (f"D={node_dir}; T=swtpm:path=$D/tpm.sock; "
                 f"tpm2_createprimary -Q -T $T -C e -G ecc256:ecdsa-sha256:null -a '{AK_ATTRS}' -c $D/ak.ctx && "
                 "tpm2_flushcontext -T $T -t && "
                 "tpm2_quote -Q -T $T -c $D/ak.ctx -l sha256:0,4,8,9,11 -q 00112233445566778899aabbccddeeff "
                 "-m $D/q.msg -s $D/q.sig -g sha256; r=$?; tpm2_flushcontext -T $T -t; exit $r")
        peer = []
        for _ in range(repeat):
            start = time.perf_counter()
            run([str(BIN / "ansible"), "all", "-i", inventory, "-f", "20", "-m", "shell", "-a", quote,
                 "-e", "ansible_python_interpreter=/usr/bin/python3", "-e", f"ansible_user={TVMM_USER}",
                 "-e", f"ansible_ssh_private_key_file={peer_key}"], env)
            peer.append(time.perf_counter() - start)
    finally:
        procs.stop([p for p in procs.processes_mentioning(control) if procs.cmdline(p).startswith("ssh")])
        lab.down()
        for path in (state, control, home):
            shutil.rmtree(path, ignore_errors=True)
    return {"nodes": size, "tccdeploy_attest_s": round(statistics.median(ours), 2),
            "ansible_tpm2_quote_s": round(statistics.median(peer), 2),
            "ratio": round(statistics.median(peer) / statistics.median(ours), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,30")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    one = single(230, args.iterations)
    rows = [fleet(int(s), args.repeat, 231 + i) for i, s in enumerate(args.sizes.split(","))]
    if args.json:
        print(json.dumps({"benchmark": "attest", "single": one, "fleet": rows}))
        return 0
    print(f"one node's evidence ({one['events']}-event log, quote over PCRs {list(POLICY_PCRS)}):")
    print(f"  tccdeploy verify (in-process, all checks)  {one['tccdeploy_verify_ms']:8.3f} ms")
    print(f"  tpm2_checkquote (command, same quote+log)  {one['tpm2_checkquote_ms']:8.2f} ms   ratio {one['ratio']}x")
    print("fleet attestation (fresh nonce, quote, log, verification, verdict stored), median of", args.repeat)
    for r in rows:
        print(f"  {r['nodes']:>3} nodes: tccdeploy attest {r['tccdeploy_attest_s']:6.2f} s;  "
              f"ansible running tpm2_quote only {r['ansible_tpm2_quote_s']:6.2f} s   ratio {r['ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
