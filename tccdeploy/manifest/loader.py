"""Find, load and check manifests: files or directories in, typed models and problems out.

This is the single entry point the CLI, the engine and the lab use. It never stops at the
first problem: every file is loaded and schema-checked, then the cross-references are checked
over the whole set, so one run reports everything.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..inventory import Inventory, vars_files, vars_names
from ..inventory.ini import as_yaml_shape, load_ini
from . import schema, xref
from .models import NodeRoster, Perimeter, PlacementRequest, Platform, TVMMBuild
from .problems import ManifestError, Problem
from .yamlload import Document, load_file, read_text

YAML_EXTENSIONS = (".yml", ".yaml")
INI_NAMES = ("hosts", "inventory")  # extensionless files a directory walk takes as INI inventories
VARS_DIRS = ("group_vars", "host_vars")


@dataclass
class LoadResult:
    files: list[str] = field(default_factory=list)
    perimeters: list[Perimeter] = field(default_factory=list)
    builds: list[TVMMBuild] = field(default_factory=list)
    platforms: list[Platform] = field(default_factory=list)
    requests: list[PlacementRequest] = field(default_factory=list)
    rosters: list[NodeRoster] = field(default_factory=list)
    inventories: list[Inventory] = field(default_factory=list)
    playbooks: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def holds(self) -> str:
        """What the files hold, for an error that says the wrong kind was given ("a Perimeter and
        2 TVMMBuilds", "an inventory", "nothing tccdeploy reads")."""
        parts = []
        for name, items in (("Perimeter", self.perimeters), ("TVMMBuild", self.builds), ("Platform", self.platforms),
                            ("PlacementRequest", self.requests), ("NodeRoster", self.rosters),
                            ("inventory", self.inventories), ("playbook", self.playbooks)):
            if items:
                parts.append(f"{len(items)} {name}s" if len(items) > 1 else f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}")
        if not parts:
            return "nothing tccdeploy reads"
        return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]

    @property
    def perimeter(self) -> Perimeter | None:
        return self.perimeters[0] if len(self.perimeters) == 1 else None

    def build(self, name: str) -> TVMMBuild | None:
        return next((b for b in self.builds if b.name == name), None)


def _walk(path: str) -> list[str]:
    out: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in VARS_DIRS)
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if (f.endswith((*YAML_EXTENSIONS, ".ini")) or f in INI_NAMES) and not f.startswith("."))
    return out


def _vars_owner(file: str) -> str | None:
    """The directory whose group_vars/ or host_vars/ holds file, if it is a vars file."""
    parts = os.path.abspath(file).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in VARS_DIRS:
            return os.sep.join(parts[:i])
    return None


def _problem(file: str, code: str, message: str, hint: str = "", severity: str = "error") -> Problem:
    return Problem(file, 1, 1, "$", code, message, severity, hint)  # type: ignore[arg-type]


def load_paths(paths: list[str]) -> LoadResult:
    """Load and check every manifest under paths (files or directories)."""
    result = LoadResult()
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(_walk(path))
        elif os.path.exists(path):
            files.append(path)
        else:
            result.problems.append(_problem(path, "file.missing", "no such file or directory",
                                            "check the path"))
    seen: set[str] = set()
    inventory_docs: dict[str, list[tuple[Document, list | None]]] = defaultdict(list)
    vars_dirs: set[str] = set()
    for file in files:
        real = os.path.realpath(file)
        if real in seen:
            continue
        seen.add(real)
        result.files.append(file)
        owner = _vars_owner(file)
        if owner is not None:
            vars_dirs.add(owner)  # loaded with the inventory of that directory
            result.files.remove(file)
            continue
        if is_ini(file):
            try:
                text = read_text(file)
            except ManifestError as exc:
                result.problems.extend(exc.problems)
                continue
            doc = Document(file, None, {})
            entries, problems = load_ini(doc, text)
            result.problems.extend(problems)
            doc.data = as_yaml_shape(entries)
            inventory_docs[os.path.dirname(os.path.abspath(file))].append((doc, entries))
            continue
        try:
            docs = load_file(file)
        except ManifestError as exc:
            result.problems.extend(exc.problems)
            continue
        for doc in docs:
            _classify(doc, result, inventory_docs)
    for directory in sorted(set(inventory_docs) | vars_dirs):
        result.inventories.extend(_inventory(directory, inventory_docs.get(directory, []), result))
    result.problems.extend(xref.check(result))
    result.problems.sort()
    return result


def is_ini(file: str) -> bool:
    """Ansible tells formats apart by trying parsers; tccdeploy by name: YAML/JSON, else INI."""
    return not file.endswith((*YAML_EXTENSIONS, ".json"))


