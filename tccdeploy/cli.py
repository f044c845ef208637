# PYTHON_ARGCOMPLETE_OK
"""tccdeploy's one entry point. Subcommands stay thin: they parse, call the library, render.

Exit codes follow ansible-playbook's where it has one: 0 ok, 1 error, 2 a host failed (and,
for validate, usage errors as argparse reports them), 4 a host unreachable, 250 unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__

Handler = Callable[[argparse.Namespace], int]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNEXPECTED = 0, 1, 2, 250


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifest.loader import load_paths
    from .manifest.report import render

    result = load_paths(args.paths)
    problems = result.problems if not args.quiet else result.errors
    if args.strict:
        from dataclasses import replace

        problems = [replace(p, severity="error") for p in problems]
    color = args.format == "text" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    render(problems, result.files, args.format, sys.stdout, color)
    failed = any(p.severity == "error" for p in problems)
    if not result.files and not failed:
        print("error: no manifest files found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR if failed else EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from .manifest.schema import KINDS, kind_for_name, schema_text

    if args.list or not args.kind:
        for kind, stem in KINDS.items():
            print(f"{kind:<17} schemas/{stem}.schema.json")
        return EXIT_OK
    kind = kind_for_name(args.kind)
    if kind is None:
        print(f"error: unknown kind {args.kind!r}; kinds are: {', '.join(KINDS)}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(schema_text(kind))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tccdeploy",
        formatter_class=_Formatter,
        description=(
            "Run confidential VMs on an untrusted provider's hosts (TCCP).\n\n"
            "Manifests say what must be true; tccdeploy attests nodes with TPM 2.0 over SSH,\n"
            "admits only compliant ones, and launches and migrates VMs encrypted end to end."
        ),
        epilog=(
            "examples:\n"
            "  tccdeploy validate examples/ inventory/lab/   check manifests, as CI would\n"
            "  tccdeploy schema Perimeter                     print a manifest schema\n"
            "  tccdeploy lab up && tccdeploy tc init          a local lab and a trusted coordinator\n"
            "  tccdeploy apply playbooks/site.yml -i .lab/inventory -m .lab/manifests\n"
            "                                                 enroll, attest and admit every node\n"
        ),
    )
    parser.add_argument("--version", action="version", version=f"tccdeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check manifests against the schemas and each other",
        formatter_class=_Formatter,
        description=(
            "Check manifests (Perimeter, TVMMBuild, PlacementRequest), Ansible YAML inventories\n"
            "with their group_vars/ and host_vars/, and playbooks: first against the JSON Schemas\n"
            "in schemas/, then against each other (sites, addresses, builds, CA files).\n"
            "Every problem is reported at once with file:line:column and its JSON path.\n\n"
            "exit status: 0 valid, 1 invalid, 2 usage error"
        ),
        epilog=(
            "examples:\n"
            "  tccdeploy validate examples/\n"
            "  tccdeploy validate --format github perimeter.yml builds/ inventory/prod/\n"
            "  tccdeploy validate --format json . | jq '.problems[] | .code'"
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest files or directories (searched for *.yml, *.yaml)")
    p.add_argument("--format", choices=("text", "json", "github"), default="text",
                   help="text for people (default), json for machines, github for CI annotations")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.add_argument("-q", "--quiet", action="store_true", help="report errors only, not warnings")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of a manifest kind",
                       description="Print a JSON Schema (2020-12) for editors and CI; --list names them.")
    p.add_argument("kind", nargs="?", metavar="KIND",
                   help="Perimeter, TVMMBuild, PlacementRequest, Inventory, Playbook or Vars")
    p.add_argument("--list", action="store_true", help="list the kinds and their schema files")
    p.set_defaults(func=_cmd_schema)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommand groups that live with their subsystem (lab, engine, coordinator...)."""
    from .commands.apply import register as playbook_register
    from .commands.build import register as build_register
    from .commands.customer import register as customer_register
    from .commands.engine import register as engine_register
    from .commands.lab import register as lab_register
    from .commands.provider import register as coordinator_register
    from .commands.tc import register as tc_register

    return [engine_register, coordinator_register, tc_register, customer_register, playbook_register, build_register,
            lab_register]


def shows_progress(args: argparse.Namespace, stream: Any = None) -> bool:
    """Progress bars only for people at a terminal: not for --json, pipes, CI logs or
    TCCDEPLOY_NO_PROGRESS, and not for apply, whose own lines are Ansible's output."""
    stream = sys.stderr if stream is None else stream
    if getattr(args, "json", False) or os.environ.get("TCCDEPLOY_NO_PROGRESS") or os.environ.get("CI"):
        return False
    if getattr(args, "command", None) == "apply":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        import argcomplete

        argcomplete.autocomplete(parser)  # only acts when the shell asks for completions
    except ImportError:  # pragma: no cover - a dependency; completion is a convenience
        pass
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        from . import progress

        with progress.shown(shows_progress(args)):
            return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        from .lab.tpm import LabError
        from .manifest.problems import ManifestError

        if isinstance(exc, ManifestError):
            from .manifest.report import render

            render(exc.problems, sorted({p.file for p in exc.problems}), "text", sys.stderr)
            return EXIT_ERROR
        request = sys.modules.get("tccdeploy.crypto.request")
        client = sys.modules.get("tccdeploy.coordinator.client")
        if isinstance(exc, LabError) or (request is not None and isinstance(exc, request.RequestError)) \
                or (client is not None and isinstance(exc, client.TCCertificates)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        client = sys.modules.get("tccdeploy.coordinator.client")
        if client is not None and isinstance(exc, client.TCUnavailable) and not os.environ.get("TCCDEPLOY_DEBUG"):
            print(f"error: {exc}: is `tccdeploy tc serve` running there, and is it the TC named by --tc "
                  "(or $TCCDEPLOY_TC)? Nothing was changed here.", file=sys.stderr)
            return EXIT_ERROR
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):  # a refusal (the TC's, or a bundle's check): its code and why
            print(f"refused: {reason}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, OSError) and exc.filename is not None and not os.environ.get("TCCDEPLOY_DEBUG"):
            print(f"error: {file_problem(exc)}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, FileNotFoundError) and exc.args and isinstance(exc.args[0], str):
            print(f"error: {exc.args[0]}", file=sys.stderr)  # raised with its own words: what is missing, what to do
            return EXIT_ERROR
        if os.environ.get("TCCDEPLOY_DEBUG"):
            raise
        print(f"unexpected error: {type(exc).__name__}: {exc} (set TCCDEPLOY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


def file_problem(exc: OSError) -> str:
    """A file the user named (or a folder it leads to) that cannot be used: which, why, what to do."""
    path = os.fsdecode(exc.filename)
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    if isinstance(exc, FileNotFoundError):
        fix = f"no such file or folder{where}: check the path"
    elif isinstance(exc, PermissionError):
        fix = f"permission denied for this user (uid {os.getuid()}): make it readable, or run as its owner"
    elif isinstance(exc, IsADirectoryError):
        fix = "a folder where a file is needed: give the file inside it"
    elif isinstance(exc, NotADirectoryError):
        fix = "a file where a folder is needed: give the folder"
    else:
        fix = exc.strerror or str(exc)
    return f"{path}: {fix}"


if __name__ == "__main__":
    sys.exit(main())
