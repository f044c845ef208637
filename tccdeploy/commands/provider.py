"""`tccdeploy tc`, `enroll`, `attest` and `nodes`: the trusted coordinator from the command line."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..coordinator.records import NodeRecord, VMRecord
from ..tables import table

if TYPE_CHECKING:
    from ..engine.enforce import Report

MANIFESTS_ENV = "TCCDEPLOY_MANIFESTS"
TC_ENV = "TCCDEPLOY_TC"
ENGINE_DIR_ENV = "TCCDEPLOY_ENGINE_DIR"


def open_tc(args: argparse.Namespace, remote_ok: bool = False, operator: bool = False):  # type: ignore[no-untyped-def]
    """The TC a command talks to: the one served at --tc URL (remote_ok), else the embedded one
    over --state and the manifests (-m or $TCCDEPLOY_MANIFESTS). operator: the TC operator's own
    command on the TC's machine (no note that provider and TC are one party: there they are not)."""
    from ..coordinator.service import Coordinator
    from ..manifest.loader import load_manifests

    url = getattr(args, "tc", None)
    if url:
        if not remote_ok:
            raise SystemExit(f"error: `tccdeploy {args.command}` does not talk to a served TC yet; run it where the TC's "
                             "state is (without --tc), or use enroll/attest with --tc")
        from ..config import state_dir
        from ..coordinator.client import RemoteCoordinator, TCUnavailable

        engine_dir = args.engine_dir or os.path.join(state_dir(args.state), "engine")
        try:
            return RemoteCoordinator(url, engine_dir)
        except TCUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None

    paths = getattr(args, "manifests", None) or ([os.environ[MANIFESTS_ENV]] if os.environ.get(MANIFESTS_ENV) else [])
    if not paths:
        raise SystemExit(f"error: give the TC's manifests (perimeter, builds, rosters) with -m PATH (or set ${MANIFESTS_ENV})")
    result = load_manifests(paths)
    if result.perimeter is None:
        raise SystemExit(f"error: exactly one Perimeter is needed in {' '.join(paths)}; it holds {result.holds()} "
                         "(-m takes the TC's manifests: the Perimeter, TVMMBuilds, Platforms and NodeRosters)")
    from ..config import note_embedded, state_dir

    if not operator:
        note_embedded(state_dir(args.state))
    return Coordinator.from_manifests(result, args.state)


def _fan(args: argparse.Namespace, make_work, what: str) -> int:  # type: ignore[no-untyped-def]
    from .engine import _fan_out

    coordinator = open_tc(args, remote_ok=True)
    try:
        return _fan_out(args, args.pattern, make_work(coordinator), "module", what)
    finally:
        coordinator.close()


def cmd_enroll(args: argparse.Namespace) -> int:
    from ..engine.attestation import enroll

    return _fan(args, lambda tc: enroll(tc), "enroll")


def cmd_attest(args: argparse.Namespace) -> int:
    from ..engine.attestation import attest

    return _fan(args, lambda tc: attest(tc, args.admit), "attest")


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def existing_registry(state: str | None):  # type: ignore[no-untyped-def]
    """The embedded TC's registry for a command that reads it: opened, never created (a `nodes` in
    the wrong folder must not leave an empty TC behind and report no nodes as if that were so)."""
    from ..coordinator.service import registry_location
    from ..coordinator.store import Registry

    location = registry_location(state, create=False)
    if "://" not in location and not os.path.isfile(location):
        raise SystemExit(f"error: no TC registry at {location}: give the TC's state folder with --state DIR "
                         "(or $TCCDEPLOY_STATE), a served TC with --tc URL, or create one with `tccdeploy tc init`")
    return Registry(location)


class _RegistryNodes:
    """The embedded TC's view of nodes, with the served client's two reading methods."""

    def __init__(self, state: str | None):
        self.registry = existing_registry(state)

    def node_history(self, name: str, limit: int) -> tuple[dict | None, list[dict]]:  # type: ignore[type-arg]
        node = self.registry.node(name)
        return node, self.registry.attestations(name, limit=limit) if node else []

    def nodes(self) -> list[NodeRecord]:
        from ..coordinator.service import node_summaries

        return node_summaries(self.registry)

    def close(self) -> None:
        self.registry.close()


