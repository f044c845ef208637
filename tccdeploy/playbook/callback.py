"""What `apply` prints: Ansible's default output for people, its JSON callback's shape for CI.

The text matches ansible-playbook's default callback line for line where both run the same
thing: PLAY/TASK banners padded with stars to 80 columns, `ok:` / `changed:` / `fatal: ...
FAILED! =>` / `skipping:` / `UNREACHABLE!` lines, per-item lines in loops, `...ignoring`, and
the PLAY RECAP with the same columns, so people and tools that read Ansible read this.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, TextIO

from .modules.basic import render_diff

STATS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
_COLOR = {"ok": "\033[0;32m", "changed": "\033[0;33m", "failed": "\033[0;31m", "unreachable": "\033[1;31m",
          "skipped": "\033[0;36m", "ignored": "\033[0;35m"}
_RESET = "\033[0m"
# Result keys that are bookkeeping, not the module's answer (hidden as Ansible hides them).
_INTERNAL = {"diff", "failed", "skipped"}
_DEBUG_ALLOWED = ("msg", "exception", "warnings", "deprecations")  # with a msg, all a debug result shows
_DEBUG_HIDDEN = ("changed", "failed", "skipped", "invocation", "skip_reason", "diff", "ansible_loop_var")


def _debug_shown(result: dict[str, Any]) -> dict[str, Any]:
    """What the default callback shows of a debug result (its _clean_results): a msg alone, or
    the variable debug was asked for (a loop's item key goes with a msg, stays with var: item)."""
    if "msg" in result:
        return {k: v for k, v in result.items() if k in _DEBUG_ALLOWED}
    return {k: v for k, v in result.items() if k not in _DEBUG_HIDDEN}


@dataclass
class Outcome:
    """One task's result on one host, after when/loop/changed_when/failed_when/ignore_errors."""

    host: str
    status: str  # ok | changed | failed | skipped | unreachable
    result: dict[str, Any] = field(default_factory=dict)
    ignored: bool = False
    rescued: bool = False  # failed inside a block with a rescue: counted rescued, as ansible-core counts it
    via: str | None = None  # delegate_to: shown as [host -> via]
    items: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)  # (status, item, result)
    traceback: str = ""


def banner(text: str, columns: int = 80) -> str:
    text = text.strip()
    return f"\n{text} {'*' * max(3, columns - len(text) - 1)}"


