"""Plain text tables for listings (`lab status`, `nodes`, `vms`): aligned columns, '-' for empty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None or value == "" or value == [] else str(value)

    widths = [max([len(title), *(len(cell(r[key])) for r in rows)]) for key, title in columns]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(cell(row[key]).ljust(w) for (key, _), w in zip(columns, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)
