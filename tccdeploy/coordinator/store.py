"""The trusted coordinator's registry: one small interface over SQLite or PostgreSQL.

Callers use Registry's methods only, never SQL. The SQL here is written once, in the subset both
databases run (`?` placeholders, ON CONFLICT upserts, RETURNING), and db.py adapts it. What
must hold under concurrent writers, including several `tc serve` replicas on one PostgreSQL,
holds by construction: a nonce is consumed by one conditional UPDATE, a key is released by one
conditional UPDATE, a pending challenge is taken by one DELETE ... RETURNING, at most one
migration per VM is under way (a partial unique index), and the audit chain's next link is
written under the backend's serializing lock. The schema is versioned: MIGRATIONS (SQLite) and
PG_MIGRATIONS (PostgreSQL) take version i to i+1, each step in one transaction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .db import open_backend

MIGRATIONS: list[str] = [
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('enrolled', 'admitted', 'quarantined', 'retired')),
        site TEXT,
        address TEXT,
        build TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE identities (
        node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        ek_certificate BLOB NOT NULL,
        ek_fingerprint TEXT NOT NULL,
        ek_public BLOB NOT NULL,
        ak_public BLOB NOT NULL,
        ak_name BLOB NOT NULL,
        ssh_host_key TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        enrolled_at REAL NOT NULL
    );
    CREATE TABLE challenges (
        node TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        ek_certificate BLOB NOT NULL,
        ek_fingerprint TEXT NOT NULL,
        ek_public BLOB NOT NULL,
        ak_public BLOB NOT NULL,
        ssh_host_key TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        purpose TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        used_at REAL
    );
    CREATE TABLE attestations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        time REAL NOT NULL,
        nonce TEXT,
        verdict TEXT NOT NULL CHECK (verdict IN ('trusted', 'untrusted')),
        reasons TEXT NOT NULL,
        warnings TEXT NOT NULL,
        pcr_digest TEXT,
        reset_count INTEGER,
        restart_count INTEGER,
        build TEXT
    );
    CREATE INDEX attestations_node_time ON attestations(node, time);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        attestation INTEGER REFERENCES attestations(id),
        tk_name TEXT NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL,
        pem TEXT NOT NULL
    );
    """,
    # 2: the verified PCR values (admission recomputes the TK's policy from them) and
    # pending admissions.
    """
    ALTER TABLE attestations ADD COLUMN pcr_values TEXT;
    CREATE TABLE admissions (
        node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        attestation INTEGER NOT NULL REFERENCES attestations(id),
        tk_public BLOB NOT NULL,
        challenge_hash BLOB NOT NULL,
        expires REAL NOT NULL
    );
    """,
    # 3: customers, placement requests (each accepted once), VMs and key releases.
    """
    CREATE TABLE customers (
        name TEXT PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        key_id TEXT NOT NULL UNIQUE,
        added REAL NOT NULL
    );
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        customer TEXT NOT NULL REFERENCES customers(name),
        vm TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        wrapped_key TEXT NOT NULL,
        spec TEXT NOT NULL,
        received REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('accepted', 'released', 'launched', 'failed'))
    );
    CREATE TABLE vms (
        vm_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        customer TEXT NOT NULL REFERENCES customers(name),
        node TEXT REFERENCES nodes(name),
        state TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopped', 'destroyed')),
        image_sha256 TEXT NOT NULL,
        request TEXT NOT NULL REFERENCES requests(id),
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        anti_affinity TEXT,
        launched REAL,
        updated REAL NOT NULL
    );
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        request TEXT NOT NULL REFERENCES requests(id),
        node TEXT NOT NULL REFERENCES nodes(name),
        attestation INTEGER NOT NULL REFERENCES attestations(id),
        certificate_serial TEXT NOT NULL,
        time REAL NOT NULL
    );
    """,
    # 4: the hash-chained audit log of every TC decision.
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        node TEXT,
        vm TEXT,
        data TEXT NOT NULL,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_node ON audit(node);
    CREATE INDEX audit_vm ON audit(vm);
    """,
    # 5: migrations, so an interrupted one is found and finished or rolled back.
    """
    CREATE TABLE migrations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL REFERENCES vms(vm_id),
        source TEXT NOT NULL,
        destination TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('started', 'committed', 'aborted')),
        started REAL NOT NULL,
        ended REAL,
        reason TEXT
    );
    """,
    # 6: engines allowed to call `tc serve` (client certificates the TC issued).
    """
    CREATE TABLE engines (
        name TEXT PRIMARY KEY,
        serial TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL,
        added REAL NOT NULL,
        revoked REAL
    );
    """,
    # 7: at most one migration under way per VM, enforced by the database (two engines racing).
    """
    CREATE UNIQUE INDEX migrations_one_started ON migrations(vm_id) WHERE state = 'started';
    """,
    # 8: signed receipts, for customers to fetch from a served TC.
    """
    CREATE TABLE receipts (request TEXT PRIMARY KEY REFERENCES requests(id), receipt TEXT NOT NULL, time REAL NOT NULL);
    """,
]



# PostgreSQL starts at the schema SQLite reached with MIGRATIONS[6] (version 7); then step by step.
PG_MIGRATIONS: list[str] = [
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('enrolled', 'admitted', 'quarantined', 'retired')),
        site TEXT, address TEXT, build TEXT,
        created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE identities (
        node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        ek_certificate BYTEA NOT NULL, ek_fingerprint TEXT NOT NULL, ek_public BYTEA NOT NULL,
        ak_public BYTEA NOT NULL, ak_name BYTEA NOT NULL, ssh_host_key TEXT NOT NULL,
        manufacturer TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE challenges (
        node TEXT PRIMARY KEY, secret_hash BYTEA NOT NULL, ek_certificate BYTEA NOT NULL,
        ek_fingerprint TEXT NOT NULL, ek_public BYTEA NOT NULL, ak_public BYTEA NOT NULL,
        ssh_host_key TEXT NOT NULL, manufacturer TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY, node TEXT NOT NULL, purpose TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL, used_at DOUBLE PRECISION
    );
    CREATE TABLE attestations (
        id BIGSERIAL PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        time DOUBLE PRECISION NOT NULL, nonce TEXT,
        verdict TEXT NOT NULL CHECK (verdict IN ('trusted', 'untrusted')),
        reasons TEXT NOT NULL, warnings TEXT NOT NULL, pcr_digest TEXT,
        reset_count BIGINT, restart_count BIGINT, build TEXT, pcr_values TEXT
    );
    CREATE INDEX attestations_node_time ON attestations(node, time);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY, node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        attestation BIGINT REFERENCES attestations(id), tk_name TEXT NOT NULL,
        not_after DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION, pem TEXT NOT NULL
    );
    CREATE TABLE admissions (
        node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        attestation BIGINT NOT NULL REFERENCES attestations(id),
        tk_public BYTEA NOT NULL, challenge_hash BYTEA NOT NULL, expires DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE customers (
        name TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL UNIQUE, added DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE requests (
        id TEXT PRIMARY KEY, customer TEXT NOT NULL REFERENCES customers(name), vm TEXT NOT NULL,
        vm_id TEXT NOT NULL, image_sha256 TEXT NOT NULL, wrapped_key TEXT NOT NULL, spec TEXT NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('accepted', 'released', 'launched', 'failed'))
    );
    CREATE TABLE vms (
        vm_id TEXT PRIMARY KEY, name TEXT NOT NULL, customer TEXT NOT NULL REFERENCES customers(name),
        node TEXT REFERENCES nodes(name),
        state TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopped', 'destroyed')),
        image_sha256 TEXT NOT NULL, request TEXT NOT NULL REFERENCES requests(id),
        vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, anti_affinity TEXT,
        launched DOUBLE PRECISION, updated DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE releases (
        id BIGSERIAL PRIMARY KEY, vm_id TEXT NOT NULL, request TEXT NOT NULL REFERENCES requests(id),
        node TEXT NOT NULL REFERENCES nodes(name), attestation BIGINT NOT NULL REFERENCES attestations(id),
        certificate_serial TEXT NOT NULL, time DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE audit (
        id BIGINT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, node TEXT, vm TEXT,
        data TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL
    );
    CREATE INDEX audit_node ON audit(node);
    CREATE INDEX audit_vm ON audit(vm);
    CREATE TABLE migrations (
        id BIGSERIAL PRIMARY KEY, vm_id TEXT NOT NULL REFERENCES vms(vm_id), source TEXT NOT NULL,
        destination TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('started', 'committed', 'aborted')),
        started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION, reason TEXT
    );
    CREATE UNIQUE INDEX migrations_one_started ON migrations(vm_id) WHERE state = 'started';
    CREATE TABLE engines (
        name TEXT PRIMARY KEY, serial TEXT NOT NULL UNIQUE, fingerprint TEXT NOT NULL,
        added DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION
    );
    """,
    """
    CREATE TABLE receipts (request TEXT PRIMARY KEY REFERENCES requests(id), receipt TEXT NOT NULL,
                           time DOUBLE PRECISION NOT NULL);
    """,
]


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class NonceCheck:
    ok: bool
    reason: str = ""
    created: float = 0.0


