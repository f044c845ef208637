"""Running a playbook: plays in order, hosts in batches, tasks on a batch's hosts in parallel.

Ansible's semantics where a playbook can tell the difference: a host that fails (and does not
ignore it) or is unreachable takes no further part in the run; a batch in which every host
failed ends the run (so `serial: 1` stops at the first failure); `any_errors_fatal` and
`max_fail_percentage` end it sooner; `when` is evaluated per loop item; variables from the
inventory, then play vars, task vars, registered results, the loop item and `-e` last.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from ..engine.runner import Engine, HostResult, Session
from ..inventory import Host, Inventory
from ..inventory.patterns import PatternError
from .callback import Callback, Outcome
from .conditions import evaluate
from .model import Play, Task, batches, plays
from .modules import Context, ModuleError, RunState, load_all
from .templar import TemplateError, render

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 2, 4, 99


@dataclass
class Options:
    limit: str | None = None
    forks: int = 20
    timeout: float = 10.0
    extra_vars: dict[str, Any] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    skip_tags: set[str] = field(default_factory=set)
    check: bool = False
    diff: bool = False
    start_at_task: str | None = None
    step: bool = False
    trust_new_host_keys: bool = False
    state: str | None = None
    manifests: list[str] = field(default_factory=list)
    tc_url: str | None = None
    engine_dir: str | None = None


def selected(task_tags: frozenset[str], only: set[str], skip: set[str]) -> bool:
    """Ansible's tag rules, with its special tags always, never, tagged, untagged and all."""
    asked = only - {"all"}
    if asked:
        run = bool(task_tags & asked) or "always" in task_tags \
            or ("tagged" in asked and bool(task_tags)) or ("untagged" in asked and not task_tags)
    else:
        run = "never" not in task_tags
    if "never" in task_tags and not (task_tags - {"never"}) & asked:
        run = False
    if skip and (task_tags & skip or ("tagged" in skip and task_tags) or ("untagged" in skip and not task_tags)):
        run = False
    return run


