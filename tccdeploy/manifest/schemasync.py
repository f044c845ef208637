"""Keep the published schemas self-contained.

Editors (yaml-language-server) and CI tools (check-jsonschema) are given one schema file and
cannot follow a $ref to another file without fetching it from the schema's $id address. So
every published schema carries, in its own $defs, copies of the shared definitions it uses
from common.schema.json (and inventory.schema.json a copy of the host-variables schema).
This module is the one place that copies them; a test fails when a copy has drifted.

    python -m tccdeploy.manifest.schemasync          # rewrite the copies
    python -m tccdeploy.manifest.schemasync --check  # exit 1 when a copy is stale
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
EMBEDDED_ROOT_KEYS = ("$schema", "$id", "title", "$defs")


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref.split("/")[2])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def expected(name: str, schemas: dict[str, dict]) -> dict:
    """What schema `name` must look like with its shared definitions copied in."""
    common = schemas["common.schema.json"]["$defs"]
    doc = copy.deepcopy(schemas[name])
    defs: dict[str, Any] = doc.setdefault("$defs", {})
    if name == "inventory.schema.json":
        host = {k: v for k, v in schemas["hostvars.schema.json"].items() if k not in EMBEDDED_ROOT_KEYS}
        defs["hostvars"] = copy.deepcopy(host)
    # Copy every common definition reachable from the schema (transitively).
    while True:
        wanted = {r for r in _refs(doc) if r in common}
        missing = [r for r in sorted(wanted) if defs.get(r) != common[r]]
        if not missing:
            break
        for r in missing:
            defs[r] = copy.deepcopy(common[r])
    return doc


def sync(write: bool) -> list[str]:
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.schema.json")}
    stale = []
    for name in sorted(schemas):
        if name == "common.schema.json":
            continue
        want = expected(name, schemas)
        if want != schemas[name]:
            stale.append(name)
            if write:
                (SCHEMA_DIR / name).write_text(json.dumps(want, indent=2, ensure_ascii=False) + "\n")
    return stale


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    stale = sync(write=not check)
    for name in stale:
        print(("stale: " if check else "updated: ") + name)
    sys.exit(1 if check and stale else 0)
