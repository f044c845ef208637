"""A playbook, parsed: plays and tasks with where each was written.

The playbook schema has already refused what tccdeploy does not run, so this only gives the
validated data a shape; every task keeps its file:line for error messages and `-vv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..manifest.xref import MODULES
from ..manifest.yamlload import Document


@dataclass
class Task:
    module: str
    args: Any
    name: str
    where: str  # file:line
    when: Any = None
    loop: Any = None
    register: str | None = None
    tags: frozenset[str] = frozenset()
    ignore_errors: bool = False
    delegate_to: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    changed_when: Any = None
    failed_when: Any = None


@dataclass
class Play:
    name: str
    hosts: str
    tasks: list[Task]
    where: str
    vars: dict[str, Any] = field(default_factory=dict)
    serial: list[int | str] = field(default_factory=list)
    max_fail_percentage: int | None = None
    any_errors_fatal: bool = False
    tags: frozenset[str] = frozenset()


def _tags(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(t.strip() for t in value.split(",") if t.strip())
    return frozenset(str(t) for t in value)


def _where(doc: Document, path: tuple) -> str:
    line, _ = doc.locate(path)
    return f"{doc.file}:{line}"


def plays(doc: Document) -> list[Play]:
    out = []
    for i, raw in enumerate(doc.data):
        hosts = raw["hosts"]
        pattern = ":".join(hosts) if isinstance(hosts, list) else str(hosts)
        serial = raw.get("serial")
        play_tags = _tags(raw.get("tags"))
        tasks = []
        for j, t in enumerate(raw.get("tasks") or []):
            module = next(k for k in t if k in MODULES)
            tasks.append(Task(
                module=module, args=t[module], name=str(t.get("name") or module), where=_where(doc, (i, "tasks", j)),
                when=t.get("when"), loop=t.get("loop"), register=t.get("register"),
                tags=_tags(t.get("tags")) | play_tags, ignore_errors=bool(t.get("ignore_errors", False)),
                delegate_to=t.get("delegate_to"), vars=dict(t.get("vars") or {}),
                changed_when=t.get("changed_when"), failed_when=t.get("failed_when"),
            ))
        out.append(Play(
            name=str(raw.get("name") or pattern), hosts=pattern, tasks=tasks, where=_where(doc, (i,)),
            vars=dict(raw.get("vars") or {}),
            serial=[] if serial is None else (list(serial) if isinstance(serial, list) else [serial]),
            max_fail_percentage=raw.get("max_fail_percentage"), any_errors_fatal=bool(raw.get("any_errors_fatal", False)),
            tags=play_tags,
        ))
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
