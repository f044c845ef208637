"""Each directory in tests/invalid trips exactly one check, reported at the exact place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tccdeploy.manifest.loader import load_paths

INVALID = Path(__file__).parent / "invalid"
CASES = sorted(p.name for p in INVALID.iterdir() if p.is_dir())


def test_there_are_cases_for_every_layer():
    prefixes = {c.split("-")[0] for c in CASES}
    assert {"schema", "xref", "yaml", "manifest"} <= prefixes


@pytest.mark.parametrize("case", CASES)
def test_invalid_example_is_reported_at_its_place(case: str):
    directory = INVALID / case
    expected = json.loads((directory / "expected.json").read_text())
    result = load_paths([str(directory)])
    errors = result.errors
    assert len(errors) == 1, [f"{e.file}:{e.line}:{e.column} {e.code} {e.message}" for e in errors]
    error = errors[0]
    assert error.code == expected["code"], error
    assert os.path.relpath(error.file, directory) == expected["file"]
    assert (error.line, error.column) == (expected["line"], expected["column"]), error
    assert error.path == expected["path"]
    assert error.message and error.hint, "every error says what is wrong and how to fix it"
