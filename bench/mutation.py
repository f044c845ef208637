#!/usr/bin/env python3
"""Mutation testing of the security-critical modules against the fast suite, with mutmut.

mutmut copies the tree to mutants/, makes each mutant (a dropped check, a flipped comparison, an
off-by-one, another constant) and runs, for each, only the fast tests that cover the mutated
function (it records which tests reach which function in one stats run first). A mutant no
test fails on "survived": a bug the fast suite would not catch. This prints, per module, how
many mutants there were, how many the tests killed, and the kill rate; `--survivors` lists the
survivors (`.venv/bin/mutmut show NAME` shows each one's diff).

    .venv/bin/python bench/mutation.py                      # every security-critical module (hours)
    .venv/bin/python bench/mutation.py keybroker crypto.wrap  # modules whose dotted name contains a word
    .venv/bin/python bench/mutation.py --results             # the figures of the last run, without running

Not part of CI (too slow for it): run it before resolving an issue that touches these modules and
put its figures in the closing note. The modules it may mutate are the ones [tool.mutmut] in
pyproject.toml does not exclude; MODULES below is the security-critical list. Each run starts
from a fresh mutants/ (mutmut would otherwise reuse its record of which tests cover what, and
tests added since would not count); the record takes one pass of the fast suite (about 2 min).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = ROOT / ".venv" / "bin" / "mutmut"
MODULES = [
    "tccdeploy.coordinator.verifier", "tccdeploy.coordinator.tpm2", "tccdeploy.coordinator.keybroker",
    "tccdeploy.coordinator.admission", "tccdeploy.coordinator.enrollment", "tccdeploy.coordinator.audit",
    "tccdeploy.coordinator.auditform", "tccdeploy.coordinator.receipts", "tccdeploy.coordinator.roster",
    "tccdeploy.coordinator.constraints", "tccdeploy.coordinator.lifecycle", "tccdeploy.coordinator.suspension",
    "tccdeploy.coordinator.runtime", "tccdeploy.coordinator.health", "tccdeploy.coordinator.references",
    "tccdeploy.crypto.stream", "tccdeploy.crypto.wrap", "tccdeploy.crypto.bundle", "tccdeploy.crypto.ticket",
    "tccdeploy.crypto.runtime", "tccdeploy.crypto.canonical", "tccdeploy.crypto.customer", "tccdeploy.crypto.reasoned",
    "tccdeploy.eventlog", "tccdeploy.tvmm.tickets", "tccdeploy.crypto.files", "tccdeploy.tvmm.daemon",
    "tccdeploy.coordinator.ear", "tccdeploy.coordinator.webhooks", "tccdeploy.node.protocol", "tccdeploy.coordinator.fronts",
]
LINE = re.compile(r"^\s*(?P<name>[\w.]+?)\.(?:x_|xǁ)\S*: (?P<status>[\w ]+)$")


def module_of(mutant: str) -> str:
    """tccdeploy.coordinator.keybroker.x_release__mutmut_3 -> tccdeploy.coordinator.keybroker"""
    match = LINE.match(f"{mutant}: x")
    return match.group("name") if match else mutant.rsplit(".", 1)[0]


def results() -> dict[str, collections.Counter[str]]:
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True)
    by_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in out.stdout.splitlines():
        match = LINE.match(line)
        if match:
            by_module[match.group("name")][match.group("status").strip()] += 1
    return by_module


STRING = re.compile(r"""(?P<q>["'])(?:\\.|(?!(?P=q)).)*(?P=q)""")
CODE = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9][a-z0-9-]*)+$")


