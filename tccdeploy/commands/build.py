"""`tccdeploy eventlog` and `tccdeploy build capture|predict`: reference values for operators.

`eventlog FILE` shows what a boot measured, decoded, and the PCRs it replays to. `build capture
NODE` writes the TVMMBuild (and Platform) a known-good node's TPM-proven boot matches, or with
--diff shows how the node departs from a build; `build predict` writes the build that booting
given files measures. Everything written is a candidate for an operator to review and approve.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

from ..bootpaths import NAMES
from .engine import add_run_args, select
from .provider import MANIFESTS_ENV, TC_ENV, open_tc

EXIT_DIFFERS = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eventlog", help="show a TCG event log decoded, and the PCRs it replays to",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode every event of a TCG event log (crypto-agile or SHA-1 format): firmware variables,\n"
                    "EFI applications with their device paths, GPT, command lines; then the PCR values a replay\n"
                    "gives in each bank the log can be replayed in (as a quote of the same TPM must show).\n"
                    "Where an event's type says what was hashed (separators, actions, variables, GPT, GRUB's\n"
                    "and systemd-boot's command lines), its digest is marked as the digest of its data or not.",
        epilog="examples:\n"
               "  tccdeploy eventlog /sys/kernel/security/tpm0/binary_bios_measurements\n"
               "  tccdeploy eventlog log.bin --pcr 4 --pcr 7 --bank sha256\n"
               "  tccdeploy eventlog log.bin --json | jq '.pcrs.sha256'")
    p.add_argument("file", metavar="FILE", help="the binary event log")
    p.add_argument("--pcr", type=int, action="append", metavar="N", help="only events of this PCR (repeat for more)")
    p.add_argument("--bank", help="show digests and replay in this bank only (default: every bank)")
    p.add_argument("--json", action="store_true", help="print events and PCRs as JSON")
    p.set_defaults(func=cmd_eventlog)

    b = sub.add_parser("build", help="reference values: capture a build from a node's boot, or predict it from files",
                       description="Write TVMMBuild and Platform manifests from what nodes really boot.")
    bs = b.add_subparsers(dest="build_command", metavar="COMMAND", required=True)
    p = bs.add_parser(
        "capture", help="the TVMMBuild (and Platform) a known-good node's boot matches, from its TPM-proven log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attest NODE through the TC (fresh nonce, quote by its enrolled AK, log replayed to the quoted\n"
                    "PCRs) and write the manifests its boot matches, each event named by what it measured. They\n"
                    "are candidates admitted on NODE only until the TC's operator reviews and approves them.\n"
                    "With --diff BUILD, show instead how NODE's boot departs from BUILD (and its platform),\n"
                    "event by event.\n\n"
                    "The capture is an attestation like any other: a node booted into a build the manifests do\n"
                    "not admit is recorded untrusted (quarantined if it was admitted) until its build is approved.\n\n"
                    "exit status: 0 written (or no difference), 1 the boot departs from BUILD, 2 refused",
        epilog="examples:\n"
               "  tccdeploy build capture node1 -i .lab/inventory -m .lab/manifests --name tvmm-2027.1 \\\n"
               "      --version 2027.1.0 --out manifests/\n"
               "  tccdeploy build capture node2 -i .lab/inventory -m .lab/manifests --diff tvmm-2026.1")
    p.add_argument("node", metavar="NODE", help="the node (inventory host) whose boot to capture")
    add_run_args(p)
    p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                   help=f"the manifests (perimeter, builds, platforms); default ${MANIFESTS_ENV}")
    p.add_argument("--tc", default=os.environ.get(TC_ENV), metavar="URL", help=f"a served TC (default ${TC_ENV})")
    p.add_argument("--engine-dir", help="the engine's certificate and key for a served TC")
    p.add_argument("--name", help="the build's name (default captured-NODE)")
    p.add_argument("--version", default="0.0.0-captured", help="the build's version (default 0.0.0-captured)")
    p.add_argument("--platform-name", help="the platform's name (default BUILD-platform)")
    p.add_argument("--platform-pcrs", metavar="LIST",
                   help="PCRs that are the platform's, e.g. 0-7 (default: those the manifests' Platforms own; none "
                        "without Platforms, so the build covers every policy PCR)")
    p.add_argument("--out", metavar="DIR", help="write BUILD.yml and PLATFORM.yml into DIR (default: print them)")
    p.add_argument("--diff", metavar="BUILD", help="show how NODE's boot departs from BUILD instead of writing")
    p.set_defaults(func=cmd_capture)

    p = bs.add_parser(
        "predict", help="the TVMMBuild that booting these files measures, computed from the files alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute a build's reference measurements from its artifacts, as the boot chain measures\n"
                    "them: EFI applications by their PE/COFF Authenticode digest, the initrd and other files by\n"
                    "their sha256, the kernel command line as the boot loader and kernel measure it.\n\n"
                    "Boot paths (--boot-path):\n"
                    "  systemd-boot  UEFI firmware -> systemd-boot -> the Linux EFI stub (Linux 6.1 and later):\n"
                    "                PCR 4 the firmware's boot-option action and separator, then bootloader's and\n"
                    "                kernel's Authenticode digests; PCR 12 the command line systemd-boot passes\n"
                    "                (UTF-16: 'initrd=\\initrd.img ' and the entry's options); PCR 9 the stub's\n"
                    "                load options (the same line) and the initrd. The loader entry must name\n"
                    "                /vmlinuz and /initrd.img on the ESP, as `tccdeploy lab` writes it.\n"
                    "  lab           the local lab's stand-in chain: PCRs 4, 8, 9, 11 (bootloader, kernel,\n"
                    "                initrd, hypervisor, tvmm-service; stand-in images by their sha256).\n"
                    "UEFI firmware's own events (PCRs 0-3 and 5-7) are the platform's: capture them from a node\n"
                    "of the model (`tccdeploy build capture NODE`).",
        epilog="examples:\n"
               "  tccdeploy build predict --boot-path systemd-boot bootloader=systemd-bootx64.efi \\\n"
               "      kernel=vmlinuz initrd=initrd.img --cmdline 'console=ttyS0 quiet' \\\n"
               "      --name tvmm-2027.1 --version 2027.1.0 --rollout node1 --out manifests/builds\n"
               "  tccdeploy build predict bootloader=b kernel=k initrd=i hypervisor=h tvmm-service=s \\\n"
               "      --cmdline 'console=ttyS0 ro' --name tvmm-2027.1 --version 2027.1.0 --rollout node1")
    p.add_argument("artifacts", nargs="+", metavar="NAME=FILE",
                   help="each file the boot path measures: bootloader, kernel, initrd (and, on the lab path, "
                        "hypervisor, tvmm-service)")
    p.add_argument("--cmdline", required=True, metavar="OPTIONS",
                   help="the boot entry's options (systemd-boot adds 'initrd=\\initrd.img ' before them)")
    p.add_argument("--name", required=True, help="the build's name")
    p.add_argument("--version", required=True, help="the build's version, e.g. 2027.1.0")
    p.add_argument("--rollout", required=True, metavar="NODE[,NODE]",
                   help="the nodes of the staged rollout: a predicted build is a candidate there until approved")
    p.add_argument("--boot-path", choices=NAMES, default="lab", help="the boot chain that measures them (default lab)")
    p.add_argument("--out", metavar="DIR", help="write NAME.yml into DIR (default: print it)")
    p.set_defaults(func=cmd_predict)


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _read_log(path: str):  # type: ignore[no-untyped-def]
    from ..eventlog import EventLogError, parse_file

    try:
        return parse_file(path)
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None
    except EventLogError as exc:
        raise SystemExit(f"error: {path} is not an event log tccdeploy can read: {exc}") from None


def cmd_eventlog(args: argparse.Namespace) -> int:
    from ..eventdecode import data_check, describe
    from ..eventlog import EV_NO_ACTION, MissingBank

    log = _read_log(args.file)
    banks = [args.bank] if args.bank else list(log.algorithms)
    if args.bank and args.bank not in log.algorithms:
        return _error(f"the log has no {args.bank} bank (banks: {', '.join(log.algorithms)})")
    events = [e for e in log.events if not args.pcr or e.pcr in args.pcr]
    pcrs: dict[str, Any] = {}
    for bank in banks:
        try:
            pcrs[bank] = {p: v.hex() for p, v in sorted(log.replay(bank).items()) if not args.pcr or p in args.pcr}
        except MissingBank as exc:
            pcrs[bank] = f"not replayable: {exc}"
    if args.json:
        print(json.dumps({"banks": list(log.algorithms), "startup_locality": log.startup_locality, "events": [
            {"pcr": e.pcr, "type": e.type_name, "digests": {b: d.hex() for b, d in e.digests.items() if b in banks},
             "description": describe(e), "data_check": {b: data_check(e, b) for b in banks if b in e.digests}}
            for e in events], "pcrs": pcrs}, indent=2))
        return 0
    print(f"{len(log.events)} events; banks {', '.join(log.algorithms)}; PCR 0 started at locality {log.startup_locality}")
    for i, event in enumerate(events):
        print(f"{i:4} PCR {event.pcr:2} {event.type_name:34} {describe(event)}")
        for bank in banks:
            if bank in event.digests and event.type != EV_NO_ACTION:
                check = {"data": "  (= its data)", "not-data": "  (not the digest of its data)"}.get(data_check(event, bank), "")
                print(f"{'':12}{bank:7} {event.digests[bank].hex()}{check}")
    for bank, values in pcrs.items():
        print(f"\nreplayed {bank}:")
        if isinstance(values, str):
            print(f"  {values}")
            continue
        for pcr, value in values.items():
            print(f"  PCR {pcr:2} {value}")
    return 0


def _pcr_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            out += list(range(int(first), int(last or first) + 1))
        except ValueError:
            raise SystemExit(f"error: --platform-pcrs {text!r}: give PCR numbers and ranges, e.g. 0-7 or 0,2,4") from None
    return sorted(set(out))


def _write(documents: list[dict], out: str | None) -> None:
    import yaml

    for doc in documents:
        text = (f"# Written by tccdeploy build: review every event before approving.\n"
                f"# yaml-language-server: $schema=../schemas/{doc['kind'].lower()}.schema.json\n"
                + yaml.safe_dump(doc, sort_keys=False, width=120))
        if out:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, f"{doc['metadata']['name']}.yml")
            if os.path.exists(path):
                raise SystemExit(f"error: {path} exists; choose another --name or --out (nothing was written over)")
            with open(path, "w") as fh:
                fh.write(text)
            print(f"wrote {path}", file=sys.stderr)
        else:
            print("---\n" + text, end="")


def cmd_capture(args: argparse.Namespace) -> int:
    from ..engine.capture import capture
    from ..engine.runner import Engine
    from ..eventlog import parse
    from ..manifest.loader import load_manifests
    from .engine import load

    paths = args.manifests or ([os.environ[MANIFESTS_ENV]] if os.environ.get(MANIFESTS_ENV) else [])
    manifests = load_manifests(paths) if paths else None
    if args.diff and manifests is None:
        return _error("--diff needs the manifests that define the build: give -m PATH")
    hosts = select(load(args), args.node, None)
    if len(hosts) != 1:
        return _error(f"{args.node!r} matches {len(hosts)} hosts; name one node of the inventory")
    coordinator = open_tc(args, remote_ok=True)
    engine = Engine(hosts, forks=1, timeout=args.timeout, trust_new_host_keys=args.trust_new_host_keys, state=args.state)
    try:
        bank, pcrs = coordinator.quote_policy()
        print(f"attesting {args.node} through the TC (fresh quote and event log)...", file=sys.stderr)
        (result,) = engine.run(capture(coordinator))
    finally:
        engine.close()
        coordinator.close()
    if result.status != "ok":
        return _error(f"{args.node}: {result.msg}")
    log = parse(base64.b64decode(result.data["eventlog"]))
    platforms = list(manifests.platforms) if manifests else []
    platform_pcrs = _pcr_list(args.platform_pcrs) if args.platform_pcrs else \
        sorted({p for platform in platforms for p in platform.pcrs if p in pcrs})
    if args.diff:
        return _diff(args, log, bank, pcrs, manifests, result.data)
    from ..baseline import captured

    name = args.name or f"captured-{args.node}"
    build, platform = captured(log, bank, pcrs, platform_pcrs, args.node, name, args.version, args.platform_name)
    documents = [build]
    if result.data.get("platform") and platform is not None:
        print(f"{args.node}'s firmware matches platform {result.data['platform']} already: no platform written",
              file=sys.stderr)
    elif platform is not None:
        documents.append(platform)
    if result.data.get("build"):
        print(f"note: {args.node}'s boot matches build {result.data['build']} already", file=sys.stderr)
    _write(documents, args.out)
    return 0


def _diff(args: argparse.Namespace, log, bank: str, pcrs: list[int], manifests, found: dict) -> int:  # type: ignore[no-untyped-def]
    from ..baseline import compare

    build = next((b for b in manifests.builds if b.name == args.diff), None)
    if build is None:
        return _error(f"no TVMMBuild {args.diff!r} in the manifests (builds: "
                      f"{', '.join(b.name for b in manifests.builds) or 'none'})")
    lines, differs = compare(log, bank, pcrs, build, manifests.platforms, found.get("platform"))
    print(f"{args.node} against {build.name} ({build.status}):")
    print("\n".join("  " + line for line in lines))
    return EXIT_DIFFERS if differs else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..baseline import predicted
    from ..bootpaths import boot_path

    path = boot_path(args.boot_path)
    artifacts: dict[str, str] = {}
    for item in args.artifacts:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            return _error(f"{item!r}: give each artifact as NAME=FILE, e.g. kernel=vmlinuz")
        if not os.path.isfile(file):
            return _error(f"{name}: {file} is not a file")
        artifacts[name] = file
    unknown = sorted(set(artifacts) - set(path.artifacts))
    if unknown:
        return _error(f"the {path.name} boot path measures no {', '.join(unknown)} (it measures "
                      f"{', '.join(path.artifacts)} and the command line)")
    try:
        doc = predicted(artifacts, args.cmdline, args.name, args.version, path, args.out)
    except ValueError as exc:
        return _error(str(exc))
    doc["spec"]["rollout"] = {"nodes": [n.strip() for n in args.rollout.split(",") if n.strip()]}
    _write([doc], args.out)
    return 0
