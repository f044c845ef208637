"""Ansible's INI inventory format, read as Ansible's `ini` inventory plugin reads it.

    host1 ansible_host=10.0.0.1 x=[1,2]     # before any section: ungrouped
    [web]
    web[01:03].example.com:2222              # a range, and a port
    [web:vars]
    http_port=80
    [prod:children]
    web

Values are Python literals where they parse as one (80 is an int, [1,2] a list, yes stays the
string "yes"), otherwise strings, in host lines and in :vars sections alike; that is what
`ansible-inventory --list` shows, and the tests compare with it. Every problem is reported
with its line, all at once.
"""

from __future__ import annotations

import ast
import re
import shlex
import string
from typing import Any

from ..manifest.problems import Problem
from ..manifest.yamlload import Document

_SECTION = re.compile(r"^\[([^\]:\s]+)(?::(\w+))?\]\s*$")
_RANGE = re.compile(r"\[(?P<start>[0-9a-zA-Z]+):(?P<end>[0-9a-zA-Z]+)(?::(?P<step>[0-9]+))?\]")


def parse_value(text: str) -> Any:
    """As Ansible's INI plugin: a Python literal if it is one, else the text itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(value, (set, complex, bytes)):
        return text
    return value


def expand_range(pattern: str) -> list[str]:
    """web[01:03].example.com -> web01, web02, web03 (zero padding kept); [a:c] for letters."""
    match = _RANGE.search(pattern)
    if not match:
        return [pattern]
    start, end, step = match["start"], match["end"], int(match["step"] or 1)
    head, tail = pattern[: match.start()], pattern[match.end():]
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        values = [str(i).zfill(width) for i in range(int(start), int(end) + 1, step)]
    elif len(start) == 1 and len(end) == 1 and start in string.ascii_letters and end in string.ascii_letters:
        values = [chr(c) for c in range(ord(start), ord(end) + 1, step)]
    else:
        raise ValueError(f"range [{start}:{end}] is neither numeric nor single letters")
    if not values:
        raise ValueError(f"range [{start}:{end}] is empty")
    return [expanded for value in values for expanded in expand_range(head + value + tail)]


def _host_and_port(token: str) -> tuple[str, int | None]:
    # host:port, but not an IPv6 address (several colons) unless bracketed
    if token.startswith("[") and "]:" in token:
        host, port = token[1:].split("]:", 1)
        return host, int(port)
    if token.count(":") == 1:
        host, port = token.split(":")
        if port.isdigit():
            return host, int(port)
    return token, None


def load_ini(doc: Document, text: str) -> tuple[list[tuple[str, str, dict[str, Any], tuple]], list[Problem]]:
    """Parse INI text into host lines, group vars and children, recording marks in doc.

    Returns (entries, problems); entries are (kind, group, payload, path) with kind one of
    host / vars / child, applied by Inventory.add_ini.
    """
    entries: list[tuple[str, str, dict[str, Any], tuple]] = []
    problems: list[Problem] = []
    group, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        column = raw.index(line[0]) + 1
        section = _SECTION.match(line)
        if line.startswith("["):
            if not section:
                problems.append(_problem(doc, number, column, "inventory.ini-section",
                                         f"cannot parse section header {line!r}",
                                         "write [group], [group:vars] or [group:children]"))
                group, kind = "", "skip"
                continue
            group, kind = section[1], section[2] or "hosts"
            if kind not in ("hosts", "vars", "children"):
                problems.append(_problem(doc, number, column, "inventory.ini-section",
                                         f"unknown section type :{kind}", "use :vars or :children"))
                kind = "skip"
                continue
            doc.marks.setdefault((group,), (number, column))
            entries.append(("group", group, {}, (group,)))
            continue
        if kind == "skip":
            continue
        if kind == "vars":
            if "=" not in line:
                problems.append(_problem(doc, number, column, "inventory.ini-vars",
                                         f"expected key=value in [{group}:vars], got {line!r}",
                                         "write one variable per line: name=value"))
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            path = (group, "vars", key)
            doc.marks[path] = (number, column)
            entries.append(("vars", group, {key: parse_value(value)}, path))
            continue
        if kind == "children":
            path = (group, "children", line)
            doc.marks[path] = (number, column)
            entries.append(("child", group, {"name": line}, path))
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            problems.append(_problem(doc, number, column, "inventory.ini-host",
                                     f"cannot parse host line: {exc}", "check the quotes on this line"))
            continue
        if not tokens:
            continue
        pattern, assignments = tokens[0], tokens[1:]
        host_vars: dict[str, Any] = {}
        bad = [a for a in assignments if "=" not in a]
        if bad:
            problems.append(_problem(doc, number, column, "inventory.ini-host",
                                     f"expected key=value after the host name, got {bad[0]!r}",
                                     "host lines are: NAME [key=value ...]; quote values with spaces"))
            continue
        for assignment in assignments:
            key, value = assignment.split("=", 1)
            host_vars[key] = parse_value(value)
        try:
            names = expand_range(pattern)
        except ValueError as exc:
            problems.append(_problem(doc, number, column, "inventory.ini-range", str(exc),
                                     "ranges are [01:10], [a:f] or [0:20:2]"))
            continue
        for name in names:
            host, port = _host_and_port(name)
            values = dict(host_vars)
            if port is not None:
                values["ansible_port"] = port
            path = (group, "hosts", host)
            doc.marks.setdefault(path, (number, column))
            for key in values:
                doc.marks[path + (key,)] = (number, column)
            entries.append(("host", group, {"name": host, "vars": values}, path))
    return entries, problems


def _problem(doc: Document, line: int, column: int, code: str, message: str, hint: str) -> Problem:
    return Problem(doc.file, line, column, "$", code, message, "error", hint)


def as_yaml_shape(entries: list[tuple[str, str, dict[str, Any], tuple]]) -> dict[str, Any]:
    """The YAML inventory an INI file amounts to, so the same schema checks both."""
    data: dict[str, Any] = {}
    for kind, group, payload, _ in entries:
        body = data.setdefault(group, {})
        if kind == "host":
            hosts = body.setdefault("hosts", {})
            hosts[payload["name"]] = {**(hosts.get(payload["name"]) or {}), **payload["vars"]} or None
        elif kind == "vars":
            body.setdefault("vars", {}).update(payload)
        elif kind == "child":
            body.setdefault("children", {})[payload["name"]] = None
    return data
