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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..crypto.ticket import TTL as TICKET_TTL
from . import auditform
from .db import open_backend
from .refusals import Refused

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
    # 9: the TC's own records (issue 13): the node roster, one EK per node, sticky quarantine,
    # images owned by the customer who first sealed them, one open request per VM, signed audit.
    """
    CREATE TABLE roster (ek TEXT PRIMARY KEY, site TEXT NOT NULL, name TEXT UNIQUE, capacity INTEGER, added REAL NOT NULL);
    ALTER TABLE nodes ADD COLUMN quarantined_at REAL;
    ALTER TABLE nodes ADD COLUMN quarantine_reset INTEGER;
    ALTER TABLE identities ADD COLUMN ek_key_fingerprint TEXT;
    CREATE UNIQUE INDEX identities_one_ek ON identities(ek_fingerprint);
    CREATE TABLE images (vm_id TEXT PRIMARY KEY, customer TEXT NOT NULL REFERENCES customers(name),
                         key_id TEXT NOT NULL, image_sha256 TEXT NOT NULL, added REAL NOT NULL);
    CREATE UNIQUE INDEX requests_one_open ON requests(vm_id) WHERE state IN ('accepted', 'released');
    ALTER TABLE audit ADD COLUMN signature TEXT;
    ALTER TABLE challenges ADD COLUMN site TEXT;
    ALTER TABLE challenges ADD COLUMN address TEXT;
    """,
    # 10: the ticket each key release was made in (issue 14): the node's launch evidence must name it.
    """
    ALTER TABLE releases ADD COLUMN ticket TEXT;
    """,
    # 11: a migration's two tickets: the destination's evidence must name its migrate-in ticket.
    """
    ALTER TABLE migrations ADD COLUMN out_ticket TEXT;
    ALTER TABLE migrations ADD COLUMN in_ticket TEXT;
    """,
    # 12: VMs end only on their node's TPM evidence (issue 14): 'off' (powered off, or its node
    # rebooted: memory gone, disk kept) and 'suspended' join the states; `boot` is the TPM
    # resetCount the VM runs in (a quote with a higher one proves it gone) and `placed` when it
    # came to its node (an end ticket older than that is about an earlier stay). SQLite cannot
    # alter a CHECK: the table is rebuilt, foreign keys checked at commit.
    """
    PRAGMA defer_foreign_keys=ON;
    CREATE TEMP TABLE vms_before_12 AS SELECT * FROM vms;
    DROP TABLE vms;
    CREATE TABLE vms (
        vm_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        customer TEXT NOT NULL REFERENCES customers(name),
        node TEXT REFERENCES nodes(name),
        state TEXT NOT NULL CHECK (state IN ('starting', 'running', 'stopped', 'off', 'suspended', 'destroyed')),
        image_sha256 TEXT NOT NULL,
        request TEXT NOT NULL REFERENCES requests(id),
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        anti_affinity TEXT,
        launched REAL,
        updated REAL NOT NULL,
        boot INTEGER,
        placed REAL
    );
    INSERT INTO vms (vm_id, name, customer, node, state, image_sha256, request, vcpus, memory_mib, anti_affinity,
                     launched, updated, placed)
        SELECT vm_id, name, customer, node, state, image_sha256, request, vcpus, memory_mib, anti_affinity,
               launched, updated, launched FROM vms_before_12;
    DROP TABLE vms_before_12;
    """,
    # 13: suspensions (issue 14): a VM's state saved on its node under a Ksus only the TC keeps
    # (wrapped to its own key), resumed once through a resume ticket.
    """
    CREATE TABLE suspensions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL REFERENCES vms(vm_id),
        node TEXT NOT NULL REFERENCES nodes(name),
        state TEXT NOT NULL CHECK (state IN ('started', 'suspended', 'aborted', 'resuming', 'resumed')),
        ksus TEXT NOT NULL,
        suspend_ticket TEXT NOT NULL,
        state_sha256 TEXT,
        resume_node TEXT,
        resume_ticket TEXT,
        started REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE UNIQUE INDEX suspensions_one_open ON suspensions(vm_id) WHERE state IN ('started', 'suspended', 'resuming');
    """,
    # 14: the replay horizon (issue 15): records of used tokens are purged only up to a time that
    # never goes back, and a token that may have been purged is refused, so moving the clock
    # forward (purge), then back, does not make a used token new again.
    """
    CREATE TABLE horizons (name TEXT PRIMARY KEY, until REAL NOT NULL);
    """,
    # 15: a key release is safe to retry (issue 15): the same node may get a fresh ticket that
    # supersedes the last (the node's launch evidence may name any of them), and a release no
    # launch settled expires back to 'accepted' (when, kept).
    """
    ALTER TABLE releases ADD COLUMN superseded TEXT NOT NULL DEFAULT '';
    ALTER TABLE releases ADD COLUMN expired REAL;
    """,
    # 16: a verdict is safe to ask for again (issue 15): the quote's nonce is used in the verdict's
    # own transaction, and the same evidence sent again gets the verdict recorded for it.
    """
    ALTER TABLE attestations ADD COLUMN evidence_sha256 TEXT;
    CREATE INDEX attestations_nonce ON attestations(nonce);
    CREATE INDEX releases_vm ON releases(vm_id);
    CREATE INDEX releases_request ON releases(request);
    """,
    # 17: platforms apart from builds (issue 17): a verdict names the hardware model's firmware
    # reference it matched as well as the TVMM build.
    """
    ALTER TABLE attestations ADD COLUMN platform TEXT;
    ALTER TABLE nodes ADD COLUMN platform TEXT;
    """,
    # 18: webhooks (issue 19): each delivers the audit log's events after its cursor, in order,
    # at least once; the delivery state is here so a TC restart loses nothing, and a lease lets
    # one replica deliver at a time.
    """
    CREATE TABLE webhooks (name TEXT PRIMARY KEY, url TEXT NOT NULL, secret TEXT NOT NULL, events TEXT NOT NULL,
                           created REAL NOT NULL, cursor INTEGER NOT NULL, checkpoint INTEGER NOT NULL DEFAULT 0,
                           attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0, last_error TEXT,
                           delivered INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL NOT NULL DEFAULT 0);
    """,
    # 19: the hot path's lookups (issue 20): a key release or a verdict reads the node's newest
    # attestation, its certificate and the VMs it runs, and every nonce issued purges the expired
    # ones; at fleet size (10,000 nodes: 600,000 nonces an hour) none of that may scan.
    """
    CREATE INDEX nonces_expires ON nonces(expires);
    CREATE INDEX attestations_node_id ON attestations(node, id);
    CREATE INDEX certificates_node ON certificates(node, not_after);
    CREATE INDEX vms_node ON vms(node);
    CREATE INDEX engines_serial ON engines(serial);
    """,
    # 20: node leases (issue 20): engines sharing a fleet each lease the nodes of their round, so
    # two never quarantine, evacuate or migrate the same node at once.
    """
    CREATE TABLE node_leases (node TEXT PRIMARY KEY, engine TEXT NOT NULL, until REAL NOT NULL);
    """,
    # 21: VMs on their way to a node (a started migration, a resume, a key released for a launch)
    # count there in a placement decision (Registry.arriving): looked up by node, not scanned.
    """
    CREATE INDEX arriving_migrations ON migrations(destination) WHERE state = 'started';
    CREATE INDEX arriving_resumes ON suspensions(resume_node) WHERE state = 'resuming';
    CREATE INDEX arriving_releases ON requests(state) WHERE state = 'released';
    """,
    # 22: a release on its way looked up by its node: step 21's index on the request's state
    # still read every released request of the fleet for each decision (0.8 ms at 1,600 in
    # flight, inside the serialized write; 0.07 ms with this one).
    """
    CREATE INDEX arriving_release_nodes ON releases(node) WHERE expired IS NULL;
    """,
    # 23: a release settles when its launch is recorded, or when its node proves a reboot after its
    # ticket's life (a key released for a request that then failed or expired may have started
    # the VM, unrecorded); the index holds the unsettled: step 22's kept every launch a node ever
    # had (a long-lived node's history read at each decision). Step 21's, the fleet's
    # released requests, is dropped: PostgreSQL, planning with the statistics of tables still
    # empty, drove a node's placement read from it and read every release for each
    # (bench/tc_service.py: key releases fell to 150/s as they accumulated).
    """
    ALTER TABLE releases ADD COLUMN settled REAL;
    UPDATE releases SET settled = time WHERE request IN (SELECT id FROM requests WHERE state = 'launched');
    DROP INDEX arriving_releases;
    DROP INDEX arriving_release_nodes;
    CREATE INDEX releases_unsettled ON releases(node) WHERE settled IS NULL;
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
    """
    CREATE TABLE roster (ek TEXT PRIMARY KEY, site TEXT NOT NULL, name TEXT UNIQUE, capacity INTEGER, added DOUBLE PRECISION NOT NULL);
    ALTER TABLE nodes ADD COLUMN quarantined_at DOUBLE PRECISION;
    ALTER TABLE nodes ADD COLUMN quarantine_reset BIGINT;
    ALTER TABLE identities ADD COLUMN ek_key_fingerprint TEXT;
    CREATE UNIQUE INDEX identities_one_ek ON identities(ek_fingerprint);
    CREATE TABLE images (vm_id TEXT PRIMARY KEY, customer TEXT NOT NULL REFERENCES customers(name),
                         key_id TEXT NOT NULL, image_sha256 TEXT NOT NULL, added DOUBLE PRECISION NOT NULL);
    CREATE UNIQUE INDEX requests_one_open ON requests(vm_id) WHERE state IN ('accepted', 'released');
    ALTER TABLE audit ADD COLUMN signature TEXT;
    ALTER TABLE challenges ADD COLUMN site TEXT;
    ALTER TABLE challenges ADD COLUMN address TEXT;
    """,
    """
    ALTER TABLE releases ADD COLUMN ticket TEXT;
    """,
    """
    ALTER TABLE migrations ADD COLUMN out_ticket TEXT;
    ALTER TABLE migrations ADD COLUMN in_ticket TEXT;
    """,
    """
    ALTER TABLE vms DROP CONSTRAINT vms_state_check;
    ALTER TABLE vms ADD CONSTRAINT vms_state_check
        CHECK (state IN ('starting', 'running', 'stopped', 'off', 'suspended', 'destroyed'));
    ALTER TABLE vms ADD COLUMN boot BIGINT;
    ALTER TABLE vms ADD COLUMN placed DOUBLE PRECISION;
    UPDATE vms SET placed = launched;
    """,
    """
    CREATE TABLE suspensions (
        id BIGSERIAL PRIMARY KEY, vm_id TEXT NOT NULL REFERENCES vms(vm_id), node TEXT NOT NULL REFERENCES nodes(name),
        state TEXT NOT NULL CHECK (state IN ('started', 'suspended', 'aborted', 'resuming', 'resumed')),
        ksus TEXT NOT NULL, suspend_ticket TEXT NOT NULL, state_sha256 TEXT, resume_node TEXT, resume_ticket TEXT,
        started DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL
    );
    CREATE UNIQUE INDEX suspensions_one_open ON suspensions(vm_id) WHERE state IN ('started', 'suspended', 'resuming');
    """,
    """
    CREATE TABLE horizons (name TEXT PRIMARY KEY, until DOUBLE PRECISION NOT NULL);
    """,
    """
    ALTER TABLE releases ADD COLUMN superseded TEXT NOT NULL DEFAULT '';
    ALTER TABLE releases ADD COLUMN expired DOUBLE PRECISION;
    """,
    """
    ALTER TABLE attestations ADD COLUMN evidence_sha256 TEXT;
    CREATE INDEX attestations_nonce ON attestations(nonce);
    CREATE INDEX releases_vm ON releases(vm_id);
    CREATE INDEX releases_request ON releases(request);
    """,
    """
    ALTER TABLE attestations ADD COLUMN platform TEXT;
    ALTER TABLE nodes ADD COLUMN platform TEXT;
    """,
    """
    CREATE TABLE webhooks (name TEXT PRIMARY KEY, url TEXT NOT NULL, secret TEXT NOT NULL, events TEXT NOT NULL,
                           created DOUBLE PRECISION NOT NULL, cursor BIGINT NOT NULL, checkpoint BIGINT NOT NULL DEFAULT 0,
                           attempts INTEGER NOT NULL DEFAULT 0, next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
                           last_error TEXT, delivered BIGINT NOT NULL DEFAULT 0, lease_owner TEXT,
                           lease_until DOUBLE PRECISION NOT NULL DEFAULT 0);
    """,
    """
    CREATE INDEX nonces_expires ON nonces(expires);
    CREATE INDEX attestations_node_id ON attestations(node, id);
    CREATE INDEX certificates_node ON certificates(node, not_after);
    CREATE INDEX vms_node ON vms(node);
    CREATE INDEX engines_serial ON engines(serial);
    """,
    # 20: node leases (issue 20): engines sharing a fleet each lease the nodes of their round, so
    # two never quarantine, evacuate or migrate the same node at once.
    """
    CREATE TABLE node_leases (node TEXT PRIMARY KEY, engine TEXT NOT NULL, until DOUBLE PRECISION NOT NULL);
    """,
    # 21: VMs on their way to a node (a started migration, a resume, a key released for a launch)
    # count there in a placement decision (Registry.arriving): looked up by node, not scanned.
    """
    CREATE INDEX arriving_migrations ON migrations(destination) WHERE state = 'started';
    CREATE INDEX arriving_resumes ON suspensions(resume_node) WHERE state = 'resuming';
    CREATE INDEX arriving_releases ON requests(state) WHERE state = 'released';
    """,
    # 22: a release on its way looked up by its node: step 21's index on the request's state
    # still read every released request of the fleet for each decision (0.8 ms at 1,600 in
    # flight, inside the serialized write; 0.07 ms with this one).
    """
    CREATE INDEX arriving_release_nodes ON releases(node) WHERE expired IS NULL;
    """,
    # 23: a release settles when its launch is recorded, or when its node proves a reboot after its
    # ticket's life (a key released for a request that then failed or expired may have started
    # the VM, unrecorded); the index holds the unsettled: step 22's kept every launch a node ever
    # had (a long-lived node's history read at each decision). Step 21's, the fleet's
    # released requests, is dropped: PostgreSQL, planning with the statistics of tables still
    # empty, drove a node's placement read from it and read every release for each
    # (bench/tc_service.py: key releases fell to 150/s as they accumulated).
    """
    ALTER TABLE releases ADD COLUMN settled DOUBLE PRECISION;
    UPDATE releases SET settled = time WHERE request IN (SELECT id FROM requests WHERE state = 'launched');
    DROP INDEX arriving_releases;
    DROP INDEX arriving_release_nodes;
    CREATE INDEX releases_unsettled ON releases(node) WHERE settled IS NULL;
    """,
]


class RegistryError(RuntimeError):
    pass


class _Unchanged(Exception):
    """A write found nothing to do once it looked inside its transaction: roll it back, quietly."""


class Conflict(RegistryError):
    """A conditional write found the registry in another state than it requires; `reason` is
    the refusal code the caller reports (the transaction, audit entry included, rolled back)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.reason, str(self))