def cmd_nodes(args: argparse.Namespace) -> int:
    words = [w for w in args.node if w != "show"] if args.node else []
    if len(words) > 1:
        print("error: give one node: tccdeploy nodes show NODE", file=sys.stderr)
        return 2
    args.node = words[0] if words else None
    if args.ear or args.attestation is not None:
        return _nodes_ear(args)
    source = open_tc(args, remote_ok=True) if getattr(args, "tc", None) else _RegistryNodes(args.state)
    try:
        if args.node:
            node, history = source.node_history(args.node, args.limit)
            if node is None:
                print(f"error: no node {args.node!r} in the registry", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"node": node, "attestations": history}, indent=2, default=str))
                return 0
            print(f"{node['name']}: {node['state']}, site {node['site'] or '-'}, address {node['address']}, "
                  f"build {node['build'] or '-'}, platform {node.get('platform') or '-'}")
            for entry in history:
                reasons = ", ".join(r["code"] for r in entry["reasons"]) or "-"
                print(f"  #{entry['id']:<5} {_when(entry['time'])}  {entry['verdict']:<9}  {entry['build'] or '-':<12}  {reasons}")
            return 0
        rows = [{"name": n.name, "state": n.state, "site": n.site, "build": n.build, "platform": n.platform,
                 "last_attestation": n.last_attestation, "verdict": n.verdict, "reasons": n.reasons}
                for n in source.nodes()]
    finally:
        source.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [dict(r, last=_when(r["last_attestation"]), why=", ".join(r["reasons"])) for r in rows]
    print(table(shown, [("name", "NODE"), ("site", "SITE"), ("state", "STATE"), ("build", "BUILD"),
                        ("platform", "PLATFORM"), ("last", "LAST ATTESTATION"), ("verdict", "VERDICT"), ("why", "REASONS")]))
    return 0


def _ask_tc(args: argparse.Namespace, ask: Callable[[Any], dict[str, Any]], refused_status: int,
            label: str = "refused") -> tuple[dict[str, Any] | None, int]:
    """Open the TC the command names, ask it one decision or document, close it. A refusal is the
    TC's answer, not a failure of the command: its reason code goes to stderr with refused_status."""
    from ..coordinator.keybroker import Refused

    coordinator = open_tc(args, remote_ok=True)
    try:
        return ask(coordinator), 0
    except Refused as exc:
        print(f"{label}: {exc.reason}: {exc}", file=sys.stderr)
        return None, refused_status
    finally:
        coordinator.close()


def _nodes_ear(args: argparse.Namespace) -> int:
    """`nodes show NODE --ear`: the TC's signed attestation result, the bare JWT on stdout (for a
    pipe into another system), or with --json the token beside its decoded header and claims."""
    if not args.node:
        print("error: --ear needs a node: tccdeploy nodes show NODE --ear", file=sys.stderr)
        return 2
    if not args.tc:
        existing_registry(args.state).close()  # an embedded TC that is not there is not made here
    result, status = _ask_tc(args, lambda tc: tc.ear(args.node, args.attestation), 1, "error")
    if result is None:
        return status
    if args.json:
        header, claims, _ = result["token"].split(".")
        decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
        print(json.dumps(result | {"header": decode(header), "claims": decode(claims)}, indent=2))
    else:
        print(result["token"])
    return 0


def cmd_request_submit(args: argparse.Namespace) -> int:
    from ..coordinator.keybroker import Refused
    from ..crypto import bundle as bundles
    from ..crypto.request import sign_request
    from ..engine.launch import launch
    from ..engine.runner import Engine
    from .engine import _logging, load, select

    _logging(args.verbose)
    if args.request.endswith(".json"):
        with open(args.request) as fh:
            envelope = json.load(fh)
    else:
        envelope = sign_request(args.request, args.key)
    if args.tc and not args.inventory:
        return _customer_submit(args, envelope)
    coordinator = open_tc(args, remote_ok=True)
    inventory = load(args)
    try:
        with Engine(select(inventory, "all", args.limit), forks=args.forks, timeout=args.timeout, state=args.state) as engine:
            result = launch(engine, coordinator, envelope, envelope["bundle"])
    except (Refused, bundles.BundleError) as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    finally:
        coordinator.close()
    if args.explain:
        for c in result.candidates:
            print(f"  {c.node:<12} {'eligible' if c.eligible else 'not eligible'}: {', '.join(c.reasons)} (VMs {c.load})")
        print("  where the time went: " + ", ".join(f"{step} {1000 * seconds:.0f} ms" for step, seconds in result.steps.items()))
    name = envelope["request"]["manifest"]["metadata"]["name"]
    path = args.receipt or f"{name}.receipt.json"
    with open(path, "w") as fh:
        json.dump(result.receipt, fh, indent=2)
    print(f"{name}: running on {result.node}; receipt signed by the TC -> {path}")
    return 0


