"""The coordinator's registry, identity and admission checks (pure logic on real SQLite files)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from tccdeploy.coordinator import identity
from tccdeploy.coordinator.store import MIGRATIONS, Registry

REPO = Path(__file__).resolve().parent.parent
PCRS = [0, 4, 8, 9, 11]
VALUES = {str(p): bytes([p]) * 32 for p in PCRS}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    r = Registry(str(tmp_path / "registry.sqlite"))
    yield r
    r.close()


def test_registry_is_created_0600_in_wal_mode_at_the_latest_version(tmp_path: Path, registry: Registry):
    assert oct(os.stat(registry.path).st_mode & 0o777) == "0o600"
    assert registry.version == len(MIGRATIONS)
    assert registry.backend.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry.backend.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_an_older_registry_is_migrated_in_place(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + ";PRAGMA user_version=1;")
    db.execute("INSERT INTO nodes (name, state, created, updated) VALUES ('n1', 'enrolled', 0, 0)")
    db.commit()
    db.close()
    registry = Registry(str(path))
    assert registry.version == len(MIGRATIONS) and registry.node("n1")["state"] == "enrolled"
    registry.close()


def test_releases_settled_before_step_23_leave_the_index_of_those_on_their_way(tmp_path: Path):
    """Step 23 marks the releases whose launch was recorded as settled: the others count on their
    node until it proves a reboot since their tickets were spent."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("".join(step + ";" for step in MIGRATIONS[:22]) + "PRAGMA user_version=22;")
    db.execute("INSERT INTO nodes (name, state, created, updated) VALUES ('n1', 'admitted', 0, 0)")
    db.execute("INSERT INTO customers (name, key, key_id, added) VALUES ('acme', 'k', 'kid', 0)")
    db.execute("INSERT INTO attestations (node, time, verdict, reasons, warnings) VALUES ('n1', 0, 'trusted', '[]', '[]')")
    for number, state in enumerate(("launched", "failed", "released")):
        db.execute("INSERT INTO requests (id, customer, vm, vm_id, image_sha256, wrapped_key, spec, received, state) "
                   "VALUES (?, 'acme', ?, ?, 'd', 'w', '{}', 0, ?)", (f"r{number}", f"vm{number}", f"v{number}", state))
        db.execute("INSERT INTO releases (vm_id, request, node, attestation, certificate_serial, time) "
                   "VALUES (?, ?, 'n1', 1, 's', ?)", (f"v{number}", f"r{number}", 10.0 + number))
    db.commit()
    db.close()
    registry = Registry(str(path))
    try:
        assert [(r["request"], r["settled"]) for r in registry.backend.query("SELECT request, settled FROM releases "
                                                                             "ORDER BY id")] == \
            [("r0", 10.0), ("r1", None), ("r2", None)]
        # (r1's request failed, but nothing shows its node rebooted since: its ticket may have started it)
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v1", "v2"]
    finally:
        registry.close()


def test_a_registry_from_a_newer_tccdeploy_is_refused(tmp_path: Path):
    path = tmp_path / "new.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(Exception, match="schema version"):
        Registry(str(path))


def test_a_nonce_is_consumed_exactly_once_even_by_racing_threads(registry: Registry):
    registry.new_nonce("n1", "quote", "abc", ttl=30)
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.consume_nonce("n1", "quote", "abc"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.ok for r in results) == 1
    assert {r.reason for r in results if not r.ok} == {"nonce.replayed"}


def test_nonce_refusals_are_named(registry: Registry):
    registry.new_nonce("n1", "quote", "x", ttl=30)
    assert registry.consume_nonce("n2", "quote", "x").reason == "nonce.other-node"
    assert registry.consume_nonce("n1", "quote", "nope").reason == "nonce.unknown"
    registry.new_nonce("n1", "quote", "old", ttl=-1)
    assert registry.consume_nonce("n1", "quote", "old").reason == "nonce.expired"


def test_tc_identity_key_is_0600_and_created_once(tmp_path: Path):
    ident, created = identity.init(str(tmp_path))
    assert created and oct(os.stat(tmp_path / identity.KEY_FILE).st_mode & 0o777) == "0o600"
    again, created = identity.init(str(tmp_path))
    assert not created and again.fingerprint == ident.fingerprint
    os.chmod(tmp_path / identity.KEY_FILE, 0o644)
    with pytest.raises(PermissionError):
        identity.load(str(tmp_path))


def test_a_long_lived_connection_sees_other_processes_writes_after_its_own_transactions(tmp_path: Path):
    mine, other = Registry(str(tmp_path / "r.sqlite")), Registry(str(tmp_path / "r.sqlite"))
    mine.save_challenge("n1", secret_hash=b"h", ek_certificate=b"c", ek_fingerprint="f", ek_public=b"e",
                        ak_public=b"a", ssh_host_key="s", manufacturer="m", expires=0.0)
    mine.take_challenge("n1")  # a read inside a transaction must not pin an old snapshot
    other.add_customer("late", "ed25519:x", "id")
    assert [c["name"] for c in mine.customers()] == ["late"]
    mine.close()
    other.close()

