"""`tccdeploy lab ...`: bring the local lab up and down, and inject faults into it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from ..tables import table

if TYPE_CHECKING:
    from ..lab.lab import Lab

# Kept in step with lab.py; the lab itself is imported only by the lab commands.
DEFAULT_BUILD, SSH_PORT, TPM_PORT = "tvmm-2026.1", 2222, 2321

DEFAULT_DIR_ENV = "TCCDEPLOY_LAB"


def default_dir() -> str:
    return os.environ.get(DEFAULT_DIR_ENV, ".lab")


def _progress(quiet: bool):  # type: ignore[no-untyped-def]
    start = time.monotonic()

    def show(message: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - start:5.1f}s] {message}", file=sys.stderr, flush=True)

    return show


def _lab(directory: str, progress=None) -> Lab:  # type: ignore[no-untyped-def]
    from ..lab.lab import Lab

    return Lab(directory, progress)


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args.dir, _progress(args.quiet))
    start = time.monotonic()
    lab.up(nodes=args.nodes, sites=args.sites, outside=args.outside, rogue=args.rogue_tpm,
           lab_index=args.lab_index, python=args.python, ssh_port=args.ssh_port, tpm_port=args.tpm_port,
           build=args.build)
    elapsed = time.monotonic() - start
    if args.json:
        print(json.dumps({"dir": lab.dir, "seconds": round(elapsed, 2), "nodes": lab.status()}, indent=2))
        return 0
    print(f"lab up: {len(lab.nodes)} node(s) in {elapsed:.1f} s, in {lab.dir}")
    print(f"  inventory:  {lab.inventory_dir}")
    print(f"  manifests:  {lab.manifests_dir}")
    print(f"  ssh:        ssh -i {lab.ssh_key} -o UserKnownHostsFile={lab.known_hosts} "
          f"-o StrictHostKeyChecking=yes -p {lab.ssh_port} tccnode@{lab.nodes[0].address}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args.dir)
    existed = os.path.isdir(lab.dir)
    stopped = lab.down()
    if args.json:
        print(json.dumps({"dir": lab.dir, "stopped_pids": stopped, "removed": existed}))
    elif existed:
        print(f"lab down: stopped {len(stopped)} process(es), removed {lab.dir}")
    else:
        print(f"lab down: no lab in {lab.dir}; nothing to do")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab(args.dir).load()
    rows = lab.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows, [("name", "NODE"), ("address", "ADDRESS"), ("site", "SITE"), ("sshd_pid", "SSHD"),
                        ("swtpm_pid", "SWTPM"), ("build", "BUILD"), ("state", "STATE")]))
    return 0


def cmd_pcrs(args: argparse.Namespace) -> int:
    lab = _lab(args.dir).load()
    rows = lab.pcrs(args.node)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.node}: sha256 PCRs read from its TPM, and replayed from its event log")
        for row in rows:
            verdict = "match" if row["match"] else "MISMATCH"
            print(f"  PCR {row['pcr']:>2}  tpm {row['tpm'][:16]}...  log {row['eventlog'][:16]}...  {verdict}")
    return 0 if all(r["match"] for r in rows) else 1


def _fault(method: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        lab = _lab(args.dir)
        kwargs = {}
        if getattr(args, "build", None):
            kwargs["build"] = args.build
        if getattr(args, "hide", False):
            kwargs["hide"] = True
        if getattr(args, "persistent", False):
            kwargs["persistent"] = True
        if getattr(args, "next_boot", False):
            kwargs["next_boot"] = True
        node = getattr(lab, method)(args.node, **kwargs)
        if args.json:
            print(json.dumps(next(r for r in lab.status() if r["name"] == node.name)))
        else:
            print(f"{node.name}: {method.replace('_', '-')} done ({node.state}, build {node.build})")
        return 0

    return run


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser(
        "lab",
        help="a local lab of real nodes (sshd + swtpm) on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Real nodes on this machine, no TPM hardware needed: each node has its own loopback\n"
            "address (127.K.S.N: lab K, site S; site 9 is outside the perimeter), its own sshd,\n"
            "its own swtpm with an EK certificate from the lab's TPM vendor CA, and a measured\n"
            "boot of a TVMM build with the matching TCG event log. Needs root.\n\n"
            f"The lab lives in --dir (default ${DEFAULT_DIR_ENV} or ./.lab): state, keys, inventory/,\n"
            "manifests/ (perimeter and builds the nodes match), one folder per node."
        ),
        epilog=(
            "examples:\n"
            "  tccdeploy lab up --nodes 6 --sites 2 --outside 1\n"
            "  tccdeploy validate .lab/manifests .lab/inventory\n"
            "  tccdeploy lab tamper node2 && tccdeploy lab status\n"
            "  tccdeploy lab down"
        ),
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", default=default_dir(), help=f"lab directory (default ${DEFAULT_DIR_ENV} or .lab)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = common(lab_sub.add_parser("up", help="create and start the lab"))
    p.add_argument("--nodes", type=int, default=6, help="nodes inside the perimeter, spread over the sites (default 6)")
    p.add_argument("--sites", type=int, default=2, help="perimeter sites, 1-8 (default 2)")
    p.add_argument("--outside", type=int, default=1, help="hosts outside the perimeter, 127.K.9.N (default 1)")
    p.add_argument("--rogue-tpm", type=int, default=0, metavar="N",
                   help="extra site-1 nodes whose TPM comes from an untrusted vendor CA (default 0)")
    p.add_argument("--lab-index", type=int, default=0, metavar="K", help="second octet of the addresses, for several labs at once (default 0)")
    p.add_argument("--build", default=DEFAULT_BUILD, help=f"TVMM build every node boots (default {DEFAULT_BUILD})")
    p.add_argument("--python", help="Python the nodes run tccdeploy's helper with (default: this one)")
    p.add_argument("--ssh-port", type=int, default=SSH_PORT, help=f"sshd port on every node address (default {SSH_PORT})")
    p.add_argument("--tpm-port", type=int, default=TPM_PORT, help=f"swtpm port (and +1 for its control channel; default {TPM_PORT})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_up)

    p = common(lab_sub.add_parser("down", help="stop everything the lab started (by PID) and remove it"))
    p.set_defaults(func=cmd_down)
    p = common(lab_sub.add_parser("status", help="a table of the lab's nodes"))
    p.set_defaults(func=cmd_status)

    p = common(lab_sub.add_parser("pcrs", help="a node's PCRs from its TPM next to its event log's replay",
                                  description="Exit 1 when they differ (a hidden tamper)."))
    p.add_argument("node", metavar="NODE")
    p.set_defaults(func=cmd_pcrs)

    faults = [
        ("reboot", "reboot", "reset the node's TPM and boot it again (--build to boot another build)"),
        ("boot", "reboot", "reboot the node into --build (e.g. the revoked tvmm-2025.4)"),
        ("tamper", "tamper", "measure an extra rogue component into PCR 4 (--hide: keep it out of the event log)"),
        ("stop-ssh", "stop_ssh", "stop the node's sshd: the node becomes unreachable"),
        ("start-ssh", "start_ssh", "start the node's sshd again"),
        ("freeze", "freeze", "SIGSTOP the node's processes: connections hang"),
        ("thaw", "thaw", "SIGCONT what freeze stopped"),
    ]
    for name, method, text in faults:
        p = common(lab_sub.add_parser(name, help=text, description=text))
        p.add_argument("node", metavar="NODE", help="node name (see lab status)")
        if name in ("reboot", "boot"):
            p.add_argument("--build", required=(name == "boot"), help="TVMM build to boot")
        if name == "reboot":
            p.add_argument("--next-boot", action="store_true",
                           help="boot what the node's boot directory names as next, from its own files "
                                "(the inventory's tcc_reboot_command)")
        if name == "tamper":
            p.add_argument("--hide", action="store_true", help="do not log the rogue measurement")
            p.add_argument("--persistent", action="store_true",
                           help="an implant in the boot chain: dormant now, measured at every boot from the next one")
        p.set_defaults(func=_fault(method))