def _customer_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..coordinator.client import CustomerClient

    if not args.tc_cert:
        raise SystemExit("error: give the TC's certificates you pinned with --tc-cert tc.pem (from `tc show -o`)")
    return CustomerClient(args.tc, args.tc_cert)


def _customer_submit(args: argparse.Namespace, envelope: dict) -> int:  # type: ignore[type-arg]
    """The customer's side: the signed request and image descriptor go to the TC; the provider
    launches it (`request launch ID`) with the sealed image the customer gave it."""
    from ..coordinator.keybroker import Refused
    from ..crypto import bundle as bundles

    try:
        descriptor = bundles.load(envelope["bundle"], check_disk=False)
    except bundles.BundleError as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    client = _customer_client(args)
    try:
        accepted = client.submit(envelope, descriptor)
    except Refused as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(json.dumps(accepted) if args.json else
          f"request {accepted['id']} for VM {accepted['vm']} accepted by the TC; give the provider the sealed image, "
          f"then `tccdeploy request status {accepted['id']}` and `tccdeploy receipt fetch {accepted['id']}`")
    return 0


def cmd_request_status(args: argparse.Namespace) -> int:
    from .customer import customer_query

    status = customer_query(args, "status")
    if status is None:
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        where = f", VM {status['vm_state']} on {status['node']}" if status["node"] else ""
        print(f"request {status['request']} (VM {status['vm']}): {status['state']}{where}"
              + ("; a signed receipt is ready (`receipt fetch`)" if status["receipt"] else ""))
    return 0


def cmd_request_launch(args: argparse.Namespace) -> int:
    """The provider's side of a request a customer submitted to a served TC."""
    from ..coordinator.keybroker import Refused
    from ..crypto import bundle as bundles
    from ..engine.launch import launch_accepted
    from ..engine.runner import Engine
    from .engine import _logging, load, select

    _logging(args.verbose)
    coordinator = open_tc(args, remote_ok=True)
    try:
        record = coordinator.request_record(args.id)
        if record is None:
            print(f"error: the TC has no request {args.id}", file=sys.stderr)
            return 1
        if record.state != "accepted":
            print(f"error: request {args.id} is {record.state}, not waiting to be launched", file=sys.stderr)
            return 2
        with Engine(select(load(args), "all", args.limit), forks=args.forks, timeout=args.timeout, state=args.state) as engine:
            result = launch_accepted(engine, coordinator, record.as_dict(), args.bundle)
    except (Refused, bundles.BundleError) as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    finally:
        coordinator.close()
    print(f"{record.vm}: running on {result.node}; the customer fetches the signed receipt from the TC")
    return 0


def cmd_vms(args: argparse.Namespace) -> int:

    if args.repair:
        from ..engine.migrate import repair
        from ..engine.runner import Engine
        from .engine import load, select

        if not args.inventory or not (args.manifests or args.tc):
            print("error: vms --repair needs -i INVENTORY and -m MANIFESTS (or --tc URL)", file=sys.stderr)
            return 2
        coordinator = open_tc(args, remote_ok=True)
        try:
            with Engine(select(load(args), "all", None), state=args.state) as engine:
                for item in repair(engine, coordinator):
                    print(f"migration #{item['migration']} of {item['vm_id'][:12]}: {item['action']} ({item['node']})")
        finally:
            coordinator.close()

    source = open_tc(args, remote_ok=True) if getattr(args, "tc", None) else existing_registry(args.state)
    try:
        vms = [v if isinstance(v, VMRecord) else VMRecord.from_row(v) for v in source.vms(args.all)]
        rows = [{"name": v.name, "state": v.state, "node": v.node, "customer": v.customer, "vm_id": v.vm_id,
                 "image_sha256": v.image_sha256, "launched": v.launched} for v in vms]
    finally:
        source.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [dict(r, when=_when(r["launched"]), image=r["image_sha256"][:16] + "...") for r in rows]
    print(table(shown, [("name", "VM"), ("state", "STATE"), ("node", "NODE"), ("customer", "CUSTOMER"),
                        ("when", "LAUNCHED"), ("image", "IMAGE")]))
    return 0


