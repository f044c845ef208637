"""Ansible's language in `apply`, compared with ansible-playbook 2.19 on the same playbooks.

The corpus (tests/playbooks/ansible/) has roles, handlers, blocks, includes, set_fact and
Ansible's filters, on three hosts that are the controller (Ansible's local connection). Each
playbook runs under both tools, each writing into a fresh out_dir, and these must agree: the
recap, the exit status, every task's banner in order with each host's status (items, includes,
ignored failures), every debug message, and the files written (content and mode).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .helpers_apply import BIN, ansible_playbook, apply, recap

HERE = Path(__file__).parent / "playbooks"
CORPUS = HERE / "ansible"
INVENTORY = str(HERE / "local-inventory.yml")
needs_ansible = pytest.mark.skipif(not (BIN / "ansible-playbook").exists(),
                                   reason="ansible-core is not installed (pip install -e '.[test]')")

_BANNER = re.compile(r"^(TASK|RUNNING HANDLER|PLAY) \[(.*)\] \*+$")
_RESULT = re.compile(r"^(ok|changed|skipping|fatal|failed): \[([^\]]+)\](?::? (?:=> )?\(item=(.*?)\))?(.*)$")
_INCLUDED = re.compile(r"^included: (\S+) for (.+)$")


def events(output: str) -> list[tuple[str, list[tuple]]]:
    """Each banner with what every host did under it: (host, status, item, debug body)."""
    out: list[tuple[str, list[tuple]]] = []
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        banner = _BANNER.match(line)
        if banner:
            out.append((f"{banner.group(1)} [{banner.group(2)}]", []))
            continue
        if not out:
            continue
        entries = out[-1][1]
        included = _INCLUDED.match(line)
        if included:
            entries += [(host.strip(), "included", included.group(1), None) for host in included.group(2).split(",")]
            continue
        if line == "...ignoring" and entries:
            entries[-1] = (*entries[-1][:1], "ignored", *entries[-1][2:])
            continue
        result = _RESULT.match(line)
        if not result:
            continue
        status, host, item, tail = result.groups()
        if status == "fatal":
            status = "unreachable" if "UNREACHABLE" in tail else "failed"
        body = None
        if tail.endswith("=> {") and status in ("ok", "changed"):
            block = ["{"]
            while i < len(lines) and lines[i].rstrip() != "}":
                block.append(lines[i])
                i += 1
            block.append("}")
            i += 1
            body = json.dumps(json.loads("\n".join(block)), sort_keys=True)
        entries.append((host, status, item, body))
    return [(banner, sorted(entries, key=lambda e: tuple(str(x) for x in e))) for banner, entries in out]


def files(folder: Path) -> dict[str, tuple[str, str]]:
    return {p.name: (p.read_text(), oct(p.stat().st_mode & 0o777)) for p in sorted(folder.iterdir())}


def both(playbook: str, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    ours_dir, theirs_dir = tmp_path / "apply", tmp_path / "ansible"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours = apply(str(CORPUS / playbook), "-i", INVENTORY, "--state", str(tmp_path / "state"),
                 "-e", f"out_dir={ours_dir}", *extra)
    theirs = ansible_playbook(str(CORPUS / playbook), "-i", INVENTORY, "-e", f"out_dir={theirs_dir}", *extra)
    return ours, theirs, ours_dir, theirs_dir


@pytest.mark.slow
@needs_ansible
@pytest.mark.parametrize("playbook", ["site.yml", "blocks.yml", "filters.yml", "become.yml", "batches.yml", "roles.yml"])
def test_the_corpus_runs_as_ansible_playbook_runs_it(playbook, tmp_path):
    ours, theirs, ours_dir, theirs_dir = both(playbook, tmp_path)
    assert recap(theirs.stdout), theirs.stdout + theirs.stderr
    assert recap(ours.stdout) == recap(theirs.stdout), ours.stdout + ours.stderr
    assert ours.returncode == theirs.returncode, ours.stdout + ours.stderr
    mine, theirs_events = events(ours.stdout), events(theirs.stdout)
    for (b1, e1), (b2, e2) in zip(mine, theirs_events, strict=False):
        assert (b1, e1) == (b2, e2), f"first difference at {b2}"
    assert len(mine) == len(theirs_events)
    assert files(ours_dir) == files(theirs_dir)


@pytest.mark.slow
@needs_ansible
@pytest.mark.parametrize("mode", [[], ["--check"]], ids=["run", "check"])
def test_check_mode_per_task_as_ansible_playbook_honours_it(mode, tmp_path):
    ours, theirs, ours_dir, theirs_dir = both("modes.yml", tmp_path, *mode)
    assert recap(ours.stdout) == recap(theirs.stdout), ours.stdout + theirs.stdout
    assert events(ours.stdout) == events(theirs.stdout)
    assert files(ours_dir) == files(theirs_dir)
    assert sorted(files(ours_dir)) == sorted(
        f"{h}.{kind}" for h in "abc" for kind in (("written",) if mode else ("written", "plain")))


@pytest.mark.slow
@needs_ansible
def test_a_second_run_changes_nothing_that_the_first_did(tmp_path):
    """Idempotence as Ansible shows it: the same out_dir twice; the second run's template and
    copy tasks report ok, so no handler runs."""
    out = tmp_path / "out"
    out.mkdir()
    first = apply(str(CORPUS / "site.yml"), "-i", INVENTORY, "--state", str(tmp_path / "s"), "-e", f"out_dir={out}")
    second = apply(str(CORPUS / "site.yml"), "-i", INVENTORY, "--state", str(tmp_path / "s"), "-e", f"out_dir={out}")
    assert first.returncode == second.returncode == 0, second.stdout
    assert "RUNNING HANDLER" in first.stdout and "RUNNING HANDLER" not in second.stdout
    theirs = ansible_playbook(str(CORPUS / "site.yml"), "-i", INVENTORY, "-e", f"out_dir={out}")
    assert recap(theirs.stdout) == recap(second.stdout)
    shutil.rmtree(out)
    os.makedirs(out)
