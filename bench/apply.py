"""Benchmark: the same playbook through `tccdeploy apply` and `ansible-playbook` on the same lab nodes.

The playbook (written to a temporary folder) runs `command: true`, copies a 1 MiB file by
content to every node, and runs `command: sha256sum` on it: the first run copies, the next ones are
idempotent (the copy is `ok`). Both tools get the same inventory, forks and playbook; Ansible
keeps its SSH ControlPersist masters between runs as it does for its users (stopped by PID at
the end). Also timed, without a peer: `apply playbooks/site.yml` enrolling and admitting every
node, and its idempotent second run.
Run: .venv/bin/python bench/apply.py [--nodes 20] [--forks 20] [--repeat 3]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from engine_fanout import BIN, stop_control_masters, timed  # noqa: E402

from tccdeploy.lab.lab import Lab  # noqa: E402

PLAYBOOK = """\
- name: bench
  hosts: all
  gather_facts: false
  tasks:
    - name: a command
      command: "true"
    - name: a file by content
      copy: {src: payload.bin, dest: "{{ tcc_boot_dir }}/../payload.bin", mode: "0644"}
    - name: read it back
      command: "sha256sum {{ tcc_boot_dir }}/../payload.bin"
      changed_when: false
"""


def measure(nodes: int, forks: int, repeat: int, lab_index: int) -> dict:
    directory = tempfile.mkdtemp(prefix="tccdeploy-bench-apply-")
    work = Path(tempfile.mkdtemp(prefix="tccdeploy-bench-apply-play-"))
    control_dir = tempfile.mkdtemp(prefix="tccdeploy-bench-ansible-cp-")
    home = tempfile.mkdtemp(prefix="tccdeploy-bench-ansible-home-")
    state = tempfile.mkdtemp(prefix="tccdeploy-bench-state-")
    env = dict(os.environ, ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir, ANSIBLE_HOME=home, TCCDEPLOY_STATE=state,
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_DEPRECATION_WARNINGS="False")
    (work / "play.yml").write_text(PLAYBOOK)
    (work / "payload.bin").write_bytes(os.urandom(1 << 20))
    lab = Lab(directory)
    try:
        lab.up(nodes=nodes, sites=2, outside=0, lab_index=lab_index)
        inv = ["-i", lab.inventory_dir]
        ours = [str(BIN / "tccdeploy"), "apply", str(work / "play.yml"), *inv, "-f", str(forks)]
        theirs = [str(BIN / "ansible-playbook"), str(work / "play.yml"), *inv, "-f", str(forks),
                  "-e", "ansible_python_interpreter=/usr/bin/python3"]
        ours_first = timed(ours, env)
        theirs_first = timed(theirs, env)
        ours_again = [timed(ours, env) for _ in range(repeat)]
        theirs_again = [timed(theirs, env) for _ in range(repeat)]
        subprocess.run([str(BIN / "tccdeploy"), "tc", "init"], env=env, capture_output=True, check=True)
        site = [str(BIN / "tccdeploy"), "apply", str(HERE.parent / "playbooks" / "site.yml"), *inv,
                "-m", lab.manifests_dir, "-f", str(forks)]
        site_first = timed(site, env)
        site_again = statistics.median(timed(site, env) for _ in range(repeat))
    finally:
        stop_control_masters(control_dir)
        lab.down()
        for path in (control_dir, home, state, str(work)):
            shutil.rmtree(path, ignore_errors=True)
    return {
        "nodes": nodes, "forks": forks,
        "tccdeploy_first_s": round(ours_first, 3), "ansible_first_s": round(theirs_first, 3),
        "tccdeploy_again_s": round(statistics.median(ours_again), 3),
        "ansible_again_s": round(statistics.median(theirs_again), 3),
        "ratio_first": round(theirs_first / ours_first, 2),
        "ratio_again": round(statistics.median(theirs_again) / statistics.median(ours_again), 2),
        "site_first_s": round(site_first, 3), "site_again_s": round(site_again, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    r = measure(args.nodes, args.forks, args.repeat, 230)
    if args.json:
        print(json.dumps({"benchmark": "apply", **r}))
        return 0
    print(f"the same 3-task playbook on {r['nodes']} lab nodes, forks {r['forks']} (second runs: median of {args.repeat}):")
    print(f"  first run (copies 1 MiB to each node): tccdeploy apply {r['tccdeploy_first_s']:.2f} s, "
          f"ansible-playbook {r['ansible_first_s']:.2f} s ({r['ratio_first']}x)")
    print(f"  idempotent run:                        tccdeploy apply {r['tccdeploy_again_s']:.2f} s, "
          f"ansible-playbook {r['ansible_again_s']:.2f} s ({r['ratio_again']}x)")
    print(f"  site.yml (enroll, attest, admit): first {r['site_first_s']:.2f} s, idempotent {r['site_again_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
