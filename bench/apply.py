"""Benchmark: the same playbook through `tccdeploy apply` and `ansible-playbook` on the same lab nodes.

The playbook (written to a temporary folder) runs `command: true`, copies a 1 MiB file by
content to every node, and runs `command: sha256sum` on it: the first run copies, the next ones are
idempotent (the copy is `ok`). Both tools get the same inventory, forks and playbook; Ansible
keeps its SSH ControlPersist masters between runs as it does for its users (stopped by PID at
the end). Also timed, without a peer: `apply playbooks/site.yml` enrolling and admitting every
node, and its idempotent second run.

The cost of one more task on one more host (issue 19), with Jinja2 in every task: a playbook of
SMALL and one of BIG templated `command` tasks (`echo {{ inventory_hostname | upper }} ...`) run
on the same nodes by each tool; (T(BIG) - T(SMALL)) / ((BIG - SMALL) x nodes) is the marginal
cost per host-task, start-up and connection set-up cancelled out. Peers, in the same run:
ansible-playbook (SSH ControlPersist, pipelining), ansible-playbook with Mitogen's
mitogen_linear strategy, and pyinfra (the same commands as server.shell operations). Mitogen and
pyinfra are not tccdeploy dependencies: `pip install mitogen pyinfra` into .venv first; a peer
that is not installed is skipped, saying so.
Run: .venv/bin/python bench/apply.py [--nodes 20] [--forks 20] [--repeat 3] [--only-per-task]
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
from typing import Any

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


SMALL, BIG = 5, 25


def _templated(count: int) -> str:
    tasks = "".join(f"    - name: task {i}\n      command: \"echo {{{{ inventory_hostname | upper }}}} "
                    f"{{{{ ['t', {i}] | join('-') }}}}\"\n      changed_when: false\n" for i in range(count))
    return f"- name: per-task cost\n  hosts: all\n  gather_facts: false\n  tasks:\n{tasks}"


def _pyinfra_files(work: Path, inventory_dir: str, count: int) -> tuple[Path, Path]:
    """pyinfra's inventory (the lab's hosts, keys and known_hosts) and a deploy of count shell operations."""
    import shlex

    from tccdeploy.manifest.loader import load_inventory

    hosts = []
    for host in load_inventory(inventory_dir).hosts.values():
        v = host.vars
        known = [w.split("=", 1)[1] for w in shlex.split(str(v.get("ansible_ssh_common_args", "")))
                 if w.lower().startswith("userknownhostsfile=")]
        data = {"ssh_hostname": str(v.get("ansible_host", host.name)), "ssh_port": int(v.get("ansible_port", 22)),
                "ssh_user": v.get("ansible_user"), "ssh_key": v.get("ansible_ssh_private_key_file"),
                "ssh_strict_host_key_checking": "yes"}
        if known:
            data["ssh_known_hosts_file"] = known[0]
        hosts.append((host.name, {k: val for k, val in data.items() if val is not None}))
    inventory = work / "pyinfra_inventory.py"
    inventory.write_text(f"hosts = {hosts!r}\n")
    deploy = work / f"pyinfra_deploy_{count}.py"
    deploy.write_text("from pyinfra import host\nfrom pyinfra.operations import server\n\n"
                      f"for i in range({count}):\n"
                      "    server.shell(name=f'task {i}', commands=[f'echo {host.name.upper()} t-{i}'])\n")
    return inventory, deploy


def per_task(lab: Lab, forks: int, repeat: int, env: dict[str, str], work: Path) -> dict:
    """Seconds for SMALL and BIG templated tasks per tool, and the marginal ms per host-task."""
    inv = ["-i", lab.inventory_dir]
    nodes = len(lab.nodes) if hasattr(lab, "nodes") else 0
    for count in (SMALL, BIG):
        (work / f"tasks-{count}.yml").write_text(_templated(count))
    tools: dict[str, Any] = {
        "tccdeploy apply": lambda n: [str(BIN / "tccdeploy"), "apply", str(work / f"tasks-{n}.yml"), *inv, "-f", str(forks)],
        "ansible-playbook": lambda n: [str(BIN / "ansible-playbook"), str(work / f"tasks-{n}.yml"), *inv, "-f", str(forks),
                                       "-e", "ansible_python_interpreter=/usr/bin/python3"],
    }
    envs = {name: env for name in tools}
    skipped = []
    try:
        import ansible_mitogen

        strategy = Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"
        tools["ansible + Mitogen"] = tools["ansible-playbook"]
        envs["ansible + Mitogen"] = dict(env, ANSIBLE_STRATEGY_PLUGINS=str(strategy), ANSIBLE_STRATEGY="mitogen_linear")
    except ImportError:
        skipped.append("Mitogen (pip install mitogen)")
    if (BIN / "pyinfra").exists():
        inventory, _ = _pyinfra_files(work, lab.inventory_dir, SMALL)
        _pyinfra_files(work, lab.inventory_dir, BIG)
        tools["pyinfra"] = lambda n: [str(BIN / "pyinfra"), str(inventory), str(work / f"pyinfra_deploy_{n}.py"), "-y",
                                      "--parallel", str(forks)]
        envs["pyinfra"] = env
    else:
        skipped.append("pyinfra (pip install pyinfra)")
    out: dict[str, Any] = {"small": SMALL, "big": BIG, "skipped": skipped, "tools": {}}
    for name, command in tools.items():
        timed(command(SMALL), envs[name])  # warm: connection masters, caches, host keys
        small = min(timed(command(SMALL), envs[name]) for _ in range(repeat))
        big = min(timed(command(BIG), envs[name]) for _ in range(repeat))
        out["tools"][name] = {"small_s": round(small, 3), "big_s": round(big, 3),
                              "ms_per_host_task": round(1000 * (big - small) / ((BIG - SMALL) * nodes), 2)}
    return out


def measure(nodes: int, forks: int, repeat: int, lab_index: int, only_per_task: bool = False) -> dict:
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
        lab.nodes = list(range(nodes))  # type: ignore[attr-defined]
        if only_per_task:
            return {"nodes": nodes, "forks": forks, "per_task": per_task(lab, forks, repeat, env, work)}
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
        costs = per_task(lab, forks, repeat, env, work)
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
        "site_first_s": round(site_first, 3), "site_again_s": round(site_again, 3), "per_task": costs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--forks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only-per-task", action="store_true", help="only the per-host-task cost against the peers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    r = measure(args.nodes, args.forks, args.repeat, 230, args.only_per_task)
    if args.json:
        print(json.dumps({"benchmark": "apply", **r}))
        return 0
    _print_per_task(r)
    if args.only_per_task:
        return 0
    print(f"the same 3-task playbook on {r['nodes']} lab nodes, forks {r['forks']} (second runs: median of {args.repeat}):")
    print(f"  first run (copies 1 MiB to each node): tccdeploy apply {r['tccdeploy_first_s']:.2f} s, "
          f"ansible-playbook {r['ansible_first_s']:.2f} s ({r['ratio_first']}x)")
    print(f"  idempotent run:                        tccdeploy apply {r['tccdeploy_again_s']:.2f} s, "
          f"ansible-playbook {r['ansible_again_s']:.2f} s ({r['ratio_again']}x)")
    print(f"  site.yml (enroll, attest, admit): first {r['site_first_s']:.2f} s, idempotent {r['site_again_s']:.2f} s")
    return 0


def _print_per_task(r: dict) -> None:
    costs = r["per_task"]
    print(f"one more templated task on one more host ({costs['small']} vs {costs['big']} tasks on {r['nodes']} nodes, "
          f"forks {r['forks']}, best of the runs):")
    ours = costs["tools"]["tccdeploy apply"]["ms_per_host_task"]
    for name, c in costs["tools"].items():
        ratio = f"{c['ms_per_host_task'] / ours:.1f}x tccdeploy's" if ours > 0 and name != "tccdeploy apply" else ""
        print(f"  {name:<18} {c['ms_per_host_task']:7.2f} ms per host-task   ({c['small_s']:.2f} s / {c['big_s']:.2f} s)  {ratio}")
    for name in costs["skipped"]:
        print(f"  skipped: {name}")


if __name__ == "__main__":
    sys.exit(main())
