"""Shared test set-up: where the repository and the shared test vectors are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TCCDEPLOY_SHARED", REPO.parent / "shared"))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_vectors() -> Path:
    path = SHARED / "vectors"
    if not path.is_dir():
        pytest.skip(f"shared test vectors not found at {path} (set TCCDEPLOY_SHARED to the shared/ folder)")
    return path
