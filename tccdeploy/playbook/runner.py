"""Running a playbook: plays in order, hosts in batches, tasks on a batch's hosts in parallel.

Ansible's linear strategy where a playbook can tell the difference:

- a host that fails (and does not ignore it) or is unreachable takes no further part in the
  run; a batch in which every host failed ends the run (so `serial: 1` stops at the first
  failure); `any_errors_fatal` and `max_fail_percentage` end it sooner;
- a block: its tasks run on the hosts that entered it; a host that fails in it runs `rescue`
  (counted `rescued`, not `failed`, as ansible-core counts it) and goes on if the rescue
  succeeds; every host that entered runs `always`;
- handlers run at the end of each section (pre_tasks; roles and tasks; post_tasks) or at
  `meta: flush_handlers`, in the order they are written, on the hosts whose tasks notified
  them and changed something;
- variables, lowest first: role defaults, inventory, play vars, vars_files, role vars, block
  and task vars, set_fact and registered results, the loop item, `-e`.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..engine.runner import Engine, HostResult, Session
from ..inventory import Host, Inventory
from ..inventory.patterns import PatternError
from .callback import Callback, Outcome
from .conditions import evaluate
from .filters import to_bool
from .model import Block, Include, Inherit, Item, Play, PlaybookError, Reader, Task, batches, plays
from .modules import Become, Context, ModuleError, RunState, load_all
from .templar import Scope, TemplateError, has_template, omit_keys, render

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 2, 4, 99
CENSORED = "the output has been hidden due to the fact that 'no_log: true' was specified for this result"


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


class _PlayEnds(Exception):
    """any_errors_fatal or max_fail_percentage: the play (and the run) stops here."""


class _EndPlay(Exception):
    """meta: end_play: this play stops, the run goes on."""


@dataclass
class _Frame:
    """Where a task runs: inside a block with a rescue (a failure there is rescuable) or not."""

    rescuing: bool = False


class HostVars(Mapping[str, Any]):
    """`hostvars`: every inventory host's variables, each templated when read."""

    def __init__(self, runner: PlaybookRunner, play: Play):
        self._runner, self._play = runner, play

    def __getitem__(self, name: str) -> Any:
        host = self._runner.inventory.hosts.get(name)
        if host is None:
            raise KeyError(name)
        return self._runner.scope(host, self._play, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._runner.inventory.hosts)

    def __len__(self) -> int:
        return len(self._runner.inventory.hosts)


