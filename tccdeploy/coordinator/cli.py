"""`tccdeploy tc`, `enroll`, `attest` and `nodes`: the trusted coordinator from the command line."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

MANIFESTS_ENV = "TCCDEPLOY_MANIFESTS"


def _coordinator(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..manifest.loader import load_manifests
    from .service import Coordinator

    paths = args.manifests or ([os.environ[MANIFESTS_ENV]] if os.environ.get(MANIFESTS_ENV) else [])
    if not paths:
        raise SystemExit(f"error: give the perimeter and builds with -m PATH (or set ${MANIFESTS_ENV})")
    result = load_manifests(paths)
    if result.perimeter is None:
        raise SystemExit(f"error: exactly one Perimeter is needed in {' '.join(paths)} (found {len(result.perimeters)})")
    return Coordinator(result.perimeter, result.builds, args.state)


def _fan(args: argparse.Namespace, make_work, what: str) -> int:  # type: ignore[no-untyped-def]
    from ..engine.cli import _fan_out

    coordinator = _coordinator(args)
    try:
        return _fan_out(args, args.pattern, make_work(coordinator), "module", what)
    finally:
        coordinator.close()


def cmd_enroll(args: argparse.Namespace) -> int:
    from ..engine.attestation import enroll

    return _fan(args, lambda tc: enroll(tc, args.force), "enroll")


def cmd_attest(args: argparse.Namespace) -> int:
    from ..engine.attestation import attest

    return _fan(args, lambda tc: attest(tc, args.admit), "attest")


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def cmd_nodes(args: argparse.Namespace) -> int:
    from ..config import state_dir
    from .store import Registry

    words = [w for w in args.node if w != "show"] if args.node else []
    if len(words) > 1:
        print("error: give one node: tccdeploy nodes show NODE", file=sys.stderr)
        return 2
    args.node = words[0] if words else None
    registry = Registry(os.path.join(state_dir(args.state), "registry.sqlite"))
    try:
        if args.node:
            if registry.node(args.node) is None:
                print(f"error: no node {args.node!r} in the registry", file=sys.stderr)
                return 1
            history = registry.attestations(args.node, limit=args.limit)
            if args.json:
                print(json.dumps({"node": registry.node(args.node), "attestations": history}, indent=2, default=str))
                return 0
            node = registry.node(args.node)
            print(f"{node['name']}: {node['state']}, site {node['site'] or '-'}, address {node['address']}, build {node['build'] or '-'}")
            for entry in history:
                reasons = ", ".join(r["code"] for r in entry["reasons"]) or "-"
                print(f"  #{entry['id']:<5} {_when(entry['time'])}  {entry['verdict']:<9}  {entry['build'] or '-':<12}  {reasons}")
            return 0
        rows = []
        for node in registry.nodes():
            last = registry.attestations(node["name"], limit=1)
            rows.append({"name": node["name"], "state": node["state"], "site": node["site"], "build": node["build"],
                         "last_attestation": last[0]["time"] if last else None,
                         "verdict": last[0]["verdict"] if last else None,
                         "reasons": [r["code"] for r in last[0]["reasons"]] if last else []})
    finally:
        registry.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NODE':<12} {'SITE':<7} {'STATE':<11} {'BUILD':<12} {'LAST ATTESTATION':<19} {'VERDICT':<9} REASONS")
    for r in rows:
        print(f"{r['name']:<12} {r['site'] or '-':<7} {r['state']:<11} {r['build'] or '-':<12} "
              f"{_when(r['last_attestation']):<19} {r['verdict'] or '-':<9} {', '.join(r['reasons']) or '-'}")
    return 0


def cmd_tc(args: argparse.Namespace) -> int:
    from ..config import state_dir
    from . import identity

    state = state_dir(args.state)
    if args.tc_command == "init":
        ident, created = identity.init(state)
        print(("created" if created else "exists") + f": TC identity in {state}")
        print(f"fingerprint (SHA-256): {ident.fingerprint}")
        return 0
    ident = identity.load(state)
    if args.json:
        print(json.dumps({"fingerprint": ident.fingerprint, "certificate": ident.pem, "subject": ident.certificate.subject.rfc4514_string()}))
    else:
        print(ident.pem, end="")
        print(f"fingerprint (SHA-256): {ident.fingerprint}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..engine.cli import add_run_args

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("pattern", nargs="?", default="all", metavar="PATTERN", help="host pattern (default all)")
        p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                       help=f"perimeter and TVMM build manifests (files or directories; default ${MANIFESTS_ENV})")
        add_run_args(p)

    p = sub.add_parser("enroll", help="enroll nodes' TPMs with the trusted coordinator",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Check each node's EK certificate against the perimeter's TPM vendors, create an\n"
                                   "attestation key and bind it to the EK (MakeCredential/ActivateCredential), pin the\n"
                                   "node's SSH host key. A node whose TPM changed is refused unless --force.",
                       epilog="example:\n  tccdeploy enroll -i .lab/inventory -m .lab/manifests")
    common(p)
    p.add_argument("--force", action="store_true", help="re-enroll a node whose TPM changed (operator-approved)")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("attest", help="attest nodes: fresh quote, event log, builds and perimeter checked by the TC",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Ask each node for a quote over the policy's PCRs with a fresh TC nonce, its event log\n"
                                   "and (where its site has one) a certified asset tag; the TC verifies everything and\n"
                                   "records the verdict with every reason. Untrusted nodes are reported as failed (exit 2).",
                       epilog="example:\n  tccdeploy attest -i .lab/inventory -m .lab/manifests")
    common(p)
    p.add_argument("--admit", action="store_true",
                   help="admit trusted nodes: create their PCR-bound trusted key, check it, issue its certificate")
    p.set_defaults(func=cmd_attest)

    p = sub.add_parser("nodes", help="nodes in the TC's registry: state, build, last verdict",
                       description="List the registry's nodes, or one node's attestation history with NODE.")
    p.add_argument("node", nargs="*", metavar="[show] NODE", help="show this node's history (`nodes show NODE` or `nodes NODE`)")
    p.add_argument("--limit", type=int, default=20, help="history entries (default 20)")
    p.add_argument("--state", help="TC state directory (default $TCCDEPLOY_STATE or ~/.local/state/tccdeploy)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("tc", help="the trusted coordinator's identity",
                       description="init: create the TC's CA key (0600) and certificate; show: print them for customers to pin.")
    p.add_argument("tc_command", choices=("init", "show"), metavar="ACTION", help="init or show")
    p.add_argument("--state", help="TC state directory (default $TCCDEPLOY_STATE or ~/.local/state/tccdeploy)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tc)
