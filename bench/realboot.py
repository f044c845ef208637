#!/usr/bin/env python3
"""Benchmark: attesting a real-boot node (OVMF, systemd-boot, Linux on a swtpm vTPM, the TVMM
service in its measured initramfs; lab/realnodes.py), against Keylime-style replay of the same
firmware log with tpm2_eventlog, in the same run.

1. The whole attestation of the real-boot node: `attest` through the engine (fresh nonce, the
   service quotes on the guest's /dev/tpmrm0 and reads the kernel's event log, the TC verifies
   quote, log replay, build, platform and perimeter and stores the verdict), beside the same on
   a fast lab node (whose "boot" is tccdeploy's own log) for scale.
2. The real boot's log, as the node's firmware, systemd-boot and EFI stub wrote it: tccdeploy's
   parse + replay of every bank in-process, against tpm2_eventlog on the same file (a process per
   log, as Keylime's verifier runs it for measured boot).

The guest runs under TCG where KVM is not usable, so (1) is dominated by emulated Python and
says little about hardware; (2) does not depend on the guest.
Run: .venv/bin/python bench/realboot.py [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eventlog import ours as replay  # noqa: E402  (bench/eventlog.py: what the verifier does with a log)
from eventlog import per_call_ms  # noqa: E402

from tccdeploy.coordinator.identity import init as tc_init  # noqa: E402
from tccdeploy.coordinator.service import Coordinator  # noqa: E402
from tccdeploy.engine.attestation import attest, enroll  # noqa: E402
from tccdeploy.engine.runner import Engine  # noqa: E402
from tccdeploy.eventlog import parse  # noqa: E402
from tccdeploy.lab import realboot, realnodes  # noqa: E402
from tccdeploy.lab.lab import Lab  # noqa: E402
from tccdeploy.manifest.loader import load_inventory, load_manifests  # noqa: E402

TIMEOUT = 180
LAB_INDEX = 236


def attest_s(lab: Lab, coordinator: Coordinator, node: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        with Engine(load_inventory(lab.inventory_dir).select(node), state=coordinator.state, timeout=TIMEOUT) as engine:
            start = time.perf_counter()
            results = engine.run(attest(coordinator))
            times.append(time.perf_counter() - start)
        if results[0].status == "failed":
            raise SystemExit(f"attesting {node} failed: {results[0].msg}")
    return statistics.median(times)


def measure(repeat: int) -> dict:
    for tool in ("qemu-system-x86_64", "swtpm", "mmdebstrap", "tpm2_eventlog"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/install)")
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-realboot-"))
    state = tempfile.mkdtemp(prefix="tccdeploy-bench-tc-")
    coordinator = None
    try:
        started = time.monotonic()
        lab.up(nodes=1, sites=1, outside=0, lab_index=LAB_INDEX, real_boot=1)
        up_s = time.monotonic() - started
        tc_init(state)
        coordinator = Coordinator.from_manifests(load_manifests([lab.manifests_dir]), state)
        with Engine(load_inventory(lab.inventory_dir).select("all"), state=state, timeout=TIMEOUT) as engine:
            failed = [r for r in engine.run(enroll(coordinator)) if r.status == "failed"]
        if failed:
            raise SystemExit(f"enrollment failed: {[(r.host, r.msg) for r in failed]}")
        real = attest_s(lab, coordinator, "rboot1", repeat)
        fast_name = next(n.name for n in lab.nodes if not n.real_boot)
        fast = attest_s(lab, coordinator, fast_name, repeat)
        work = tempfile.mkdtemp(prefix="tccdeploy-bench-log-")
        try:
            log_path = Path(work, "binary_bios_measurements")
            raw = realnodes.booted(lab, lab.node("rboot1")).eventlog
            log_path.write_bytes(raw)
            log = parse(raw)
            ours = per_call_ms(lambda: replay(log_path.read_bytes()), 200)
            peer = per_call_ms(lambda: subprocess.run(["tpm2_eventlog", str(log_path)], capture_output=True, check=True), 10)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if coordinator is not None:
            coordinator.close()
        lab.down()
        shutil.rmtree(state, ignore_errors=True)
    return {"lab_up_s": round(up_s, 1), "accelerator": realboot.accelerator(),
            "real_attest_s": round(real, 2), "fast_attest_s": round(fast, 2),
            "events": len(log.events), "banks": len(log.banks), "bytes": len(raw),
            "tccdeploy_replay_ms": round(ours, 3), "tpm2_eventlog_ms": round(peer, 2), "ratio": round(peer / ours, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="attestations timed per node (median; default 3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for bench/run)")
    args = parser.parse_args()
    r = measure(args.repeat)
    if args.json:
        print(json.dumps({"benchmark": "realboot", **r}))
        return 0
    print(f"lab up with one real-boot node: {r['lab_up_s']} s (guest accelerator {r['accelerator']})")
    print(f"attest the real-boot node (quote on its vTPM + its firmware's log): {r['real_attest_s']:.2f} s; "
          f"a fast lab node: {r['fast_attest_s']:.2f} s")
    print(f"the real boot's log ({r['events']} events, {r['banks']} banks, {r['bytes']} bytes), parse + replay: "
          f"tccdeploy {r['tccdeploy_replay_ms']:.3f} ms; tpm2_eventlog {r['tpm2_eventlog_ms']:.2f} ms; ratio {r['ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
