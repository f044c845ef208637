"""Benchmark: engines sharing a fleet through one served TC (issue 20's shards and leases).

A lab of --nodes real nodes (sshd + swtpm) is enrolled and admitted through `tc serve`. Then
one enforcement round (`tccdeploy enforce --once`) three ways, each engine a process with its
own engine certificate:

1. one engine over the whole fleet (the peer);
2. two engines at once on disjoint shards (--shard 1/2, --shard 2/2): the round's wall time,
   and every node attested by exactly one of them;
3. two engines at once over the whole fleet (overlapping): the TC's leases give each node to
   one engine; the count of nodes both acted on must be 0.

The lab's nodes, the TC and the engines share this machine's 2 cores, so two engines here
contend for the same CPU as one: the wall time says little of separate machines. Beside each
round, how many of the machine's cores were busy (bench/machine.py, from /proc/stat): a round
that keeps them all busy cannot end sooner here, however many engines share it. What each
engine process spends (its CPU seconds a round, from wait4) is the figure that scales out:
the busier shard engine against the one engine over the whole fleet.
Run: .venv/bin/python bench/engine_shards.py [--nodes 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import Busy  # noqa: E402

from tccdeploy.lab.lab import Lab  # noqa: E402
from tests.tcservice import BIN, Service  # noqa: E402


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed (exit {proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc


def enforce_at_once(engines: list[tuple[str, list[str]]], common: list[str], env: dict[str, str],
                    folder: str) -> tuple[float, list[dict], list[float], float]:
    """Start one `enforce --once --json` per (engine folder, extra args) together; the wall time
    until the last ends, each one's round report, the CPU seconds each engine process used and
    how many of the machine's cores were busy meanwhile (everything on it: nodes, TC, engines)."""
    busy = Busy().start()
    started = time.perf_counter()
    runs = []
    for i, (engine_dir, extra) in enumerate(engines):
        out = open(os.path.join(folder, f"engine-{i}.json"), "w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([str(BIN / "tccdeploy"), "enforce", "--once", "--json", *common, "--engine-dir", engine_dir,
                                 *extra], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        runs.append((proc, out))
    reports, cpu = [], []
    for proc, out in runs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
        out.close()
        if proc.returncode != 0:
            raise SystemExit(f"enforce failed (exit {proc.returncode}): {text[-1500:]}")
        reports.append(json.loads([line for line in text.splitlines() if line.startswith("{")][-1]))
        cpu.append(usage.ru_utime + usage.ru_stime)
    elapsed = time.perf_counter() - started
    busy.stop()
    return elapsed, reports, cpu, busy.cores


def attested(report: dict) -> set[str]:
    return {r["name"] for r in report["attested"]}


def measure(nodes: int, repeat: int, lab_index: int) -> dict:
    lab = Lab(tempfile.mkdtemp(prefix="tccdeploy-bench-shards-"))
    state = Path(tempfile.mkdtemp(prefix="tccdeploy-bench-shards-tc-"))
    service = None
    try:
        lab.up(nodes=nodes, sites=1, outside=0, lab_index=lab_index)
        service = Service(state, lab.manifests_dir)
        env = dict(os.environ, TCCDEPLOY_STATE=str(state))
        run([str(BIN / "tccdeploy"), "tc", "engines", "add", "ops2", "-o", str(state / "engine-ops2")], env)
        one, two = str(service.engine_dir), str(state / "engine-ops2")
        common = ["-i", lab.inventory_dir, "--tc", service.url]
        run([str(BIN / "tccdeploy"), "enroll", *common, "--engine-dir", one], env)
        run([str(BIN / "tccdeploy"), "attest", "--admit", *common, "--engine-dir", one], env)
        fleet = {n.name for n in lab.nodes}
        single, sharded, overlapping, acted_twice, split_ok = [], [], [], 0, True
        single_cpu, shard_cpu, single_busy, shard_busy = [], [], [], []
        for _ in range(repeat):
            elapsed, (report,), cpu, cores = enforce_at_once([(one, [])], common, env, str(state))
            if attested(report) != fleet:
                raise SystemExit(f"one engine attested {len(attested(report))} of {len(fleet)} nodes")
            single.append(elapsed)
            single_cpu += cpu
            single_busy.append(cores)
            elapsed, (a, b), cpu, cores = enforce_at_once([(one, ["--shard", "1/2"]), (two, ["--shard", "2/2"])], common, env,
                                                   str(state))
            split_ok &= attested(a) | attested(b) == fleet and not attested(a) & attested(b)
            sharded.append(elapsed)
            shard_cpu.append(max(cpu))
            shard_busy.append(cores)
            elapsed, (a, b), _, _ = enforce_at_once([(one, []), (two, [])], common, env, str(state))
            acted_twice += len(attested(a) & attested(b))
            overlapping.append(elapsed)
        started = time.perf_counter()
        run([str(BIN / "tccdeploy"), "--version"], env)
        startup = time.perf_counter() - started
    finally:
        if service is not None:
            service.stop()
        lab.down()
        shutil.rmtree(state, ignore_errors=True)
    return {"nodes": nodes, "one_engine_s": round(statistics.median(single), 2),
            "two_shards_s": round(statistics.median(sharded), 2),
            "two_overlapping_s": round(statistics.median(overlapping), 2),
            "one_engine_cpu_s": round(statistics.median(single_cpu), 2),
            "busiest_shard_engine_cpu_s": round(statistics.median(shard_cpu), 2), "cli_start_s": round(startup, 2),
            "one_engine_cores_busy": round(statistics.median(single_busy), 2),
            "two_shards_cores_busy": round(statistics.median(shard_busy), 2),
            "shards_split_the_fleet": split_ok, "nodes_acted_on_twice": acted_twice,
            "ratio": round(statistics.median(single) / statistics.median(sharded), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.nodes, args.repeat, 236)
    if args.json:
        print(json.dumps({"benchmark": "engine_shards", **result}))
        return 0
    print(f"one enforcement round over {args.nodes} lab nodes through tc serve, median of {args.repeat}:")
    cores = os.cpu_count() or 1
    print(f"  one engine, whole fleet             {result['one_engine_s']:6.2f} s   "
          f"({result['one_engine_cores_busy']:.2f} of {cores} cores busy)")
    print(f"  two engines, shards 1/2 and 2/2     {result['two_shards_s']:6.2f} s   ({result['ratio']}x faster; "
          f"shards split the fleet: {result['shards_split_the_fleet']}; {result['two_shards_cores_busy']:.2f} of {cores} "
          "cores busy)")
    print(f"  engine CPU a round: one engine {result['one_engine_cpu_s']:.2f} s, the busier shard engine "
          f"{result['busiest_shard_engine_cpu_s']:.2f} s (the command's start alone: {result['cli_start_s']:.2f} s wall)")
    print(f"  two engines, both the whole fleet   {result['two_overlapping_s']:6.2f} s   "
          f"(nodes acted on by both: {result['nodes_acted_on_twice']})")
    return 0 if result["shards_split_the_fleet"] and result["nodes_acted_on_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
