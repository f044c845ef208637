"""Problems found in manifests: one shape for every layer (YAML, schema, cross-references).

A CI pipeline needs every problem at once, each pinned to file, line, column and JSON path,
with a stable code it can filter on. Every layer reports into this one type so the CLI renders
them the same way whichever layer found them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]
PathPart = str | int
JsonPath = tuple[PathPart, ...]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(path: Iterable[PathPart]) -> str:
    """Render a JSON path the way jq and JSONPath users read it: $.spec.sites[0].name."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}"
        else:
            escaped = part.replace("\\", "\\\\").replace('"', '\\"')
            out += f'["{escaped}"]'
    return out


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong (or worth a warning) in one place of one file."""

    file: str
    line: int
    column: int
    path: str
    code: str
    message: str
    severity: Severity = "error"
    hint: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


class ManifestError(Exception):
    """Raised when manifests cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems)
        first = self.problems[0] if self.problems else None
        summary = f"{first.file}:{first.line}:{first.column}: {first.message}" if first else ""
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(summary + more)