def cmd_vm(args: argparse.Namespace) -> int:
    from ..engine.lifecycle import end_vm
    from .engine import _fan_out, load

    registry = open_tc(args, remote_ok=True)
    try:
        vm = registry.vm(args.vm)
        if vm is None or vm.node is None:
            print(f"error: no VM {args.vm!r} in the registry", file=sys.stderr)
            return 1
        inventory = load(args)
        if vm.node not in inventory.hosts:
            print(f"error: VM {args.vm} runs on {vm.node}, which is not in the inventory", file=sys.stderr)
            return 1

        if args.action in ("suspend", "resume"):
            return _suspend_or_resume(args, registry, vm.vm_id)  # by id: the name may be another's too

        def work(session):  # type: ignore[no-untyped-def]
            if args.action in ("poweroff", "destroy"):  # an end: the TC records it from the node's TPM evidence
                return end_vm(session, registry, vm.vm_id, vm.node, args.action)
            result = session.tvmm("vm_" + args.action, {"vm_id": vm.vm_id})
            if args.action in ("stop", "start"):  # pausing is the provider's call: the TC just notes it
                registry.set_vm_state(vm.vm_id, {"stop": "stopped", "start": "running"}[args.action])
            return result

        args.limit = None
        return _fan_out(args, vm.node, work, "module", f"vm {args.action}")
    finally:
        registry.close()


