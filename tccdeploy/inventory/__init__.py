"""Ansible-compatible inventories: operators reuse the files they already have.

Reads Ansible's YAML inventory format and the group_vars/ and host_vars/ directories beside
it, and merges variables in the order Ansible documents for these sources, lowest first:

1. the `all` group's vars in the inventory file,
2. other groups' vars in the inventory file (parents before children, then by
   ansible_group_priority, then by name),
3. group_vars/all (above every group's vars in the inventory file, as ansible-inventory and
   ansible-playbook 2.19 merge them),
4. group_vars/<group> files, in the same group order,
5. the host's vars in the inventory file,
6. host_vars/<host>.

Every final variable remembers where it was written, so a bad tcc_site is reported at the line
that set it, whichever of these files that was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..manifest.problems import JsonPath, Problem
from ..manifest.yamlload import Document, load_file
from .ini import expand_range

VARS_EXTENSIONS = ("", ".yml", ".yaml", ".json")


class Origin(NamedTuple):
    """Where a value was written: a document and the JSON path inside it."""

    doc: Document
    path: JsonPath

    def problem(self, code: str, message: str, hint: str = "", severity: str = "error") -> Problem:
        return self.doc.problem(self.path, code, message, hint, severity)


@dataclass
class Group:
    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    var_origins: dict[str, Origin] = field(default_factory=dict)
    file_vars: dict[str, Any] = field(default_factory=dict)
    file_var_origins: dict[str, Origin] = field(default_factory=dict)
    defined_at: Origin | None = None
    priority: int = 1


@dataclass
class Host:
    name: str
    groups: list[str] = field(default_factory=list)
    own_vars: dict[str, Any] = field(default_factory=dict)
    own_origins: dict[str, Origin] = field(default_factory=dict)
    file_vars: dict[str, Any] = field(default_factory=dict)
    file_var_origins: dict[str, Origin] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)
    defined_at: list[Origin] = field(default_factory=list)

    @property
    def address(self) -> str:
        """Where SSH goes: ansible_host if set, else the inventory name."""
        return str(self.vars.get("ansible_host", self.name))

    @property
    def port(self) -> int:
        return int(self.vars.get("ansible_port", 22))

    def where(self, var: str | None = None) -> Origin | None:
        if var is not None and var in self.origins:
            return self.origins[var]
        return self.defined_at[0] if self.defined_at else None


@dataclass
class Inventory:
    sources: list[str] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)
    valid: bool = True
    problems: list[Problem] = field(default_factory=list)

    def group(self, name: str) -> Group:
        if name not in self.groups:
            self.groups[name] = Group(name)
        return self.groups[name]

    # -- building -------------------------------------------------------------------------

    def add_yaml(self, doc: Document) -> None:
        """Add one YAML inventory document (already schema-valid)."""
        self.documents.append(doc)
        self.group("all")
        if not isinstance(doc.data, dict):
            return
        for name, body in doc.data.items():
            self._add_group(doc, name, body, (name,), parent=None)

    def _add_group(self, doc: Document, name: str, body: Any, path: JsonPath, parent: str | None) -> None:
        group = self.group(name)
        if group.defined_at is None:
            group.defined_at = Origin(doc, path)
        if parent is not None and parent != name:
            if name not in self.groups[parent].children:
                self.groups[parent].children.append(name)
            if parent not in group.parents:
                group.parents.append(parent)
        # Shapes are checked by the schema; here a bad one is skipped, never a crash, so the
        # cross-references of the rest are still reported in the same run.
        body = body if isinstance(body, dict) else {}
        for key, value in _mapping(body.get("vars")).items():
            self._set_group_var(group, key, value, Origin(doc, path + ("vars", key)))
        for pattern, host_vars in _mapping(body.get("hosts")).items():
            try:  # a key may be a range, as Ansible's YAML plugin expands it: node[01:20], db-[a:c]
                names = expand_range(pattern)
            except ValueError as exc:
                self.problems.append(doc.problem(path + ("hosts", pattern), "inventory.yaml-range", str(exc),
                                                 "ranges are [01:10], [a:f] or [0:20:2]"))
                continue
            for host_name in names:
                self.add_host(doc, name, host_name, _mapping(host_vars), path + ("hosts", pattern))
        for child, child_body in _mapping(body.get("children")).items():
            self._add_group(doc, child, child_body, path + ("children", child), parent=name)

    def add_host(self, doc: Document, group_name: str, host_name: str, host_vars: dict[str, Any], path: JsonPath) -> Host:
        """A host line: put it in group_name and set its own variables (later lines win, as in Ansible)."""
        group = self.group(group_name)
        host = self.hosts.get(host_name)
        if host is None:
            host = self.hosts[host_name] = Host(host_name)
        host.defined_at.append(Origin(doc, path))
        if group_name not in host.groups:
            host.groups.append(group_name)
        if host_name not in group.hosts:
            group.hosts.append(host_name)
        for key, value in host_vars.items():
            if key == "ansible_host" and key in host.own_vars and host.own_vars[key] != value:
                first = host.own_origins[key]
                line, column = first.doc.locate(first.path)
                self.problems.append(doc.problem(
                    path + (key,), "inventory.conflicting-address",
                    f"host {host_name!r} is given address {value!r} here but {host.own_vars[key]!r} at "
                    f"{os.path.basename(first.doc.file)}:{line}:{column}",
                    "a host has one address: remove one of them, or give the hosts different names",
                ))
            host.own_vars[key] = value
            host.own_origins[key] = Origin(doc, path + (key,))
        return host

    @staticmethod
    def _set_group_var(group: Group, key: str, value: Any, origin: Origin) -> None:
        if key == "ansible_group_priority":
            # A property of the group (it orders variable merging), not a variable: Ansible
            # takes it out of the group's vars too.
            group.priority = value if isinstance(value, int) and not isinstance(value, bool) else 1
            return
        group.vars[key] = value
        group.var_origins[key] = origin

    def add_ini(self, doc: Document, entries: list[tuple[str, str, dict[str, Any], JsonPath]]) -> None:
        """Add the entries of one INI inventory file (see inventory.ini), in file order."""
        self.documents.append(doc)
        self.group("all")
        for kind, group_name, payload, path in entries:
            group = self.group(group_name)
            if group.defined_at is None:
                group.defined_at = Origin(doc, (group_name,))
            if kind == "host":
                self.add_host(doc, group_name, payload["name"], payload["vars"], path)
            elif kind == "vars":
                for key, value in payload.items():
                    self._set_group_var(group, key, value, Origin(doc, path))
            elif kind == "child":
                child = self.group(payload["name"])
                if child.defined_at is None:
                    child.defined_at = Origin(doc, path)
                if child.name not in group.children:
                    group.children.append(child.name)
                if group_name not in child.parents:
                    child.parents.append(group_name)

    def add_vars_file(self, doc: Document, kind: str, name: str) -> None:
        """Add a group_vars/ or host_vars/ file (kind 'group' or 'host')."""
        self.documents.append(doc)
        data = _mapping(doc.data)
        if kind == "group":
            group = self.group(name)
            for key, value in data.items():
                group.file_vars[key] = value
                group.file_var_origins[key] = Origin(doc, (key,))
        else:
            host = self.hosts.get(name)
            if host is None:
                return  # host_vars for a host not in this inventory: Ansible ignores it too
            for key, value in data.items():
                host.file_vars[key] = value
                host.file_var_origins[key] = Origin(doc, (key,))

    def finish(self) -> None:
        """Implicit groups and final variables, once every source is in."""
        all_group = self.group("all")
        for name, group in self.groups.items():
            if name != "all" and not group.parents:
                group.parents.append("all")
                if name not in all_group.children:
                    all_group.children.append(name)
        ungrouped = self.group("ungrouped")
        if "ungrouped" in all_group.children:
            all_group.children.remove("ungrouped")
        all_group.children.insert(0, "ungrouped")  # first, as Ansible lists it
        if not ungrouped.parents:
            ungrouped.parents.append("all")
        for host in self.hosts.values():
            grouped = [g for g in host.groups if g not in ("all", "ungrouped")]
            if grouped and "ungrouped" in host.groups:
                # Listed before any section and in a group later: Ansible keeps it in the group only.
                host.groups.remove("ungrouped")
                ungrouped.hosts.remove(host.name)
            elif not grouped and "ungrouped" not in host.groups:
                host.groups.append("ungrouped")
                ungrouped.hosts.append(host.name)
        for host in self.hosts.values():
            self._resolve(host)

    def group_hosts(self, name: str) -> list[str]:
        """Hosts of a group and of all its descendants, in inventory order."""
        members: set[str] = set()
        todo, seen = [name], set()
        while todo:
            group = self.groups[todo.pop()]
            if group.name in seen:
                continue
            seen.add(group.name)
            members.update(group.hosts)
            todo.extend(group.children)
        if name == "all":
            return list(self.hosts)
        return [h for h in self.hosts if h in members]

    def select(self, pattern: str | list[str]) -> list[Host]:
        from .patterns import select

        return select(self, pattern)

    def as_ansible_list(self) -> dict[str, Any]:
        """What `ansible-inventory --list` prints for the same files (without its "profile")."""
        out: dict[str, Any] = {"_meta": {"hostvars": {h.name: dict(h.vars) for h in self.hosts.values() if h.vars}}}
        for name, group in self.groups.items():
            entry: dict[str, Any] = {}
            hosts = [] if name == "all" else group.hosts
            if hosts:
                entry["hosts"] = list(hosts)
            children = [c for c in group.children if self._listed(c) or (name == "all" and c == "ungrouped")]
            if children:
                entry["children"] = children
            if entry or name == "all":
                out[name] = entry
        return out

    def _listed(self, name: str) -> bool:
        group = self.groups[name]
        return bool(group.hosts) or any(self._listed(c) for c in group.children)

    def graph(self) -> str:
        """`ansible-inventory --graph`: the group tree with hosts, one per line."""
        lines: list[str] = []

        def walk(name: str, depth: int) -> None:
            lines.append("  |" * depth + "--@" + name + ":" if depth else "@" + name + ":")
            group = self.groups[name]
            for child in group.children:
                if self._listed(child) or (name == "all" and child == "ungrouped"):
                    walk(child, depth + 1)
            for host in ([] if name == "all" else group.hosts):
                lines.append("  |" * (depth + 1) + "--" + host)

        walk("all", 0)
        return "\n".join(lines)

    def depth(self, name: str, _seen: frozenset[str] = frozenset()) -> int:
        group = self.groups[name]
        if name == "all" or not group.parents or name in _seen:
            return 0
        return 1 + max(self.depth(p, _seen | {name}) for p in group.parents)

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = [name]
        while todo:
            for parent in self.groups[todo.pop()].parents:
                if parent not in out:
                    out.add(parent)
                    todo.append(parent)
        return out

    def host_groups(self, host: Host) -> list[str]:
        """All groups of host, direct and inherited, in Ansible's variable order."""
        names: set[str] = set()
        for g in host.groups:
            names.add(g)
            names |= self.ancestors(g)
        names.add("all")

        def order(name: str) -> tuple[int, int, str]:
            return (self.depth(name), self.groups[name].priority, name)

        return sorted(names, key=order)

    def _resolve(self, host: Host) -> None:
        values: dict[str, Any] = {}
        origins: dict[str, Origin] = {}

        def layer(vars_: dict[str, Any], vars_origins: dict[str, Origin]) -> None:
            for key, value in vars_.items():
                values[key] = value
                origins[key] = vars_origins[key]

        groups = [self.groups[g] for g in self.host_groups(host)]
        all_group = self.groups["all"]
        layer(all_group.vars, all_group.var_origins)
        for g in groups:
            if g.name != "all":
                layer(g.vars, g.var_origins)
        layer(all_group.file_vars, all_group.file_var_origins)  # group_vars/all outranks every group's inline vars
        for g in groups:
            if g.name != "all":
                layer(g.file_vars, g.file_var_origins)
        layer(host.own_vars, host.own_origins)
        layer(host.file_vars, host.file_var_origins)
        host.vars, host.origins = values, origins


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def vars_files(directory: str, name: str) -> list[str]:
    """group_vars/NAME{,.yml,.yaml,.json} and every file in group_vars/NAME/, as Ansible finds them."""
    found: list[str] = []
    for ext in VARS_EXTENSIONS:
        candidate = os.path.join(directory, name + ext)
        if os.path.isfile(candidate):
            found.append(candidate)
    folder = os.path.join(directory, name)
    if os.path.isdir(folder):
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for f in sorted(files):
                if f.endswith((".yml", ".yaml", ".json")) and not f.startswith("."):
                    found.append(os.path.join(root, f))
    return found


def vars_names(directory: str) -> list[str]:
    """Every group or host name that has a vars file or folder in directory."""
    names: set[str] = set()
    if not os.path.isdir(directory):
        return []
    for entry in os.listdir(directory):
        if entry.startswith("."):
            continue
        full = os.path.join(directory, entry)
        if os.path.isdir(full):
            names.add(entry)
        else:
            stem, ext = os.path.splitext(entry)
            if ext in VARS_EXTENSIONS:
                names.add(stem)
    return sorted(names)


__all__ = ["Group", "Host", "Inventory", "Origin", "load_file", "vars_files", "vars_names"]
