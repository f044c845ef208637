"""The registry's guarantees on both of its databases: SQLite (one file) and PostgreSQL (shared
by replicas). Several Registry instances on one database stand for several processes or `tc
serve` replicas: each has its own connections."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tccdeploy.coordinator import audit
from tccdeploy.coordinator.store import RELEASE_EXPIRY, Conflict, Registry, RegistryError

from .conftest import audited_registry


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    return request.getfixturevalue("postgres").new_database()


def race(workers: int, job: Callable[[int], object]) -> list[object]:
    results: list[object] = [None] * workers
    start = threading.Barrier(workers)

    def run(i: int) -> None:
        start.wait()
        results[i] = job(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _enrolled(registry: Registry, node: str = "n1", ek: str = "f") -> None:
    registry.enroll(node, "site1", "127.0.1.7", {"ek_certificate": b"\x00cert\xff", "ek_fingerprint": ek, "ek_public": b"e",
                                                 "ak_public": b"a", "ak_name": b"\x00\x0bname", "ssh_host_key": "h",
                                                 "manufacturer": "m"})


def test_rows_round_trip_with_bytes_json_and_ids(location, tc_identity):
    registry = audited_registry(location, tc_identity)
    try:
        _enrolled(registry)
        with pytest.raises(Conflict) as refused:
            _enrolled(registry, "n9")  # the same EK under another name
        assert refused.value.reason == "ek.duplicate"
        with pytest.raises(Conflict) as refused:
            _enrolled(registry, "n1", ek="other")  # another EK for an enrolled node
        assert refused.value.reason == "ek.changed"
        assert registry.identity("n1")["ek_certificate"] == b"\x00cert\xff" and registry.node("n9") is None
        first = registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reasons": [],
                                                "pcr_values": {"0": "aa"}})
        second = registry.add_attestation("n1", {"verdict": "untrusted", "reasons": [{"code": "x", "message": "m"}]})
        assert second > first and registry.attestation(first)["pcr_values"] == {"0": "aa"}
        assert [a["id"] for a in registry.attestations("n1")] == [second, first]
        assert registry.node("n1")["build"] == "b1"
        registry.save_challenge("n1", secret_hash=b"s", ek_certificate=b"c", ek_fingerprint="f", ek_public=b"e",
                                ak_public=b"a", ssh_host_key="h", manufacturer="m", expires=1.0)
        assert registry.take_challenge("n1")["secret_hash"] == b"s" and registry.take_challenge("n1") is None
        registry.add_customer("acme", "ed25519:k", "kid")
        record = {"id": "r1", "customer": "acme", "vm": "web", "vm_id": "v1", "image_sha256": "d", "wrapped_key": "w",
                  "spec": {"vcpus": 1}}
        registry.accept_request(record, "kid")
        with pytest.raises(Conflict) as refused:
            registry.accept_request(record, "kid")
        assert refused.value.reason == "request.replayed"
        assert registry.request("r1")["spec"] == {"vcpus": 1}
        assert registry.record_release("r1", "v1", "n1", first, "serial")
        receipt = registry.record_launch("r1", {"vm_id": "v1", "name": "web", "customer": "acme", "node": "n1",
                                                "state": "running", "image_sha256": "d", "request": "r1", "vcpus": 1,
                                                "memory_mib": 64}, lambda: {"signed": True})
        assert receipt == {"signed": True} and registry.receipt("r1") == receipt
        _enrolled(registry, "n2", ek="f2")
        migration = registry.start_migration("v1", "n1", "n2")
        with pytest.raises(RegistryError, match="already migrating"):
            registry.start_migration("v1", "n1", "n2")
        registry.end_migration(migration, commit=True)
        assert registry.vm("web")["node"] == "n2"
        with pytest.raises(RegistryError):
            registry.end_migration(migration, commit=False)
        registry.add_engine("e1", "abc", "fp")
        assert registry.engine_by_serial("abc")["name"] == "e1" and registry.revoke_engine("e1")
        assert registry.engine_by_serial("abc") is None
    finally:
        registry.close()


def test_a_nonce_is_consumed_once_across_processes(location):
    registries = [Registry(location) for _ in range(4)]
    try:
        registries[0].new_nonce("n1", "quote", "the-nonce", ttl=30)
        results = race(16, lambda i: registries[i % 4].consume_nonce("n1", "quote", "the-nonce"))
        assert sum(r.ok for r in results) == 1  # type: ignore[attr-defined]
        assert {r.reason for r in results if not r.ok} == {"nonce.replayed"}  # type: ignore[attr-defined]
    finally:
        for r in registries:
            r.close()


def test_a_key_is_released_once_per_request_across_processes(location, tc_identity):
    registries = [audited_registry(location, tc_identity) for _ in range(4)]
    try:
        first = registries[0]
        _enrolled(first)
        attestation = first.add_attestation("n1", {"verdict": "trusted", "build": "b"})
        first.add_customer("acme", "ed25519:k", "kid")
        first.accept_request({"id": "r1", "customer": "acme", "vm": "web", "vm_id": "v1", "image_sha256": "d",
                              "wrapped_key": "w", "spec": {}}, "kid")
        results = race(16, lambda i: registries[i % 4].record_release("r1", "v1", "n1", attestation, "serial"))
        assert results.count(True) == 1
        assert len(first.releases("v1")) == 1
    finally:
        for r in registries:
            r.close()


def test_the_audit_chain_stays_linear_under_concurrent_writers(location, tc_identity):
    registries = [audited_registry(location, tc_identity) for _ in range(4)]
    try:
        race(8, lambda i: [audit.append(registries[i % 4], "test", f"n{i}", None, seq=j) for j in range(15)])
        entries = registries[0].audit_entries()
        assert [e["id"] for e in entries] == list(range(1, 121))
        assert audit.verify(registries[1], tc=tc_identity).ok
        assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    finally:
        for r in registries:
            r.close()


def test_a_node_is_quarantined_once(location, tc_identity):
    registries = [audited_registry(location, tc_identity) for _ in range(4)]
    try:
        _enrolled(registries[0])
        attestation = registries[0].add_attestation("n1", {"verdict": "trusted", "build": "b", "reset_count": 1})
        registries[0].admit("n1", {"serial": "s1", "attestation": attestation, "tk_name": "t", "not_after": 9e9, "pem": "p",
                                   "build": "b"})
        results = race(8, lambda i: registries[i % 4].quarantine("n1", audit.entry("quarantine", "n1", reason="t")))
        assert results.count(True) == 1 and registries[0].certificate("n1") is None
        assert [e["kind"] for e in registries[0].audit_entries()] == ["quarantine"]
        with pytest.raises(Conflict) as refused:  # the attestation before the quarantine no longer admits it
            registries[1].admit("n1", {"serial": "s2", "attestation": attestation, "tk_name": "t", "not_after": 9e9,
                                       "pem": "p", "build": "b"})
        assert refused.value.reason == "admit.quarantined" and registries[0].node("n1")["state"] == "quarantined"
    finally:
        for r in registries:
            r.close()


def test_an_entry_carrying_hostile_values_is_stored_as_it_was_hashed(location, tc_identity):
    """Issue 15's poisoning request on both databases: a refusal naming a VM id that is a number
    or a list, text with a lone surrogate or NUL, an integer beyond 64 bits: `audit verify` ok."""
    registry = audited_registry(location, tc_identity)
    try:
        for vm in (5, [], "\ud800", "a\x00b", 2**70):
            audit.append(registry, "request.refused", "\x00node", vm, reason="request.signature", raw=[vm, {"k": vm}])
        check = audit.verify(registry, tc=tc_identity)
        assert check.ok, check.problem
        assert all(e["vm"].startswith("sha256:") for e in registry.audit_entries())
    finally:
        registry.close()


HOT_PATH_INDEXES = {"nonces_expires", "attestations_node_id", "certificates_node", "vms_node", "engines_serial",
                    "arriving_migrations", "arriving_resumes", "releases_unsettled"}


def test_the_hot_path_lookups_by_node_have_their_indexes(location):
    """Issue 20: a verdict or a key release reads the node's newest attestation, its certificate and
    its VMs; at fleet size (10,000 nodes, an attestation each a minute) those must not scan."""
    registry = Registry(location)
    try:
        if registry.kind == "sqlite":
            names = {r["name"] for r in registry.backend.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
            plan = " ".join(str(r["detail"]) for r in registry.backend.query(
                "EXPLAIN QUERY PLAN SELECT * FROM attestations WHERE node = ? ORDER BY id DESC LIMIT ?", ("n1", 1)))
            assert "attestations_node_id" in plan and "TEMP B-TREE" not in plan, plan  # no sort of the node's history
            plan = " ".join(str(r["detail"]) for r in registry.backend.query(
                "EXPLAIN QUERY PLAN DELETE FROM nonces WHERE expires < ?", (0,)))
            assert "nonces_expires" in plan, plan  # each nonce issued purges the expired: not by a scan
        else:
            names = {r["indexname"] for r in registry.backend.query("SELECT indexname FROM pg_indexes")}
        assert HOT_PATH_INDEXES <= names
    finally:
        registry.close()


def test_a_decision_reads_only_its_own_node_roster_entries(location, tc_identity):
    registry = audited_registry(location, tc_identity)
    try:
        for i in range(3):
            registry.roster_add(f"sha256:{i:064x}", "site1", f"n{i}", None)
        assert [r["name"] for r in registry.roster((f"sha256:{1:064x}", "sha256:" + "f" * 64))] == ["n1"]
        assert registry.roster(()) == [] and len(registry.roster()) == 3
    finally:
        registry.close()


def test_a_node_is_leased_to_one_engine_at_a_time_across_processes(location):
    """Issue 20's engines sharing a fleet: eight asking at once for the same node, one gets it;
    the holder renews it, nobody else takes it before it runs out, and each ends only its own."""
    registries = [Registry(location) for _ in range(8)]
    try:
        for i, node in enumerate(("n1", "n2", "n3")):
            _enrolled(registries[0], node, ek=f"ek{i}")
        for i in range(8):
            registries[0].add_engine(f"engine-{i}", f"{i:x}", f"{i:064x}")
        results = race(8, lambda i: registries[i].lease_nodes(f"engine-{i}", ["n1", "n2"], 60))
        holders = {r["n1"]["engine"] for r in results}  # type: ignore[index]
        assert len(holders) == 1 and {r["n2"]["engine"] for r in results} == holders  # type: ignore[index]
        (holder,) = holders
        other = next(f"engine-{i}" for i in range(8) if f"engine-{i}" != holder)
        assert registries[0].lease_nodes(other, ["n1"], 60)["n1"]["engine"] == holder
        assert registries[0].lease_nodes(holder, ["n1"], 120)["n1"]["engine"] == holder  # renewed
        assert registries[0].release_leases(other, ["n1", "n2"]) == 0 and registries[0].lease_of("n1")["engine"] == holder
        assert registries[0].release_leases(holder, ["n1"]) == 1 and registries[0].lease_of("n1") is None
        assert registries[0].lease_nodes(other, ["n1"], 60)["n1"]["engine"] == other  # free again
        registries[0].lease_nodes(holder, ["n3"], 0.05)
        time.sleep(0.1)
        assert registries[0].lease_of("n3") is None and registries[0].lease_nodes(other, ["n3"], 60)["n3"]["engine"] == other
    finally:
        for r in registries:
            r.close()


def test_postgresql_drops_a_connection_the_server_cut_rather_than_keeping_it_until_close(postgres):
    """A replica outlives database outages: each one replaces the thread's connection, and the
    one the server cut is let go then, not held (with its socket's memory) until the service stops."""
    from tccdeploy.coordinator.db import PostgresBackend

    backend = PostgresBackend(postgres.new_database())
    first = backend._connection()
    try:
        with first.cursor() as admin:  # the server ends this session, as a restart would
            admin.execute("select pg_terminate_backend(pg_backend_pid())")
    except Exception:  # noqa: BLE001 - the session ends under the statement that ended it
        pass
    assert first.closed
    second = backend._connection()
    assert second is not first and backend._all == [second]
    backend.close()
    assert second.closed and backend._all == []


def test_postgresql_a_lease_waits_for_a_decision_under_way_on_another_replica(postgres):
    """Read committed lets a lease be written between another engine's lease check and its write
    (a quarantine, a migration's start): a lease takes the registry's serializing lock as they do."""
    location = postgres.new_database()
    holder, asker = Registry(location), Registry(location)
    try:
        _enrolled(holder, "n1", ek="ek0")
        holder.add_engine("engine-b", "b", "0" * 64)
        inside, leave, leased = threading.Event(), threading.Event(), threading.Event()

        def decide() -> None:
            with holder.transaction(serialize=True) as db:
                db.execute("SELECT 1")  # (a decision under way: its first statement sent, with the lock)
                inside.set()
                leave.wait(10)

        def lease() -> None:
            asker.lease_nodes("engine-b", ["n1"], 60)
            leased.set()

        threads = [threading.Thread(target=decide), threading.Thread(target=lease)]
        threads[0].start()
        assert inside.wait(10)
        threads[1].start()
        assert not leased.wait(1.0)  # it waits for the decision's transaction (it used not to)
        leave.set()
        assert leased.wait(10)
        for t in threads:
            t.join()
    finally:
        holder.close()
        asker.close()


def test_vms_on_their_way_to_a_node_are_found_by_node(location, tc_identity):
    """Registry.arriving on both databases: a key released for a launch not yet recorded, then
    that VM's migration to another node, each counted at its destination until it lands."""
    registry = audited_registry(location, tc_identity)
    try:
        for i, node in enumerate(("n1", "n2")):
            _enrolled(registry, node, ek=f"ek{i}")
        attestation = registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reasons": []})
        registry.add_customer("acme", "ed25519:k", "kid")
        record = {"id": "r1", "customer": "acme", "vm": "web", "vm_id": "v1", "image_sha256": "d", "wrapped_key": "w",
                  "spec": {"vcpus": 1, "constraints": {"antiAffinityGroup": "g"}}}
        registry.accept_request(record, "kid")
        assert registry.arriving("n1") == []
        assert registry.record_release("r1", "v1", "n1", attestation, "serial")
        assert registry.arriving("n1") == [{"vm_id": "v1", "name": "web", "customer": "acme", "node": "n1",
                                            "state": "starting", "anti_affinity": "g", "arriving": 1}]
        registry.record_launch("r1", {"vm_id": "v1", "name": "web", "customer": "acme", "node": "n1", "state": "running",
                                      "image_sha256": "d", "request": "r1", "vcpus": 1, "memory_mib": 64,
                                      "anti_affinity": "g"}, lambda: {"signed": True})
        assert registry.arriving("n1") == []  # it is there now: a VM row ...
        assert [v["vm_id"] for v in registry.placed_on("n1")] == ["v1"]
        assert registry.releases("v1")[0]["settled"] is not None  # ... and its release left the index of those on their way
        registry.accept_request({**record, "id": "r2", "vm": "db", "vm_id": "v2"}, "kid")
        assert registry.record_release("r2", "v2", "n1", attestation, "serial")
        assert registry.fail_request("r2") == "released"  # failed after its release: its ticket may have started it
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v2"]
        with registry.transaction() as db:  # (made long ago: its tickets are spent)
            db.execute("UPDATE releases SET time = time - 1000 WHERE vm_id = 'v2'")
        registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 1})
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v2"]  # the boot it may run in
        registry.add_attestation("n1", {"verdict": "untrusted", "build": "b1", "reset_count": 2})
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v2"]  # (a reboot only a trusted quote proves)
        registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 2})  # rebooted since
        assert registry.releases("v2")[0]["settled"] is not None and registry.arriving("n1") == []
        unsettled = registry.backend.query("SELECT COUNT(*) AS n FROM releases WHERE settled IS NULL")
        assert unsettled[0]["n"] == 0
        migration = registry.start_migration("v1", "n1", "n2")
        assert [(v["vm_id"], v["node"], v["anti_affinity"]) for v in registry.arriving("n2")] == [("v1", "n2", "g")]
        registry.end_migration(migration, commit=True)
        assert registry.arriving("n2") == [] and registry.arriving("n1") == []
    finally:
        registry.close()


