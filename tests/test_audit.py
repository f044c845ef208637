"""The audit log's hash chain: edits, deletions, reordering and truncation are all detected."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from tccdeploy.coordinator import audit
from tccdeploy.coordinator.store import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    r = Registry(str(tmp_path / "registry.sqlite"))
    for i in range(5):
        audit.append(r, "attestation", f"node{i}", verdict="trusted", id=i)
    yield r
    r.close()


def _raw(registry: Registry) -> sqlite3.Connection:
    return sqlite3.connect(registry.path, isolation_level=None)


def test_an_untouched_log_verifies_and_names_its_head(registry: Registry):
    result = audit.verify(registry)
    assert result.ok and result.entries == 5
    assert audit.verify(registry, expect_head=f"5:{result.head}").ok


def test_an_edited_entry_is_detected(registry: Registry):
    _raw(registry).execute("UPDATE audit SET data = ? WHERE id = 3", ('{"verdict": "untrusted"}',))
    result = audit.verify(registry)
    assert not result.ok and "entry 3" in result.problem and "edited" in result.problem


def test_a_deleted_entry_is_detected(registry: Registry):
    _raw(registry).execute("DELETE FROM audit WHERE id = 2")
    result = audit.verify(registry)
    assert not result.ok and "missing" in result.problem


def test_reordered_entries_are_detected(registry: Registry):
    db = _raw(registry)
    db.execute("UPDATE audit SET id = 100 WHERE id = 2")
    db.execute("UPDATE audit SET id = 2 WHERE id = 3")
    db.execute("UPDATE audit SET id = 3 WHERE id = 100")
    result = audit.verify(registry)
    assert not result.ok and "entry 2" in result.problem


def test_removing_the_newest_entries_is_detected_against_the_recorded_head(registry: Registry):
    head = audit.verify(registry)
    _raw(registry).execute("DELETE FROM audit WHERE id >= 4")
    assert audit.verify(registry).ok  # consistent, but shorter...
    result = audit.verify(registry, expect_head=f"{head.entries}:{head.head}")
    assert not result.ok and "removed" in result.problem  # ...which the recorded head shows


def test_concurrent_writers_make_one_linear_chain(tmp_path: Path):
    path = str(tmp_path / "r.sqlite")
    Registry(path).close()

    def writer(n: int) -> None:
        r = Registry(path)
        for i in range(20):
            audit.append(r, "attestation", f"w{n}", i=i)
        r.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry = Registry(path)
    result = audit.verify(registry)
    assert result.ok and result.entries == 80
    registry.close()