def _upsert(table: str, key: str, values: dict[str, Any]) -> tuple[str, tuple]:
    """INSERT ... ON CONFLICT(key) DO UPDATE of every other column: SQLite's and PostgreSQL's."""
    columns = list(values)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    sql = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
           f"ON CONFLICT({key}) DO UPDATE SET {updates}")
    return sql, tuple(values.values())


class Registry:
    """The TC's state. One instance per process; safe to use from the engine's and the server's threads.

    location: a SQLite file path, or a postgresql:// URL."""

    def __init__(self, location: str):
        self.path = location
        self.backend = open_backend(location)
        self.kind = self.backend.kind
        current = self.backend.version()
        steps = MIGRATIONS if self.kind == "sqlite" else PG_MIGRATIONS
        if current > len(steps):
            raise RegistryError(f"{location} has schema version {current}; this tccdeploy knows up to {len(steps)}")
        self.backend.migrate(steps)

    @property
    def version(self) -> int:
        return self.backend.version()

    def transaction(self, serialize: bool = False):  # type: ignore[no-untyped-def]
        return self.backend.transaction(serialize)

    def _all(self, query: str, params: tuple = ()) -> list[dict[str, Any]]:
        return self.backend.query(query, params)

    def _one(self, query: str, params: tuple = ()) -> dict[str, Any] | None:
        rows = self.backend.query(query, params)
        return rows[0] if rows else None

    def close(self) -> None:
        self.backend.close()

    # -- nodes ----------------------------------------------------------------------------
    def node(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM nodes WHERE name = ?", (name,))

    def nodes(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM nodes ORDER BY name")

    def set_state(self, name: str, state: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE nodes SET state = ?, updated = ?{', ' + sets if sets else ''} WHERE name = ?",
                       (state, time.time(), *fields.values(), name))

    # -- enrollment -----------------------------------------------------------------------
    def save_challenge(self, node: str, **values: Any) -> None:
        sql, params = _upsert("challenges", "node", {"node": node, **values})
        with self.transaction() as db:
            db.execute(sql, params)

    def take_challenge(self, node: str) -> dict[str, Any] | None:
        """Return and delete the pending challenge in one statement: each is answered once."""
        with self.transaction() as db:
            return db.execute("DELETE FROM challenges WHERE node = ? RETURNING *", (node,)).first()

    def enroll(self, node: str, site: str | None, address: str, identity: dict[str, Any]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes (name, state, site, address, created, updated) VALUES (?, 'enrolled', ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET state = 'enrolled', site = excluded.site, address = excluded.address, "
                "updated = excluded.updated",
                (node, site, address, now, now),
            )
            sql, params = _upsert("identities", "node", {"node": node, **identity, "enrolled_at": now})
            db.execute(sql, params)

    def identity(self, node: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM identities WHERE node = ?", (node,))

    # -- nonces ---------------------------------------------------------------------------
    def new_nonce(self, node: str, purpose: str, nonce: str, ttl: float) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM nonces WHERE expires < ?", (now - 3600,))
            db.execute("INSERT INTO nonces (nonce, node, purpose, created, expires) VALUES (?, ?, ?, ?, ?)",
                       (nonce, node, purpose, now, now + ttl))

    def consume_nonce(self, node: str, purpose: str, nonce: str) -> NonceCheck:
        """Use a nonce once: the single UPDATE is what makes replay impossible, even across processes."""
        now = time.time()
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE nonces SET used_at = ? WHERE nonce = ? AND node = ? AND purpose = ? AND used_at IS NULL "
                "AND expires >= ?", (now, nonce, node, purpose, now)).rowcount
            row = db.execute("SELECT * FROM nonces WHERE nonce = ?", (nonce,)).first()
        if changed == 1 and row is not None:
            return NonceCheck(True, created=row["created"])
        if row is None:
            return NonceCheck(False, "nonce.unknown")
        if row["node"] != node or row["purpose"] != purpose:
            return NonceCheck(False, "nonce.other-node")
        if row["used_at"] is not None:
            return NonceCheck(False, "nonce.replayed")
        return NonceCheck(False, "nonce.expired")

    def use_once(self, token: str, purpose: str, ttl: float) -> bool:
        """Record token as used; False if it was used before (any process, any replica)."""
        now = time.time()
        try:
            with self.transaction() as db:
                db.execute("INSERT INTO nonces (nonce, node, purpose, created, expires, used_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (token, "-", purpose, now, now + ttl, now))
        except self.backend.integrity_error:
            return False
        return True

    # -- attestations ---------------------------------------------------------------------
    def add_attestation(self, node: str, record: dict[str, Any]) -> int:
        with self.transaction() as db:
            row = db.execute(
                "INSERT INTO attestations (node, time, nonce, verdict, reasons, warnings, pcr_digest, reset_count, "
                "restart_count, build, pcr_values) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (node, time.time(), record.get("nonce"), record["verdict"], json.dumps(record.get("reasons", [])),
                 json.dumps(record.get("warnings", [])), record.get("pcr_digest"), record.get("reset_count"),
                 record.get("restart_count"), record.get("build"), json.dumps(record.get("pcr_values") or {})),
            ).first()
            if record["verdict"] == "trusted" and record.get("build"):
                db.execute("UPDATE nodes SET build = ?, updated = ? WHERE name = ?", (record["build"], time.time(), node))
            return int(row["id"]) if row else 0

    @staticmethod
    def _attestation_row(item: dict[str, Any]) -> dict[str, Any]:
        item = dict(item)
        item["reasons"] = json.loads(item["reasons"])
        item["warnings"] = json.loads(item["warnings"])
        item["pcr_values"] = json.loads(item.get("pcr_values") or "{}")
        return item

    def attestations(self, node: str, limit: int = 50, trusted_only: bool = False) -> list[dict[str, Any]]:
        query = "SELECT * FROM attestations WHERE node = ?" + (" AND verdict = 'trusted'" if trusted_only else "")
        return [self._attestation_row(r) for r in self._all(query + " ORDER BY id DESC LIMIT ?", (node, limit))]

    def attestation(self, attestation_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM attestations WHERE id = ?", (attestation_id,))
        return self._attestation_row(row) if row else None

    # -- admission ------------------------------------------------------------------------
    def save_admission(self, node: str, attestation: int, tk_public: bytes, challenge_hash: bytes, expires: float) -> None:
        sql, params = _upsert("admissions", "node", {"node": node, "attestation": attestation, "tk_public": tk_public,
                                                     "challenge_hash": challenge_hash, "expires": expires})
        with self.transaction() as db:
            db.execute(sql, params)

    def take_admission(self, node: str) -> dict[str, Any] | None:
        with self.transaction() as db:
            return db.execute("DELETE FROM admissions WHERE node = ? RETURNING *", (node,)).first()

    def admit(self, node: str, certificate: dict[str, Any]) -> None:
        """Record the node certificate and make the node admitted, in one transaction."""
        with self.transaction() as db:
            db.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (time.time(), node))
            db.execute("INSERT INTO certificates (serial, node, attestation, tk_name, not_after, pem) VALUES (?, ?, ?, ?, ?, ?)",
                       (certificate["serial"], node, certificate["attestation"], certificate["tk_name"],
                        certificate["not_after"], certificate["pem"]))
            db.execute("UPDATE nodes SET state = 'admitted', build = ?, updated = ? WHERE name = ?",
                       (certificate["build"], time.time(), node))

    def quarantine(self, node: str) -> bool:
        """Revoke the node's certificates and quarantine it; True if it was admitted (one caller wins)."""
        with self.transaction() as db:
            changed = db.execute("UPDATE nodes SET state = 'quarantined', updated = ? WHERE name = ? AND state = 'admitted'",
                                 (time.time(), node)).rowcount
            if changed != 1:
                return False
            db.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (time.time(), node))
        return True

    # -- customers, requests, VMs -----------------------------------------------------------
    def add_customer(self, name: str, key: str, key_id: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO customers (name, key, key_id, added) VALUES (?, ?, ?, ?)", (name, key, key_id, time.time()))

    def customer_by_key(self, key: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM customers WHERE key = ?", (key,))

    def customers(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM customers ORDER BY name")

    def accept_request(self, record: dict[str, Any]) -> bool:
        """Record a request; False if its id was seen before (a replay)."""
        try:
            with self.transaction() as db:
                db.execute("INSERT INTO requests (id, customer, vm, vm_id, image_sha256, wrapped_key, spec, received, state) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'accepted')",
                           (record["id"], record["customer"], record["vm"], record["vm_id"], record["image_sha256"],
                            record["wrapped_key"], json.dumps(record["spec"]), time.time()))
        except self.backend.integrity_error:
            return False
        return True

    def request(self, request_id: str) -> dict[str, Any] | None:
        item = self._one("SELECT * FROM requests WHERE id = ?", (request_id,))
        if item is None:
            return None
        item["spec"] = json.loads(item["spec"])
        return item

    def set_request_state(self, request_id: str, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE requests SET state = ? WHERE id = ?", (state, request_id))

    def record_release(self, request_id: str, vm_id: str, node: str, attestation: int, serial: str) -> bool:
        """One release per request: the conditional UPDATE and the insert are one transaction."""
        with self.transaction() as db:
            changed = db.execute("UPDATE requests SET state = 'released' WHERE id = ? AND state = 'accepted'",
                                 (request_id,)).rowcount
            if changed != 1:
                return False
            db.execute("INSERT INTO releases (vm_id, request, node, attestation, certificate_serial, time) VALUES (?, ?, ?, ?, ?, ?)",
                       (vm_id, request_id, node, attestation, serial, time.time()))
        return True

    def save_receipt(self, request_id: str, receipt: dict[str, Any]) -> None:
        sql, params = _upsert("receipts", "request", {"request": request_id, "receipt": json.dumps(receipt),
                                                      "time": time.time()})
        with self.transaction() as db:
            db.execute(sql, params)

    def receipt(self, request_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT receipt FROM receipts WHERE request = ?", (request_id,))
        return json.loads(row["receipt"]) if row else None

    def releases(self, vm_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM releases WHERE vm_id = ? ORDER BY id", (vm_id,))

    def upsert_vm(self, record: dict[str, Any]) -> None:
        row = {"launched": None, "anti_affinity": None, **record, "updated": time.time()}
        columns = ("vm_id", "name", "customer", "node", "state", "image_sha256", "request", "vcpus", "memory_mib",
                   "anti_affinity", "launched", "updated")
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO vms ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) ON CONFLICT(vm_id) DO "
                "UPDATE SET node = excluded.node, state = excluded.state, launched = excluded.launched, "
                "updated = excluded.updated", tuple(row[c] for c in columns))

    def vm(self, name_or_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM vms WHERE (vm_id = ? OR name = ?) AND state != 'destroyed' ORDER BY updated DESC",
                         (name_or_id, name_or_id))

    def vms(self, include_destroyed: bool = False) -> list[dict[str, Any]]:
        query = "SELECT * FROM vms" + ("" if include_destroyed else " WHERE state != 'destroyed'") + " ORDER BY name"
        return self._all(query)

    def set_vm_state(self, vm_id: str, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE vms SET state = ?, updated = ? WHERE vm_id = ?", (state, time.time(), vm_id))

    # -- migrations -------------------------------------------------------------------------
    def start_migration(self, vm_id: str, source: str, destination: str) -> int:
        try:
            with self.transaction() as db:
                row = db.execute("INSERT INTO migrations (vm_id, source, destination, state, started) "
                                 "VALUES (?, ?, ?, 'started', ?) RETURNING id", (vm_id, source, destination, time.time())).first()
        except self.backend.integrity_error:
            busy = self._one("SELECT id FROM migrations WHERE vm_id = ? AND state = 'started'", (vm_id,))
            raise RegistryError(f"VM {vm_id} is already migrating (migration {busy['id'] if busy else '?'})") from None
        return int(row["id"]) if row else 0

    def end_migration(self, migration_id: int, commit: bool, reason: str = "") -> None:
        """Commit moves the VM to the destination in the same transaction; abort leaves it."""
        with self.transaction() as db:
            row = db.execute("UPDATE migrations SET state = ?, ended = ?, reason = ? WHERE id = ? AND state = 'started' "
                             "RETURNING vm_id, destination",
                             ("committed" if commit else "aborted", time.time(), reason, migration_id)).first()
            if row is None:
                raise RegistryError(f"migration {migration_id} is not under way")
            if commit:
                db.execute("UPDATE vms SET node = ?, state = 'running', updated = ? WHERE vm_id = ?",
                           (row["destination"], time.time(), row["vm_id"]))

    def migrations(self, state: str | None = None) -> list[dict[str, Any]]:
        if state:
            return self._all("SELECT * FROM migrations WHERE state = ? ORDER BY id", (state,))
        return self._all("SELECT * FROM migrations ORDER BY id")

    # -- audit ----------------------------------------------------------------------------
    def audit_append(self, entry: dict[str, Any], chain: Any) -> dict[str, Any]:
        """Append one entry; `chain(prev_hash, entry) -> hash`. Serialized (BEGIN IMMEDIATE in
        SQLite, an advisory lock in PostgreSQL), so concurrent writers, replicas included, still
        make one linear chain."""
        with self.transaction(serialize=True) as db:
            last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").first()
            entry = dict(entry, id=(int(last["id"]) + 1) if last else 1)
            prev = last["hash"] if last else "0" * 64
            digest = chain(prev, entry)
            db.execute("INSERT INTO audit (id, time, kind, node, vm, data, prev, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (entry["id"], entry["time"], entry["kind"], entry.get("node"), entry.get("vm"),
                        json.dumps(entry["data"], sort_keys=True), prev, digest))
        return entry | {"prev": prev, "hash": digest}

    def audit_entries(self, node: str | None = None, vm: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM audit WHERE 1=1", []
        for column, value in (("node", node), ("vm", vm)):
            if value is not None:
                query += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            query += " AND time >= ?"
            params.append(since)
        rows = self._all(query + " ORDER BY id", tuple(params))
        return [dict(r) | {"data": json.loads(r["data"])} for r in rows]

    # -- engines ------------------------------------------------------------------------------
    def add_engine(self, name: str, serial: str, fingerprint: str) -> None:
        """Record (or replace) an engine's certificate; the previous one stops working."""
        sql, params = _upsert("engines", "name", {"name": name, "serial": serial, "fingerprint": fingerprint,
                                                  "added": time.time(), "revoked": None})
        with self.transaction() as db:
            db.execute(sql, params)

    def revoke_engine(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("UPDATE engines SET revoked = ? WHERE name = ? AND revoked IS NULL",
                              (time.time(), name)).rowcount == 1

    def engines(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM engines ORDER BY name")

    def engine_by_serial(self, serial: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM engines WHERE serial = ? AND revoked IS NULL", (serial,))

    def certificate(self, node: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM certificates WHERE node = ? AND revoked_at IS NULL ORDER BY not_after DESC", (node,))