# (prev hash, entry) -> (hash, signature): the audit chain's next link, set by the Coordinator
# (audit.py), so every decision's entry is written in the decision's own transaction.
Auditor = Callable[[str, dict[str, Any]], tuple[str, str | None]]
Audit = dict[str, Any] | None  # {"kind", "node", "vm", "data"}
LOCAL_ENGINE = "local"  # the engine an embedded TC serves (a served TC names each by its certificate; reserved)
MIGRATION_LEASE = 360.0  # seconds a migration's start leases its source to its engine: its tickets' life and a minute
# A placement check a write runs again inside its transaction, on the VMs there and on their
# way (Registry.placed_on); it raises Conflict to refuse.
Guard = Callable[[list[dict[str, Any]]], None] | None


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


_AUDIT_HEAD = "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"
# How long a released key may still be launched: its ticket's life, and a minute for the clocks.
RELEASE_EXPIRY = TICKET_TTL + 60
# Whether release r's node has rebooted since r's tickets could last be used: its newest trusted
# boot is above the boot its first trusted attestation after that time found (a VM a ticket
# started ran in that boot or an earlier one). Takes RELEASE_EXPIRY; not known counts as no.
_REBOOTED_SINCE_SPENT = (
    "(CASE WHEN (SELECT reset_count FROM attestations WHERE node = r.node AND verdict = 'trusted' AND reset_count IS "
    "NOT NULL ORDER BY id DESC LIMIT 1) > (SELECT reset_count FROM attestations WHERE node = r.node AND verdict = "
    "'trusted' AND reset_count IS NOT NULL AND time >= r.time + ? ORDER BY time LIMIT 1) THEN 1 ELSE 0 END = 1)")


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
        self.auditor: Auditor | None = None
        self._standing_sql = self._standing_query()
        self._identity_sql = self._joined_query(
            "identities i", (("roster", "r"),), "roster r ON r.ek IN ('sha256:' || i.ek_fingerprint, i.ek_key_fingerprint)",
            "i.node = ? ORDER BY r.site, r.name, r.ek")
        self._request_sql = self._joined_query("requests q", (("images", "m"),), "images m ON m.vm_id = q.vm_id", "q.id = ?")

    @property
    def version(self) -> int:
        return self.backend.version()

    def transaction(self, serialize: bool = False):  # type: ignore[no-untyped-def]
        """A write. serialize: one at a time across every process on this registry, as an audit
        entry needs; such a transaction reads the audit chain's head first (`_audit`), in the
        round trip that takes the lock."""
        return self.backend.transaction(serialize, _AUDIT_HEAD if serialize else None)

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

    def enroll(self, node: str, site: str | None, address: str, identity: dict[str, Any], audit: Audit = None) -> None:
        """Bind node to its TPM, once: a node that has an identity keeps it (a changed TPM is the
        operator's `tc nodes replace-tpm`), and an EK bound to one node is never bound to another.
        Checked here, inside the write, so two racing enrollments cannot both pass."""
        now = time.time()
        with self.transaction(serialize=True) as db:
            other = db.execute("SELECT node FROM identities WHERE ek_fingerprint = ?", (identity["ek_fingerprint"],)).first()
            if other is not None:
                raise Conflict("ek.duplicate", f"this TPM is enrolled as {other['node']}; one EK is one node")
            if db.execute("SELECT node FROM identities WHERE node = ?", (node,)).first() is not None:
                raise Conflict("ek.changed", f"{node} is enrolled with another TPM; a changed TPM is the TC operator's "
                                             f"decision: tccdeploy tc nodes replace-tpm {node}")
            db.execute(
                "INSERT INTO nodes (name, state, site, address, created, updated) VALUES (?, 'enrolled', ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET state = 'enrolled', site = excluded.site, address = excluded.address, "
                "updated = excluded.updated",
                (node, site, address, now, now),
            )
            columns = {"node": node, **identity, "enrolled_at": now}
            db.execute(f"INSERT INTO identities ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                       tuple(columns.values()))
            self._audit(db, audit)

    def identity_by_ek(self, ek_fingerprint: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM identities WHERE ek_fingerprint = ?", (ek_fingerprint,))

    def replace_tpm(self, node: str, audit: Audit = None) -> bool:
        """The operator's decision that node's TPM changed: its identity and certificates go, and
        it enrolls again (with an EK on the roster). True if it had an identity."""
        with self.transaction(serialize=True) as db:
            gone = db.execute("DELETE FROM identities WHERE node = ?", (node,)).rowcount
            if gone != 1:
                return False
            db.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (time.time(), node))
            db.execute("UPDATE nodes SET state = 'retired', updated = ? WHERE name = ?", (time.time(), node))
            self._audit(db, audit)
        return True

    # -- the roster -----------------------------------------------------------------------
    def roster(self, eks: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The operator's roster entries; eks: only those for these EK names (a decision's lookup)."""
        if eks is None:
            return self._all("SELECT * FROM roster ORDER BY site, name, ek")
        if not eks:
            return []
        return self._all(f"SELECT * FROM roster WHERE ek IN ({', '.join('?' * len(eks))}) ORDER BY site, name, ek", eks)

    def roster_add(self, ek: str, site: str, name: str | None, capacity: int | None, audit: Audit = None) -> None:
        try:
            with self.transaction(serialize=True) as db:
                db.execute("INSERT INTO roster (ek, site, name, capacity, added) VALUES (?, ?, ?, ?, ?)",
                           (ek, site, name, capacity, time.time()))
                self._audit(db, audit)
        except self.backend.integrity_error:
            raise Conflict("roster.duplicate", f"{ek} or the name {name!r} is on the roster already; remove it first") from None

    def roster_remove(self, ek: str, audit: Audit = None) -> bool:
        with self.transaction(serialize=True) as db:
            if db.execute("DELETE FROM roster WHERE ek = ?", (ek,)).rowcount != 1:
                return False
            self._audit(db, audit)
        return True

    def identity(self, node: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM identities WHERE node = ?", (node,))

    def identity_and_roster(self, node: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(node's identity, the operator's roster entries for its enrolled EK), as `identity` and
        `roster(roster.enrolled_identities(identity))` read them, in one read: every decision about
        a node weighs both. (The join names the EK as enrolled_identities does: the certificate's
        fingerprint with its prefix, then the public key's.)"""
        rows = self._all(self._identity_sql, (node,))
        if not rows:
            return None, []
        split = [_split(row, ("r",)) for row in rows]
        return split[0][0], [entry for _, (entry,) in split if entry["ek"] is not None]

    # -- nonces ---------------------------------------------------------------------------
    def new_nonce(self, node: str, purpose: str, nonce: str, ttl: float) -> None:
        """A nonce the TC issued (used once, until now + ttl); records expired an hour ago go, and
        the replay horizon moves up to there (it never moves back: see use_once)."""
        now = time.time()
        cutoff = now - 3600
        with self.transaction() as db:
            db.execute("INSERT INTO horizons (name, until) VALUES ('used', ?) ON CONFLICT (name) DO UPDATE SET "
                       "until = CASE WHEN excluded.until > horizons.until THEN excluded.until ELSE horizons.until END",
                       (cutoff,))
            db.execute("DELETE FROM nonces WHERE expires < (SELECT until FROM horizons WHERE name = 'used')")
            db.execute("INSERT INTO nonces (nonce, node, purpose, created, expires) VALUES (?, ?, ?, ?, ?)",
                       (nonce, node, purpose, now, now + ttl))

    _USE_NONCE = ("UPDATE nonces SET used_at = ? WHERE nonce = ? AND node = ? AND purpose = ? AND used_at IS NULL "
                  "AND expires >= ?")

    def consume_nonce(self, node: str, purpose: str, nonce: str) -> NonceCheck:
        """Use a nonce once: the single UPDATE is what makes replay impossible, even across processes."""
        now = time.time()
        with self.transaction() as db:
            changed = db.execute(self._USE_NONCE, (now, nonce, node, purpose, now)).rowcount
            row = db.execute("SELECT * FROM nonces WHERE nonce = ?", (nonce,)).first()
        return self._nonce_check(changed == 1, row, node, purpose)

    def check_nonce(self, node: str, purpose: str, nonce: str) -> NonceCheck:
        """What consume_nonce would answer, without using the nonce: the decision that relies on it
        uses it in its own transaction (add_attestation), so a crash before that leaves it unused."""
        row = self._one("SELECT * FROM nonces WHERE nonce = ?", (nonce,))
        usable = (row is not None and row["node"] == node and row["purpose"] == purpose and row["used_at"] is None
                  and row["expires"] >= time.time())
        return self._nonce_check(usable, row, node, purpose)

    @staticmethod
    def _nonce_check(usable: bool, row: dict[str, Any] | None, node: str, purpose: str) -> NonceCheck:
        if usable and row is not None:
            return NonceCheck(True, created=row["created"])
        if row is None:
            return NonceCheck(False, "nonce.unknown")
        if row["node"] != node or row["purpose"] != purpose:
            return NonceCheck(False, "nonce.other-node")
        if row["used_at"] is not None:
            return NonceCheck(False, "nonce.replayed")
        return NonceCheck(False, "nonce.expired")

    def use_once(self, token: str, purpose: str, valid_until: float) -> str | None:
        """Record token as used: None, or why not: "replayed" (used before, by any process or
        replica) or "horizon" (its record could have been purged already: valid_until, when the
        token stops being acceptable by its own terms such as a signed time plus the skew
        allowed, is at or below the replay horizon). The horizon only rises, so no clock moved
        back makes a used token new again (tokens are refused until the clock passes it)."""
        now = time.time()
        try:
            with self.transaction() as db:
                horizon = db.execute("SELECT until FROM horizons WHERE name = 'used'").first()
                if horizon is not None and valid_until <= float(horizon["until"]):
                    return "horizon"
                db.execute("INSERT INTO nonces (nonce, node, purpose, created, expires, used_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (token, "-", purpose, now, valid_until, now))
        except self.backend.integrity_error:
            return "replayed"
        return None

    # -- attestations ---------------------------------------------------------------------
    def add_attestation(self, node: str, record: dict[str, Any], audit: Audit = None,
                        quarantine: Audit = None, rebooted: Callable[[list[str]], Audit] | None = None,
                        use_nonce: str | None = None) -> int:
        """Record a verdict with its audit entry; an untrusted one quarantines an admitted node in
        the same transaction (quarantine: its audit entry), so no crash leaves a failed node admitted.
        A trusted quote whose TPM resetCount is above a VM's boot proves that VM's memory gone:
        the VM is off, in the same transaction (rebooted: the audit entry for those VMs).
        use_nonce: the quote nonce the verdict relied on, used here, once (Conflict if it was not
        free any more: another submission of it won)."""
        with self.transaction(serialize=True) as db:
            now = time.time()
            if use_nonce is not None and db.execute(self._USE_NONCE, (now, use_nonce, node, "quote", now)).rowcount != 1:
                raise Conflict("nonce.replayed", "the quote's nonce was used meanwhile (the same evidence sent twice?)")
            row = db.execute(
                "INSERT INTO attestations (node, time, nonce, verdict, reasons, warnings, pcr_digest, reset_count, "
                "restart_count, build, pcr_values, evidence_sha256, platform) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (node, now, record.get("nonce"), record["verdict"], json.dumps(record.get("reasons", [])),
                 json.dumps(record.get("warnings", [])), record.get("pcr_digest"), record.get("reset_count"),
                 record.get("restart_count"), record.get("build"), json.dumps(record.get("pcr_values") or {}),
                 record.get("evidence_sha256"), record.get("platform")),
            ).first()
            attestation_id = int(row["id"]) if row else 0
            if record["verdict"] == "trusted" and record.get("build"):
                db.execute("UPDATE nodes SET build = ?, platform = ?, updated = ? WHERE name = ?",
                           (record["build"], record.get("platform"), time.time(), node))
            self._audit(db, audit, id=attestation_id)
            if record["verdict"] == "trusted" and record.get("reset_count") is not None:
                gone = [r["vm_id"] for r in db.execute(
                    "UPDATE vms SET state = 'off', updated = ? WHERE node = ? AND boot IS NOT NULL AND boot < ? "
                    "AND state IN ('starting', 'running', 'stopped') RETURNING vm_id",
                    (time.time(), node, record["reset_count"])).fetchall()]
                if gone and rebooted is not None:
                    self._audit(db, rebooted(sorted(gone)))
                # A key released here can have started nothing still running once the node rebooted
                # after its tickets were spent (its launch unrecorded: the request failed or expired).
                db.defer("UPDATE releases SET settled = ? WHERE node = ? AND settled IS NULL AND (SELECT reset_count FROM "
                         "attestations c WHERE c.node = releases.node AND c.verdict = 'trusted' AND c.reset_count IS NOT NULL "
                         "AND c.time >= releases.time + ? ORDER BY c.time LIMIT 1) < ?",
                         (now, node, RELEASE_EXPIRY, record["reset_count"]))
            if quarantine is not None:
                self._quarantine(db, node, quarantine)
            return attestation_id

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

    def attestation_of(self, node: str, nonce: str, evidence_sha256: str) -> dict[str, Any] | None:
        """The verdict recorded for this very evidence (node, nonce and quote), if any."""
        row = self._one("SELECT * FROM attestations WHERE node = ? AND nonce = ? AND evidence_sha256 = ? ORDER BY id",
                        (node, nonce, evidence_sha256))
        return self._attestation_row(row) if row else None

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

    def admit(self, node: str, certificate: dict[str, Any], after_reboot: bool = False, audit: Audit = None) -> None:
        """Record the node certificate and make the node admitted, in one transaction, only from a
        state that allows it: enrolled or admitted and not quarantined since the attestation it
        relies on; quarantined only when the perimeter readmits after a reboot and that
        attestation shows the TPM reset since the quarantine."""
        with self.transaction(serialize=True) as db:
            att = db.execute("SELECT time, reset_count FROM attestations WHERE id = ? AND node = ?",
                             (certificate["attestation"], node)).first()
            if att is None:
                raise Conflict("admit.not-trusted", "the attestation admission relies on is not this node's")
            # A verdict that failed since then stands, admitted or not: a node only enrolled is not
            # quarantined by it, and its first admission completed after it (found in review).
            if db.execute("SELECT 1 FROM attestations WHERE node = ? AND id > ? AND verdict != 'trusted'",
                          (node, certificate["attestation"])).first():
                raise Conflict("admit.not-trusted", f"{node} failed an attestation after the one admission relies on: "
                                                    "attest it again, then admit")
            changed = db.execute(
                "UPDATE nodes SET state = 'admitted', build = ?, updated = ? WHERE name = ? AND ("
                "(state IN ('enrolled', 'admitted') AND (quarantined_at IS NULL OR quarantined_at < ?)) OR "
                "(? AND state = 'quarantined' AND quarantined_at < ? AND quarantine_reset IS NOT NULL AND quarantine_reset < ?))",
                (certificate["build"], time.time(), node, att["time"], after_reboot, att["time"], att["reset_count"] or 0),
            ).rowcount
            if changed != 1:
                raise Conflict("admit.quarantined", f"{node} is quarantined (or was, after the attestation admission "
                                                    f"relies on): it stays out until the TC's operator runs "
                                                    f"`tccdeploy tc nodes release {node}`")
            db.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (time.time(), node))
            db.execute("INSERT INTO certificates (serial, node, attestation, tk_name, not_after, pem) VALUES (?, ?, ?, ?, ?, ?)",
                       (certificate["serial"], node, certificate["attestation"], certificate["tk_name"],
                        certificate["not_after"], certificate["pem"]))
            self._audit(db, audit)

    def _quarantine(self, db: Any, node: str, audit: Audit) -> bool:
        last = db.execute("SELECT reset_count FROM attestations WHERE node = ? ORDER BY id DESC LIMIT 1", (node,)).first()
        now = time.time()
        changed = db.execute("UPDATE nodes SET state = 'quarantined', updated = ?, quarantined_at = ?, quarantine_reset = ? "
                             "WHERE name = ? AND state = 'admitted'",
                             (now, now, last["reset_count"] if last else None, node)).rowcount
        if changed != 1:
            return False
        db.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (now, node))
        self._audit(db, audit)
        return True

    def quarantine(self, node: str, audit: Audit = None, engine: str | None = None) -> bool:
        """Revoke the node's certificates and quarantine it; True if it was admitted (one caller wins).
        engine: the engine asking, refused (Conflict node.leased) while another engine leases node."""
        with self.transaction(serialize=True) as db:
            if engine is not None:
                self._not_leased_elsewhere(db, node, engine)
            return self._quarantine(db, node, audit)

    # -- node leases ----------------------------------------------------------------------
    def lease_nodes(self, engine: str, nodes: list[str], seconds: float) -> dict[str, dict[str, Any]]:
        """Lease each node to engine for seconds, where no other engine holds a live lease on it
        (the holder renews its own, never for less than it holds). Per node: {"engine", "until"}
        of the lease that stands, the asker's if granted; engine "" for a node the registry does
        not know (nothing is stored for it: an engine cannot fill the table with names). One
        conditional upsert for the whole list, under the lock every decision takes (on PostgreSQL's
        read committed, a lease written between another engine's lease check and its write would
        be granted for a node that engine is acting on; found in review), so a round's 20,000
        nodes hold that lock for two statements, not 20,000. The engine must still be there
        (_engine_present), checked in this write."""
        now = time.time()
        # the list as one parameter: an array on PostgreSQL, JSON for SQLite's json_each
        listed, values = (("unnest(CAST(? AS TEXT[])) AS n(value)", nodes) if self.kind == "postgresql"
                          else ("json_each(?) AS n", json.dumps(nodes)))
        with self.transaction(serialize=True) as db:
            self._engine_present(db, engine)
            db.execute(
                f"INSERT INTO node_leases (node, engine, until) SELECT n.value, ?, ? FROM {listed} "
                "WHERE EXISTS (SELECT 1 FROM nodes WHERE name = n.value) "
                "ON CONFLICT (node) DO UPDATE SET engine = excluded.engine, "
                "until = CASE WHEN node_leases.engine = excluded.engine AND node_leases.until > excluded.until "
                "THEN node_leases.until ELSE excluded.until END "
                "WHERE node_leases.engine = excluded.engine OR node_leases.until <= ?",
                (engine, now + seconds, values, now))
            standing = {r["node"]: {"engine": r["engine"], "until": r["until"]} for r in db.execute(
                f"SELECT node, engine, until FROM node_leases WHERE node IN (SELECT n.value FROM {listed})",
                (values,)).fetchall()}
        return {node: standing.get(node) or {"engine": "", "until": 0.0} for node in nodes}

    def release_leases(self, engine: str, nodes: list[str]) -> int:
        """End engine's own leases on these nodes (another engine's stay); how many ended."""
        with self.transaction() as db:
            return sum(db.execute("DELETE FROM node_leases WHERE node = ? AND engine = ?", (node, engine)).rowcount
                       for node in nodes)

    def lease_of(self, node: str) -> dict[str, Any] | None:
        """The live lease on node ({"engine", "until"}), or None."""
        return self._one("SELECT engine, until FROM node_leases WHERE node = ? AND until > ?", (node, time.time()))

    @staticmethod
    def _engine_present(db: Any, engine: str) -> None:
        """Conflict lease.engine-removed unless engine is one of the engines table not removed (or
        an embedded TC's own): a call authenticated just before `tc engines remove` ended the
        engine's leases made new ones after it (found in review). Checked in the write that leases."""
        if engine != LOCAL_ENGINE and not db.execute("SELECT 1 FROM engines WHERE name = ? AND revoked IS NULL",
                                                     (engine,)).first():
            raise Conflict("lease.engine-removed", f"engine {engine} is removed (or unknown): it leases nothing")

    @staticmethod
    def _not_leased_elsewhere(db: Any, node: str, engine: str) -> None:
        held = db.execute("SELECT engine, until FROM node_leases WHERE node = ? AND until > ? AND engine != ?",
                          (node, time.time(), engine)).first()
        if held is not None:
            raise Conflict("node.leased", f"engine {held['engine']} leases {node} for its round (for "
                                          f"{max(0, held['until'] - time.time()):.0f} s more): that engine acts on it")

    def release_node(self, node: str, audit: Audit = None) -> bool:
        """The operator's release of a quarantined node: enrolled again, to be attested and
        admitted on a quote newer than the quarantine."""
        with self.transaction(serialize=True) as db:
            if db.execute("UPDATE nodes SET state = 'enrolled', updated = ? WHERE name = ? AND state = 'quarantined'",
                          (time.time(), node)).rowcount != 1:
                return False
            self._audit(db, audit)
        return True

    # -- customers, requests, VMs -----------------------------------------------------------
    def add_customer(self, name: str, key: str, key_id: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO customers (name, key, key_id, added) VALUES (?, ?, ?, ?)", (name, key, key_id, time.time()))

    def customer_by_key(self, key: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM customers WHERE key = ?", (key,))

    def customers(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM customers ORDER BY name")

    def accept_request(self, record: dict[str, Any], key_id: str, audit: Audit = None) -> None:
        """Record a request, once, for an image its customer owns and of which no copy may still run.

        The image (its vm_id) belongs to the customer who first submitted it; a VM with a copy
        not proven gone (a row not destroyed, an open request, a key released for a launch that
        failed on a node that has not rebooted since) blocks another request for it. All
        checked and written in one transaction: Conflict names what was refused."""
        vm_id = record["vm_id"]
        try:
            with self.transaction(serialize=True) as db:
                if db.execute("SELECT 1 FROM requests WHERE id = ?", (record["id"],)).first() is not None:
                    raise Conflict("request.replayed", f"request {record['id']} was submitted before; a request is accepted once")
                owner = db.execute("SELECT customer, image_sha256 FROM images WHERE vm_id = ?", (vm_id,)).first()
                if owner is not None and owner["customer"] != record["customer"]:
                    raise Conflict("request.image-owner", f"image {vm_id} belongs to another customer: a sealed image is "
                                                          "launched only by the customer who first submitted it")
                if owner is None:
                    db.execute("INSERT INTO images (vm_id, customer, key_id, image_sha256, added) VALUES (?, ?, ?, ?, ?)",
                               (vm_id, record["customer"], key_id, record["image_sha256"], time.time()))
                # (a VM off has no memory anywhere: only a new launch, through the TC, runs it again)
                running = db.execute("SELECT state FROM vms WHERE vm_id = ? AND state NOT IN ('destroyed', 'off')",
                                     (vm_id,)).first()
                open_request = db.execute("SELECT id, state FROM requests WHERE vm_id = ? AND state IN ('accepted', 'released')",
                                          (vm_id,)).first()
                unproven = db.execute(
                    "SELECT r.node FROM releases r JOIN attestations a ON a.id = r.attestation "
                    "JOIN requests q ON q.id = r.request WHERE r.vm_id = ? AND q.state = 'failed' AND NOT EXISTS ("
                    "SELECT 1 FROM attestations b WHERE b.node = r.node AND b.verdict = 'trusted' "
                    "AND b.reset_count > a.reset_count)", (vm_id,)).first()
                if running is not None or open_request is not None or unproven is not None:
                    where = (f"it is {running['state']}" if running else
                             f"request {open_request['id']} for it is {open_request['state']}" if open_request else
                             f"its key went to {unproven['node']} for a launch reported failed, and that node has not "
                             "rebooted since")
                    raise Conflict("request.vm-exists", f"a copy of VM {vm_id} may still run ({where}): one image runs "
                                                        "once; destroy it first")
                db.execute("INSERT INTO requests (id, customer, vm, vm_id, image_sha256, wrapped_key, spec, received, state) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'accepted')",
                           (record["id"], record["customer"], record["vm"], vm_id, record["image_sha256"],
                            record["wrapped_key"], json.dumps(record["spec"]), time.time()))
                self._audit(db, audit)
        except self.backend.integrity_error:
            raise Conflict("request.vm-exists", f"another request for VM {vm_id} is open") from None

    def request(self, request_id: str) -> dict[str, Any] | None:
        item = self._one("SELECT * FROM requests WHERE id = ?", (request_id,))
        if item is None:
            return None
        item["spec"] = json.loads(item["spec"])
        return item

    def fail_request(self, request_id: str, audit: Audit = None) -> str | None:
        """accepted or released -> failed; the state it left, or None (launched and failed stay)."""
        with self.transaction(serialize=True) as db:
            row = db.execute("SELECT state FROM requests WHERE id = ?", (request_id,)).first()
            if row is None or row["state"] not in ("accepted", "released"):
                return None
            if db.execute("UPDATE requests SET state = 'failed' WHERE id = ? AND state = ?",
                          (request_id, row["state"])).rowcount != 1:
                return None
            # (its release is over, not settled: it counts on its node until that node reboots)
            db.defer("UPDATE releases SET expired = ? WHERE request = ? AND expired IS NULL", (time.time(), request_id))
            self._audit(db, audit, left=row["state"])
            return str(row["state"])

    def record_release(self, request_id: str, vm_id: str, node: str, attestation: int, serial: str,
                       audit: Audit = None, ticket: str | None = None, guard: Guard = None) -> bool:
        """One release per request: the conditional UPDATE, the insert and its audit entry are one
        transaction (guard: the placement check on node, run again inside it)."""
        with self.transaction(serialize=True) as db:
            # (the UPDATE first: it goes with the lock in one round trip; a guard that fails undoes it)
            changed = db.execute("UPDATE requests SET state = 'released' WHERE id = ? AND state = 'accepted'",
                                 (request_id,)).rowcount
            if changed != 1:
                return False
            self._guarded(db, guard, node)
            db.defer("INSERT INTO releases (vm_id, request, node, attestation, certificate_serial, time, ticket) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (vm_id, request_id, node, attestation, serial, time.time(), ticket))
            self._audit(db, audit)
        return True

    def reissue_release(self, release_id: int, previous_ticket: str, attestation: int, serial: str, ticket: str,
                        audit: Audit = None, limit: int = 8, guard: Guard = None) -> bool:
        """The same node's release again, under a fresh ticket that supersedes the last (kept, so
        the node's evidence may name whichever it used): only while the request still waits for
        its launch, only from the ticket the caller saw (a concurrent reissue wins), at most
        `limit` tickets per release. One transaction with its audit entry."""
        with self.transaction(serialize=True) as db:
            if guard is not None:
                placed = db.execute("SELECT node FROM releases WHERE id = ?", (release_id,)).first()
                if placed is not None:
                    self._guarded(db, guard, placed["node"])
            row = db.execute("SELECT r.superseded, q.state FROM releases r JOIN requests q ON q.id = r.request "
                             "WHERE r.id = ? AND r.ticket = ? AND r.expired IS NULL", (release_id, previous_ticket)).first()
            if row is None or row["state"] != "released":
                return False
            superseded = row["superseded"].split() + [previous_ticket]
            if len(superseded) + 1 > limit:
                raise Conflict("release.reissue-limit", f"this release was issued {limit} times; fail the request "
                                                        "and submit it again")
            db.execute("UPDATE releases SET ticket = ?, superseded = ?, attestation = ?, certificate_serial = ?, time = ? "
                       "WHERE id = ?", (ticket, " ".join(superseded), attestation, serial, time.time(), release_id))
            self._audit(db, audit)
        return True

    def expire_releases(self, cutoff: float, audit: Callable[[dict[str, Any]], Audit],
                        request: str | None = None) -> list[str]:
        """released -> accepted for every request (or the one named) whose last release was made
        before cutoff and no launch settled: each in its own transaction with its audit entry. The
        release row stays (expired), so the key's last node is still known to whoever releases it next."""
        due = self._all("SELECT r.id, r.request, r.node, r.vm_id, r.ticket FROM releases r JOIN requests q "
                        "ON q.id = r.request WHERE q.state = 'released' AND r.expired IS NULL AND r.time < ?"
                        + (" AND r.request = ?" if request is not None else ""),
                        (cutoff, request) if request is not None else (cutoff,))
        expired = []
        for row in due:
            try:
                with self.transaction(serialize=True) as db:
                    # The release first, as it stands now: one reissued since `due` was read (a fresh
                    # ticket) is not expired and its request stays released (found in review: it went
                    # back to accepted with the fresh ticket alive).
                    if db.execute("UPDATE releases SET expired = ? WHERE id = ? AND time < ? AND expired IS NULL",
                                  (time.time(), row["id"], cutoff)).rowcount != 1:
                        raise _Unchanged
                    if db.execute("UPDATE requests SET state = 'accepted' WHERE id = ? AND state = 'released'",
                                  (row["request"],)).rowcount != 1:
                        raise _Unchanged  # (launched or failed meanwhile: the release stays as it was)
                    self._audit(db, audit(row))
            except _Unchanged:
                continue
            expired.append(str(row["request"]))
        return expired

    def record_launch(self, request_id: str, vm: dict[str, Any], receipt: Callable[[], dict[str, Any]],
                      audit: Audit = None) -> dict[str, Any]:
        """released -> launched, once; the VM row (new, or replacing a destroyed one) and the
        receipt in the same transaction. A replay or a VM revived from the dead is a Conflict."""
        now = time.time()
        row = {"launched": now, "anti_affinity": None, "boot": None, **vm, "updated": now, "placed": now}
        columns = ("vm_id", "name", "customer", "node", "state", "image_sha256", "request", "vcpus", "memory_mib",
                   "anti_affinity", "launched", "updated", "boot", "placed")
        with self.transaction(serialize=True) as db:
            if db.execute("UPDATE requests SET state = 'launched' WHERE id = ? AND state = 'released'",
                          (request_id,)).rowcount != 1:
                raise Conflict("launch.replayed", f"request {request_id} is not waiting for its launch (launched already, "
                                                  "failed, or its key never released)")
            changed = db.execute(
                f"INSERT INTO vms ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) ON CONFLICT(vm_id) DO "
                "UPDATE SET name = excluded.name, customer = excluded.customer, node = excluded.node, "
                "state = excluded.state, request = excluded.request, vcpus = excluded.vcpus, "
                "memory_mib = excluded.memory_mib, anti_affinity = excluded.anti_affinity, launched = excluded.launched, "
                "updated = excluded.updated, boot = excluded.boot, placed = excluded.placed "
                "WHERE vms.state IN ('destroyed', 'off')", tuple(row[c] for c in columns)).rowcount
            if changed != 1:
                raise Conflict("request.vm-exists", f"VM {vm['vm_id']} is recorded running already")
            signed = receipt()
            db.defer("INSERT INTO receipts (request, receipt, time) VALUES (?, ?, ?)", (request_id, json.dumps(signed), now))
            # (the VM row counts on its node now: its release is no longer on its way there)
            db.defer("UPDATE releases SET settled = ? WHERE request = ? AND settled IS NULL", (now, request_id))
            self._audit(db, audit)
        return signed

    def receipt(self, request_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT receipt FROM receipts WHERE request = ?", (request_id,))
        return json.loads(row["receipt"]) if row else None

    def releases(self, vm_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM releases WHERE vm_id = ? ORDER BY id", (vm_id,))

    def probe(self) -> None:
        """A real write (and its commit): what /readyz asks, since reads go on where writes fail."""
        with self.transaction() as db:
            db.execute("INSERT INTO horizons (name, until) VALUES ('ready', ?) ON CONFLICT (name) DO UPDATE SET "
                       "until = excluded.until", (time.time(),))

    def rebooted_since(self, node: str, attestation: int) -> bool:
        """Whether node's TPM has been reset since that attestation, shown by a trusted one: every
        VM of the earlier boot is gone (a VM does not survive its node's reset)."""
        return self._one("SELECT 1 AS yes FROM attestations b JOIN attestations a ON a.id = ? WHERE b.node = ? "
                         "AND b.verdict = 'trusted' AND b.reset_count > a.reset_count", (attestation, node)) is not None

    def image_owner(self, vm_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM images WHERE vm_id = ?", (vm_id,))

    def request_and_owner(self, request_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the request, its image's row), as `request` and `image_owner` read them, in one read:
        a key release weighs both first."""
        row = self._one(self._request_sql, (request_id,))
        if row is None:
            return None, None
        own, (image,) = _split(row, ("m",))
        own["spec"] = json.loads(own["spec"])
        return own, image if image["vm_id"] is not None else None

    def vm(self, name_or_id: str) -> dict[str, Any] | None:
        """The live VM with this id, else the one live VM of this name. An id always wins: a name
        is the customer's (or the provider's) choice and may be another VM's id, 32 hex digits; and
        a name two live VMs share names neither (Refused vm.ambiguous): the newest of them was
        taken, so a migration or a suspension could act on another customer's VM (found in review)."""
        rows = self._all("SELECT * FROM vms WHERE (vm_id = ? OR name = ?) AND state != 'destroyed' "
                         "ORDER BY CASE WHEN vm_id = ? THEN 0 ELSE 1 END, updated DESC LIMIT 2",
                         (name_or_id, name_or_id, name_or_id))
        if len(rows) > 1 and rows[0]["vm_id"] != name_or_id:
            raise Refused("vm.ambiguous", f"more than one VM is named {name_or_id!r}: name it by its VM id "
                                          "(`tccdeploy vms` lists them)")
        return rows[0] if rows else None

    def vms(self, include_destroyed: bool = False, node: str | None = None) -> list[dict[str, Any]]:
        """node: only those the registry places on node (what a placement decision weighs)."""
        query = "SELECT * FROM vms WHERE 1=1" + ("" if include_destroyed else " AND state != 'destroyed'")
        if node is not None:
            return self._all(query + " AND node = ? ORDER BY name", (node,))
        return self._all(query + " ORDER BY name")

    def arriving(self, node: str) -> list[dict[str, Any]]:
        """VMs on their way to node, as VM rows placed there (state starting): a migration started
        to it, a suspension resuming on it, a key released to it for a launch not yet recorded.
        Each will run there; placement counted only VMs already there, so two migrations (or a
        migration and a release) into one node each passed its anti-affinity and capacity check
        (found in review)."""
        return [r for r in self.placed_on(node) if r["arriving"]]

    def placed_on(self, node: str) -> list[dict[str, Any]]:
        """What a placement decision for node weighs: the VMs there (arriving 0) and those on their
        way (arriving 1), in one query."""
        return self._placed_on(self._all, node)

    def _placed_on(self, run: Callable[[str, tuple], list[dict[str, Any]]], node: str) -> list[dict[str, Any]]:
        return run(*self._placed_sql(node))

    def _placed_sql(self, node: str) -> tuple[str, tuple]:
        # A release's group read in SQL, not by parsing each request's whole spec in Python: this
        # runs inside the decision's serialized write, once per VM on the node.
        group = ("CAST(q.spec AS JSONB) #>> '{constraints,antiAffinityGroup}'" if self.kind == "postgresql"
                 else "json_extract(q.spec, '$.constraints.antiAffinityGroup')")
        return (
            "SELECT vm_id, name, customer, node, state, anti_affinity, 0 AS arriving FROM vms "
            "WHERE node = ? AND state != 'destroyed' UNION ALL "
            "SELECT v.vm_id, v.name, v.customer, m.destination, 'starting', v.anti_affinity, 1 FROM vms v "
            "JOIN migrations m ON m.vm_id = v.vm_id WHERE m.state = 'started' AND m.destination = ? UNION ALL "
            "SELECT v.vm_id, v.name, v.customer, s.resume_node, 'starting', v.anti_affinity, 1 FROM vms v "
            "JOIN suspensions s ON s.vm_id = v.vm_id WHERE s.state = 'resuming' AND s.resume_node = ? UNION ALL "
            # (a release counts until its launch is recorded, or its node proves a reboot since its
            # tickets were spent: one whose request failed or expired counts too, as the engine that
            # says so holds the ticket; found in review)
            f"SELECT q.vm_id, q.vm, q.customer, r.node, 'starting', {group}, 1 FROM releases r "
            "JOIN requests q ON q.id = r.request WHERE r.node = ? AND r.settled IS NULL "
            f"AND (r.expired IS NULL OR NOT {_REBOOTED_SINCE_SPENT})",
            (node, node, node, node, RELEASE_EXPIRY))

    def _guard_sql(self, node: str) -> tuple[str, tuple]:
        placed, params = self._placed_sql(node)
        # (the certificate's lookup by node as a parameter: PostgreSQL planned the correlated form
        # as one scan of every node's certificates)
        return ("SELECT n.state AS node_state, EXISTS (SELECT 1 FROM certificates c WHERE c.node = ? AND "
                "c.revoked_at IS NULL AND c.not_after >= ?) AS node_certified, p.* FROM nodes n "
                f"LEFT JOIN ({placed}) p ON 1 = 1 WHERE n.name = ?", (node, time.time(), *params, node))

    def _guarded(self, db: Any, guard: Guard, node: str) -> None:
        """For a decision that gives node a VM's key (a release, a migration in, a resume): node is
        still admitted with a valid certificate, and the placement guard holds on node's VMs, as
        this transaction reads them. The checks made before the write, made again where no other
        decision can come between: concurrent decisions each passed the placement check alone
        (found in review), and a release decided while the node was being quarantined committed
        after the quarantine (found in review: the engine chooses when it asks for both). One
        statement (the node's row joined to its VMs), since the registry's lock is held meanwhile."""
        if guard is None:
            return
        rows = db.execute(*self._guard_sql(node)).fetchall()
        state = rows[0]["node_state"] if rows else None
        if state != "admitted":
            raise Conflict("release.not-admitted", f"{node} is {state or 'unknown'} now, not admitted "
                                                   "(it changed while this decision was under way)")
        if not rows[0]["node_certified"]:
            raise Conflict("release.no-certificate", f"{node} has no valid node certificate now (it was revoked while "
                                                     "this decision was under way); admit it again")
        guard([r for r in rows if r["vm_id"] is not None])  # (its records take the VM's fields, not node_*)

    # What the engine may report of a VM: paused (stopped) or running, between those and from
    # starting. Nothing else is its word: a VM ends (off, destroyed) only on its node's TPM
    # evidence (end_vm) or a reboot the TPM proves (add_attestation).
    VM_TRANSITIONS = {"running": ("starting", "stopped", "running"), "stopped": ("starting", "running", "stopped")}
    # What an end ticket's evidence may end: a VM off may still be destroyed; a destroyed one stays.
    VM_ENDS = {"off": ("starting", "running", "stopped", "off"),
               "destroyed": ("starting", "running", "stopped", "off", "suspended")}

    def end_vm(self, vm_id: str, node: str, state: str, not_before: float, audit: Audit = None) -> bool:
        """The VM ended on node (off or destroyed), as its TPM showed: one conditional UPDATE, only
        for the stay on node that began no later than the end ticket was issued (not_before, in
        whole seconds); False otherwise."""
        allowed = self.VM_ENDS[state]
        with self.transaction(serialize=True) as db:
            # A resume under way may already run the VM elsewhere from this node's saved state: an
            # end ticket issued before the resume began must not record it gone (found in review).
            if db.execute("SELECT 1 FROM suspensions WHERE vm_id = ? AND state = 'resuming'", (vm_id,)).first():
                raise Conflict("vm.end-resuming", f"VM {vm_id} is being resumed: settle that first (its resume evidence)")
            marks = ", ".join("?" * len(allowed))
            if db.execute(f"UPDATE vms SET state = ?, updated = ? WHERE vm_id = ? AND node = ? AND state IN ({marks}) "
                          "AND (placed IS NULL OR placed < ?)",
                          (state, time.time(), vm_id, node, *allowed, not_before + 1)).rowcount != 1:
                return False
            if state == "destroyed":  # its saved state went with it
                db.execute("UPDATE suspensions SET state = 'aborted', updated = ? WHERE vm_id = ? "
                           "AND state IN ('started', 'suspended')", (time.time(), vm_id))
            self._audit(db, audit)
        return True

    def set_vm_state(self, vm_id: str, state: str, audit: Audit = None) -> bool:
        """One conditional UPDATE naming the states it may leave; False when the VM is not in one."""
        allowed = self.VM_TRANSITIONS.get(state, ())
        if not allowed:
            return False
        with self.transaction(serialize=True) as db:
            marks = ", ".join("?" * len(allowed))
            if db.execute(f"UPDATE vms SET state = ?, updated = ? WHERE vm_id = ? AND state IN ({marks})",
                          (state, time.time(), vm_id, *allowed)).rowcount != 1:
                return False
            self._audit(db, audit)
        return True

    # -- migrations -------------------------------------------------------------------------
    def start_migration(self, vm_id: str, source: str, destination: str, audit: Audit = None,
                        tickets: tuple[str, str] | None = None, engine: str | None = None, guard: Guard = None) -> int:
        """Record a migration of vm_id from source (one started per VM); engine: the engine asking,
        refused (Conflict node.leased) while another engine leases the source."""
        try:
            with self.transaction(serialize=True) as db:
                if engine is not None:
                    self._engine_present(db, engine)
                    self._not_leased_elsewhere(db, source, engine)
                    # the source is the starter's until the migration's tickets are spent or dead:
                    # another engine's repair takes a migration under way for an interrupted one
                    until = time.time() + MIGRATION_LEASE
                    db.execute("INSERT INTO node_leases (node, engine, until) VALUES (?, ?, ?) ON CONFLICT (node) DO "
                               "UPDATE SET engine = excluded.engine, until = CASE WHEN node_leases.engine = "
                               "excluded.engine AND node_leases.until > excluded.until THEN node_leases.until "
                               "ELSE excluded.until END", (source, engine, until))
                self._guarded(db, guard, destination)
                if db.execute("SELECT 1 FROM vms WHERE vm_id = ? AND node = ? AND state IN ('running', 'stopped')",
                              (vm_id, source)).first() is None:
                    raise Conflict("migrate.unknown-vm", f"VM {vm_id} is not running on {source}")
                # (as a suspension is refused while a migration is under way: never both at once; the
                # states as suspensions_one_open names them, so SQLite looks it up by that index)
                if any(r["state"] == "started" for r in db.execute(
                        "SELECT state FROM suspensions WHERE vm_id = ? AND state IN ('started', 'suspended', 'resuming')",
                        (vm_id,)).fetchall()):
                    raise Conflict("migrate.suspending", f"VM {vm_id} is being suspended: settle that first")
                out_ticket, in_ticket = tickets or (None, None)
                row = db.execute("INSERT INTO migrations (vm_id, source, destination, state, started, out_ticket, in_ticket) "
                                 "VALUES (?, ?, ?, 'started', ?, ?, ?) RETURNING id",
                                 (vm_id, source, destination, time.time(), out_ticket, in_ticket)).first()
                self._audit(db, audit, migration=int(row["id"]) if row else 0)
        except self.backend.integrity_error:
            busy = self._one("SELECT id FROM migrations WHERE vm_id = ? AND state = 'started'", (vm_id,))
            raise RegistryError(f"VM {vm_id} is already migrating (migration {busy['id'] if busy else '?'})") from None
        return int(row["id"]) if row else 0

    def migration(self, migration_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM migrations WHERE id = ?", (migration_id,))

    def end_migration(self, migration_id: int, commit: bool, reason: str = "", audit: Audit = None,
                      boot: int | None = None, engine: str | None = None) -> None:
        """Commit moves the VM to the destination (boot: the destination TPM's resetCount it
        arrived in) in the same transaction; abort leaves it. engine: the engine asking, refused
        (Conflict node.leased) while another engine leases the source: the engine that leased the
        source for its round started the migration and ends it (another one's repair used to abort
        it under way)."""
        with self.transaction(serialize=True) as db:
            if engine is not None:
                started = db.execute("SELECT source FROM migrations WHERE id = ?", (migration_id,)).first()
                if started is not None:
                    self._not_leased_elsewhere(db, started["source"], engine)
            row = db.execute("UPDATE migrations SET state = ?, ended = ?, reason = ? WHERE id = ? AND state = 'started' "
                             "RETURNING vm_id, source, destination",
                             ("committed" if commit else "aborted", time.time(), reason, migration_id)).first()
            if row is None:
                raise RegistryError(f"migration {migration_id} is not under way")
            now = time.time()
            if commit and db.execute("UPDATE vms SET node = ?, state = 'running', updated = ?, placed = ?, boot = ? "
                                     "WHERE vm_id = ? AND node = ? AND state IN ('running', 'stopped')",
                                     (row["destination"], now, now, boot, row["vm_id"], row["source"])).rowcount != 1:
                raise Conflict("migrate.vm-moved", f"VM {row['vm_id']} is no longer on {row['source']}: nothing to commit")
            self._audit(db, audit)

    def migrations(self, state: str | None = None) -> list[dict[str, Any]]:
        if state:
            return self._all("SELECT * FROM migrations WHERE state = ? ORDER BY id", (state,))
        return self._all("SELECT * FROM migrations ORDER BY id")

    # -- suspensions ------------------------------------------------------------------------
    def start_suspension(self, vm_id: str, node: str, ksus: str, ticket: str, audit: Audit = None) -> int:
        """A suspension begins for a VM running on node (one open per VM); its id."""
        try:
            with self.transaction(serialize=True) as db:
                if db.execute("SELECT 1 FROM vms WHERE vm_id = ? AND node = ? AND state IN ('running', 'stopped')",
                              (vm_id, node)).first() is None:
                    raise Conflict("suspend.not-running", f"VM {vm_id} is not running on {node}")
                if db.execute("SELECT 1 FROM migrations WHERE vm_id = ? AND state = 'started'", (vm_id,)).first():
                    raise Conflict("suspend.migrating", f"VM {vm_id} is migrating")
                now = time.time()
                row = db.execute("INSERT INTO suspensions (vm_id, node, state, ksus, suspend_ticket, started, updated) "
                                 "VALUES (?, ?, 'started', ?, ?, ?, ?) RETURNING id",
                                 (vm_id, node, ksus, ticket, now, now)).first()
                self._audit(db, audit, suspension=int(row["id"]) if row else 0)
        except self.backend.integrity_error:
            raise Conflict("suspend.open", f"VM {vm_id} has a suspension open already") from None
        return int(row["id"]) if row else 0

    def suspension(self, suspension_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM suspensions WHERE id = ?", (suspension_id,))

    def suspensions(self, vm_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM suspensions WHERE vm_id = ? ORDER BY id", (vm_id,))

    def end_suspension(self, suspension_id: int, saved: bool, state_sha256: str | None, audit: Audit = None) -> None:
        """started -> suspended (the VM's state saved: the VM row is suspended too) or aborted."""
        with self.transaction(serialize=True) as db:
            row = db.execute("UPDATE suspensions SET state = ?, state_sha256 = ?, updated = ? WHERE id = ? "
                             "AND state = 'started' RETURNING vm_id, node",
                             ("suspended" if saved else "aborted", state_sha256, time.time(), suspension_id)).first()
            if row is None:
                raise Conflict("suspend.not-started", f"suspension {suspension_id} is not under way")
            if saved and db.execute("UPDATE vms SET state = 'suspended', updated = ? WHERE vm_id = ? AND node = ? "
                                    "AND state IN ('running', 'stopped')",
                                    (time.time(), row["vm_id"], row["node"])).rowcount != 1:
                raise Conflict("suspend.not-running", f"VM {row['vm_id']} is no longer running on {row['node']}")
            self._audit(db, audit)

    def resuming(self, suspension_id: int, node: str, ticket: str, audit: Audit = None, guard: Guard = None) -> None:
        """suspended -> resuming on node (or resuming again on the same node: a retry); a resume on
        another node once one was allowed is a Conflict (never twice)."""
        with self.transaction(serialize=True) as db:
            self._guarded(db, guard, node)
            # resume_ticket: every resume ticket issued for it (space-separated), for the evidence
            if db.execute("UPDATE suspensions SET state = 'resuming', resume_node = ?, updated = ?, "
                          "resume_ticket = CASE WHEN state = 'resuming' THEN resume_ticket || ' ' || ? ELSE ? END "
                          "WHERE id = ? AND (state = 'suspended' OR (state = 'resuming' AND resume_node = ?))",
                          (node, time.time(), ticket, ticket, suspension_id, node)).rowcount != 1:
                row = db.execute("SELECT state, resume_node FROM suspensions WHERE id = ?", (suspension_id,)).first()
                where = f" on {row['resume_node']}" if row and row["resume_node"] else ""
                raise Conflict("suspend.resumed", f"suspension {suspension_id} is {row['state'] if row else 'unknown'}"
                                                  f"{where}: a suspended state resumes once, on one node")
            self._audit(db, audit)

    def resumed(self, suspension_id: int, boot: int, audit: Audit = None) -> None:
        """resuming -> resumed: the VM runs on the resume node (one transaction)."""
        with self.transaction(serialize=True) as db:
            row = db.execute("UPDATE suspensions SET state = 'resumed', updated = ? WHERE id = ? AND state = 'resuming' "
                             "RETURNING vm_id, resume_node", (time.time(), suspension_id)).first()
            if row is None:
                raise Conflict("suspend.not-resuming", f"suspension {suspension_id} is not being resumed")
            now = time.time()
            if db.execute("UPDATE vms SET state = 'running', node = ?, updated = ?, placed = ?, boot = ? "
                          "WHERE vm_id = ? AND state = 'suspended'",
                          (row["resume_node"], now, now, boot, row["vm_id"])).rowcount != 1:
                raise Conflict("suspend.not-suspended", f"VM {row['vm_id']} is no longer suspended in the records")
            self._audit(db, audit)

    # -- audit ----------------------------------------------------------------------------
    def _audit(self, db: Any, audit: Audit, **extra: Any) -> dict[str, Any] | None:
        """The audit chain's next link, inside the caller's transaction, which must be serialized
        (BEGIN IMMEDIATE in SQLite, the advisory lock in PostgreSQL) so concurrent writers,
        replicas included, still make one linear chain."""
        if audit is None:
            return None
        if self.auditor is None:
            raise RegistryError("the registry has no auditor: decisions are written only with their audit entry")
        if not db.serialized:
            raise RegistryError("an audit entry is written only in a serialized transaction (one chain, not two)")
        # The head as the transaction read it once it held the lock; after an entry of its own, that one.
        if db.first is None:
            db.first = db.execute(_AUDIT_HEAD).fetchall()
        last = db.first[0] if db.first else None
        # (the canonical form: what is hashed is exactly what is stored and read back)
        entry = {"id": (int(last["id"]) + 1) if last else 1, "time": time.time(), "kind": auditform.text(audit["kind"]),
                 "node": auditform.text(audit.get("node")), "vm": auditform.text(audit.get("vm")),
                 "data": auditform.data({**audit.get("data", {}), **extra})}
        prev = last["hash"] if last else "0" * 64
        digest, signature = self.auditor(prev, entry)
        db.defer("INSERT INTO audit (id, time, kind, node, vm, data, prev, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (entry["id"], entry["time"], entry["kind"], entry["node"], entry["vm"],
                  json.dumps(entry["data"], sort_keys=True), prev, digest, signature))
        db.first = [{"id": entry["id"], "hash": digest}]
        return entry | {"prev": prev, "hash": digest, "signature": signature}

    def audit_append(self, audit: dict[str, Any]) -> dict[str, Any]:
        """An entry that records no other write (a refusal, an enforcement outcome)."""
        with self.transaction(serialize=True) as db:
            entry = self._audit(db, audit)
        assert entry is not None
        return entry

    def audit_entries(self, node: str | None = None, vm: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM audit WHERE 1=1", list[Any]()
        for column, value in (("node", node), ("vm", vm)):
            if value is not None:
                query += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            query += " AND time >= ?"
            params.append(since)
        rows = self._all(query + " ORDER BY id", tuple(params))
        return [dict(r) | {"data": json.loads(r["data"])} for r in rows]

    def audit_after(self, cursor: int, limit: int) -> list[dict[str, Any]]:
        """The entries after id cursor, oldest first: what a webhook has still to deliver."""
        rows = self._all("SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit))
        return [dict(r) | {"data": json.loads(r["data"])} for r in rows]

    def audit_head(self) -> int:
        row = self._one("SELECT MAX(id) AS head FROM audit")
        return int(row["head"] or 0) if row else 0

    # -- webhooks -----------------------------------------------------------------------------
    def add_webhook(self, name: str, url: str, secret: str, events: list[str], cursor: int) -> bool:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM webhooks WHERE name = ?", (name,)).fetchall():
                return False
            db.execute("INSERT INTO webhooks (name, url, secret, events, created, cursor, checkpoint) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, url, secret, json.dumps(events), time.time(), cursor, cursor))
        return True

    def remove_webhook(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM webhooks WHERE name = ?", (name,)).rowcount == 1

    def webhooks(self) -> list[dict[str, Any]]:
        return [dict(r) | {"events": json.loads(r["events"])} for r in self._all("SELECT * FROM webhooks ORDER BY name")]

    def lease_webhook(self, name: str, owner: str, seconds: float, dead: str | None = None) -> bool:
        """Take (or keep) the right to deliver this webhook's events for a while: one replica at a
        time. dead: a holder known to be gone (a process of this machine that no longer runs)."""
        now = time.time()
        with self.transaction() as db:
            return db.execute("UPDATE webhooks SET lease_owner = ?, lease_until = ? WHERE name = ? AND "
                              "(lease_until < ? OR lease_owner = ? OR lease_owner = ?)",
                              (owner, now + seconds, name, now, owner, dead or owner)).rowcount == 1

    def release_webhook_leases(self, owner: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE webhooks SET lease_until = 0 WHERE lease_owner = ?", (owner,))

    def webhook_progress(self, name: str, owner: str, cursor: int, delivered: int, checkpoint: int | None = None) -> None:
        """Events up to cursor are delivered (or not subscribed): move on, attempts reset."""
        with self.transaction() as db:
            db.execute("UPDATE webhooks SET cursor = ?, delivered = delivered + ?, attempts = 0, next_at = 0, "
                       "last_error = NULL, checkpoint = COALESCE(?, checkpoint) WHERE name = ? AND lease_owner = ?",
                       (cursor, delivered, checkpoint, name, owner))

    def webhook_failed(self, name: str, owner: str, error: str, next_at: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE webhooks SET attempts = attempts + 1, next_at = ?, last_error = ? "
                       "WHERE name = ? AND lease_owner = ?", (next_at, error, name, owner))

    # -- engines ------------------------------------------------------------------------------
    def add_engine(self, name: str, serial: str, fingerprint: str) -> None:
        """Record (or replace) an engine's certificate; the previous one stops working."""
        sql, params = _upsert("engines", "name", {"name": name, "serial": serial, "fingerprint": fingerprint,
                                                  "added": time.time(), "revoked": None})
        with self.transaction() as db:
            db.execute(sql, params)

    def revoke_engine(self, name: str) -> bool:
        """The engine's certificate no longer answered, and its node leases ended with it: a removed
        engine acts on nothing, so its leases would only keep the other engines off those nodes
        for up to a round (600 s)."""
        with self.transaction(serialize=True) as db:
            revoked = db.execute("UPDATE engines SET revoked = ? WHERE name = ? AND revoked IS NULL",
                                 (time.time(), name)).rowcount == 1
            if revoked:
                db.execute("DELETE FROM node_leases WHERE engine = ?", (name,))
            return revoked

    def engines(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM engines ORDER BY name")

    def engine_by_serial(self, serial: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM engines WHERE serial = ? AND revoked IS NULL", (serial,))

    def certificate(self, node: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM certificates WHERE node = ? AND revoked_at IS NULL ORDER BY not_after DESC", (node,))

    # The two tables a node's standing joins to its row, and the prefix of their columns there.
    _STANDING = (("attestations", "a"), ("certificates", "c"))

    def _standing_query(self) -> str:
        picked = ", ".join(f'{alias}.{column} AS "{alias}.{column}"' for table, alias in self._STANDING
                           for column in self.backend.columns(table))
        # (each row found by its key from a lookup by node, a parameter: with the node's name taken
        # from the join, PostgreSQL planned a scan of every node's attestations)
        return (f"SELECT n.*, {picked} FROM nodes n "
                "LEFT JOIN attestations a ON a.id = (SELECT MAX(id) FROM attestations WHERE node = ?) "
                "LEFT JOIN certificates c ON c.serial = (SELECT serial FROM certificates WHERE node = ? AND "
                "revoked_at IS NULL ORDER BY not_after DESC LIMIT 1) WHERE n.name = ?")

    def _joined_query(self, base: str, joined: tuple[tuple[str, str], ...], on: str, where: str) -> str:
        """SELECT base's columns and each joined table's as "alias.column" (split again by _split)."""
        picked = ", ".join(f'{alias}.{column} AS "{alias}.{column}"' for table, alias in joined
                           for column in self.backend.columns(table))
        return f"SELECT {base.split()[1]}.*, {picked} FROM {base} LEFT JOIN {on} WHERE {where}"

    def standing(self, node: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
        """(node's row, its newest attestation, its valid certificate), as `node`,
        `attestations(node, limit=1)` and `certificate` read them, in one read: what every
        key-giving decision weighs first, three round trips to PostgreSQL where one does."""
        row = self._one(self._standing_sql, (node, node, node))
        if row is None:
            return None, None, None
        own, (latest, certificate) = _split(row, tuple(alias for _, alias in self._STANDING))
        return (own, self._attestation_row(latest) if latest["id"] is not None else None,
                certificate if certificate["serial"] is not None else None)

    def certified_tk(self, node: str, tk_name: str) -> bool:
        """Whether the TC ever certified this trusted key (TPM name, hex) for node."""
        return self._one("SELECT 1 AS yes FROM certificates WHERE node = ? AND tk_name = ?", (node, tk_name)) is not None

    def last_certificate(self, node: str) -> dict[str, Any] | None:
        """The node's newest certificate, revoked or not: the TK it holds (a quarantined node
        keeps its TK, which opens only while its boot is still the one it was admitted with)."""
        return self._one("SELECT * FROM certificates WHERE node = ? ORDER BY not_after DESC", (node,))


def _split(row: dict[str, Any], aliases: tuple[str, ...]) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """A joined row's own columns, and each alias's ("alias.column") as a row of its own."""
    parts: dict[str, dict[str, Any]] = {alias: {} for alias in aliases}
    own = {}
    for key, value in row.items():
        alias, dot, column = key.partition(".")
        if dot and alias in parts:
            parts[alias][column] = value
        else:
            own[key] = value
    return own, tuple(parts[alias] for alias in aliases)
