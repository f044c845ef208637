"""A playbook, parsed: plays, blocks, includes, roles and tasks, each with where it was written.

The playbook schema has already refused what tccdeploy does not run. This gives the validated
data a shape and does what Ansible does when it reads a playbook: `import_playbook`,
`import_tasks`, `import_role` and `roles:` are read now (their files validated like the
playbook, so a broken role stops the run before any host is touched), and a block's or an
import's `when`, `vars` and `tags` are handed down to each task inside, as Ansible's
inheritance does (the condition is evaluated per task). `include_tasks` and `include_role`
are read when they run, per host, as in Ansible.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..manifest.problems import Problem
from ..manifest.xref import MODULES, STRUCTURES, canonical
from ..manifest.yamlload import Document

BECOME = ("become", "become_user", "become_method")


class PlaybookError(Exception):
    """Files the playbook names that are missing or invalid: nothing may run."""

    def __init__(self, problems: list[Problem], files: dict[str, str] | None = None):
        super().__init__("; ".join(f"{p.file}:{p.line}: {p.message}" for p in problems))
        self.problems = problems
        self.files = files or {}


@dataclass
class Role:
    name: str
    path: str
    defaults: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    handlers: list[Task] = field(default_factory=list)


@dataclass
class Task:
    module: str
    args: Any
    name: str  # as shown: "role : name" in a role
    where: str  # file:line
    short: str = ""  # as written, without the role: what notify names
    when: list[Any] = field(default_factory=list)  # inherited conditions first, all must hold
    loop: Any = None
    loop_var: str = "item"
    index_var: str | None = None
    label: Any = None
    register: str | None = None
    tags: frozenset[str] = frozenset()
    ignore_errors: bool = False
    delegate_to: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    changed_when: Any = None
    failed_when: Any = None
    notify: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)
    run_once: bool = False
    until: Any = None
    retries: Any = None
    delay: Any = None
    check_mode: bool | None = None
    diff: bool | None = None
    no_log: bool = False
    role: Role | None = None
    base_dir: str = ""  # where relative paths of this task's file are looked up first
    become: dict[str, Any] = field(default_factory=dict)  # become, become_user, become_method as written

    @property
    def answers(self) -> set[str]:
        """For a handler: the notifications it runs for (its name, with or without its role, and
        its listen topics)."""
        return {self.name, self.short or self.name, *self.listen}


@dataclass
class Block:
    tasks: list[Item]
    rescue: list[Item]
    always: list[Item]
    where: str


@dataclass
class Include:
    """include_tasks / include_role: read when it runs, per host."""

    kind: str  # "tasks" | "role"
    target: Any  # a file (templated) or a role name
    name: str
    where: str
    when: list[Any] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    tasks_from: str = "main"
    base_dir: str = ""
    role: Role | None = None


Item = Task | Block | Include


@dataclass
class Play:
    name: str
    hosts: str
    tasks: list[Item]
    where: str
    vars: dict[str, Any] = field(default_factory=dict)
    serial: list[int | str] = field(default_factory=list)
    max_fail_percentage: int | None = None
    any_errors_fatal: bool = False
    tags: frozenset[str] = frozenset()
    pre_tasks: list[Item] = field(default_factory=list)
    post_tasks: list[Item] = field(default_factory=list)
    handlers: list[Task] = field(default_factory=list)
    vars_files: list[str] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)

    @property
    def role_defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in self.roles:
            out.update(role.defaults)
        return out

    @property
    def role_vars(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in self.roles:
            out.update(role.vars)
        return out


@dataclass(frozen=True)
class Inherit:
    """What enclosing blocks, imports and roles hand down to each task."""

    when: tuple[Any, ...] = ()
    vars: tuple[tuple[str, Any], ...] = ()
    tags: frozenset[str] = frozenset()
    role: Role | None = None
    base_dir: str = ""
    become: tuple[tuple[str, Any], ...] = ()

    def add(self, raw: dict[str, Any], base_dir: str | None = None, role: Role | None = None) -> Inherit:
        when = raw.get("when")
        return Inherit(
            when=self.when + tuple(_conditions(when)),
            vars=self.vars + tuple((raw.get("vars") or {}).items()),
            tags=self.tags | _tags(raw.get("tags")),
            role=role or self.role, base_dir=base_dir or self.base_dir,
            become=self.become + tuple((k, raw[k]) for k in BECOME if k in raw))


def _conditions(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _tags(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(t.strip() for t in value.split(",") if t.strip())
    return frozenset(str(t) for t in value)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _where(doc: Document, path: tuple) -> str:
    line, _ = doc.locate(path)
    return f"{doc.file}:{line}"


class Reader:
    """Reads a playbook and every file it imports, collecting problems instead of stopping at
    the first, so one run of `apply --syntax-check` names them all."""

    def __init__(self, playbook_dir: str):
        self.playbook_dir = playbook_dir
        self.problems: list[Problem] = []
        self.files: dict[str, str] = {}
        self._roles: dict[str, Role] = {}
        self._used: list[Role] = []  # roles a play's tasks import or include: their handlers are the play's
        self._stack: list[str] = []

    # -- files ---------------------------------------------------------------------------
    def find(self, name: str, base_dir: str, role: Role | None, sub: str) -> str | None:
        """Ansible's search: beside the including file, the role's sub folder, the playbook's."""
        if os.path.isabs(name):
            return name if os.path.isfile(name) else None
        candidates = [os.path.join(base_dir, name)] if base_dir else []
        if role is not None:
            candidates.append(os.path.join(role.path, sub, name))
        candidates += [os.path.join(self.playbook_dir, sub, name), os.path.join(self.playbook_dir, name)]
        return next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)

    def load(self, path: str, where: tuple[Document, tuple] | None, kind: str) -> Document | None:
        from ..manifest import schema
        from ..manifest.problems import ManifestError
        from ..manifest.yamlload import load_text, read_text

        try:
            self.files[path] = read_text(path)
            docs = load_text(path, self.files[path])
        except ManifestError as exc:
            self.problems.extend(exc.problems)
            return None
        if not docs or docs[0].data is None:
            return docs[0] if docs else None
        doc = docs[0]
        if kind == "tasks":
            if not isinstance(doc.data, list):
                self.problems.append(doc.problem((), "playbook.file", f"{path} is not a list of tasks",
                                                 "a tasks file is a YAML list of tasks, as under a play's tasks:"))
                return None
            found = schema.validate_tasks(doc)
            if not found:
                from ..manifest.xref import task_list

                found = list(task_list(doc, doc.data, ()))
            if found:
                self.problems.extend(found)
                return None
        elif kind == "vars" and not isinstance(doc.data, dict):
            self.problems.append(doc.problem((), "playbook.file", f"{path} is not a mapping of variables",
                                             "a role's defaults/ or vars/ file maps names to values"))
            return None
        return doc

    def _problem(self, where: tuple[Document, tuple] | None, code: str, message: str, hint: str) -> None:
        if where is None:
            self.problems.append(Problem("(playbook)", 0, 0, "", code, message, "error", hint))
        else:
            self.problems.append(where[0].problem(where[1], code, message, hint))

    # -- plays ---------------------------------------------------------------------------
    def plays(self, doc: Document) -> list[Play]:
        out: list[Play] = []
        for i, raw in enumerate(doc.data):
            if "import_playbook" in raw:
                out.extend(self._import_playbook(doc, i, raw))
            else:
                out.append(self.play(doc, i, raw))
        return out

    def _import_playbook(self, doc: Document, i: int, raw: dict[str, Any]) -> list[Play]:
        from ..manifest import schema
        from ..manifest.xref import playbook_tasks

        target = str(raw["import_playbook"])
        path = self.find(target, os.path.dirname(os.path.abspath(doc.file)), None, "")
        if path is None:
            self._problem((doc, (i, "import_playbook")), "playbook.missing", f"import_playbook: no such file {target}",
                          "the path is relative to the importing playbook")
            return []
        if path in self._stack:
            self._problem((doc, (i, "import_playbook")), "playbook.cycle",
                          f"import_playbook {target} imports itself (through {' -> '.join(self._stack)})",
                          "remove the import that closes the loop")
            return []
        imported = self.load(path, (doc, (i, "import_playbook")), "playbook")
        if imported is None or imported.data is None:
            return []
        found = schema.validate(imported, "Playbook") or list(playbook_tasks(imported))
        if found:
            self.problems.extend(found)
            return []
        self._stack.append(path)
        try:
            plays = self.plays(imported)
        finally:
            self._stack.pop()
        for play in plays:
            play.vars = {**(raw.get("vars") or {}), **play.vars}
            play.tags |= _tags(raw.get("tags"))
        return plays

    def play(self, doc: Document, i: int, raw: dict[str, Any]) -> Play:
        self._used = []
        hosts = raw["hosts"]
        pattern = ":".join(hosts) if isinstance(hosts, list) else str(hosts)
        serial = raw.get("serial")
        base = Inherit(tags=_tags(raw.get("tags")), base_dir=os.path.dirname(os.path.abspath(doc.file)),
                       become=tuple((k, raw[k]) for k in BECOME if k in raw))
        play = Play(
            name=str(raw.get("name") or pattern), hosts=pattern, tasks=[], where=_where(doc, (i,)),
            vars=dict(raw.get("vars") or {}),
            serial=[] if serial is None else (list(serial) if isinstance(serial, list) else [serial]),
            max_fail_percentage=raw.get("max_fail_percentage"), any_errors_fatal=bool(raw.get("any_errors_fatal", False)),
            tags=base.tags, vars_files=[str(f) for f in raw.get("vars_files") or []],
        )
        play.pre_tasks = self.items(doc, raw.get("pre_tasks"), (i, "pre_tasks"), base)
        for k, entry in enumerate(raw.get("roles") or []):
            spec = {"role": entry} if isinstance(entry, str) else entry
            role = self.role(str(spec["role"]), (doc, (i, "roles", k)))
            if role is None:
                continue
            play.roles.append(role)
            inherit = base.add({"when": spec.get("when"), "vars": spec.get("vars"), "tags": spec.get("tags")},
                               os.path.join(role.path, "tasks"), role)
            play.tasks += self.role_tasks(role, "main", inherit, (doc, (i, "roles", k)))
        play.tasks += self.items(doc, raw.get("tasks"), (i, "tasks"), base)
        play.post_tasks = self.items(doc, raw.get("post_tasks"), (i, "post_tasks"), base)
        roles = _unique_roles(play.roles + self._used)
        play.handlers = [h for role in roles for h in role.handlers]
        play.handlers += self._handlers(doc, raw.get("handlers"), (i, "handlers"), base)
        self._check_notify(play, doc, (i,))
        return play

    def _check_notify(self, play: Play, doc: Document, path: tuple) -> None:
        """Ansible refuses a notify that no handler answers: so does tccdeploy, before running."""
        known = {n for h in play.handlers for n in h.answers}
        for task in _walk(play.pre_tasks + play.tasks + play.post_tasks + list(play.handlers)):
            for name in task.notify:
                if name not in known and "{{" not in name:
                    file, _, line = task.where.rpartition(":")
                    self.problems.append(Problem(
                        file, int(line or 0), 0, "", "playbook.unknown-handler",
                        f"task {task.name!r} notifies {name!r}, which no handler of the play is named or listens to",
                        "error", f"handlers are: {', '.join(sorted(known)) or '(none)'}"))

    def _handlers(self, doc: Document, raw: Any, path: tuple, base: Inherit) -> list[Task]:
        out = []
        for item in self.items(doc, raw, path, base):
            if isinstance(item, Task):
                out.append(item)
            else:
                self._problem((doc, path), "playbook.handler", "a handler is one module call, not a block or include",
                              "write each handler as a task calling one module")
        return out

    # -- roles ---------------------------------------------------------------------------
    def role(self, name: str, where: tuple[Document, tuple]) -> Role | None:
        if name in self._roles:
            return self._roles[name]
        if "/" in name or name.startswith("."):
            path = os.path.abspath(os.path.join(self.playbook_dir, name))
        else:
            path = os.path.join(self.playbook_dir, "roles", name)
        if not os.path.isdir(path):
            self._problem(where, "playbook.role", f"role {name!r} not found: no folder {path}",
                          "roles are read from roles/NAME beside the playbook")
            return None
        role = Role(name=os.path.basename(path.rstrip("/")), path=path)
        self._roles[name] = role
        for sub, target in (("defaults", role.defaults), ("vars", role.vars)):
            file = _main(os.path.join(path, sub))
            if file:
                loaded = self.load(file, where, "vars")
                if loaded is not None and isinstance(loaded.data, dict):
                    target.update(loaded.data)
        handlers = _main(os.path.join(path, "handlers"))
        if handlers:
            hdoc = self.load(handlers, where, "tasks")
            if hdoc is not None and hdoc.data:
                inherit = Inherit(base_dir=os.path.join(path, "handlers"), role=role)
                role.handlers = self._handlers(hdoc, hdoc.data, (), inherit)
        return role

    def role_tasks(self, role: Role, tasks_from: str, inherit: Inherit, where: tuple[Document, tuple]) -> list[Item]:
        file = _main(os.path.join(role.path, "tasks"), tasks_from)
        if file is None:
            if tasks_from != "main":
                self._problem(where, "playbook.role", f"role {role.name!r} has no tasks/{tasks_from}.yml",
                              f"the files are in {os.path.join(role.path, 'tasks')}")
            return []
        tdoc = self.load(file, where, "tasks")
        if tdoc is None or not tdoc.data:
            return []
        return self.items(tdoc, tdoc.data, (), replace(inherit, role=role, base_dir=os.path.dirname(file)))

    # -- tasks ---------------------------------------------------------------------------
    def tasks_file(self, path: str, inherit: Inherit, where: tuple[Document, tuple] | None) -> list[Item]:
        if path in self._stack:
            self._problem(where, "playbook.cycle", f"{path} includes itself (through {' -> '.join(self._stack)})",
                          "remove the include that closes the loop")
            return []
        doc = self.load(path, where, "tasks")
        if doc is None or not doc.data:
            return []
        self._stack.append(path)
        try:
            return self.items(doc, doc.data, (), replace(inherit, base_dir=os.path.dirname(path)))
        finally:
            self._stack.pop()

    def items(self, doc: Document, raw: Any, path: tuple, inherit: Inherit) -> list[Item]:
        out: list[Item] = []
        for j, t in enumerate(raw or []):
            t = {canonical(k): v for k, v in t.items()}
            here = (*path, j)
            where = _where(doc, here)
            if "block" in t:
                inner = inherit.add(t)
                out.append(Block(tasks=self.items(doc, t.get("block"), (*here, "block"), inner),
                                 rescue=self.items(doc, t.get("rescue"), (*here, "rescue"), inner),
                                 always=self.items(doc, t.get("always"), (*here, "always"), inner), where=where))
            elif "import_tasks" in t:
                target = t["import_tasks"]
                name = str(target["file"] if isinstance(target, dict) else target)
                found = self.find(name, inherit.base_dir, inherit.role, "tasks")
                if found is None:
                    self._problem((doc, (*here, "import_tasks")), "playbook.missing", f"import_tasks: no such file {name}",
                                  "the path is relative to the importing file, the role's tasks/ or the playbook")
                    continue
                out += self.tasks_file(found, inherit.add(t), (doc, here))
            elif "import_role" in t:
                role = self.role(str(t["import_role"]["name"]), (doc, (*here, "import_role")))
                if role is not None:
                    self._used.append(role)
                    out += self.role_tasks(role, str(t["import_role"].get("tasks_from", "main")),
                                           inherit.add(t), (doc, here))
            elif "include_tasks" in t or "include_role" in t:
                kind = "tasks" if "include_tasks" in t else "role"
                spec = t["include_tasks" if kind == "tasks" else "include_role"]
                if "loop" in t:
                    self._problem((doc, (*here, "loop")), "playbook.include-loop",
                                  f"a loop on include_{kind} is not run by tccdeploy apply",
                                  "loop inside the included tasks instead")
                    continue
                target = (spec["file"] if isinstance(spec, dict) else spec) if kind == "tasks" else spec["name"]
                role = self.role(str(target), (doc, here)) if kind == "role" else None
                if role is not None:
                    self._used.append(role)
                out.append(Include(
                    kind=kind, target=target, name=str(t.get("name") or f"include_{kind}"), where=where,
                    when=[*inherit.when, *_conditions(t.get("when"))], vars=dict(t.get("vars") or {}),
                    tags=inherit.tags | _tags(t.get("tags")),
                    tasks_from=str(spec.get("tasks_from", "main")) if kind == "role" else "main",
                    base_dir=inherit.base_dir, role=role if kind == "role" else inherit.role))
                if kind == "role" and role is None:
                    out.pop()
            else:
                out.append(self.task(doc, here, t, inherit))
        return out

    def _templates(self, doc: Document, here: tuple, t: dict[str, Any]) -> None:
        """Refuse, by name and file:line, what a template would be refused for when it runs."""
        from .templar import problems

        for key, value in t.items():
            condition = key in ("when", "changed_when", "failed_when", "until")
            for found in problems(value, condition):
                message, _, listed = found.partition("; its ")
                hint = f"its {listed}" if listed else "see `tccdeploy apply --help` for what templates may use"
                self.problems.append(doc.problem((*here, key), "playbook.template", message, hint))

    def task(self, doc: Document, here: tuple, t: dict[str, Any], inherit: Inherit) -> Task:
        self._templates(doc, here, t)
        module = next(k for k in t if k in MODULES and k not in STRUCTURES)
        control = t.get("loop_control") or {}
        role = inherit.role
        name = str(t.get("name") or module)
        return Task(
            module=module, args=t[module], name=f"{role.name} : {name}" if role is not None else name,
            where=_where(doc, here), short=name, when=[*inherit.when, *_conditions(t.get("when"))], loop=t.get("loop"),
            loop_var=str(control.get("loop_var", "item")), index_var=control.get("index_var"), label=control.get("label"),
            register=t.get("register"), tags=inherit.tags | _tags(t.get("tags")),
            ignore_errors=bool(t.get("ignore_errors", False)), delegate_to=t.get("delegate_to"),
            vars={**dict(inherit.vars), **(t.get("vars") or {})}, changed_when=t.get("changed_when"),
            failed_when=t.get("failed_when"), notify=_names(t.get("notify")), listen=_names(t.get("listen")),
            run_once=bool(t.get("run_once", False)), until=t.get("until"), retries=t.get("retries"),
            delay=t.get("delay"), check_mode=t.get("check_mode"), diff=t.get("diff"), no_log=bool(t.get("no_log", False)),
            role=role, base_dir=inherit.base_dir,
            become={**dict(inherit.become), **{k: t[k] for k in BECOME if k in t}},
        )