class Callback:
    def __init__(self, verbosity: int = 0, json_mode: bool = False, diff: bool = False, out: TextIO | None = None,
                 color: bool | None = None):
        self.verbosity = verbosity
        self.json_mode = json_mode
        self.diff = diff
        self.out = out or sys.stdout
        self.color = (self.out.isatty() if color is None else color) and not json_mode
        self.stats: dict[str, dict[str, int]] = {}
        self.plays: list[dict[str, Any]] = []
        self.refusals: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    # -- text ---------------------------------------------------------------------------
    def _say(self, text: str, kind: str | None = None) -> None:
        if self.json_mode:
            return
        if kind and self.color:
            text = f"{_COLOR[kind]}{text}{_RESET}"
        self.out.write(text + "\n")
        self.out.flush()

    def _stat(self, host: str, **increments: int) -> None:
        entry = self.stats.setdefault(host, dict.fromkeys(STATS, 0))
        for key, value in increments.items():
            entry[key] += value

    def play_start(self, name: str, hosts: list[str], where: str) -> None:
        if not (self.plays and self.plays[-1]["play"]["path"] == where and not self.plays[-1]["tasks"]):
            self.plays.append({"play": {"name": name, "path": where}, "tasks": []})
        self._say(banner(f"PLAY [{name}]"))

    def no_hosts(self) -> None:
        self._say("skipping: no hosts matched", "skipped")

    def task_start(self, name: str, where: str, handler: bool = False) -> None:
        self.plays[-1]["tasks"].append({"task": {"name": name, "path": where}, "hosts": {}})
        self._say(banner(f"{'RUNNING HANDLER' if handler else 'TASK'} [{name}]"))
        if self.verbosity >= 2:
            self._say(f"task path: {where}")

    def _dump(self, result: dict[str, Any], indent: int | None = None) -> str:
        shown = {k: v for k, v in result.items() if k not in _INTERNAL}
        return json.dumps(shown, sort_keys=True, default=str, indent=indent)

    def host_result(self, outcome: Outcome, debug: bool = False) -> None:
        with self._lock:
            self.plays[-1]["tasks"][-1]["hosts"][outcome.host] = dict(
                outcome.result, **({"_status": outcome.status} if self.json_mode else {}))
            self._count(outcome)
            self._print(outcome, debug)

    def _count(self, outcome: Outcome) -> None:
        host, status = outcome.host, outcome.status
        if status == "unreachable":
            self._stat(host, unreachable=1)
        elif status == "skipped":
            self._stat(host, skipped=1)
        elif status == "failed" and outcome.rescued and not outcome.ignored:
            self._stat(host, rescued=1)
        elif status == "failed" and not outcome.ignored:
            self._stat(host, failed=1)
        else:
            self._stat(host, ok=1, changed=1 if outcome.result.get("changed") else 0,
                       ignored=1 if outcome.ignored else 0)

    def _print(self, o: Outcome, debug: bool) -> None:
        host = f"{o.host} -> {o.via}" if o.via and o.status != "skipped" else o.host
        if self.diff and o.result.get("diff") and o.status in ("changed", "ok", "failed"):
            self._say(render_diff(o.result["diff"]).rstrip("\n") + "\n")
        if o.items:
            for status, item, result in o.items:
                label = json.dumps(item, default=str) if not isinstance(item, str) else item
                if status == "failed":
                    self._say(f"failed: [{host}] (item={label}) => {self._dump(result)}", "failed")
                elif status == "skipped":
                    self._say(f"skipping: [{host}] => (item={label}) ", "skipped")
                elif debug:  # debug shows each item's message, as it does without a loop
                    shown = json.dumps(_debug_shown(result), indent=4, default=str)
                    self._say(f"{status}: [{host}] => (item={label}) => {shown}", status)
                else:
                    tail = f" => {self._dump(result)}" if self.verbosity else ""
                    self._say(f"{status}: [{host}] => (item={label}){tail}", status)
            if o.status == "failed" and o.ignored:
                self._say("...ignoring", "skipped")
            elif o.status == "unreachable":
                self._say(f"fatal: [{host}]: UNREACHABLE! => {self._dump(o.result)}", "unreachable")
            return
        if o.status == "unreachable":
            self._say(f"fatal: [{host}]: UNREACHABLE! => {self._dump(o.result)}", "unreachable")
        elif o.status == "failed":
            self._say(f"fatal: [{host}]: FAILED! => {self._dump(o.result)}", "failed")
            if o.traceback and self.verbosity >= 3:
                self._say("The full traceback on the node was:\n" + o.traceback.rstrip())
            if o.ignored:
                self._say("...ignoring", "skipped")
        elif o.status == "skipped":
            self._say(f"skipping: [{host}]", "skipped")
        elif debug:
            self._say(f"ok: [{host}] => {json.dumps(_debug_shown(o.result), indent=4, default=str)}", "ok")
        elif self.verbosity:
            self._say(f"{o.status}: [{host}] => {self._dump(o.result)}", o.status)
        else:
            self._say(f"{o.status}: [{host}]", o.status)

    def refusal(self, host: str, reason: str, task: str) -> None:
        """Why a host dropped out of the run (its first failure), for the lines under the recap."""
        self.refusals.setdefault(host, (reason, task))

    def banner_only(self, name: str) -> None:
        """A meta task's banner: ansible-core prints it and records no result."""
        self._say(banner(f"TASK [{name}]"))

    def skipped_uncounted(self, host: str) -> None:
        self._say(f"skipping: [{host}]", "skipped")

    def included(self, path: str, hosts: list[str]) -> None:
        """include_tasks read a file for these hosts: ok for each, as ansible-core counts it."""
        with self._lock:
            for host in hosts:
                self._stat(host, ok=1)
                self.plays[-1]["tasks"][-1]["hosts"][host] = {"changed": False, "include": path}
            self._say(f"included: {path} for {', '.join(hosts)}", "skipped")

    def retrying(self, host: str, task: str, left: int) -> None:
        self._say(f"FAILED - RETRYING: [{host}]: {task} ({left} retries left).", "failed")

    def error(self, text: str) -> None:
        if self.json_mode:
            sys.stderr.write(f"[ERROR]: {text}\n")
        else:
            self._say(f"[ERROR]: {text}", "failed")

    def no_more_hosts(self) -> None:
        self._say(banner("NO MORE HOSTS LEFT"))

    def warning(self, text: str) -> None:
        if self.json_mode:
            sys.stderr.write(f"[WARNING]: {text}\n")
        else:
            self._say(f"[WARNING]: {text}", "ignored")

    def recap(self) -> None:
        if self.json_mode:
            json.dump({"plays": self.plays, "stats": self.stats,
                       "refused": {h: {"reason": r, "task": t} for h, (r, t) in sorted(self.refusals.items())}},
                      self.out, indent=4, default=str)
            self.out.write("\n")
            return
        self._say(banner("PLAY RECAP"))
        for host in sorted(self.stats):
            s = self.stats[host]
            worst = "unreachable" if s["unreachable"] else "failed" if s["failed"] else "changed" if s["changed"] else "ok"
            name = f"{host:<26}" if not self.color else f"{_COLOR[worst]}{host:<37}{_RESET}"
            cells = " ".join(f"{key}={s[key]:<4}" for key in STATS)
            self.out.write(f"{name} : {cells}\n")
        if self.refusals:
            # Not in Ansible's recap: which reason took each failed host out, so an operator sees
            # at a glance why a node was refused without scrolling back through the tasks.
            self._say("")
            for host in sorted(self.refusals):
                reason, task = self.refusals[host]
                self._say(f"{host:<26} : {reason} (task: {task})", "failed")
        self._say("")