def _classify(doc: Document, result: LoadResult, inventory_docs: dict[str, list[tuple[Document, list | None]]]) -> None:
    data = doc.data
    base_dir = os.path.dirname(os.path.abspath(doc.file))
    if data is None:
        if doc.index == 0:
            result.problems.append(_problem(doc.file, "file.empty", "file is empty; nothing to check",
                                            "remove it, or add its content", "warning"))
        return
    if isinstance(data, list):
        problems = schema.validate(doc, "Playbook")
        result.problems.extend(problems)
        result.playbooks.append(doc)
        return
    if not isinstance(data, dict):
        result.problems.append(doc.problem(
            (), "manifest.unknown", f"cannot tell what this file is: its top level is {type(data).__name__}",
            "a manifest has apiVersion and kind; an inventory maps group names; a playbook is a list of plays",
        ))
        return
    if "apiVersion" in data or "kind" in data:
        kind = data.get("kind")
        if kind not in schema.MANIFEST_KINDS:
            path = ("kind",) if "kind" in data else ()
            result.problems.append(doc.problem(
                path, "manifest.kind",
                f"unknown kind {kind!r}" if kind is not None else "manifest has apiVersion but no kind",
                f"kind is one of {', '.join(schema.MANIFEST_KINDS)}",
            ))
            return
        problems = schema.validate(doc, kind)
        result.problems.extend(problems)
        if problems:
            return
        if kind == "Perimeter":
            result.perimeters.append(Perimeter.from_document(doc, data, base_dir))
        elif kind == "TVMMBuild":
            result.builds.append(TVMMBuild.from_document(doc, data, base_dir))
        elif kind == "Platform":
            result.platforms.append(Platform.from_document(doc, data, base_dir))
        elif kind == "NodeRoster":
            result.rosters.append(NodeRoster.from_document(doc, data, base_dir))
        else:
            result.requests.append(PlacementRequest.from_document(doc, data, base_dir))
        return
    inventory_docs[os.path.dirname(os.path.abspath(doc.file))].append((doc, None))


def _inventory(directory: str, docs: list[tuple[Document, list | None]], result: LoadResult) -> list[Inventory]:
    """One inventory per directory: its inventory files plus group_vars/ and host_vars/ beside them."""
    inventory = Inventory(sources=[d.file for d, _ in docs])
    valid = True
    for doc, ini_entries in docs:
        problems = schema.validate(doc, "Inventory")
        result.problems.extend(problems)
        valid = valid and not problems
        if ini_entries is None:
            inventory.add_yaml(doc)
        else:
            inventory.add_ini(doc, ini_entries)
    vars_docs: list[tuple[str, str, Document]] = []
    for kind, sub in (("group", "group_vars"), ("host", "host_vars")):
        folder = os.path.join(directory, sub)
        for name in vars_names(folder):
            for file in vars_files(folder, name):
                if file not in result.files:
                    result.files.append(file)
                try:
                    file_docs = load_file(file)
                except ManifestError as exc:
                    result.problems.extend(exc.problems)
                    valid = False
                    continue
                for doc in file_docs[:1]:
                    problems = schema.validate(doc, "Vars")
                    result.problems.extend(problems)
                    valid = valid and not problems
                    vars_docs.append((kind, name, doc))
    if not docs:
        return []  # vars files without an inventory: checked against the schema only
    for kind, name, doc in vars_docs:
        inventory.add_vars_file(doc, kind, name)
    inventory.finish()
    result.problems.extend(inventory.problems)
    # Returned even when some part was invalid, so cross-references on the rest are reported.
    inventory.valid = valid
    return [inventory]


def load_manifests(paths: list[str]) -> LoadResult:
    """Like load_paths, but raise ManifestError when anything is wrong (for commands that act)."""
    result = load_paths(paths)
    if result.errors:
        raise ManifestError(result.errors)
    return result


def as_json_problems(problems: list[Problem]) -> list[dict[str, Any]]:
    return [p.as_dict() for p in problems]


def load_inventory(path: str) -> Inventory:
    """Load an inventory file or directory the way the CLI's -i does; raise on any problem."""
    result = load_paths([path])
    errors = [p for p in result.problems if p.severity == "error"]
    if errors:
        raise ManifestError(errors)
    if not result.inventories:
        raise ManifestError([Problem(path, 1, 1, "$", "inventory.none", "no inventory found here",
                                     "error", "give -i an Ansible YAML inventory file or its directory")])
    if len(result.inventories) > 1:
        where = ", ".join(inv.sources[0] for inv in result.inventories)
        raise ManifestError([Problem(path, 1, 1, "$", "inventory.ambiguous",
                                     f"{len(result.inventories)} inventories found here ({where})",
                                     "error", "give -i one inventory file or the directory that holds it")])
    return result.inventories[0]
