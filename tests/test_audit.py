"""The audit log: a hash chain whose every link is signed by the TC's audit key. Edits,
deletions, reordering, a chain rewritten with every hash recomputed, and truncation below a
published checkpoint are all detected."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from tccdeploy.coordinator import audit, identity
from tccdeploy.coordinator.store import Registry, RegistryError

from .conftest import audited_registry as audited


@pytest.fixture
def tc(tc_identity) -> identity.Identity:
    return tc_identity


@pytest.fixture
def registry(tmp_path: Path, tc: identity.Identity) -> Registry:
    r = audited(str(tmp_path / "registry.sqlite"), tc)
    for i in range(5):
        audit.append(r, "attestation", f"node{i}", verdict="trusted", id=i)
    yield r
    r.close()


def _raw(registry: Registry) -> sqlite3.Connection:
    return sqlite3.connect(registry.path, isolation_level=None)


def test_an_untouched_log_verifies_and_names_its_head(registry: Registry, tc):
    result = audit.verify(registry, tc=tc)
    assert result.ok and result.entries == 5
    assert audit.verify(registry, expect_head=f"5:{result.head}", tc=tc).ok


def test_an_edited_entry_is_detected(registry: Registry, tc):
    _raw(registry).execute("UPDATE audit SET data = ? WHERE id = 3", ('{"verdict": "untrusted"}',))
    result = audit.verify(registry, tc=tc)
    assert not result.ok and "entry 3" in result.problem and "edited" in result.problem


def test_a_deleted_entry_is_detected(registry: Registry, tc):
    _raw(registry).execute("DELETE FROM audit WHERE id = 2")
    result = audit.verify(registry, tc=tc)
    assert not result.ok and "missing" in result.problem


def test_reordered_entries_are_detected(registry: Registry, tc):
    db = _raw(registry)
    db.execute("UPDATE audit SET id = 100 WHERE id = 2")
    db.execute("UPDATE audit SET id = 2 WHERE id = 3")
    db.execute("UPDATE audit SET id = 3 WHERE id = 100")
    result = audit.verify(registry, tc=tc)
    assert not result.ok and "entry 2" in result.problem


def test_a_chain_rewritten_with_every_hash_recomputed_is_detected_by_its_signatures(registry: Registry, tc):
    """Write access to the database is not enough: the attacker recomputes the whole chain after
    editing entry 3, so every hash and link is consistent, but cannot sign the new heads."""
    db = _raw(registry)
    rows = [dict(zip([c[0] for c in db.execute("SELECT * FROM audit").description], r, strict=True))
            for r in db.execute("SELECT * FROM audit ORDER BY id").fetchall()]
    prev = audit.GENESIS
    for row in rows:
        row["data"] = json.loads(row["data"])
        if row["id"] == 3:
            row["data"]["verdict"] = "untrusted"
        row["prev"], row["hash"] = prev, audit.entry_hash(prev, row)
        db.execute("UPDATE audit SET data = ?, prev = ?, hash = ? WHERE id = ?",
                   (json.dumps(row["data"], sort_keys=True), row["prev"], row["hash"], row["id"]))
        prev = row["hash"]
    assert audit.verify(registry).ok  # the hashes alone are consistent...
    result = audit.verify(registry, tc=tc)
    assert not result.ok and "entry 3" in result.problem and "not signed" in result.problem  # ...the signatures are not


def test_a_signature_from_another_tc_is_refused(registry: Registry, tmp_path: Path):
    other = identity.init(str(tmp_path / "other"))[0]
    result = audit.verify(registry, tc=other)
    assert not result.ok and "not signed" in result.problem


def test_removing_the_newest_entries_is_detected_against_the_recorded_head(registry: Registry, tc):
    head = audit.verify(registry, tc=tc)
    _raw(registry).execute("DELETE FROM audit WHERE id >= 4")
    assert audit.verify(registry, tc=tc).ok  # consistent, but shorter...
    result = audit.verify(registry, expect_head=f"{head.entries}:{head.head}", tc=tc)
    assert not result.ok and "removed" in result.problem  # ...which the recorded head shows


def test_a_published_checkpoint_proves_truncation_and_is_itself_signed(registry: Registry, tc):
    published = audit.checkpoint(registry, tc)
    last = registry.audit_entries()[-1]
    assert published == {"type": "tccdeploy-audit-checkpoint", "count": 5, "head": last["hash"], "time": last["time"],
                         "tc": tc.fingerprint, "signature": last["signature"], "certificates": tc.purpose("audit").all_pem}
    assert published["count"] == 5 and audit.verify(registry, tc=tc, checkpoint=published).ok
    audit.append(registry, "quarantine", "node1", reason="build.unknown")
    assert audit.verify(registry, tc=tc, checkpoint=published).ok  # a longer chain still holds it
    _raw(registry).execute("DELETE FROM audit WHERE id >= 5")
    result = audit.verify(registry, tc=tc, checkpoint=published)
    assert not result.ok and "checkpoint" in result.problem
    forged = dict(published, count=4, head=audit.verify(registry).head)
    result = audit.verify(registry, tc=tc, checkpoint=forged)
    assert not result.ok and "not signed" in result.problem


def test_an_empty_log_has_no_checkpoint(tmp_path: Path, tc):
    empty = audited(str(tmp_path / "empty.sqlite"), tc)
    with pytest.raises(ValueError, match="the audit log is empty: nothing to checkpoint yet"):
        audit.checkpoint(empty, tc)
    empty.close()


def test_a_registry_without_an_auditor_writes_no_decision(tmp_path: Path):
    registry = Registry(str(tmp_path / "r.sqlite"))
    with pytest.raises(RegistryError, match="auditor"):
        audit.append(registry, "attestation", "n1")
    assert registry.audit_entries() == []


def test_concurrent_writers_make_one_linear_chain(tmp_path: Path, tc):
    path = str(tmp_path / "r.sqlite")
    Registry(path).close()

    def writer(n: int) -> None:
        r = audited(path, tc)
        for i in range(20):
            audit.append(r, "attestation", f"w{n}", i=i)
        r.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry = Registry(path)
    result = audit.verify(registry, tc=tc)
    assert result.ok and result.entries == 80
    registry.close()


def test_after_rotating_the_audit_key_old_and_new_entries_verify_and_the_old_key_is_gone(tmp_path: Path):
    state = str(tmp_path / "tc")
    tc = identity.init(state)[0]
    registry = audited(str(tmp_path / "r.sqlite"), tc)
    audit.append(registry, "attestation", "n1")
    old_id = tc.purpose("audit").key_id
    rotated = identity.rotate(state, "audit")
    assert rotated.key_id != old_id and [identity.key_id(c) for c in rotated.retired] == [old_id]
    assert sorted(p.name for p in (tmp_path / "tc").glob("tc-audit-*")) == [
        "tc-audit-cert.pem", "tc-audit-key.pem", "tc-audit-retired.pem"]  # one private key: the new one
    now = identity.load(state)
    registry.auditor = audit.Auditor(now)
    audit.append(registry, "attestation", "n2")
    entries = registry.audit_entries()
    assert [e["signature"].split(":")[0] for e in entries] == [old_id, rotated.key_id]
    assert audit.verify(registry, tc=now).ok
    # Without the retired certificate, the old entries do not verify: the key id is what picks it.
    result = audit.verify_entries(entries, now.certificate, now.purpose("audit").pem)
    assert not result.ok and result.code == "audit.unsigned"
    registry.close()


def test_a_receipt_signed_before_a_rotation_still_verifies(tmp_path: Path):
    from tccdeploy.coordinator import receipts

    state = str(tmp_path / "tc")
    tc = identity.init(state)[0]
    signed = receipts.sign(tc, {"vm": "web"})
    identity.rotate(state, "receipt")
    now = identity.load(state)
    assert receipts.verify(signed, now.certificate)["vm"] == "web"
    assert receipts.sign(now, {"vm": "db"})["certificate"] != signed["certificate"]
    with pytest.raises(ValueError):
        identity.rotate(state, "ca")


def test_tc_rotate_from_the_command_line_is_audited(tmp_path: Path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TCCDEPLOY_STATE=str(tmp_path / "tc"))
    run = [sys.executable, "-m", "tccdeploy", "tc"]
    assert subprocess.run([*run, "init"], env=env, capture_output=True).returncode == 0
    proc = subprocess.run([*run, "rotate", "audit"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "SIGHUP" in proc.stdout, proc.stderr
    registry = Registry(str(tmp_path / "tc" / "registry.sqlite"))
    try:
        entries = registry.audit_entries()
        assert [e["kind"] for e in entries] == ["key.rotate"] and entries[0]["data"]["purpose"] == "audit"
        assert audit.verify(registry, tc=identity.load(str(tmp_path / "tc"))).ok
    finally:
        registry.close()
