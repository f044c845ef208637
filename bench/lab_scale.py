"""Benchmark: how many lab nodes this machine holds, how fast they come up, what each costs.

Brings up N nodes (default 30), times `lab up`, measures each node's memory (PSS of its sshd
and swtpm, from /proc/PID/smaps_rollup) and checks every node answers OpenSSH's client.
Run: .venv/bin/python bench/lab_scale.py [--nodes N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tccdeploy.lab.lab import Lab  # noqa: E402


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ssh(lab: Lab, address: str, command: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["ssh", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-F", "/dev/null", "-p", str(lab.ssh_port), f"tccnode@{address}", command],
        check=True, capture_output=True,
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--lab-index", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="tccdeploy-bench-lab-")
    lab = Lab(directory)
    try:
        start = time.perf_counter()
        lab.up(nodes=args.nodes, sites=2, outside=0, lab_index=args.lab_index)
        up_s = time.perf_counter() - start
        per_node = [(pss_kib(n.sshd_pid) + pss_kib(n.swtpm_pid)) / 1024 for n in lab.nodes]  # type: ignore[arg-type]
        reach = [ssh(lab, n.address, "true") for n in lab.nodes]
        plain = statistics.median(ssh(lab, lab.nodes[0].address, "true") for _ in range(5))
    finally:
        lab.down()
    result = {
        "benchmark": "lab_scale",
        "nodes": args.nodes,
        "up_s": round(up_s, 2),
        "memory_per_node_mib": round(statistics.mean(per_node), 2),
        "memory_total_mib": round(sum(per_node), 1),
        "ssh_reach_all_s": round(sum(reach), 2),
        "ssh_command_s": round(plain, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"lab of {args.nodes} nodes:")
        print(f"  lab up                      {up_s:7.2f} s")
        print(f"  memory per node (PSS)       {result['memory_per_node_mib']:7.2f} MiB (sshd + swtpm), "
              f"{result['memory_total_mib']} MiB in all")
        print(f"  SSH to every node, serial   {sum(reach):7.2f} s")
        print(f"  one OpenSSH command         {plain * 1000:7.1f} ms (connect, key exchange, login, run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