def diff_of(name: str) -> tuple[list[str], list[str]]:
    shown = subprocess.run([str(MUTMUT), "show", name], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    return [line[2:] for line in shown if line.startswith("- ")], [line[2:] for line in shown if line.startswith("+ ")]


def wording_only(removed: list[str], added: list[str]) -> bool:
    """A mutant that changes only the words of a message (a string literal with a space in it,
    that is not a reason code, changed in case or wrapped in XX): what a person reads, not what
    the code decides. (Keys, patterns and names have no spaces: their mutants always count.)"""
    if not removed or len(removed) != len(added):
        return False
    for before, after in zip(removed, added, strict=True):
        if STRING.sub('""', before) != STRING.sub('""', after):
            return False
        old = [m.group(0)[1:-1] for m in STRING.finditer(before)]
        new = [m.group(0)[1:-1] for m in STRING.finditer(after)]
        if any(CODE.match(a) or CODE.match(b) for a, b in zip(old, new, strict=False) if a != b):
            return False
        if any(b.lower() != a.lower() and b != f"XX{a}XX" for a, b in zip(old, new, strict=False) if a != b):
            return False
        if any(" " not in a.strip() for a, b in zip(old, new, strict=False) if a != b):
            return False
    return True


def leftovers() -> list[tuple[int, str]]:
    """Processes a mutmut run left behind: a test's server whose teardown a mutant broke (every
    program mutmut's tests start carries MUTANT_UNDER_TEST in its environment), or a fork of a
    mutmut worker that a mutant sent down the other branch of a fork (titled "mutmut: ...")."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("mutmut: ") or any(item.startswith(b"MUTANT_UNDER_TEST=") for item in environ):
            found.append((int(entry), cmdline.strip()))
    return found


def stop_leftovers() -> None:
    """Stop by PID what a run left, and say so: a benchmark must not leave servers behind."""
    left = leftovers()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid, _ in left):
        time.sleep(0.1)
    for pid, cmdline in left:
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"stopped a process the mutmut run left (pid {pid}): {cmdline[:160]}", file=sys.stderr)


def survivors() -> list[str]:
    out = subprocess.run([str(MUTMUT), "results"], cwd=ROOT, capture_output=True, text=True)
    return [line.split(":")[0].strip() for line in out.stdout.splitlines() if line.strip().endswith("survived")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="run only the modules whose dotted name contains one of these")
    parser.add_argument("--results", action="store_true", help="print the last run's figures; run nothing")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants too")
    parser.add_argument("--explain", action="store_true", help="with --survivors: each survivor's diff (mutmut show)")
    parser.add_argument("--wording", action="store_true",
                        help="also the kill rate leaving out survivors that change only a message's wording "
                             "(--survivors then lists the others only)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    args = parser.parse_args()
    chosen = [m for m in MODULES if not args.words or any(w in m for w in args.words)]
    if not chosen:
        print(f"no security-critical module matches {args.words}; they are: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    elapsed = 0.0
    if not args.results:
        # A fresh copy each run: mutmut keeps mutants/ and its record of which tests reach which
        # function between runs, and reuses both, so tests or settings changed since would not count.
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        start = time.monotonic()
        # Its errors go to a file, not a pipe: a process a mutant left would hold a pipe open, and
        # this would wait for it instead of stopping it.
        with tempfile.TemporaryFile("w+") as errors:
            run = subprocess.run([str(MUTMUT), "run", *(f"{m}.*" for m in chosen)], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=errors, text=True)
            elapsed = time.monotonic() - start
            stop_leftovers()
            if run.returncode != 0:
                errors.seek(0)
                print(f"mutmut failed ({run.returncode}): {errors.read()[-2000:]}", file=sys.stderr)
                return 1
    figures = results()
    rows = []
    for module in chosen:
        counts = figures.get(module, collections.Counter())
        total = sum(counts.values())
        killed = counts.get("killed", 0) + counts.get("timeout", 0)  # a mutant that hangs the tests is caught too
        rows.append({"module": module, "mutants": total, "killed": killed, "survived": counts.get("survived", 0),
                     "no_tests": counts.get("no tests", 0), "other": total - killed - counts.get("survived", 0)
                     - counts.get("no tests", 0), "kill_rate": round(100 * killed / total, 1) if total else None})
    if args.json:
        print(json.dumps({"rows": rows, "seconds": round(elapsed)}))
        return 0
    print(f"{'module':42} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'kill rate':>9}")
    for row in rows:
        rate = f"{row['kill_rate']}%" if row["kill_rate"] is not None else "not run"
        print(f"{row['module']:42} {row['mutants']:>7} {row['killed']:>7} {row['survived']:>8} {row['no_tests']:>8} "
              f"{rate:>9}")
    total = sum(r["mutants"] for r in rows)
    killed = sum(r["killed"] for r in rows)
    if total:
        print(f"{'all':42} {total:>7} {killed:>7} {'':>8} {'':>8} {round(100 * killed / total, 1):>8}%")
    if elapsed:
        print(f"(mutmut ran {elapsed / 60:.1f} min)")
    try:  # the commit mutmut copied the tree from (its stats record names it)
        commit = json.loads((ROOT / "mutants" / "mutmut-stats.json").read_text()).get("git_commit") or "?"
        print(f"(the tests and code of commit {commit[:10]}, as mutmut copied them)")
    except (OSError, ValueError):
        pass
    if args.survivors or args.wording:
        wanted = tuple(f"{m}." for m in chosen)
        wording: collections.Counter[str] = collections.Counter()
        for name in survivors():
            if not name.startswith(wanted):
                continue
            removed, added = diff_of(name)
            if wording_only(removed, added):
                wording[module_of(name)] += 1
                continue
            if args.survivors:
                print("survived:", name)
                if args.explain:
                    print("".join(f"    - {line}\n" for line in removed) + "".join(f"    + {line}\n" for line in added), end="")
        print("\nKill rate leaving out the survivors that change only a message's wording (case, XX):")
        for row in rows:
            total = row["mutants"] - wording[row["module"]]
            if total:
                print(f"  {row['module']:42} {row['killed']:>5}/{total:<5} {round(100 * row['killed'] / total, 1):>5}%"
                      f"  ({wording[row['module']]} wording-only survivors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
