"""`tccdeploy tc ...`: the TC operator's commands, run on the TC's machine against its state.

The TC's operator is the third party TCCP trusts; these are the decisions only it takes: the
TC's identity, which customers and engines may talk to it, which machines are inside the
perimeter (the roster), letting a quarantined node back in, accepting a changed TPM, and
publishing signed checkpoints of the audit log. None of them is reachable over the API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import closing

from ..config import state_dir, state_path
from ..tables import table

MANIFESTS_ENV = "TCCDEPLOY_MANIFESTS"


def _when(timestamp: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def open_tc(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The TC itself, over this machine's state and its manifests: the operator's commands act on it."""
    from .provider import open_tc as open_any

    return open_any(args, operator=True)


def _registry(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The TC's registry, for the operator's commands on a TC that exists (`tc init` made its
    identity; the registry itself is made at its first use): a wrong --state creates nothing."""
    from ..coordinator import identity
    from ..coordinator.service import registry_location
    from ..coordinator.store import Registry

    if not os.path.isfile(os.path.join(state_path(args.state), identity.CERT_FILE)):
        raise SystemExit(f"error: no TC in {state_path(args.state)}: give the TC's state folder with --state DIR "
                         "(or $TCCDEPLOY_STATE), or create the TC with `tccdeploy tc init`")
    return Registry(registry_location(args.state))


# -- identity ------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from ..coordinator import identity

    state = state_dir(args.state)
    ident, created = identity.init(state)
    print(("created" if created else "exists") + f": TC identity in {state}")
    print(f"fingerprint (SHA-256): {ident.fingerprint}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..coordinator import identity

    ident = identity.load(state_path(args.state))  # read only: a wrong --state creates nothing
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(ident.bundle_pem)
        print(f"wrote the TC's CA, key-wrapping and signing certificates to {args.output}")
        print(f"fingerprint (SHA-256): {ident.fingerprint}")
        return 0
    if args.json:
        print(json.dumps({"fingerprint": ident.fingerprint, "certificate": ident.pem,
                          "subject": ident.certificate.subject.rfc4514_string()}))
    else:
        print(ident.pem, end="")
        print(f"fingerprint (SHA-256): {ident.fingerprint}")
    return 0


# -- customers and engines -------------------------------------------------------------------
def cmd_customers(args: argparse.Namespace) -> int:
    from ..crypto import customer

    with closing(_registry(args)) as registry:
        if args.action == "add":
            if not args.name or not args.key:
                print("usage: tccdeploy tc customers add NAME ed25519:KEY", file=sys.stderr)
                return 2
            public = customer.parse_public(args.key)
            registry.add_customer(args.name, customer.public_text(public), customer.key_id(public))
            print(f"customer {args.name} registered (key id {customer.key_id(public)})")
            return 0
        rows = [{"name": c["name"], "key_id": c["key_id"], "key": c["key"]} for c in registry.customers()]
        print(json.dumps(rows, indent=2) if args.json else "\n".join(f"{r['name']:<16} {r['key_id']}" for r in rows))
        return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Webhooks: add writes the new secret to a 0600 file (never to the terminal or argv)."""
    from ..coordinator import webhooks
    from ..crypto.files import atomic_write

    with closing(_registry(args)) as registry:
        if args.action == "add":
            if not args.name or not args.url or not args.secret_file:
                print("usage: tccdeploy tc webhooks add NAME URL --secret-file FILE [--events TYPE,...]", file=sys.stderr)
                return 2
            events = [e.strip() for e in (args.events or ",".join(webhooks.DEFAULT_EVENTS)).split(",") if e.strip()]
            try:
                webhooks.check(args.name, args.url, events)
            except webhooks.WebhookError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if os.path.exists(args.secret_file):
                print(f"error: {args.secret_file} exists; give a new file for the webhook's secret", file=sys.stderr)
                return 2
            secret = webhooks.new_secret()
            atomic_write(args.secret_file, secret.encode() + b"\n", 0o600)
            cursor = 0 if args.from_start else registry.audit_head()
            if not registry.add_webhook(args.name, args.url, secret, events, cursor):
                os.unlink(args.secret_file)
                print(f"error: a webhook named {args.name} exists; remove it first", file=sys.stderr)
                return 2
            print(f"webhook {args.name} -> {args.url}: {', '.join(events)}; from audit entry {cursor + 1} on. Its "
                  f"secret (for the receiver to verify the webhook-signature header) is in {args.secret_file} (0600)")
            return 0
        if args.action == "remove":
            if not args.name:
                print("usage: tccdeploy tc webhooks remove NAME", file=sys.stderr)
                return 2
            if not registry.remove_webhook(args.name):
                print(f"error: no webhook named {args.name}", file=sys.stderr)
                return 1
            print(f"webhook {args.name} removed; its undelivered events will not be sent")
            return 0
        rows = webhooks.status(registry)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no webhooks; add one with `tccdeploy tc webhooks add NAME URL --secret-file FILE`")
            return 0
        shown = [dict(r, oldest=None if r["oldest_pending_age"] is None else f"{r['oldest_pending_age']:g} s",
                      next=_when(r["next_attempt"]) if r["next_attempt"] else None) for r in rows]
        print(table(shown, [("name", "webhook"), ("url", "url"), ("pending", "pending"), ("delivered", "delivered"),
                            ("oldest", "oldest pending"), ("attempts", "attempts"), ("next", "next attempt"),
                            ("last_error", "last error")]))
        return 0


def engine_name_problem(name: str) -> str | None:
    """Why name cannot be an engine's, or None. An engine's name is its leases' holder and its
    folder's name: "local" is the embedded TC's own engine (a served engine of that name would
    share its leases), and a path or odd characters would put its key elsewhere."""
    import re

    from ..coordinator.store import LOCAL_ENGINE

    if name == LOCAL_ENGINE:
        return "\"local\" is the name an embedded TC gives its own engine; choose another"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
        return "use 1 to 63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def cmd_engines(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes

    from ..coordinator import identity, tls

    state = state_path(args.state)
    with closing(_registry(args)) as registry:
        if args.action in ("add", "remove") and not args.name:
            print(f"usage: tccdeploy tc engines {args.action} NAME", file=sys.stderr)
            return 2
        if args.action == "add":
            problem = engine_name_problem(args.name)
            if problem:
                print(f"error: engine name {args.name!r}: {problem}", file=sys.stderr)
                return 2
            folder = args.output or os.path.join(state, "engines", args.name)
            cert = tls.engine_certificate(identity.load(state), args.name, folder)
            registry.add_engine(args.name, format(cert.serial_number, "x"), cert.fingerprint(hashes.SHA256()).hex())
            print(f"engine {args.name}: client certificate and key (0600) in {folder}; give that folder to the engine "
                  f"(--engine-dir {folder}); it pins the TC's CA in tc-ca.pem")
            return 0
        if args.action == "remove":
            if not registry.revoke_engine(args.name):
                print(f"error: no active engine {args.name!r}", file=sys.stderr)
                return 1
            print(f"engine {args.name} removed: its certificate is refused from now on")
            return 0
        rows = registry.engines()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(table([dict(r, added=_when(r["added"]), state="removed" if r["revoked"] else "active") for r in rows],
                        [("name", "ENGINE"), ("state", "STATE"), ("serial", "CERTIFICATE SERIAL"), ("added", "ADDED")]))
        return 0


# -- the roster and the nodes ------------------------------------------------------------------
def cmd_roster(args: argparse.Namespace) -> int:
    from ..coordinator.refusals import Refused

    with closing(open_tc(args)) as tc:
        try:
            if args.action == "list":
                rows = [{"ek": e.ek, "site": e.site, "name": e.name, "capacity": e.capacity, "source": e.source}
                        for e in tc.roster_entries()]
                if args.json:
                    print(json.dumps(rows, indent=2))
                else:
                    print(table(rows, [("site", "SITE"), ("name", "NODE"), ("ek", "EK"), ("capacity", "CAPACITY"),
                                       ("source", "FROM")]))
                return 0
            if args.action == "add":
                if not args.site or not args.ek:
                    print("usage: tccdeploy tc roster add SITE EK [--name NODE] [--capacity N]", file=sys.stderr)
                    return 2
                entry = tc.roster_add(args.ek, args.site, args.name, args.capacity)
                print(f"roster: {entry.ek} is a machine of site {entry.site}" + (f", node {entry.name}" if entry.name else ""))
                return 0
            ek = args.site  # `roster remove EK`: the one positional is the EK
            if not ek:
                print("usage: tccdeploy tc roster remove EK", file=sys.stderr)
                return 2
            if not tc.roster_remove(ek):
                print(f"error: {ek} is not on the roster (tc roster list shows it)", file=sys.stderr)
                return 1
            print(f"roster: {ek} removed; the node fails attestation (perimeter.not-in-roster) from its next round")
            return 0
        except (Refused, ValueError) as exc:
            print(f"error: {getattr(exc, 'reason', 'roster')}: {exc}", file=sys.stderr)
            return 1


def cmd_nodes(args: argparse.Namespace) -> int:
    with closing(open_tc(args)) as tc:
        if args.action == "release":
            if not tc.release_node(args.node, args.note or ""):
                row = tc.node(args.node)
                print(f"error: {args.node} is {row.state if row else 'not in the registry'}, not quarantined",
                      file=sys.stderr)
                return 1
            print(f"{args.node} released: enrolled again; it is admitted only after a fresh trusted attestation "
                  "(tccdeploy attest --admit)")
            return 0
        if not tc.replace_tpm(args.node, args.note or ""):
            print(f"error: {args.node} is not enrolled: nothing to replace", file=sys.stderr)
            return 1
        print(f"{args.node}: its TPM identity is gone and its certificates revoked; enroll it again (the new EK must be "
              "on the roster)")
        return 0


# -- the audit log ---------------------------------------------------------------------------
def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from ..coordinator import audit, identity

    state = state_path(args.state)
    with closing(_registry(args)) as registry:
        try:
            checkpoint = audit.checkpoint(registry, identity.load(state))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    text = json.dumps(checkpoint, indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
        print(f"checkpoint {checkpoint['count']}:{checkpoint['head']} signed by the TC's audit key -> {args.output}")
        print("publish it outside the TC; `tccdeploy audit verify --checkpoint FILE` proves the log still holds it")
    else:
        sys.stdout.write(text)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from ..coordinator import audit, identity

    state = state_path(args.state)
    before = identity.load(state).purpose(args.purpose).key_id
    new = identity.rotate(state, args.purpose)
    with closing(_registry(args)) as registry:
        registry.auditor = audit.Auditor(identity.load(state))
        audit.append(registry, "key.rotate", purpose=args.purpose, retired=before, key=new.key_id)
    print(f"the TC's {args.purpose} key is now {new.key_id} (was {before}, destroyed; its certificate is kept so what it "
          "signed still verifies). A running `tc serve` takes it on SIGHUP; give customers and engines the new "
          "certificates: tccdeploy tc show -o FILE")
    return 0


# -- the service -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from ..coordinator import identity
    from ..coordinator.server import Limits, ListenError, serve

    host, _, port = (args.listen or "127.0.0.1:8443").rpartition(":")
    if not host or not port.isdigit():
        print(f"error: --listen takes HOST:PORT, such as 127.0.0.1:8443, not {args.listen!r}", file=sys.stderr)
        return 2
    if args.fronts < 0:
        print(f"error: --fronts takes 0 or more, not {args.fronts}", file=sys.stderr)
        return 2
    if args.max_connections_per_client < 1 or min(args.header_timeout, args.body_timeout, args.handshake_timeout,
                                                  args.answer_timeout) <= 0:
        print("error: --max-connections-per-client takes 1 or more, the timeouts more than 0 seconds", file=sys.stderr)
        return 2
    limits = Limits(handshake=args.handshake_timeout, headers=args.header_timeout, body=args.body_timeout,
                    answer=args.answer_timeout, per_client=args.max_connections_per_client)
    from .. import logs

    logs.configure(args.log_format)
    with closing(open_tc(args)) as coordinator:
        ident = identity.load(coordinator.state)

        def listening() -> None:
            logs.emit("serve.start", f"serving the TC on https://{host}:{port} (CA fingerprint {ident.fingerprint}); "
                      "SIGHUP reloads the manifests; Ctrl-C or SIGTERM stops it", stream=sys.stdout,
                      url=f"https://{host}:{port}", fingerprint=ident.fingerprint)

        paths = args.manifests or ([os.environ[MANIFESTS_ENV]] if os.environ.get(MANIFESTS_ENV) else [])
        try:
            return serve(coordinator, host.strip("[]"), int(port), args.name or [], "info" if args.verbose else "warning",
                         paths, limits, fronts=args.fronts, listening=listening)
        except ListenError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


def register(sub: argparse._SubParsersAction) -> None:
    def state(p: argparse.ArgumentParser, manifests: bool = False) -> None:
        p.add_argument("--state", help="TC state directory (default $TCCDEPLOY_STATE or ~/.local/state/tccdeploy)")
        if manifests:
            p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                           help=f"the TC's manifests: perimeter, builds, rosters (default ${MANIFESTS_ENV})")

    p = sub.add_parser("tc", help="the trusted coordinator's operator: identity, roster, nodes, customers, engines, "
                                  "audit, the HTTPS service",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="What only the TC's operator decides, on the TC's machine (never over the API).",
                       epilog="examples:\n  tccdeploy tc init\n  tccdeploy tc roster add site1 sha256:ab12... --name node7 "
                              "-m manifests/\n  tccdeploy tc nodes release node3 -m manifests/ --note 'fan replaced'\n"
                              "  tccdeploy tc engines add ops-1 -o /tmp/ops-1\n"
                              "  tccdeploy tc serve --listen 127.0.0.1:8443 -m .lab/manifests\n"
                              "  tccdeploy tc audit checkpoint -o head.json")
    tc = p.add_subparsers(dest="tc_command", metavar="ACTION", required=True)

    q = tc.add_parser("init", help="create the TC's CA key (0600), its certificate and its purpose keys")
    state(q)
    q.set_defaults(func=cmd_init)
    q = tc.add_parser("show", help="print the TC's certificate and fingerprint; -o FILE: the bundle customers seal to")
    q.add_argument("-o", "--output", help="write the CA, key-wrapping and signing certificates here")
    q.add_argument("--json", action="store_true")
    state(q)
    q.set_defaults(func=cmd_show)

    q = tc.add_parser("roster", help="the machines inside the perimeter, by TPM EK: add SITE EK | remove EK | list",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="A node whose EK is on no site's roster is never enrolled: the engine's address and\n"
                                  "site claims are not proof of where a machine is. EK: sha256: and the SHA-256 of the\n"
                                  "EK certificate (DER) or public key (DER SubjectPublicKeyInfo). Entries in NodeRoster\n"
                                  "manifests are listed too and changed in those files. Every change is audited.")
    q.add_argument("action", choices=("add", "remove", "list"))
    q.add_argument("site", nargs="?", metavar="SITE|EK", help="add: the site; remove: the EK")
    q.add_argument("ek", nargs="?", metavar="EK", help="add: the EK fingerprint")
    q.add_argument("--name", help="add: the node name this machine must enroll under")
    q.add_argument("--capacity", type=int, help="add: how many VMs the TC lets run on it")
    q.add_argument("--json", action="store_true")
    state(q, manifests=True)
    q.set_defaults(func=cmd_roster)

    q = tc.add_parser("nodes", help="release a quarantined node, or accept that a node's TPM was replaced",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="release NODE: a quarantined node becomes enrolled again; it is admitted only after a\n"
                                  "fresh trusted attestation. replace-tpm NODE: forget the node's TPM identity (after\n"
                                  "checking the hardware); it enrolls again with its new EK, which must be on the roster.")
    q.add_argument("action", choices=("release", "replace-tpm"))
    q.add_argument("node", metavar="NODE")
    q.add_argument("--note", help="why, for the audit log")
    state(q, manifests=True)
    q.set_defaults(func=cmd_nodes)

    q = tc.add_parser("customers", help="customers' signing keys: add NAME ed25519:KEY | list")
    q.add_argument("action", nargs="?", choices=("add", "list"), default="list")
    q.add_argument("name", nargs="?")
    q.add_argument("key", nargs="?", metavar="ed25519:KEY")
    q.add_argument("--json", action="store_true")
    state(q)
    q.set_defaults(func=cmd_customers)

    q = tc.add_parser(
        "webhooks", help="deliver the TC's events to an HTTP receiver: add NAME URL --secret-file F | remove NAME | status",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Webhooks deliver the TC's audit log as CloudEvents 1.0 (JSON), signed with HMAC-SHA256 as\n"
                    "Standard Webhooks sign (webhook-id, webhook-timestamp, webhook-signature headers): in order,\n"
                    "at least once, retried with backoff (1 s doubling to 5 min) while `tc serve` runs; the\n"
                    "delivery state is in the registry, so a restart loses nothing. status shows what is pending.",
        epilog="event types: " + ", ".join(__import__("tccdeploy.coordinator.webhooks", fromlist=["x"]).ALL_EVENTS)
               + "\n\nexamples:\n  tccdeploy tc webhooks add soc https://siem.example/tcc --secret-file soc.secret\n"
               "  tccdeploy tc webhooks add pager https://pager.example/in --secret-file p.secret "
               "--events node.quarantined,refused\n  tccdeploy tc webhooks status")
    q.add_argument("action", nargs="?", choices=("add", "remove", "status", "list"), default="status")
    q.add_argument("name", nargs="?")
    q.add_argument("url", nargs="?")
    q.add_argument("--secret-file", metavar="FILE", help="add: where to write the new secret (created 0600)")
    q.add_argument("--events", metavar="TYPE,...", help="add: the event types to deliver (default: quarantine, release, "
                   "key release, launch, migration, build revoked, audit checkpoint and refusals; * for all)")
    q.add_argument("--from-start", action="store_true", help="add: deliver the whole audit log, not only what follows")
    q.add_argument("--json", action="store_true")
    state(q)
    q.set_defaults(func=cmd_webhooks)

    q = tc.add_parser("engines", help="engines' client certificates: add NAME [-o DIR] | remove NAME | list")
    q.add_argument("action", nargs="?", choices=("add", "remove", "list"), default="list")
    q.add_argument("name", nargs="?")
    q.add_argument("-o", "--output", help="add: the folder for the engine's certificate and key")
    q.add_argument("--json", action="store_true")
    state(q)
    q.set_defaults(func=cmd_engines)

    q = tc.add_parser("audit", help="checkpoint: the audit log's head signed by the TC's audit key, to publish")
    q.add_argument("action", choices=("checkpoint",))
    q.add_argument("-o", "--output", help="write the checkpoint here (default: standard output)")
    state(q)
    q.set_defaults(func=cmd_audit_checkpoint)

    q = tc.add_parser("rotate", help="replace the key the TC signs receipts or audit checkpoints with (audited)")
    q.add_argument("purpose", choices=("receipt", "audit", "ticket"))
    state(q)
    q.set_defaults(func=cmd_rotate)

    q = tc.add_parser("serve", help="the TC's HTTPS API for engines and customers")
    q.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default 127.0.0.1:8443)")
    q.add_argument("--name", action="append", metavar="DNS", help="another name the server certificate covers")
    q.add_argument("-v", "--verbose", action="store_true", help="log every request")
    q.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text for people, or one JSON object per line (time, level, event, message, fields) for a log "
                        "pipeline (default text)")
    q.add_argument("--max-connections-per-client", type=int, default=64, metavar="N",
                   help="open connections one client address may hold; more are dropped at once (default 64; the "
                        "engine's fan-out uses one per fork)")
    q.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive whole this soon after the connection opens or the last "
                        "answer; idle connections close then too (default 10)")
    q.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a TLS handshake must finish this soon after the TCP connection (default 10)")
    q.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's body must arrive whole this soon after its headers (default 30)")
    q.add_argument("--fronts", type=int, default=1, metavar="N",
                   help="run TLS, HTTP and the requests' checks in N more processes (fronts), the decisions in "
                        "this one, so another core serves too; the fronts hold none of the TC's keys in memory. Limits "
                        "(connections per client, in all) count per front. 0 serves all "
                        "from this process (a one-core machine); more than 1 pays only with cores to spare "
                        "(default 1)")
    q.add_argument("--answer-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a request's answer must be taken whole this soon after the request's last byte: the "
                        "TC's decision and the client's reading of it; a client that stops reading is cut then "
                        "(default 120)")
    state(q, manifests=True)
    q.set_defaults(func=cmd_serve)