class PlaybookRunner:
    def __init__(self, document: Any, inventory: Inventory, options: Options, callback: Callback):
        self.plays: list[Play] = plays(document)
        self.inventory = inventory
        self.options = options
        self.callback = callback
        self.playbook_dir = os.path.dirname(os.path.abspath(document.file))
        self.modules = load_all()
        self.failed: set[str] = set()
        self.unreachable: set[str] = set()
        self.registered: dict[str, dict[str, Any]] = {}
        self._started = options.start_at_task is None

    # -- hosts and variables ----------------------------------------------------------
    def _hosts(self, play: Play) -> list[Host]:
        try:
            pattern = str(render(play.hosts, {**play.vars, **self.options.extra_vars}))  # as Ansible: no host vars here
        except TemplateError as exc:
            self.callback.warning(f"hosts of play {play.name!r}: {exc}")
            return []
        if pattern in ("localhost", "127.0.0.1") and pattern not in self.inventory.hosts:
            return [Host("localhost", vars={"ansible_connection": "local", "inventory_hostname": "localhost"})]
        try:
            hosts = self.inventory.select(pattern)
        except PatternError as exc:
            self.callback.warning(f"Could not match supplied host pattern, ignoring: {exc}")
            return []
        if self.options.limit:
            allowed = {h.name for h in self.inventory.select(self.options.limit)}
            hosts = [h for h in hosts if h.name in allowed]
        return hosts

    def _vars(self, host: Host, play: Play, task: Task) -> dict[str, Any]:
        groups: dict[str, list[str]] = {"all": sorted(self.inventory.hosts)}
        for h in self.inventory.hosts.values():
            for g in h.groups:
                groups.setdefault(g, []).append(h.name)
        out = dict(host.vars)
        out.update(inventory_hostname=host.name, inventory_hostname_short=host.name.split(".")[0],
                   group_names=sorted(g for g in host.groups if g not in ("all", "ungrouped")), groups=groups,
                   playbook_dir=self.playbook_dir, ansible_check_mode=self.options.check,
                   ansible_diff_mode=self.options.diff)
        out.update(play.vars)
        out.update(task.vars)
        out.update(self.registered.get(host.name, {}))
        out.update(self.options.extra_vars)
        return out

    # -- one task on one host ----------------------------------------------------------
    def _call(self, task: Task, host: Host, variables: dict[str, Any], run: RunState) -> dict[str, Any]:
        args = render(task.args, variables)
        if args is None:
            args = {}
        ctx = Context(host, args, variables, run, delegated=task.delegate_to == "localhost")
        try:
            result = dict(self.modules[task.module](ctx))
        except ModuleError as exc:
            result = {"failed": True, "changed": False, "msg": str(exc)}
        result.setdefault("changed", False)
        if task.changed_when is not None or task.failed_when is not None:
            scope = dict(variables)
            if task.register:
                scope[task.register] = result
            if task.changed_when is not None:
                result["changed"] = evaluate(task.changed_when, scope)
            if task.failed_when is not None:
                result["failed"] = evaluate(task.failed_when, scope)
        return result

    def _work(self, play: Play, task: Task, run: RunState):  # type: ignore[no-untyped-def]
        def work(session: Session) -> HostResult:
            host = session.host
            variables = self._vars(host, play, task)
            outcome = Outcome(host.name, "ok")
            try:
                if task.loop is None:
                    if task.when is not None and not evaluate(task.when, variables):
                        outcome.status, outcome.result = "skipped", {"changed": False, "skipped": True,
                                                                     "skip_reason": "Conditional result was False"}
                    else:
                        outcome.result = self._call(task, host, variables, run)
                        outcome.status = _status(outcome.result)
                else:
                    items = render(task.loop, variables)
                    if not isinstance(items, list):
                        raise TemplateError(f"loop must be a list, not {type(items).__name__}: {items!r}")
                    results = []
                    for item in items:
                        scope = dict(variables, item=item)
                        if task.when is not None and not evaluate(task.when, scope):
                            res = {"changed": False, "skipped": True, "item": item}
                        else:
                            res = self._call(task, host, scope, run) | {"item": item, "ansible_loop_var": "item"}
                        results.append(res)
                        outcome.items.append((_status(res), item, res))
                    failed = any(r.get("failed") for r in results)
                    outcome.result = {"changed": any(r.get("changed") for r in results), "results": results,
                                      "msg": "One or more items failed" if failed else "All items completed"}
                    if failed:
                        outcome.result["failed"] = True
                    if results and all(r.get("skipped") for r in results):
                        outcome.result["skipped"] = True
                    outcome.status = _status(outcome.result)
            except TemplateError as exc:
                outcome.status, outcome.result = "failed", {"failed": True, "changed": False,
                                                            "msg": f"{exc} (in {task.where})"}
            outcome.ignored = outcome.status == "failed" and task.ignore_errors
            return HostResult(host.name, "ok", data={"outcome": outcome})

        return work

    def _outcome(self, task: Task, result: HostResult) -> Outcome:
        """The runner's view of a result, also for the engine's own failures (unreachable, helper)."""
        if "outcome" in result.data:
            return result.data["outcome"]  # type: ignore[no-any-return]
        body: dict[str, Any] = {"changed": False, "msg": result.msg}
        if result.status == "unreachable":
            body["unreachable"] = True
        else:
            body["failed"] = True
        if result.reason:
            body["reason"] = result.reason
        outcome = Outcome(result.host, result.status, body, traceback=result.traceback)
        outcome.ignored = result.status == "failed" and task.ignore_errors
        return outcome

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        engine = Engine(list(self.inventory.hosts.values()), forks=self.options.forks, timeout=self.options.timeout,
                        trust_new_host_keys=self.options.trust_new_host_keys, state=self.options.state)
        run = RunState(engine, self.inventory, self.playbook_dir, self.options.manifests, self.options.state,
                       check=self.options.check, diff=self.options.diff, tc_url=self.options.tc_url,
                       engine_dir=self.options.engine_dir)
        try:
            for play in self.plays:
                if not self._play(play, engine, run):
                    break
        except KeyboardInterrupt:
            engine.cancel()
            self.callback.warning("User interrupted execution")
            return EXIT_INTERRUPTED
        finally:
            engine.close()
            run.close()
        self.callback.recap()
        if self.unreachable:
            return EXIT_UNREACHABLE
        return EXIT_FAILED if self.failed else EXIT_OK

    def _play(self, play: Play, engine: Engine, run: RunState) -> bool:
        """Run one play; False when the run must stop (a whole batch failed, or a fatal error)."""
        hosts = self._hosts(play)
        try:
            play.name = str(render(play.name, {**play.vars, **self.options.extra_vars}))
        except TemplateError:
            pass  # the name is for people; the raw one will do
        if not hosts:
            self.callback.play_start(play.name, [], play.where)
            self.callback.no_hosts()
            return True
        for batch in batches(hosts, play.serial):
            self.callback.play_start(play.name, [h.name for h in batch], play.where)  # per batch, as Ansible
            live = [h for h in batch if h.name not in self.failed | self.unreachable]
            if not live:
                continue
            before = len(self.failed | self.unreachable)
            fatal = self._batch(play, live, engine, run)
            lost = len(self.failed | self.unreachable) - before
            if fatal or lost >= len(batch):
                self.callback.no_more_hosts()
                return False
        return True

    def _batch(self, play: Play, batch: list[Host], engine: Engine, run: RunState) -> bool:
        """Every task on the batch's hosts; True when the play must end here: any_errors_fatal was
        triggered, or more of the batch than max_fail_percentage failed, judged after each task
        as Ansible's linear strategy does (the batch's other hosts get no more tasks)."""
        lost_before = len(self.failed | self.unreachable)
        for task in play.tasks:
            if not self._started:
                if not fnmatch.fnmatchcase(task.name, self.options.start_at_task or ""):
                    continue
                self._started = True
            if not selected(task.tags, self.options.tags, self.options.skip_tags):
                continue
            live = [h for h in batch if h.name not in self.failed | self.unreachable]
            if not live:
                return False
            if self.options.step and not self._confirm(task):
                continue
            self.callback.task_start(task.name, task.where)
            failed_now = False

            def report(result: HostResult, task: Task = task) -> None:
                nonlocal failed_now
                outcome = self._outcome(task, result)
                if outcome.status == "unreachable":
                    self.unreachable.add(outcome.host)
                elif outcome.status == "failed" and not outcome.ignored:
                    self.failed.add(outcome.host)
                    failed_now = True
                if task.register:
                    self.registered.setdefault(outcome.host, {})[task.register] = _registered(outcome)
                if outcome.status in ("failed", "unreachable") and not outcome.ignored:
                    self.callback.refusal(outcome.host, str(outcome.result.get("reason") or outcome.status), task.name)
                self.callback.host_result(outcome, debug=task.module == "debug")

            engine.run(self._work(play, task, run), live, on_result=report)
            if failed_now and play.any_errors_fatal:
                return True
            lost = len(self.failed | self.unreachable) - lost_before
            if play.max_fail_percentage is not None and lost * 100 / len(batch) > play.max_fail_percentage:
                return True
        return False


    def _confirm(self, task: Task) -> bool:
        """--step: ask before each task, as ansible-playbook does; (c)ontinue stops asking."""
        import sys

        while True:
            sys.stderr.write(f"Perform task: TASK: {task.name} (N)o/(y)es/(c)ontinue: ")
            sys.stderr.flush()
            answer = sys.stdin.readline()
            if not answer:  # end of input: nobody to ask, so do nothing more than asked
                sys.stderr.write("\n")
                return False
            answer = answer.strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("c", "continue"):
                self.options.step = False
                return True
            if answer in ("", "n", "no"):
                return False


def _status(result: dict[str, Any]) -> str:
    if result.get("failed"):
        return "failed"
    if result.get("skipped"):
        return "skipped"
    return "changed" if result.get("changed") else "ok"


def _registered(outcome: Outcome) -> dict[str, Any]:
    out = dict(outcome.result)
    out.setdefault("changed", False)
    out["failed"] = outcome.status == "failed"
    if outcome.status == "skipped":
        out["skipped"] = True
    if outcome.status == "unreachable":
        out["unreachable"] = True
    return out