def _suspend_or_resume(args: argparse.Namespace, coordinator, vm_name: str) -> int:  # type: ignore[no-untyped-def]
    from ..coordinator.keybroker import Refused
    from ..engine.helper import RemoteError
    from ..engine.runner import Engine
    from ..engine.suspend import resume, suspend
    from .engine import load, select

    try:
        with Engine(select(load(args), "all", None), forks=args.forks, timeout=args.timeout, state=args.state) as engine:
            if args.action == "suspend":
                result = suspend(engine, coordinator, vm_name)
            else:
                result = resume(engine, coordinator, vm_name, args.on)
    except Refused as exc:
        print(f"refused: {exc.reason}: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"error: the node's TVMM service: {exc.reason or exc.kind}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "suspend":
        print(f"{args.vm} suspended on {result['node']}: {result['bytes']} bytes of state saved there, encrypted under "
              f"a key only the TC holds (suspension {result['suspension']})")
    else:
        print(f"{args.vm} resumed on {result['node']} (suspension {result['suspension']}, once)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..engine.migrate import migrate
    from ..engine.runner import Engine
    from .engine import _logging, load, select

    _logging(args.verbose)

    def moved(coordinator: Any) -> dict[str, Any]:
        with Engine(select(load(args), "all", args.limit), forks=args.forks, timeout=args.timeout, state=args.state) as engine:
            return migrate(engine, coordinator, args.vm, args.to)

    result, status = _ask_tc(args, moved, 2)
    if result is None:
        return status
    if args.json:
        print(json.dumps(result))
    else:
        rate = result["ciphertext_bytes"] / max(result["stream_seconds"], 1e-6) / 1e6
        print(f"{result['vm']}: migrated {result['from']} -> {result['to']} (encrypted, {result['ciphertext_bytes']} bytes "
              f"of stream in {result['stream_seconds']:.2f} s, {rate:.0f} MB/s), migration #{result['migration']} committed")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from ..engine.migrate import drain
    from ..engine.runner import Engine
    from .engine import _logging, load, select

    _logging(args.verbose)
    coordinator = open_tc(args, remote_ok=True)
    try:
        with Engine(select(load(args), "all", args.limit), forks=args.forks, timeout=args.timeout, state=args.state) as engine:
            results = drain(engine, coordinator, args.node)
    finally:
        coordinator.close()
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['vm']}: {r['result']}")
        print(f"{args.node}: drained ({len(results)} VM(s))" if all(r["ok"] for r in results)
              else f"{args.node}: not fully drained")
    return 0 if all(r["ok"] for r in results) else 2


def cmd_enforce(args: argparse.Namespace) -> int:
    import signal
    import time as _time

    from .. import logs
    from ..coordinator.client import TCUnavailable
    from ..engine.enforce import enforce_round, parse_shard
    from ..engine.runner import Engine
    from .engine import _logging, load, select

    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as exc:
        print(f"tccdeploy enforce: {exc}", file=sys.stderr)
        return 1
    _logging(args.verbose)
    logs.configure(args.log_format)
    stopping = {"now": False}

    def stop(signum, frame):  # type: ignore[no-untyped-def]
        stopping["now"] = True
        logs.emit("enforce.stopping", "enforce: stopping after this round")

    signal.signal(signal.SIGTERM, stop)
    rounds, failures, interval = 0, 0, float(args.interval or 60)
    while True:
        try:
            coordinator = open_tc(args, remote_ok=True)  # manifests re-read each round: a revoked build applies at once
            try:
                interval = args.interval or coordinator.enforce_interval()
                hosts = select(load(args), args.pattern, args.limit)
                # A pattern or --limit is this engine's part of the fleet: the admitted nodes outside
                # it are another engine's, not "not in the inventory".
                only = {h.name for h in hosts} if args.pattern != "all" or args.limit else None
                with Engine(hosts, forks=args.forks, timeout=args.timeout, state=args.state) as engine:
                    report = enforce_round(engine, coordinator, only=only, shard=shard)
            finally:
                coordinator.close()
        except TCUnavailable as exc:
            # The TC cannot decide now: no verdict, so nothing is quarantined on the TC's silence;
            # the nodes keep what they run, and the loop asks again, backing off.
            failures += 1
            wait = min(interval, 5.0 * 2 ** (failures - 1))
            logs.emit("enforce.tc-unavailable", f"enforce: the TC cannot be asked now ({exc}); round {rounds + 1} again "
                      f"in {wait:g} s", "warning", round=rounds + 1, retry_in=wait, error=str(exc))
            if args.once:
                return 1
            deadline = _time.monotonic() + wait
            while _time.monotonic() < deadline and not stopping["now"]:
                _time.sleep(0.2)
            if stopping["now"]:
                return 0
            continue
        failures = 0
        rounds += 1
        if args.json:
            print(json.dumps(report.as_dict()), flush=True)
        elif logs.is_json():
            summary = report.as_dict()
            logs.emit("enforce.round", f"round {rounds}: {len(report.quarantined)} quarantined",
                      "warning" if report.quarantined else "info", stream=sys.stdout, round=rounds, **summary)
        else:
            print_round(rounds, report)
        if args.once or stopping["now"]:
            return 2 if report.quarantined else 0
        deadline = _time.monotonic() + interval
        while _time.monotonic() < deadline and not stopping["now"]:
            _time.sleep(0.2)
        if stopping["now"]:
            return 0


def print_round(number: int, report: Report) -> None:
    """An enforcement round as `enforce` prints it on a terminal."""
    trusted = sum(1 for r in report.attested if r.status in ("ok", "changed"))
    print(f"enforce round {number}: {len(report.attested)} admitted node(s) re-attested, {trusted} trusted, "
          f"{len(report.quarantined)} quarantined in {report.elapsed:.2f} s", flush=True)
    for q in report.quarantined:
        print(f"  quarantined {q['node']}: {q['reason']}")
    if report.leased:
        print(f"  left {len(report.leased)} node(s) to the engines that lease them: "
              + ", ".join(f"{x['node']} ({x['engine']})" for x in report.leased[:10])
              + (" ..." if len(report.leased) > 10 else ""))
    for vm in report.vms:
        print(f"  VM {vm['vm']} on {vm['node']}: {vm['result']}", flush=True)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..coordinator import audit

    registry = open_tc(args, remote_ok=True) if getattr(args, "tc", None) else existing_registry(args.state)
    try:
        if args.audit_command == "verify":
            checkpoint = None
            if args.checkpoint:
                try:
                    with open(args.checkpoint) as fh:
                        checkpoint = json.load(fh)
                except (OSError, ValueError) as exc:
                    print(f"error: cannot read the checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
                    return 1
            ca, audit_pem = _audit_keys(args, registry)
            if ca is None:
                print("warning: no TC certificate here: the chain's hashes are checked, its signatures are not",
                      file=sys.stderr)
            result = audit.verify_entries(registry.audit_entries(), ca, audit_pem, args.expect_head, checkpoint)
            if args.json:
                print(json.dumps({"ok": result.ok, "entries": result.entries, "head": f"{result.entries}:{result.head}",
                                  "problem": result.problem}))
            elif result.ok:
                signed = ", every entry signed by the TC's audit key" if ca is not None else ""
                held = f", holds checkpoint {checkpoint['count']}" if checkpoint else ""
                print(f"ok: {result.entries} entries, chain intact{signed}{held}; head {result.entries}:{result.head}")
                if not checkpoint:
                    print("truncation leaves a shorter valid chain: anchor the head outside the TC (`tccdeploy tc audit "
                          "checkpoint`) and check it later with `audit verify --checkpoint FILE`")
            else:
                print(f"TAMPERED: {result.problem}", file=sys.stderr)
            return 0 if result.ok else 1
        since = None
        if args.since:
            try:
                since = datetime.datetime.fromisoformat(args.since).timestamp()
            except ValueError:
                print(f"error: --since takes an ISO time such as 2026-11-27T10:00, not {args.since!r}", file=sys.stderr)
                return 2
        entries = registry.audit_entries(args.node, args.vm, since)
    finally:
        registry.close()
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for e in entries:
        data = ", ".join(f"{k}={v}" for k, v in sorted(e["data"].items()) if v not in (None, [], ""))
        print(f"#{e['id']:<5} {_when(e['time'])}  {e['kind']:<20} {e['node'] or '-':<10} {(e['vm'] or '-')[:12]:<12} {data}")
    return 0


def _audit_keys(args: argparse.Namespace, source):  # type: ignore[no-untyped-def]
    """(TC CA certificate, audit certificate PEM) to check the chain's signatures with: pinned
    in the engine's folder and fetched from a served TC, or the TC's own state."""
    from cryptography import x509

    from ..config import state_dir
    from ..coordinator import identity

    if getattr(args, "tc", None):
        with open(os.path.join(source.engine_dir, "tc-ca.pem"), "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read()), source.audit_certificate()
    state = state_dir(args.state)
    if not os.path.exists(os.path.join(state, identity.KEY_FILE)):
        return None, None
    ident = identity.load(state)
    return ident.certificate, ident.purpose("audit").all_pem


def add_tc_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that acts through the engine on the TC's behalf."""
    from .engine import add_run_args

    p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                   help=f"perimeter and TVMM build manifests (files or directories; default ${MANIFESTS_ENV})")
    p.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL",
                   help=f"a served TC (tccdeploy tc serve) instead of the embedded one (default ${TC_ENV})")
    p.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR",
                   help="this engine's client certificate, from `tc engines add` (default STATE/engine)")
    add_run_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    from .engine import add_run_args

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("pattern", nargs="?", default="all", metavar="PATTERN", help="host pattern (default all)")
        add_tc_args(p)

    p = sub.add_parser("enroll", help="enroll nodes' TPMs with the trusted coordinator",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Check each node's EK certificate against the perimeter's TPM vendors, create an\n"
                                   "attestation key and bind it to the EK (MakeCredential/ActivateCredential), pin the\n"
                                   "node's SSH host key. The EK must be on the TC's node roster, which gives the node\n"
                                   "its site. A node already enrolled with this TPM is left as it is; one whose TPM\n"
                                   "changed is refused (ek.changed) until the TC's operator runs\n"
                                   "`tccdeploy tc nodes replace-tpm NODE`.",
                       epilog="example:\n  tccdeploy enroll -i .lab/inventory -m .lab/manifests")
    common(p)
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
    p.add_argument("--ear", action="store_true",
                   help="print the node's latest verdict as the TC's signed EAR (a JWT: RATS EAT Attestation Result "
                        "with the AR4SI trust vector; verify it with any JOSE library against the TC CA)")
    p.add_argument("--attestation", type=int, metavar="ID", help="with --ear: that verdict (an id from `nodes show NODE`)")
    p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                   help="with --ear and an embedded TC: its manifests (the perimeter names the EAR's policy and validity)")
    p.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help="a served TC")
    p.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR", help="engine credentials for --tc")
    p.add_argument("--state", help="TC state directory (default $TCCDEPLOY_STATE or ~/.local/state/tccdeploy)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("request", help="placement requests: submit a signed request and launch the VM")
    rq = p.add_subparsers(dest="request_command", metavar="ACTION", required=True)
    from .customer import cmd_request_sign, default_key

    q = rq.add_parser("sign", help="sign a PlacementRequest (customer side; single use)")
    q.add_argument("request", metavar="REQUEST.yml")
    q.add_argument("--key", default=default_key(), help="the customer's key")
    q.add_argument("-o", "--output", required=True, metavar="SIGNED.json")
    q.set_defaults(func=cmd_request_sign)
    q = rq.add_parser("submit", help="submit a request: place, re-attest, release the key, upload, start, receipt "
                                     "(customer, with --tc and no -i: send it to a served TC)",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="REQUEST is a signed request (SIGNED.json from `request sign`) or a PlacementRequest\n"
                                  "YAML signed on the fly with --key. The TC accepts each request once.\n"
                                  "With -i (the provider): place and launch it now, through the embedded TC or --tc.\n"
                                  "With --tc and --tc-cert but no -i (the customer): send it to the served TC, which\n"
                                  "prints its id; the provider launches it with `request launch ID`.\n\n"
                                  "exit status: 0 running (or accepted), 2 refused (with its reason), 1 error",
                      epilog="examples:\n  tccdeploy request submit web.json -i .lab/inventory -m .lab/manifests --explain\n"
                             "  tccdeploy request submit web.json --tc https://tc:8443 --tc-cert tc.pem")
    q.add_argument("request", metavar="REQUEST")
    q.add_argument("--key", default=default_key(), help="the customer's key (for a YAML request)")
    q.add_argument("--explain", action="store_true", help="say why each node was or was not chosen, and where the launch's time went (each step)")
    q.add_argument("--receipt", metavar="FILE", help="where to write the receipt (default VM.receipt.json)")
    q.add_argument("--tc-cert", metavar="TC_CERT", help="customer, with --tc and no -i: the TC certificates you pinned")
    add_tc_args(q)
    q.set_defaults(func=cmd_request_submit)
    q = rq.add_parser("status", help="customer: a request's state at a served TC (a signed query)")
    q.add_argument("id", metavar="REQUEST_ID")
    q.add_argument("--tc", required=True, metavar="URL", help="the served TC")
    q.add_argument("--tc-cert", required=True, metavar="TC_CERT", help="the TC certificates you pinned (tc show -o)")
    q.add_argument("--key", default=default_key(), help="your customer key (signs the query)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_request_status)
    q = rq.add_parser("launch", help="provider: launch a request a customer submitted to a served TC",
                      description="Place, re-attest, release the key and start the VM of an accepted request, with the\n"
                                  "sealed image the customer handed over (--bundle).")
    q.add_argument("id", metavar="REQUEST_ID")
    q.add_argument("--bundle", required=True, metavar="DIR", help="the sealed image (from `image seal`)")
    add_tc_args(q)
    q.set_defaults(func=cmd_request_launch)

    p = sub.add_parser("migrate", help="move a VM to another trusted node, encrypted end to end",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The destination is attested now and must be admitted; the TC re-wraps the VM key to its\n"
                                   "TK. The source encrypts QEMU's migration stream (STREAM, AES-256-GCM) under a fresh key\n"
                                   "only the destination's TPM can unwrap; the engine relays ciphertext. Committed only when\n"
                                   "the destination runs; any failure before that leaves the VM running on the source.")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--to", default="auto", metavar="NODE", help="destination node, or auto (placement chooses; default)")
    add_tc_args(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("drain", help="migrate every VM off a node, for maintenance",
                       description="Each running VM of NODE migrates (encrypted) to a trusted node placement picks.\n"
                                   "exit status: 0 drained, 2 a VM could not be moved (it keeps running where it was)")
    p.add_argument("node", metavar="NODE")
    add_tc_args(p)
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("enforce", help="re-attest every admitted node, quarantine failures, handle their VMs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="A loop (or one round with --once, for cron or CI): every admitted node is re-attested\n"
                                   "with a fresh nonce; a failure (changed boot, revoked build, outside the perimeter, or\n"
                                   "unreachable past the grace period) quarantines it: certificate revoked, no key released,\n"
                                   "its VMs handled by the perimeter's onFailure policy. SIGTERM ends it after the round.\n\n"
                                   "Several engines can share a fleet: each with its own engine certificate and a shard,\n"
                                   "  tccdeploy enforce -i inv/ --tc URL --shard 1/2     (on one machine)\n"
                                   "  tccdeploy enforce -i inv/ --tc URL --shard 2/2     (on another)\n"
                                   "Each round leases its nodes from the TC; a node another engine leases is left to it.\n\n"
                                   "exit status (--once): 0 all trusted, 2 a node was quarantined, 1 error")
    common(p)
    p.add_argument("--interval", type=float, help="seconds between rounds (default: the perimeter's intervalSeconds)")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--shard", metavar="K/N",
                   help="enforce only shard K of N (the admitted nodes whose name hashes there), for N engines "
                        "sharing the fleet")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: each round and each message as one JSON object per line (time, level, event, message, "
                        "the round's figures), for a log pipeline (default text)")
    p.set_defaults(func=cmd_enforce)

    p = sub.add_parser("audit", help="the TC's hash-chained audit log: verify it, show it",
                       description="Every TC decision (enrollment, verdict, admission, quarantine, request, key release,\n"
                                   "launch) is appended to a hash chain. verify: exit 1 on any edit, deletion or reordering.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    au = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    q = au.add_parser("verify", help="recompute the chain (with --tc: from the entries a served TC returns)")
    q.add_argument("--expect-head", metavar="N:HASH", help="the head recorded earlier (detects removed newest entries)")
    q.add_argument("--checkpoint", metavar="FILE", help="a signed checkpoint published earlier (`tc audit checkpoint`): "
                                                        "the chain must still hold it")
    q.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help="a served TC")
    q.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR", help="engine credentials for --tc")
    q.add_argument("--state", help="TC state directory")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_audit)
    q = au.add_parser("show", help="list entries, filtered by node, VM, time")
    q.add_argument("--node", help="only this node")
    q.add_argument("--vm", help="only this VM id")
    q.add_argument("--since", metavar="ISO_TIME", help="only entries from this time on")
    q.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help="a served TC")
    q.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR", help="engine credentials for --tc")
    q.add_argument("--state", help="TC state directory")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_audit)

    p = sub.add_parser("vms", help="VMs in the TC's registry (--repair: finish or roll back interrupted migrations)")
    p.add_argument("--all", action="store_true", help="include destroyed VMs")
    p.add_argument("--repair", action="store_true", help="finish or roll back migrations an interrupted run left")
    p.add_argument("-i", "--inventory", default=os.environ.get("TCCDEPLOY_INVENTORY"), help="inventory (for --repair)")
    p.add_argument("-m", "--manifests", action="append", metavar="PATH", help="perimeter and builds (for --repair)")
    p.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help="a served TC")
    p.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR", help="engine credentials for --tc")
    p.add_argument("--state", help="TC state directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vms)

    p = sub.add_parser("vm", help="pause, continue, power off, destroy, suspend or resume a VM",
                       description="stop and start pause and continue a VM (the TC notes it). poweroff (memory gone, "
                                   "encrypted disk kept) and destroy (disk gone too) end it: the TC issues an end "
                                   "ticket, the node's TVMM service acts on it and answers with its TPM's evidence, "
                                   "and only that evidence ends the VM in the TC's records. suspend saves the VM's "
                                   "state on its node under a fresh key only the TC holds; resume (--on NODE: another "
                                   "trusted node, which gets the disk and the state as ciphertext) runs it again, "
                                   "once.")
    p.add_argument("action", choices=("status", "stop", "start", "poweroff", "destroy", "suspend", "resume"))
    p.add_argument("vm", metavar="VM", help="VM name or id")
    p.add_argument("--on", metavar="NODE", help="resume: the node to resume on (default: where it was suspended)")
    p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                   help=f"the embedded TC's manifests (default ${MANIFESTS_ENV}); not with --tc")
    p.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help="a served TC")
    p.add_argument("--engine-dir", default=os.environ.get(ENGINE_DIR_ENV), metavar="DIR", help="engine credentials for --tc")
    add_run_args(p)
    p.set_defaults(func=cmd_vm)
