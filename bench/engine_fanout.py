"""Benchmark: one ad-hoc command on N lab nodes, tccdeploy against Ansible, same nodes, same forks.

For each size (default 10 and 30 nodes) it brings a lab up and times, as whole commands:
  tccdeploy run all -a true                 (paramiko, one helper per host)
  ansible all -m command -a true            (Ansible's module shipping)
  ansible all -m raw -a true                (Ansible with no module: plain ssh)
each the median of --repeat runs (Ansible keeps its SSH ControlPersist masters between runs, as
it does for its users; they are stopped by PID at the end).
Run: .venv/bin/python bench/engine_fanout.py [--sizes 10,30] [--forks 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tccdeploy.lab import procs  # noqa: E402
from tccdeploy.lab.lab import Lab  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return elapsed


def stop_control_masters(control_dir: str) -> None:
    pids = [p for p in procs.processes_mentioning(control_dir) if procs.cmdline(p).startswith("ssh")]
    procs.stop(pids)


def measure(size: int, forks: int, repeat: int, lab_index: int) -> dict:
    directory = tempfile.mkdtemp(prefix="tccdeploy-bench-fanout-")
    control_dir = tempfile.mkdtemp(prefix="tccdeploy-bench-ansible-cp-")
    home = tempfile.mkdtemp(prefix="tccdeploy-bench-ansible-home-")
    lab = Lab(directory)
    state = tempfile.mkdtemp(prefix="tccdeploy-bench-state-")
    env = dict(os.environ, ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir, ANSIBLE_HOME=home,
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_DEPRECATION_WARNINGS="False")
    try:
        lab.up(nodes=size, sites=2, outside=0, lab_index=lab_index)
        inventory = lab.inventory_dir
        ours = [timed([str(BIN / "tccdeploy"), "run", "all", "-i", inventory, "-a", "true", "-f", str(forks),
                       "--state", state], env) for _ in range(repeat)]
        ansible = [str(BIN / "ansible"), "all", "-i", inventory, "-f", str(forks),
                   "-e", "ansible_python_interpreter=/usr/bin/python3"]
        command = [timed([*ansible, "-m", "command", "-a", "true"], env) for _ in range(repeat)]
        raw = [timed([*ansible, "-m", "raw", "-a", "true"], env) for _ in range(repeat)]
    finally:
        stop_control_masters(control_dir)
        lab.down()
        for path in (control_dir, home, state):
            shutil.rmtree(path, ignore_errors=True)
    return {
        "nodes": size,
        "forks": forks,
        "tccdeploy_s": round(statistics.median(ours), 3),
        "ansible_command_s": round(statistics.median(command), 3),
        "ansible_raw_s": round(statistics.median(raw), 3),
        "ratio_vs_command": round(statistics.median(command) / statistics.median(ours), 2),
        "ratio_vs_raw": round(statistics.median(raw) / statistics.median(ours), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,30")
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rows = [measure(int(size), args.forks, args.repeat, 210 + i) for i, size in enumerate(args.sizes.split(","))]
    if args.json:
        print(json.dumps({"benchmark": "engine_fanout", "rows": rows}))
        return 0
    print(f"one command on every lab node, forks {args.forks}, median of {args.repeat}:")
    print(f"  {'nodes':>5}  {'tccdeploy':>10}  {'ansible -m command':>18}  {'ansible -m raw':>14}  {'vs command':>10}  {'vs raw':>7}")
    for r in rows:
        print(f"  {r['nodes']:>5}  {r['tccdeploy_s']:>9.2f}s  {r['ansible_command_s']:>17.2f}s  {r['ansible_raw_s']:>13.2f}s"
              f"  {r['ratio_vs_command']:>9.1f}x  {r['ratio_vs_raw']:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