def _table(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tccdeploy.coordinator.db import SQLiteBackend

    backend = SQLiteBackend(str(tmp_path / "odd name #?.sqlite"))  # (the read connections' URI quotes the path)
    with backend.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
        tx.execute("INSERT INTO t VALUES (1)")
    return backend


def test_sqlite_a_read_does_not_wait_behind_a_write_under_way_and_sees_only_what_was_committed(tmp_path):
    """Issue 20: a decision's reads ran on the one connection the writes hold, so each queued behind
    another decision's write and its fsync; they now run on the thread's own WAL reader."""
    backend = _table(tmp_path)
    try:
        read: list[object] = []
        with backend.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (2)")
            reader = threading.Thread(target=lambda: read.append(backend.query("SELECT x FROM t ORDER BY x")))
            reader.start()
            reader.join(30)  # (before: it waited for the write's lock, which this thread holds until the join)
            assert not reader.is_alive()
        assert read == [[{"x": 1}]]  # the write under way is not seen
        assert backend.query("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}]  # once committed, it is
    finally:
        backend.close()


def test_sqlite_a_read_inside_a_write_sees_the_writes_own_changes(tmp_path):
    import sqlite3

    backend = _table(tmp_path)
    try:
        with backend.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (2)")
            assert backend.query("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}]
            tx.execute("INSERT INTO t VALUES (3)")
        with pytest.raises(RuntimeError):
            with backend.transaction() as tx:
                tx.execute("DELETE FROM t")
                raise RuntimeError
        assert backend.query("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}, {"x": 3}]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the reads are on its reader again
            backend.query("INSERT INTO t VALUES (4)")
    finally:
        backend.close()


def test_sqlite_a_read_connection_writes_nothing_and_closes_with_its_thread_or_the_backend(tmp_path):
    import gc
    import sqlite3

    backend = _table(tmp_path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            backend.query("INSERT INTO t VALUES (3)")
        assert backend.query("SELECT count(*) AS n FROM t") == [{"n": 1}]
        worker = threading.Thread(target=backend.query, args=("SELECT x FROM t",))
        worker.start()
        worker.join()
        gc.collect()
        assert len(backend._readers) == 1  # this thread's; the ended thread's went with it
        mine = backend._local.reader.db
    finally:
        backend.close()
    with pytest.raises(sqlite3.ProgrammingError):
        mine.execute("SELECT 1")
    assert isinstance(_read_on_a_new_thread(backend), sqlite3.ProgrammingError)  # (it opens no reader)


def _read_on_a_new_thread(backend) -> BaseException | None:  # type: ignore[no-untyped-def]
    """What a read on a thread with no read connection yet raised, if anything."""
    failures: list[BaseException] = []

    def read() -> None:
        try:
            backend.query("SELECT x FROM t")
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            failures.append(exc)

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    return failures[0] if failures else None


def test_sqlite_reads_from_a_registry_file_replaced_under_the_tc_fail_closed(tmp_path):
    """A backup restored over the file (or the file removed) while the TC runs: the writer keeps
    the file it opened, a new reader would open the other; mixing two registries is refused."""
    from tccdeploy.coordinator.db import SQLiteBackend, store_failure

    backend = _table(tmp_path)
    other = SQLiteBackend(str(tmp_path / "other.sqlite"))
    with other.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
        tx.execute("INSERT INTO t VALUES (99)")
    other.close()
    try:
        assert backend.query("SELECT x FROM t") == [{"x": 1}]  # this thread's reader, opened before
        os.replace(tmp_path / "other.sqlite", backend.path)
        failure = _read_on_a_new_thread(backend)
        assert failure is not None and store_failure(failure) == "store.unavailable", failure
    finally:
        backend.close()


def test_sqlite_reads_find_the_registry_by_any_path_it_was_opened_with(tmp_path, monkeypatch):
    from tccdeploy.coordinator.db import SQLiteBackend

    monkeypatch.chdir(tmp_path)
    backend = SQLiteBackend("relative.sqlite")
    with backend.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
    monkeypatch.chdir("/")  # (the readers open it by the path it had when the backend opened it)
    assert backend.query("SELECT count(*) AS n FROM t") == [{"n": 0}]
    backend.close()
    doubled = SQLiteBackend("/" + str(tmp_path / "doubled.sqlite"))  # //tmp/...: no URI authority
    with doubled.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
    assert doubled.query("SELECT count(*) AS n FROM t") == [{"n": 0}]
    doubled.close()


def test_a_serialized_write_reads_the_audit_head_after_the_lock_not_before(location, tc_identity):
    """The chain's head is read in the round trip that takes the lock: it must be the head as the
    last writer before the lock left it, or two entries would name one previous link."""
    _head_after_the_lock(location, tc_identity)


def _head_after_the_lock(location: str, tc_identity) -> None:  # type: ignore[no-untyped-def]
    holder, asker = audited_registry(location, tc_identity), audited_registry(location, tc_identity)
    try:
        audit.append(holder, "test", "n1", None, seq=0)
        inside, leave, done = threading.Event(), threading.Event(), threading.Event()

        def hold() -> None:
            with holder.transaction(serialize=True) as db:
                holder._audit(db, audit.entry("test", "n1", seq=1))
                inside.set()
                leave.wait(10)

        def append() -> None:
            audit.append(asker, "test", "n2", None, seq=2)
            done.set()

        threads = [threading.Thread(target=hold), threading.Thread(target=append)]
        threads[0].start()
        assert inside.wait(10)
        threads[1].start()
        assert not done.wait(0.5)  # it waits for the lock (SQLite: for the write) ...
        leave.set()
        for t in threads:
            t.join()
        entries = holder.audit_entries()  # ... and links to the entry committed while it waited
        assert [e["id"] for e in entries] == [1, 2, 3] and entries[2]["prev"] == entries[1]["hash"]
        assert audit.verify(asker, tc=tc_identity).ok
    finally:
        holder.close()
        asker.close()


def test_two_entries_in_one_transaction_link_to_each_other(location, tc_identity):
    registry = audited_registry(location, tc_identity)
    try:
        audit.append(registry, "test", "n1", None, seq=0)
        head = registry.audit_entries()[-1]
        with registry.transaction(serialize=True) as db:  # the head came with the lock, whatever ran first
            db.execute("SELECT 1 AS one")
            assert db.first == [{"id": 1, "hash": head["hash"]}]
        with registry.transaction(serialize=True) as db:
            registry._audit(db, audit.entry("test", "n1", seq=1))
            registry._audit(db, audit.entry("test", "n1", seq=2))
        entries = registry.audit_entries()
        assert [e["id"] for e in entries] == [1, 2, 3] and audit.verify(registry, tc=tc_identity).ok
    finally:
        registry.close()


def test_postgresql_an_audit_entry_outside_a_serialized_write_is_refused(postgres, tc_identity):
    """Fail closed: an entry written without the lock could fork the chain with a replica's."""
    registry = audited_registry(postgres.new_database(), tc_identity)
    try:
        with pytest.raises(RegistryError, match="serialized"), registry.transaction() as db:
            registry._audit(db, audit.entry("test", "n1"))
        assert registry.audit_entries() == []
    finally:
        registry.close()


def test_postgresql_a_failed_write_rolls_back_and_its_connection_goes_on(postgres):
    """BEGIN, COMMIT and ROLLBACK are the backend's own (BEGIN and the lock go with the first
    statement, deferred writes with the next or the COMMIT): a statement that fails there or
    later, a deferred write that fails, or an exception between statements, leaves nothing
    written and the thread's connection out of the failed transaction, ready for the next."""
    registry = Registry(postgres.new_database())
    good = "INSERT INTO roster (ek, site, name, capacity, added) VALUES (?, 's', ?, 1, 0)"
    bad = "INSERT INTO roster (ek) VALUES (?)"  # (a NOT NULL column left out)

    def first_fails(db) -> None:  # type: ignore[no-untyped-def]
        db.execute(bad, ("e1",))

    def later_fails(db) -> None:  # type: ignore[no-untyped-def]
        db.execute(good, ("e1", "n1"))
        db.execute(bad, ("e2",))

    def deferred_fails_at_commit(db) -> None:  # type: ignore[no-untyped-def]
        db.execute(good, ("e1", "n1"))
        db.defer(good, ("e2", "n2"))
        db.defer(bad, ("e3",))

    def deferred_fails_at_next(db) -> None:  # type: ignore[no-untyped-def]
        db.defer(good, ("e1", "n1"))
        db.defer(good, ("e2", "n1"))  # (the name is unique)
        db.execute("SELECT 1")

    def raises_between(db) -> None:  # type: ignore[no-untyped-def]
        db.execute(good, ("e1", "n1"))
        db.defer(good, ("e2", "n2"))
        raise KeyError("between statements")

    try:
        for body in (first_fails, later_fails, deferred_fails_at_commit, deferred_fails_at_next, raises_between):
            with pytest.raises(Exception) as raised, registry.transaction(serialize=True) as db:
                body(db)
            expected = KeyError if body is raises_between else registry.backend.integrity_error
            assert isinstance(raised.value, expected), body.__name__
            assert registry.roster() == [], body.__name__
        with registry.transaction(serialize=True) as db:
            db.execute(good, ("e3", "n3"))
        assert [r["ek"] for r in registry.roster()] == ["e3"]
        with pytest.raises(ValueError, match="no parameters"), registry.backend.transaction(first="SELECT %s"):
            pass
        assert [r["ek"] for r in registry.roster()] == ["e3"]
    finally:
        registry.close()


@pytest.mark.parametrize("serialize", [True, False])
def test_deferred_writes_land_in_order_with_their_values_as_given(location, serialize):
    """A deferred write is sent later, its values quoted by psycopg (PostgreSQL): text with quotes,
    percent signs, backslashes and other scripts, bytes, floats and NULL come back as they went,
    a later read in the same transaction sees them, and the commit keeps their order."""
    registry = Registry(location)
    hostile = ["it's 100% \\x00 ' ; -- /* \"q\"", "%s %(x)s %%", "ünï\u2028cødé €", "E'x'", "$1 $$ $$"]
    try:
        _enrolled(registry)
        with registry.transaction(serialize=serialize) as db:
            for i, text in enumerate(hostile):
                db.defer("INSERT INTO roster (ek, site, name, capacity, added) VALUES (?, ?, ?, ?, ?)",
                         (f"e{i}", text, None, i, 1.0 / 3 + i))
            seen = db.execute("SELECT site FROM roster ORDER BY capacity").fetchall()
            db.defer("UPDATE identities SET ek_certificate = ? WHERE node = ?", (b"\x00'\\\xff%s", "n1"))
        assert [r["site"] for r in seen] == hostile
        rows = registry.roster()
        assert sorted((r["capacity"], r["site"], r["name"], r["added"]) for r in rows) == \
            [(i, text, None, 1.0 / 3 + i) for i, text in enumerate(hostile)]
        assert registry.identity("n1")["ek_certificate"] == b"\x00'\\\xff%s"
    finally:
        registry.close()


def test_a_nodes_standing_is_what_its_three_reads_give(location, tc_identity):
    """Registry.standing, one read on the hot path, against node, attestations(limit=1) and
    certificate, as the node goes through its states (no verdict, no certificate, two of each, a
    revoked one, quarantined), beside another node's newer rows."""
    registry = audited_registry(location, tc_identity)

    def standing(node: str = "n1") -> tuple:
        latest = registry.attestations(node, limit=1)
        got = registry.standing(node)
        assert got == (registry.node(node), latest[0] if latest else None, registry.certificate(node))
        return got

    try:
        assert standing() == (None, None, None)
        _enrolled(registry)
        _enrolled(registry, "n2", ek="g")
        assert standing()[0]["state"] == "enrolled" and standing()[1:] == (None, None)
        first = registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reasons": ["r"],
                                                "pcr_values": {"sha256": {"0": "00"}}, "reset_count": 1})
        assert standing()[1]["pcr_values"] == {"sha256": {"0": "00"}}
        registry.admit("n1", {"serial": "s1", "attestation": first, "tk_name": "t", "not_after": 9e9, "pem": "p1", "build": "b1"})
        second = registry.add_attestation("n1", {"verdict": "trusted", "build": "b2", "warnings": ["w"], "reset_count": 1})
        registry.add_attestation("n2", {"verdict": "trusted", "build": "other", "reset_count": 1})  # another node's, newer
        assert standing()[1]["id"] == second and standing()[2]["serial"] == "s1"
        registry.admit("n1", {"serial": "s2", "attestation": second, "tk_name": "t", "not_after": 9e9 + 1, "pem": "p2",
                              "build": "b2"})  # the first revoked
        assert standing()[2]["serial"] == "s2" and standing()[1]["warnings"] == ["w"]
        registry.quarantine("n1", audit.entry("quarantine", "n1", reason="t"))
        assert standing()[0]["state"] == "quarantined" and standing()[2] is None
        registry.add_attestation("n1", {"verdict": "untrusted", "build": "b2", "reasons": ["x"], "reset_count": 1})
        assert standing()[1]["verdict"] == "untrusted" and standing("n2")[1]["build"] == "other"
    finally:
        registry.close()


def test_a_nodes_identity_and_roster_are_what_their_two_reads_give(location, tc_identity):
    """Registry.identity_and_roster, one read for every decision about a node, against identity
    and roster(enrolled_identities(...)): the EK named by its certificate's fingerprint, by its
    public key's, by both; entries for other EKs and other nodes left out."""
    from tccdeploy.coordinator.roster import enrolled_identities

    registry = audited_registry(location, tc_identity)

    def both(node: str = "n1") -> tuple:
        known = registry.identity(node)
        got = registry.identity_and_roster(node)
        assert got == (known, registry.roster(enrolled_identities(known)) if known else [])
        return got

    try:
        assert both() == (None, [])
        _enrolled(registry, "n1", ek="f1")
        registry.enroll("n2", "site1", "127.0.1.8", {"ek_certificate": b"c", "ek_fingerprint": "f2", "ek_public": b"e",
                                                     "ak_public": b"a", "ak_name": b"n", "ssh_host_key": "h",
                                                     "manufacturer": "m", "ek_key_fingerprint": "sha256:k2"})
        assert both()[1] == [] and both()[0]["ek_certificate"] == b"\x00cert\xff"
        registry.roster_add("sha256:other", "site1", "x", None)
        registry.roster_add("sha256:f2", "site1", None, 3)  # n2's, by its certificate
        assert both()[1] == [] and [r["capacity"] for r in both("n2")[1]] == [3]
        registry.roster_add("sha256:k2", "site2", "n2", None)  # n2's again, by its public key
        registry.roster_add("sha256:f1", "site1", "n1", 2)
        assert [r["ek"] for r in both("n2")[1]] == ["sha256:f2", "sha256:k2"]
        assert [(r["ek"], r["name"], r["capacity"]) for r in both()[1]] == [("sha256:f1", "n1", 2)]
    finally:
        registry.close()


def test_a_requests_row_and_its_images_owner_are_what_their_two_reads_give(location, tc_identity):
    registry = audited_registry(location, tc_identity)

    def both(request_id: str = "r1") -> tuple:
        request = registry.request(request_id)
        got = registry.request_and_owner(request_id)
        assert got == (request, registry.image_owner(request["vm_id"]) if request else None)
        return got

    try:
        assert both() == (None, None)
        _released_once(registry)
        request, owner = both()
        assert request["state"] == "released" and request["spec"] == {"vcpus": 1} and owner["customer"] == "acme"
        with registry.transaction() as db:  # (no image row: the join must not invent one)
            db.execute("DELETE FROM images WHERE vm_id = 'v1'")
        assert both()[1] is None and both("r9") == (None, None)
    finally:
        registry.close()


@pytest.mark.parametrize("read", ["standing", "guard", "identity", "request"])
def test_a_key_releases_reads_find_their_rows_by_index_not_by_a_scan(location, tc_identity, read):
    """At fleet size (10,000 nodes, an attestation each a minute) the reads every key release makes
    (the node's standing before, its state, certificate and VMs inside the write) must find their
    rows by index: their first forms had PostgreSQL scan every node's attestations (a hash join)
    and certificates."""
    registry = audited_registry(location, tc_identity)
    try:
        for i in range(3):
            _enrolled(registry, f"n{i}", ek=f"ek{i}")
            registry.add_attestation(f"n{i}", {"verdict": "trusted", "build": "b", "reset_count": 1})
        sql, params = {"standing": lambda: (registry._standing_sql, ("n1",) * registry._standing_sql.count("?")),
                       "guard": lambda: registry._guard_sql("n1"),
                       "identity": lambda: (registry._identity_sql, ("n1",)),
                       "request": lambda: (registry._request_sql, ("r1",))}[read]()
        if registry.kind == "sqlite":
            plan = [str(r["detail"]) for r in registry.backend.query("EXPLAIN QUERY PLAN " + sql, params)]
            # (a scan of p, the node's own VMs as the subquery found them by index, is no table's)
            assert plan and not [step for step in plan if step.startswith("SCAN") and not step.startswith("SCAN p ")], plan
        else:
            import psycopg

            with psycopg.connect(location, autocommit=True) as conn:
                conn.execute("SET plan_cache_mode = force_generic_plan")  # (the plan a prepared statement keeps)
                plan = [r[0] for r in conn.execute("EXPLAIN " + sql.replace("?", "%s"), params, prepare=True).fetchall()]
            assert plan and not [step for step in plan if "Seq Scan" in step or "Hash" in step], "\n".join(plan)
    finally:
        registry.close()


def _released_once(registry: Registry) -> int:
    """n1 enrolled and attested (boot 1), acme's request r1 for VM v1 accepted and its key released
    to n1 under ticket t1: that attestation's id."""
    _enrolled(registry)
    attestation = registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 1})
    registry.add_customer("acme", "ed25519:k", "kid")
    registry.accept_request({"id": "r1", "customer": "acme", "vm": "web", "vm_id": "v1", "image_sha256": "d",
                             "wrapped_key": "w", "spec": {"vcpus": 1}}, "kid")
    assert registry.record_release("r1", "v1", "n1", attestation, "serial", ticket="t1")
    return attestation


def test_a_release_counts_until_its_node_reboots_after_its_tickets_were_spent(location, tc_identity):
    """A key released for a request that then failed may have started the VM at any time in its
    tickets' life, in whatever boot the node was in then: a reboot within that life proves
    nothing; the first trusted quote after it names the boot to leave, and a later trusted boot
    above it ends the count (and settles the release)."""
    registry = audited_registry(location, tc_identity)

    def at(attestation: int, when: float) -> None:
        with registry.transaction() as db:
            db.execute("UPDATE attestations SET time = ? WHERE id = ?", (when, attestation))

    try:
        _released_once(registry)
        released = registry.releases("v1")[0]["time"]
        assert registry.fail_request("r1") == "released"
        at(registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 2}), released + 10)
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v1"]  # rebooted while a ticket could still start it
        at(registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 2}),
           released + RELEASE_EXPIRY + 40)
        assert [v["vm_id"] for v in registry.arriving("n1")] == ["v1"]  # the boot it may run in
        assert registry.releases("v1")[0]["settled"] is None
        registry.add_attestation("n1", {"verdict": "trusted", "build": "b1", "reset_count": 3})
        assert registry.arriving("n1") == [] and registry.releases("v1")[0]["settled"] is not None
    finally:
        registry.close()


