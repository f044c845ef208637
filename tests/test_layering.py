"""Data flows one way, and the trusted code stands apart: the TC (coordinator/) imports nothing
of the engine, the playbooks or the command line; the crypto the customer and the nodes use
imports nothing of the TC; the node side imports nothing of the TC or the engine. Checked by
walking every import (top-level and inside functions) in the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tccdeploy"
FORBIDDEN = {
    "coordinator": ("engine", "playbook", "commands", "cli", "lab"),
    "crypto": ("coordinator", "engine", "playbook", "commands", "cli", "lab", "node", "tvmm"),
    "node": ("coordinator", "engine", "playbook", "commands", "cli", "lab", "tvmm", "manifest", "inventory"),
    # The TVMM service is the build's: it takes only the shared wire (node.protocol) and crypto.
    "tvmm": ("coordinator", "engine", "playbook", "commands", "cli", "lab", "manifest", "inventory", "node.main",
             "node.ops", "node.files"),
    "manifest": ("coordinator", "engine", "playbook", "commands", "cli"),
    # The inventory uses the manifest's YAML loader and problem type, but not its loader (which
    # loads inventories: the other way round would be a cycle).
    "inventory": ("coordinator", "engine", "playbook", "commands", "cli", "manifest.loader", "manifest.xref"),
    "engine": ("commands", "cli", "playbook"),
}


def imports_of(path: Path) -> set[str]:
    """The tccdeploy subpackages path imports, relative imports resolved."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module[:-node.level])
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from .. import x: x may be a subpackage
                    found.update(".".join([*target, alias.name]) for alias in node.names)
                found.add(".".join(target))
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name.split(".", 1)[1] for name in found if name.startswith("tccdeploy.")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_it_must_not(package):
    wrong = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        bad = {name for name in imports_of(path)
               if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])}
        if bad:
            wrong[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not wrong, f"{package}/ must not import {FORBIDDEN[package]}: {wrong}"


def test_the_walk_sees_relative_and_function_level_imports(tmp_path):
    sample = PACKAGE / "coordinator" / "service.py"
    found = imports_of(sample)
    assert "manifest.models" in found and "crypto" in found and "coordinator.refusals" in found
