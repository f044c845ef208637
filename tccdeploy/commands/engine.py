"""`tccdeploy ping`, `tccdeploy run` and `tccdeploy inventory`: the engine from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

from ..inventory import Inventory
from ..inventory.patterns import PatternError
from ..manifest.loader import load_inventory

if TYPE_CHECKING:
    from ..engine.runner import Session

# The engine (paramiko) is imported by the commands that connect, not when the parser is
# built: `tccdeploy --help` and `tccdeploy validate` stay fast.
DEFAULT_TIMEOUT = 10.0

INVENTORY_ENV = "TCCDEPLOY_INVENTORY"


def add_inventory_args(p: argparse.ArgumentParser, limit: bool = True) -> None:
    p.add_argument("-i", "--inventory", default=os.environ.get(INVENTORY_ENV),
                   help=f"inventory file or directory, Ansible's YAML or INI format (default ${INVENTORY_ENV})")
    if limit:
        p.add_argument("-l", "--limit", metavar="SUBSET", help="further limit hosts with a pattern (web:&site1:!node3)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_inventory_args(p)
    p.add_argument("-f", "--forks", type=int, default=20, help="hosts worked on at once (default 20)")
    p.add_argument("-T", "--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait to connect, log in and get an answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail; -vvv shows the node's tracebacks")
    p.add_argument("--json", action="store_true", help="print a JSON array of per-host results")
    p.add_argument("--trust-new-host-keys", action="store_true",
                   help="accept and record host keys seen for the first time (first enrollment only; logged)")
    p.add_argument("--state", help="tccdeploy state directory (default $TCCDEPLOY_STATE or ~/.local/state/tccdeploy)")


def load(args: argparse.Namespace) -> Inventory:
    if not args.inventory:
        raise SystemExit(_usage(f"no inventory: give -i FILE or set ${INVENTORY_ENV}"))
    return load_inventory(args.inventory)


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def select(inventory: Inventory, pattern: str, limit: str | None) -> list:
    hosts = inventory.select(pattern)
    if limit:
        allowed = {h.name for h in inventory.select(limit)}
        hosts = [h for h in hosts if h.name in allowed]
    return hosts


def _logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 2 else logging.INFO if verbosity < 4 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if verbosity < 4:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def _fan_out(args: argparse.Namespace, pattern: str, work, kind: str, what: str) -> int:  # type: ignore[no-untyped-def]
    _logging(args.verbose)
    inventory = load(args)
    try:
        hosts = select(inventory, pattern, args.limit)
    except PatternError as exc:
        return _usage(str(exc))
    if not hosts:
        print("no hosts matched; nothing to do", file=sys.stderr)
        return 0
    from ..engine.output import Output
    from ..engine.runner import Engine, exit_code

    output = Output(args.verbose, args.json)
    output.start(len(hosts), what)
    engine = Engine(hosts, forks=args.forks, timeout=args.timeout,
                    trust_new_host_keys=args.trust_new_host_keys, state=args.state)
    try:
        results = engine.run(work, on_result=lambda r: output.result(r, kind), label=what)
    except KeyboardInterrupt:
        print("\n[ERROR]: User interrupted execution", file=sys.stderr)
        return 99
    finally:
        engine.close()
    output.finish()
    return exit_code(results)


def cmd_ping(args: argparse.Namespace) -> int:
    def work(session: Session) -> dict:
        answer = session.call("ping")
        out = {"ping": answer.get("ping"), "changed": False}
        if args.verbose:
            out["helper_uploaded"] = session.helper.uploaded
            out["node"] = answer.get("node")
        return out

    return _fan_out(args, args.pattern, work, "module", "ping")


def cmd_run(args: argparse.Namespace) -> int:
    try:
        argv = shlex.split(args.args)
    except ValueError as exc:
        return _usage(f"cannot parse the command {args.args!r}: {exc}")
    if not argv:
        return _usage("the command is empty")
    # Each word quoted for the login shell, so it reaches the program exactly as given: no
    # globbing, pipes or variables, as with Ansible's command module. Nothing needs the helper
    # here, so the command goes straight over the SSH channel.
    remote = shlex.join(argv)

    def work(session: Session) -> dict:
        start = time.monotonic()
        rc, out, err = session.connect().exec(remote, timeout=args.command_timeout)
        result = {"rc": rc, "stdout": out.decode(errors="replace").rstrip("\n"),
                  "stderr": err.decode(errors="replace").rstrip("\n"), "changed": True,
                  "delta": round(time.monotonic() - start, 3), "cmd": argv}
        if rc == 127 and not out:
            result["msg"] = f"[Errno 2] No such file or directory: {argv[0]!r}"
        if rc:
            result["failed"] = True
            result.setdefault("msg", "non-zero return code")
        return result

    return _fan_out(args, args.pattern, work, "command", f"command {args.args!r}")


def cmd_inventory(args: argparse.Namespace) -> int:
    inventory = load(args)
    if args.host:
        if args.host not in inventory.hosts:
            return _usage(f"no host {args.host!r} in the inventory")
        print(json.dumps(inventory.hosts[args.host].vars, indent=4, sort_keys=True, default=str))
        return 0
    if args.graph:
        print(inventory.graph())
        return 0
    print(json.dumps(inventory.as_ansible_list(), indent=4, sort_keys=True, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ping", help="reach hosts over SSH and start tccdeploy's helper on them (Ansible's ping)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Connect to every host (strict host-key checking), start the node helper (uploading it\n"
                    "once per version) and check it answers.\n\n"
                    "exit status: 0 all ok, 2 a host failed, 4 a host was unreachable, 1 error",
        epilog="examples:\n  tccdeploy ping -i .lab/inventory\n  tccdeploy ping site1 -i .lab/inventory -l '!node3' --json",
    )
    p.add_argument("pattern", nargs="?", default="all", metavar="PATTERN", help="host pattern (default all)")
    add_run_args(p)
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser(
        "run", help="run an ad-hoc command on hosts (Ansible's command module: no shell)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a command on every matched host through the node helper, without a shell\n"
                    "(quote arguments as you would in a shell; pipes and redirections are not interpreted).\n\n"
                    "exit status: 0 all ok, 2 a command failed, 4 a host was unreachable, 1 error",
        epilog="examples:\n  tccdeploy run all -i .lab/inventory -a 'uname -r'\n  tccdeploy run site2 -i inv.yml -a 'systemctl is-active qemu' -f 50",
    )
    p.add_argument("pattern", metavar="PATTERN", help="host pattern, e.g. all, site1, 'site1:!node3'")
    p.add_argument("-a", "--args", required=True, metavar="COMMAND", help="the command line to run")
    p.add_argument("--command-timeout", type=float, default=60.0, help="seconds the command may run (default 60)")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "inventory", help="show the inventory as tccdeploy (and Ansible) reads it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the inventory as `ansible-inventory` does: --list (JSON, the default), --graph, --host HOST.",
    )
    add_inventory_args(p, limit=False)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="all groups and host variables as JSON (default)")
    group.add_argument("--graph", action="store_true", help="the group tree")
    group.add_argument("--host", metavar="HOST", help="one host's variables as JSON")
    p.set_defaults(func=cmd_inventory)