def test_a_release_reissued_while_the_sweep_expires_it_stays_released(location, tc_identity):
    """The expiry sweep reads what is due, then expires each in its own write; a retry that
    reissued the release meanwhile (a fresh ticket, alive) keeps it and its request released: the
    request went back to accepted with that ticket alive, counted nowhere (found in review)."""
    registry = audited_registry(location, tc_identity)
    try:
        attestation = _released_once(registry)
        with registry.transaction() as db:  # (made long ago)
            db.execute("UPDATE releases SET time = time - 1000")
        read = registry._all

        def then_reissued(sql: str, params: tuple = ()) -> list:
            rows = read(sql, params)
            if rows and "r.time < ?" in sql:
                release = registry.releases("v1")[0]
                assert registry.reissue_release(int(release["id"]), "t1", attestation, "serial", "t2")
            return rows

        registry._all = then_reissued  # type: ignore[method-assign]
        assert registry.expire_releases(time.time() - RELEASE_EXPIRY, lambda row: None) == []
        registry._all = read  # type: ignore[method-assign]
        release = registry.releases("v1")[0]
        assert registry.request("r1")["state"] == "released" and release["expired"] is None and release["ticket"] == "t2"
    finally:
        registry.close()


def test_postgresql_a_transaction_is_never_mistaken_for_committed_nor_joined_by_the_next(postgres):
    """A statement that failed inside a write whose code caught it leaves the transaction
    aborted: its COMMIT is answered ROLLBACK, which is raised, not taken for a commit; a
    connection some failure left inside a transaction is not reused, so the next write does not
    run (and commit) inside it; an answer short of the statements sent is raised."""
    from tccdeploy.coordinator.db import StoreFailure

    registry = Registry(postgres.new_database())
    good = "INSERT INTO roster (ek, site, name, capacity, added) VALUES (?, 's', ?, 1, 0)"
    try:
        with pytest.raises(StoreFailure, match="ROLLBACK"), registry.transaction(serialize=True) as db:
            db.execute(good, ("e1", "n1"))
            with pytest.raises(registry.backend.integrity_error):
                db.execute(good, ("e1", "n1"))  # (caught here, as a careless caller might)
        assert registry.roster() == []
        registry.backend._cursor().execute("BEGIN")  # a connection left in a transaction ...
        registry.backend._cursor().execute("INSERT INTO roster (ek, site, name, capacity, added) VALUES ('e0', 's', 'n0', 1, 0)")
        with registry.transaction(serialize=True) as db:
            db.execute(good, ("e2", "n2"))
        assert [r["ek"] for r in registry.roster()] == ["e2"]  # ... is not the next write's
        with pytest.raises(StoreFailure, match="answered"), registry.transaction(serialize=True) as db:
            db.defer(good, ("e3", "n3"))
            db.defer("  ")  # (an empty statement gives no result)
            db.execute("SELECT 1")
    finally:
        registry.close()


def test_postgresql_the_audit_head_is_read_after_the_lock_whatever_the_servers_isolation(postgres, tc_identity):
    """The writes ask for READ COMMITTED: under the server's repeatable read the head was read in
    the snapshot taken before the lock was granted, and two entries named one previous link."""
    location = postgres.new_database()
    import psycopg

    with psycopg.connect(location, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET default_transaction_isolation TO 'repeatable read'")
    _head_after_the_lock(location, tc_identity)