def _unique_roles(roles: list[Role]) -> list[Role]:
    out: list[Role] = []
    for role in roles:
        if all(role is not seen for seen in out):
            out.append(role)
    return out


def _main(folder: str, stem: str = "main") -> str | None:
    for ext in (".yml", ".yaml", ""):
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def _walk(items: list[Any]) -> Iterator[Task]:
    for item in items:
        if isinstance(item, Task):
            yield item
        elif isinstance(item, Block):
            yield from _walk(item.tasks + item.rescue + item.always)


def tasks_of(items: list[Item]) -> Iterator[Task]:
    """Every task of a list, through blocks (not into includes, which are read when they run)."""
    return _walk(items)


def plays(doc: Document) -> list[Play]:
    """The plays of a validated playbook; PlaybookError when a file it imports is missing or invalid."""
    reader = Reader(os.path.dirname(os.path.abspath(doc.file)))
    out = reader.plays(doc)
    if reader.problems:
        raise PlaybookError(reader.problems, reader.files)
    return out


def batches(hosts: list[Any], serial: list[int | str]) -> list[list[Any]]:
    """Ansible's serial: sizes (numbers or percentages) in order, the last one repeating."""
    if not serial:
        return [hosts] if hosts else []
    sizes = []
    for item in serial:
        if isinstance(item, str) and item.endswith("%"):
            sizes.append(max(1, int(len(hosts) * int(item[:-1]) / 100)))
        else:
            sizes.append(max(1, int(item)))
    out, i, k = [], 0, 0
    while i < len(hosts):
        size = sizes[min(k, len(sizes) - 1)]
        out.append(hosts[i:i + size])
        i += size
        k += 1
    return out