class PlaybookRunner:
    def __init__(self, document: Any, inventory: Inventory, options: Options, callback: Callback,
                 parsed: list[Play] | None = None):
        self.plays: list[Play] = parsed if parsed is not None else plays(document)
        self.inventory = inventory
        self.options = options
        self.callback = callback
        self.playbook_dir = os.path.dirname(os.path.abspath(document.file))
        self.reader = Reader(self.playbook_dir)  # for include_tasks / include_role, read when they run
        self.modules = load_all()
        self.failed: set[str] = set()
        self.unreachable: set[str] = set()
        self.facts: dict[str, dict[str, Any]] = {}  # set_fact and registered results, per host
        self._started = options.start_at_task is None
        self._groups = self._group_map()
        # per play
        self._vars_files: dict[str, Any] = {}
        self._notified: dict[str, set[str]] = {}
        self._ended: set[str] = set()
        self._batch_hosts: list[Host] = []
        self._play_hosts: list[str] = []
        self._lost_before = 0

    # -- hosts and variables ----------------------------------------------------------
    def _group_map(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {"all": sorted(self.inventory.hosts)}
        for h in self.inventory.hosts.values():
            for g in h.groups:
                groups.setdefault(g, []).append(h.name)
        return groups

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

    def scope(self, host: Host, play: Play, task: Task | Include | None) -> Scope:
        """The variables a template sees for host (and task), lowest precedence first."""
        role = task.role if task is not None else None
        raw: dict[str, Any] = dict(play.role_defaults)
        if role is not None:
            raw.update(role.defaults)  # a role imported or included by a task: its defaults, for its tasks
        raw.update(host.vars)
        raw.update(inventory_hostname=host.name, inventory_hostname_short=host.name.split(".")[0],
                   group_names=sorted(g for g in host.groups if g not in ("all", "ungrouped")), groups=self._groups,
                   playbook_dir=self.playbook_dir, ansible_check_mode=self.options.check,
                   ansible_diff_mode=self.options.diff, hostvars=HostVars(self, play),
                   ansible_play_hosts=list(self._play_hosts), play_hosts=list(self._play_hosts),
                   ansible_play_batch=[h.name for h in self._batch_hosts])
        raw.update(play.vars)
        raw.update(self._vars_files)
        raw.update(play.role_vars)
        if role is not None:
            raw.update(role.vars)
        if task is not None:
            if task.role is not None:
                raw.update(role_name=task.role.name, role_path=task.role.path)
            raw.update(task.vars)
        raw.update(self.options.extra_vars)
        facts = {k: v for k, v in self.facts.get(host.name, {}).items() if k not in self.options.extra_vars}
        return Scope(raw, facts)  # facts and registered results are data a node may control: never templated

    def _load_vars_files(self, play: Play) -> None:
        self._vars_files = {}
        base = Scope({**play.vars, **self.options.extra_vars, "playbook_dir": self.playbook_dir})
        for raw in play.vars_files:
            name = str(render(raw, base))
            path = name if os.path.isabs(name) else os.path.join(self.playbook_dir, name)
            try:
                with open(path) as fh:
                    data = yaml.safe_load(fh)
            except OSError as exc:
                raise TemplateError(f"vars_files: cannot read {path}: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                raise TemplateError(f"vars_files: {path} is not YAML: {exc}") from None
            if data is None:
                continue
            if not isinstance(data, dict):
                raise TemplateError(f"vars_files: {path} must map names to values, not hold a {type(data).__name__}")
            self._vars_files.update(data)

    # -- one task on one host ----------------------------------------------------------
    def _call(self, task: Task, host: Host, variables: Scope, run: RunState) -> dict[str, Any]:
        if task.until is None:
            return self._attempt(task, host, variables, run)
        retries = int(render(task.retries, variables)) if task.retries is not None else 3
        delay = float(render(task.delay, variables)) if task.delay is not None else 5.0
        attempts = max(retries, 0) + 1
        for attempt in range(1, attempts + 1):
            result = self._attempt(task, host, variables, run)
            result["attempts"] = attempt
            scope = variables.child(**{task.register: result}) if task.register else variables
            if evaluate(task.until, scope):
                return result
            if attempt < attempts:
                self.callback.retrying(host.name, task.name, attempts - attempt)
                time.sleep(delay)
        result["failed"] = True
        return result

    def _attempt(self, task: Task, host: Host, variables: Scope, run: RunState) -> dict[str, Any]:
        args = omit_keys(render(task.args, variables))
        if has_template(task.args):
            from ..manifest.schema import module_args_problems

            problems = module_args_problems(task.module, args)
            if problems:
                return {"failed": True, "changed": False, "msg": "; ".join(problems)}
        if args is None:
            args = {}
        delegated, via = self._delegate(task, variables)
        ctx = Context(host, args, variables, run, delegated=delegated, via=via,
                      check_override=task.check_mode, diff_override=task.diff, base_dir=task.base_dir,
                      role_path=task.role.path if task.role else None, become=self._become(task, variables))
        try:
            result = dict(self.modules[task.module](ctx))
        except ModuleError as exc:
            result = {"failed": True, "changed": False, "msg": str(exc)}
        result.setdefault("changed", False)
        if task.changed_when is not None or task.failed_when is not None:
            scope = variables.child(**{task.register: result}) if task.register else variables
            if task.changed_when is not None:
                result["changed"] = evaluate(task.changed_when, scope)
            if task.failed_when is not None:
                result["failed"] = evaluate(task.failed_when, scope)
        return result

    def _delegate(self, task: Task, variables: Scope) -> tuple[bool, Host | None]:
        """delegate_to: (runs on the controller, the inventory host whose connection it uses)."""
        if task.delegate_to is None:
            return False, None
        name = str(render(task.delegate_to, variables))
        if name in self.inventory.hosts:
            return False, self.inventory.hosts[name]
        if name in ("localhost", "127.0.0.1"):
            return True, None
        raise TemplateError(f"delegate_to: no host {name!r} in the inventory (nor localhost)")

    def _become(self, task: Task, variables: Scope) -> Become | None:
        """become, with Ansible's precedence: the inventory's ansible_become* variables over the
        playbook's keywords, as for every connection setting."""
        def setting(var: str, keyword: str, default: Any) -> Any:
            if var in variables:
                return variables[var]
            return render(task.become[keyword], variables) if keyword in task.become else default

        if not to_bool(setting("ansible_become", "become", False)):
            return None
        method = str(setting("ansible_become_method", "become_method", "sudo"))
        if method != "sudo":
            raise TemplateError(f"become_method {method!r} is not run by tccdeploy apply; sudo is")
        password = variables["ansible_become_password"] if "ansible_become_password" in variables else \
            variables.get("ansible_become_pass")
        return Become(str(setting("ansible_become_user", "become_user", "root")),
                      None if password is None else str(password))

    def _work(self, play: Play, task: Task, run: RunState):  # type: ignore[no-untyped-def]
        def work(session: Session) -> HostResult:
            host = session.host
            outcome = Outcome(host.name, "ok")
            try:
                variables = self.scope(host, play, task)
                if task.delegate_to is not None:
                    outcome.via = str(render(task.delegate_to, variables))
                if task.loop is None:
                    if task.when and not evaluate(task.when, variables):
                        outcome.status, outcome.result = "skipped", {"changed": False, "skipped": True,
                                                                     "skip_reason": "Conditional result was False"}
                    else:
                        outcome.result = self._call(task, host, variables, run)
                        outcome.status = _status(outcome.result)
                else:
                    self._loop(play, task, run, host, variables, outcome)
            except TemplateError as exc:
                outcome.status, outcome.result = "failed", {"failed": True, "changed": False,
                                                            "msg": f"{exc} (in {task.where})"}
            outcome.ignored = outcome.status == "failed" and task.ignore_errors
            return HostResult(host.name, "ok", data={"outcome": outcome})

        return work

    def _loop(self, play: Play, task: Task, run: RunState, host: Host, variables: Scope, outcome: Outcome) -> None:
        items = render(task.loop, variables)
        if not isinstance(items, list):
            raise TemplateError(f"loop must be a list, not {type(items).__name__}: {items!r}")
        results: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            extra = {task.loop_var: item, "ansible_loop_var": task.loop_var}
            if task.index_var:
                extra[task.index_var] = index
            scope = variables.child(**extra)
            if task.when and not evaluate(task.when, scope):
                res = {"changed": False, "skipped": True, "skip_reason": "Conditional result was False"}
            else:
                res = self._call(task, host, scope, run)
            res |= {task.loop_var: item, "ansible_loop_var": task.loop_var}
            if task.index_var:
                res |= {"ansible_index_var": task.index_var, task.index_var: index}
            results.append(res)
            label = render(task.label, scope) if task.label is not None else item
            outcome.items.append((_status(res), label, res))
        failed = any(r.get("failed") for r in results)
        outcome.result = {"changed": any(r.get("changed") for r in results), "results": results,
                          "msg": "One or more items failed" if failed else "All items completed"}
        if failed:
            outcome.result["failed"] = True
        if results and all(r.get("skipped") for r in results):
            outcome.result["skipped"] = True
        facts: dict[str, Any] = {}
        for r in results:
            facts.update(r.get("ansible_facts") or {})
        if facts:
            outcome.result["ansible_facts"] = facts
        outcome.status = _status(outcome.result)

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
        self._play_hosts = [h.name for h in hosts if h.name not in self.failed | self.unreachable]
        self._ended = set()
        try:
            self._load_vars_files(play)
        except TemplateError as exc:
            self.callback.play_start(play.name, [h.name for h in hosts], play.where)
            self.callback.error(f"{exc} (in {play.where})")
            for host in hosts:
                self.failed.add(host.name)
                self.callback.refusal(host.name, "vars_files", play.name)
            return False
        for batch in batches(hosts, play.serial):
            self.callback.play_start(play.name, [h.name for h in batch], play.where)  # per batch, as Ansible
            live = [h for h in batch if h.name not in self.failed | self.unreachable]
            if not live:
                continue
            before = len(self.failed | self.unreachable)
            try:
                fatal = self._batch(play, live, run)
            except _EndPlay:
                return True
            lost = len(self.failed | self.unreachable) - before
            if fatal or lost >= len(batch):
                self.callback.no_more_hosts()
                return False
        return True

    def _batch(self, play: Play, batch: list[Host], run: RunState) -> bool:
        """Every section on the batch's hosts; True when the play must end here: any_errors_fatal was
        triggered, or more of the batch than max_fail_percentage failed, judged after each task
        as Ansible's linear strategy does (the batch's other hosts get no more tasks)."""
        self._lost_before = len(self.failed | self.unreachable)
        self._batch_hosts = batch
        self._notified = {}
        self._batch_size = len(batch)
        try:
            for section in (play.pre_tasks, play.tasks, play.post_tasks):
                self._items(play, section, self._alive(batch), _Frame(), run)
                self._flush(play, batch, run)
        except _PlayEnds:
            return True
        return False

    def _alive(self, hosts: list[Host]) -> list[Host]:
        gone = self.failed | self.unreachable | self._ended
        return [h for h in hosts if h.name not in gone]

    def _items(self, play: Play, items: list[Item], hosts: list[Host], frame: _Frame, run: RunState) -> set[str]:
        """Run items in order on hosts; the hosts that failed here (and were not rescued)."""
        failed: set[str] = set()
        for item in items:
            live = [h for h in hosts if h.name not in failed | self.unreachable | self._ended]
            if not live:
                break
            if isinstance(item, Task):
                failed |= self._task(play, item, live, frame, run)
            elif isinstance(item, Block):
                failed |= self._block(play, item, live, frame, run)
            else:
                failed |= self._include(play, item, live, frame, run)
        return failed

    def _block(self, play: Play, block: Block, hosts: list[Host], frame: _Frame, run: RunState) -> set[str]:
        failed = self._items(play, block.tasks, hosts, _Frame(rescuing=frame.rescuing or bool(block.rescue)), run)
        if block.rescue and failed:
            rescue = [h for h in hosts if h.name in failed and h.name not in self.unreachable]
            failed = self._items(play, block.rescue, rescue, frame, run) | {h for h in failed if h in self.unreachable}
        entered = [h for h in hosts if h.name not in self.unreachable and h.name not in self._ended]
        return failed | self._items(play, block.always, entered, frame, run)

    def _include(self, play: Play, inc: Include, hosts: list[Host], frame: _Frame, run: RunState) -> set[str]:
        if not self._wanted(inc.name, inc.tags):
            return set()
        self.callback.task_start(inc.name, inc.where)
        groups: dict[str, list[Host]] = {}
        failed: set[str] = set()
        for host in hosts:
            try:
                variables = self.scope(host, play, inc)
                if inc.when and not evaluate(inc.when, variables):
                    self.callback.host_result(Outcome(host.name, "skipped", {"changed": False, "skipped": True}))
                    continue
                if inc.kind == "role":
                    assert inc.role is not None
                    target = os.path.join(inc.role.path, "tasks", inc.tasks_from)
                else:
                    name = str(render(inc.target, variables))
                    found = self.reader.find(name, inc.base_dir, inc.role, "tasks")
                    if found is None:
                        raise TemplateError(f"include_tasks: no such file {name} (looked beside {inc.where}, "
                                            "in the role's tasks/ and the playbook's folder)")
                    target = found
            except TemplateError as exc:
                outcome = Outcome(host.name, "failed", {"failed": True, "changed": False, "msg": f"{exc} (in {inc.where})"})
                self._failure(outcome, frame, inc.name)
                self.callback.host_result(outcome)
                failed.add(host.name)
                continue
            groups.setdefault(target, []).append(host)
        for target, members in groups.items():  # every include's line first, as ansible-core prints them
            self.callback.included(target if inc.kind == "tasks" else f"{inc.role.name if inc.role else ''}",
                                   [h.name for h in members])
        for target, members in groups.items():
            inherit = Inherit(vars=tuple(inc.vars.items()), base_dir=inc.base_dir, role=inc.role)
            self.reader.problems = []
            if inc.kind == "role" and inc.role is not None:
                items = self.reader.role_tasks(inc.role, inc.tasks_from, inherit, None)  # type: ignore[arg-type]
            else:
                items = self.reader.tasks_file(target, inherit, None)
            if self.reader.problems:
                msg = "; ".join(f"{p.file}:{p.line}: {p.message}" for p in self.reader.problems)
                for host in members:
                    outcome = Outcome(host.name, "failed", {"failed": True, "changed": False, "msg": msg})
                    self._failure(outcome, frame, inc.name)
                    self.callback.host_result(outcome)
                    failed.add(host.name)
                continue
            failed |= self._items(play, items, members, frame, run)
        return failed

    def _wanted(self, name: str, tags: frozenset[str]) -> bool:
        if not self._started:
            if not fnmatch.fnmatchcase(name, self.options.start_at_task or ""):
                return False
            self._started = True
        return selected(tags, self.options.tags, self.options.skip_tags)

    def _failure(self, outcome: Outcome, frame: _Frame, task_name: str) -> None:
        """Book a host's failure: rescuable inside a block with rescue, else final for the run."""
        if outcome.status == "unreachable":
            self.unreachable.add(outcome.host)
        elif outcome.status == "failed" and not outcome.ignored:
            if frame.rescuing:
                outcome.rescued = True
                self.facts.setdefault(outcome.host, {}).update(
                    ansible_failed_task={"name": task_name}, ansible_failed_result=dict(outcome.result))
            else:
                self.failed.add(outcome.host)
        if outcome.status in ("failed", "unreachable") and not outcome.ignored and not outcome.rescued:
            self.callback.refusal(outcome.host, str(outcome.result.get("reason") or outcome.status), task_name)

    def _task(self, play: Play, task: Task, hosts: list[Host], frame: _Frame, run: RunState,
              handler: bool = False) -> set[str]:
        if task.module == "meta":
            return self._meta(play, task, hosts, run)
        if not handler and not self._wanted(task.name, task.tags):
            return set()
        if self.options.step and not self._confirm(task):
            return set()
        targets = hosts[:1] if task.run_once else hosts
        self.callback.task_start(task.name, task.where, handler=handler)
        failed: set[str] = set()
        first: Outcome | None = None

        def report(result: HostResult) -> None:
            nonlocal first
            outcome = self._outcome(task, result)
            first = first or outcome
            self._failure(outcome, frame, task.name)
            if outcome.status in ("failed", "unreachable") and not outcome.ignored:
                failed.add(outcome.host)
            self._keep(task, outcome.host, outcome)
            if task.no_log:
                _censor(outcome)
            self.callback.host_result(outcome, debug=task.module == "debug")

        self._engine(run).run(self._work(play, task, run), targets, on_result=report)
        if task.run_once and first is not None:
            for host in hosts[1:]:
                self._keep(task, host.name, first)
        if failed - self.unreachable and play.any_errors_fatal and not frame.rescuing:
            raise _PlayEnds()
        lost = len(self.failed | self.unreachable) - self._lost_before
        if play.max_fail_percentage is not None and lost * 100 / self._batch_size > play.max_fail_percentage:
            raise _PlayEnds()
        return failed

    def _keep(self, task: Task, host: str, outcome: Outcome) -> None:
        """What a task leaves for later ones: its registered result, its facts, its notifications."""
        facts = self.facts.setdefault(host, {})
        if outcome.status not in ("failed", "unreachable", "skipped"):
            facts.update(outcome.result.get("ansible_facts") or {})
        if task.register:
            facts[task.register] = _registered(outcome)
        if task.notify and outcome.status == "changed":
            self._notified.setdefault(host, set()).update(task.notify)

    def _engine(self, run: RunState) -> Engine:
        return run.engine

    def _meta(self, play: Play, task: Task, hosts: list[Host], run: RunState) -> set[str]:
        """meta, printed as ansible-core 2.19 prints it: the banner once per host (end_play: for
        the first host only, which alone decides), a skipped condition shown but not counted."""
        action = task.args
        if not self._wanted(task.name, task.tags):
            return set()
        for host in hosts[:1] if action == "end_play" else hosts:
            self.callback.banner_only(task.name)
            if action not in ("end_play", "end_host"):
                continue
            try:
                hit = not task.when or evaluate(task.when, self.scope(host, play, task))
            except TemplateError as exc:
                self.callback.warning(f"meta: {action} on {host.name}: {exc} (in {task.where})")
                continue
            if not hit:
                self.callback.skipped_uncounted(host.name)
            elif action == "end_host":
                self._ended.add(host.name)
            else:
                raise _EndPlay()
        if action == "flush_handlers":
            self._flush(play, self._batch_hosts, run)
        return set()

    def _flush(self, play: Play, batch: list[Host], run: RunState) -> None:
        """Run the notified handlers, in the order written, each on the hosts that notified it."""
        for handler in play.handlers:
            names = handler.answers
            hosts = [h for h in self._alive(batch) if self._notified.get(h.name, set()) & names]
            if not hosts:
                continue
            for h in hosts:
                self._notified[h.name] -= names
            self._task(play, handler, hosts, _Frame(), run, handler=True)

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


def _censor(outcome: Outcome) -> None:
    outcome.result = {"censored": CENSORED, "changed": bool(outcome.result.get("changed"))}
    outcome.items = [(status, "(censored due to no_log)", {"censored": CENSORED}) for status, _, _ in outcome.items]


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


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNREACHABLE", "Options", "PlaybookError",
           "PlaybookRunner", "selected"]
