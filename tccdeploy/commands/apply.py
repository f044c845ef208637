"""`tccdeploy apply PLAYBOOK`: ansible-playbook's interface to tccdeploy's modules."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

EXIT_PARSE = 4  # ansible-playbook's exit status for a playbook it cannot parse


def parse_extra_vars(values: list[str]) -> dict[str, Any]:
    """-e as Ansible takes it: key=value pairs (strings), a YAML/JSON mapping, or @file."""
    out: dict[str, Any] = {}
    for value in values:
        value = value.strip()
        if value.startswith("@"):
            with open(value[1:]) as fh:
                data = yaml.safe_load(fh)
        elif value.startswith(("{", "[")):
            data = yaml.safe_load(value)
        else:
            import shlex

            data = {}
            for word in shlex.split(value):
                if "=" not in word:
                    raise ValueError(f"-e {value!r}: expected key=value pairs, a YAML/JSON mapping or @file")
                key, _, val = word.partition("=")
                data[key] = val
        if not isinstance(data, dict):
            raise ValueError(f"-e {value!r} must give a mapping of variables")
        out.update(data)
    return out


def _tags(values: list[str] | None) -> set[str]:
    return {t.strip() for v in values or [] for t in v.split(",") if t.strip()}


def cmd_apply(args: argparse.Namespace) -> int:
    from ..manifest.loader import load_inventory, load_paths
    from ..manifest.report import render
    from ..playbook.callback import Callback
    from ..playbook.runner import Options, PlaybookRunner
    from .engine import _logging

    _logging(args.verbose)
    if not os.path.isfile(args.playbook):
        print(f"error: the playbook {args.playbook} does not exist", file=sys.stderr)
        return 1
    loaded = load_paths([args.playbook])
    if loaded.errors or len(loaded.playbooks) != 1:
        if not loaded.errors:
            print(f"error: {args.playbook} is not a playbook (a playbook is a YAML list of plays); it holds "
                  f"{loaded.holds()}", file=sys.stderr)
        else:
            render(loaded.errors, loaded.files, "text", sys.stderr, sys.stderr.isatty())
        print("the playbook was not run: nothing was changed on any host", file=sys.stderr)
        return EXIT_PARSE
    from ..playbook.model import PlaybookError, plays

    try:
        parsed = plays(loaded.playbooks[0])
    except PlaybookError as exc:
        render(exc.problems, [*loaded.files, *exc.files], "text", sys.stderr, sys.stderr.isatty())
        print("the playbook was not run: nothing was changed on any host", file=sys.stderr)
        return EXIT_PARSE
    if args.syntax_check:
        print(f"playbook: {args.playbook}")
        return 0
    if not args.inventory:
        print("error: no inventory: give -i FILE or set $TCCDEPLOY_INVENTORY", file=sys.stderr)
        return 1
    try:
        extra = parse_extra_vars(args.extra_vars or [])
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 5  # ansible-playbook's exit status for bad options
    manifests = args.manifests or ([os.environ["TCCDEPLOY_MANIFESTS"]] if os.environ.get("TCCDEPLOY_MANIFESTS") else [])
    options = Options(limit=args.limit, forks=args.forks, timeout=args.timeout, extra_vars=extra,
                      tags=_tags(args.tags), skip_tags=_tags(args.skip_tags), check=args.check, diff=args.diff,
                      start_at_task=args.start_at_task, step=args.step, trust_new_host_keys=args.trust_new_host_keys,
                      state=args.state, manifests=manifests, tc_url=args.tc, engine_dir=args.engine_dir)
    runner = PlaybookRunner(loaded.playbooks[0], load_inventory(args.inventory), options,
                            Callback(args.verbose, args.json, args.diff, color=None if "NO_COLOR" not in os.environ else False),
                            parsed=parsed)
    if args.list_tasks:
        from ..playbook.model import tasks_of

        for play in runner.plays:
            print(f"play: {play.name} (hosts: {play.hosts})")
            for task in tasks_of(play.pre_tasks + play.tasks + play.post_tasks):
                if task.module == "meta":
                    continue
                tags = f"  TAGS: [{', '.join(sorted(task.tags))}]" if task.tags else ""
                print(f"    {task.name}{tags}")
        return 0
    if options.check and not args.json:
        print("check mode: nothing will be changed; tasks report what they would change")
    return runner.run()


def register(sub: argparse._SubParsersAction) -> None:
    from .engine import add_run_args

    p = sub.add_parser(
        "apply", help="run a playbook: make what it says true, idempotently, with a recap (ansible-playbook)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run a playbook of tccdeploy modules (tvmm_deploy, enroll, attest, evict, launch, migrate,\n"
            "drain, enforce, command, copy, template, wait_for_ssh, ping, debug, fail, set_fact) the way\n"
            "ansible-playbook runs Ansible's. The playbook, and every file it imports (roles, task\n"
            "files, playbooks), is validated against its schema first; nothing runs if one has an error.\n"
            "Each module reports changed only when it changed something, so a second run reports no\n"
            "changes; --check reports what would change and changes nothing.\n\n"
            "Ansible's language: Jinja2 templates (sandboxed) with Ansible's common filters and tests\n"
            "(default, length, join, map, select, selectattr, combine, dict2items, to_json, regex_*,\n"
            "bool, b64encode, version...; any other is refused by name), when/changed_when/failed_when/\n"
            "until as boolean expressions, vars_files, set_fact, blocks with rescue/always, handlers\n"
            "with notify/listen and meta: flush_handlers, roles (tasks, handlers, defaults, vars, files,\n"
            "templates), import_tasks/include_tasks, import_role/include_role, import_playbook,\n"
            "run_once, until/retries/delay, loop_control, check_mode/diff/no_log per task. Not run:\n"
            "lookups, become, async, strategies other than linear, delegate_to other than localhost.\n\n"
            "exit status: 0 ok, 2 a host failed, 4 a host was unreachable or the playbook is invalid,\n"
            "5 bad options, 99 interrupted, 1 error"
        ),
        epilog=(
            "examples:\n"
            "  tccdeploy apply playbooks/site.yml -i .lab/inventory -m .lab/manifests\n"
            "  tccdeploy apply playbooks/site.yml -i .lab/inventory -m .lab/manifests --check --diff\n"
            "  tccdeploy apply playbooks/rollout-tvmm.yml -i .lab/inventory -m .lab/manifests -e new_build=tvmm-2026.2\n"
            "  tccdeploy apply playbooks/enforce.yml -i inv/ -m manifests/ --json > enforce.json"
        ),
    )
    p.add_argument("playbook", metavar="PLAYBOOK", help="the playbook file (YAML)")
    p.add_argument("-m", "--manifests", action="append", metavar="PATH",
                   help="perimeter and TVMM build manifests, for the TC's modules (default $TCCDEPLOY_MANIFESTS)")
    p.add_argument("--tc", default=os.environ.get("TCCDEPLOY_TC"), metavar="URL",
                   help="a served TC (tc serve) instead of the embedded one (default $TCCDEPLOY_TC)")
    p.add_argument("--engine-dir", default=os.environ.get("TCCDEPLOY_ENGINE_DIR"), metavar="DIR",
                   help="this engine's client certificate for --tc (default STATE/engine)")
    add_run_args(p)
    p.add_argument("-e", "--extra-vars", action="append", metavar="VARS",
                   help="variables that override all others: key=value, a YAML/JSON mapping, or @file")
    p.add_argument("-t", "--tags", action="append", help="only tasks with these tags (comma-separated)")
    p.add_argument("--skip-tags", action="append", help="skip tasks with these tags (comma-separated)")
    p.add_argument("-C", "--check", action="store_true", help="change nothing; report what would change")
    p.add_argument("-D", "--diff", action="store_true", help="show what changes (or would change, with --check)")
    p.add_argument("--start-at-task", metavar="NAME", help="start at the first task with this name (glob)")
    p.add_argument("--step", action="store_true", help="ask before each task: (N)o/(y)es/(c)ontinue")
    p.add_argument("--syntax-check", action="store_true", help="validate the playbook and stop")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and stop")
    p.set_defaults(func=cmd_apply)


__all__ = ["cmd_apply", "register", "parse_extra_vars"]
