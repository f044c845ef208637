"""Render problems for people (text), machines (json) and CI annotations (github)."""

from __future__ import annotations

import json
from typing import TextIO

from .problems import Problem


def _escape_github(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render(problems: list[Problem], files: list[str], fmt: str, out: TextIO, color: bool = False) -> None:
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if fmt == "json":
        json.dump(
            {
                "valid": errors == 0,
                "files": files,
                "errors": errors,
                "warnings": warnings,
                "problems": [p.as_dict() for p in problems],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return
    if fmt == "github":
        for p in problems:
            level = "error" if p.severity == "error" else "warning"
            title = _escape_github(f"{p.code} at {p.path}", prop=True)
            body = p.message + (f" ({p.hint})" if p.hint else "")
            out.write(
                f"::{level} file={_escape_github(p.file, True)},line={p.line},col={p.column},"
                f"title={title}::{_escape_github(body)}\n"
            )
        out.write(f"{errors} error(s), {warnings} warning(s) in {len(files)} file(s)\n")
        return
    red, yellow, dim, reset = ("\033[31m", "\033[33m", "\033[2m", "\033[0m") if color else ("", "", "", "")
    for p in problems:
        tint = red if p.severity == "error" else yellow
        out.write(f"{p.file}:{p.line}:{p.column}: {tint}{p.severity}{reset}: {p.message} [{p.code}]\n")
        out.write(f"    {dim}at {p.path}{reset}\n")
        if p.hint:
            out.write(f"    {dim}fix: {p.hint}{reset}\n")
    if errors == 0:
        out.write(f"ok: {len(files)} file(s) valid" + (f", {warnings} warning(s)" if warnings else "") + "\n")
    else:
        out.write(f"{errors} error(s), {warnings} warning(s) in {len(files)} file(s)\n")
