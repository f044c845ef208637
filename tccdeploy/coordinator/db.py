"""Where the registry's rows live: SQLite (the default, one file) or PostgreSQL (shared by
several `tc serve` replicas). The registry writes one portable SQL for both; this module hides
the rest: placeholders, connections per thread, transactions that serialize what must be
serialized, and which exception means "that row exists already".
"""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Cursor(Protocol):
    rowcount: int

    def fetchall(self) -> list[Any]: ...


class Backend(Protocol):
    kind: str
    integrity_error: type[Exception] | tuple[type[Exception], ...]

    def transaction(self, serialize: bool = False, first: str | None = None) -> Any: ...

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]: ...

    def version(self) -> int: ...

    def columns(self, table: str) -> list[str]: ...

    def migrate(self, steps: list[str]) -> None: ...

    def close(self) -> None: ...


def is_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


class SQLiteBackend:
    """One connection for the writes, shared by the process's threads (an RLock around it), WAL,
    and every write transaction BEGIN IMMEDIATE: writers are serialized by SQLite itself, across
    processes too. A read outside a write runs on its thread's own connection: a WAL reader sees
    the last commit and waits for no writer, so a decision's reads do not queue behind another
    decision's write and its fsync (bench/tc_service.py: served key releases about 5% more a
    second). A read inside a write stays on the writer's connection, which sees its own changes."""

    kind = "sqlite"
    integrity_error = sqlite3.IntegrityError

    def __init__(self, path: str):
        self.path = path
        self._absolute = os.path.abspath(path)  # (the readers open it by name: not another folder's after a chdir)
        os.makedirs(os.path.dirname(self._absolute), mode=0o700, exist_ok=True)
        fresh = not os.path.exists(path)
        self.db = sqlite3.connect(self._absolute, timeout=30, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(path, 0o600)
        self.db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._local = threading.local()  # .reader: this thread's _Reader; .writing: inside a write
        # every live thread's, closed with the backend (a thread that ends drops its own)
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()  # not the writer's: a first read must not wait for a write
        self._closed = False
        # Readers beside the writer need WAL; where the file system refuses it, reads stay on the writer
        self._wal = str(self.db.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]).lower() == "wal"
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=30000")
        opened = os.stat(self._absolute)  # the file the writer has open: readers must open the same
        self._file = (opened.st_dev, opened.st_ino)

    @contextmanager
    def transaction(self, serialize: bool = False, first: str | None = None) -> Iterator[Any]:
        """A write; every one is serialized here. first: a read without parameters run as the
        transaction's first statement, its rows in the transaction's `first`."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._local.writing = True
            try:
                tx = _SQLiteTx(self.db)
                if first is not None:
                    tx.first = tx.execute(first).rows
                yield tx
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            finally:
                self._local.writing = False
            self.db.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        if getattr(self._local, "writing", False) or not self._wal:
            with self._lock:
                return [dict(r) for r in self.db.execute(sql, params).fetchall()]
        # (run to the end: a half-read statement would pin its snapshot and hold back checkpoints)
        return [dict(r) for r in self._reader().execute(sql, params).fetchall()]

    def _reader(self) -> sqlite3.Connection:
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            with self._readers_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                reader = _Reader(self._absolute)
                try:
                    now = os.stat(self._absolute)
                except OSError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != self._file:
                    # The name now points elsewhere (a file restored over it, or removed): reads from
                    # it beside writes to the file this backend opened would mix two registries.
                    reader.db.close()
                    raise StoreFailure("store.unavailable", f"the registry file {self._absolute} was replaced or "
                                                            "removed while the TC had it open; restart the TC")
                self._readers.add(reader)
            self._local.reader = reader
        return reader.db

    def version(self) -> int:
        with self._lock:
            return int(self.db.execute("PRAGMA user_version").fetchall()[0][0])

    def columns(self, table: str) -> list[str]:
        with self._lock:
            return [str(r["name"]) for r in self.db.execute("SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))]

    def migrate(self, steps: list[str]) -> None:
        current = self.version()
        for number in range(current, len(steps)):
            # One transaction per step: a failed migration leaves the previous version intact.
            with self._lock:
                self.db.executescript("BEGIN IMMEDIATE;" + steps[number] + f";PRAGMA user_version={number + 1};COMMIT;")

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            for reader in list(self._readers):
                reader.db.close()
            self._readers.clear()
        with self._lock:
            self.db.close()


class _Reader:
    """A thread's read connection; closed when the thread ends (its thread-local goes, and this
    with it) or with the backend."""

    __slots__ = ("db", "__weakref__")

    def __init__(self, path: str) -> None:
        # read-only: whatever runs on it, a reader writes nothing
        self.db = sqlite3.connect(f"file://{urllib.parse.quote(os.fsencode(path))}?mode=ro", uri=True, timeout=30,
                                  isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=30000")


class _SQLiteTx:
    serialized = True  # (every SQLite write is: BEGIN IMMEDIATE)

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.first: list[dict[str, Any]] | None = None

    def defer(self, sql: str, params: tuple = ()) -> None:
        self.execute(sql, params)  # (in process: nothing to save by waiting)

    def execute(self, sql: str, params: tuple = ()) -> _Result:
        cursor = self.db.execute(sql, params)
        rows = [dict(r) for r in cursor.fetchall()]  # run to the end: a half-read statement pins a snapshot
        return _Result(rows, cursor.rowcount)


class _Result:
    def __init__(self, rows: list[dict[str, Any]], rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows

    def first(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


class PostgresBackend:
    """A connection per thread (psycopg 3), READ COMMITTED. Each single-statement check-and-set
    the registry relies on (a nonce used once, a key released once, a challenge taken once) is
    atomic there as in SQLite; what needs more (the audit chain's next link) asks for
    `serialize`, which takes a transaction-scoped advisory lock, so replicas on other machines
    queue on the same lock."""

    kind = "postgresql"
    LOCK_KEY = 0x7CC_DE91  # one advisory lock for the registry's serialized writes

    def __init__(self, url: str):
        import psycopg
        from psycopg.rows import dict_row

        self._psycopg = psycopg
        self._dict_row = dict_row
        self.url = url
        self.integrity_error = psycopg.errors.IntegrityError
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._connection()  # fail now, with the server's message, rather than at the first request

    def _connection(self):  # type: ignore[no-untyped-def]
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._psycopg.connect(self.url, row_factory=self._dict_row, autocommit=True, connect_timeout=10)
            self._local.conn = conn
            # One cursor a connection, used for every statement: `conn.execute` makes a cursor
            # each time, a quarter of psycopg's CPU for the registry's one-row lookups.
            self._local.cursor = conn.cursor()
            self._local.literal = self._psycopg.ClientCursor(conn)  # (for its quoting only: nothing runs on it)
            with self._lock:  # a closed one (the server went away) is dropped, not kept until close()
                self._all = [c for c in self._all if not c.closed]
                self._all.append(conn)
        return conn

    def _cursor(self):  # type: ignore[no-untyped-def]
        self._connection()
        return self._local.cursor

    @staticmethod
    @functools.lru_cache(maxsize=2048)
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def transaction(self, serialize: bool = False, first: str | None = None) -> Iterator[Any]:
        """A write. serialize: under the registry's advisory lock, held to the commit. first: a
        read without parameters run right after the lock, its rows in the transaction's `first`.

        Each round trip to the server is one the registry's lock is held for, and one more wait
        for this thread to get the GIL back from the other decisions' threads; so they are few.
        BEGIN, the lock and `first` go with the transaction's first statement, and the writes it
        defers (`_PostgresTx.defer`) with the next statement or the COMMIT, each such group one
        simple query: READ COMMITTED gives each of its statements a snapshot of its own, so the
        statements after the lock see every commit made before it was granted."""
        if first is not None and ("%" in first or ";" in first):
            raise ValueError("a transaction's first read takes no parameters and is one statement")
        conn = self._connection()
        if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            conn.close()  # (left inside a transaction by a failure: its statements would join this one)
            conn = self._connection()
        # READ COMMITTED whatever the server's default: a statement after the lock must see every
        # commit made before the lock was granted (a snapshot taken before would not)
        opening = ["BEGIN ISOLATION LEVEL READ COMMITTED"]
        if serialize:
            opening.append(f"SELECT pg_advisory_xact_lock({self.LOCK_KEY:d})")
        # (the thread's one cursor: conn.execute would make another)
        tx = _PostgresTx(self._local.cursor, self._local.literal, self._sql, serialize, opening, first)
        try:
            yield tx
            tx.commit()
        except BaseException:
            if tx.sent:
                try:
                    self._local.cursor.execute("ROLLBACK")
                except self._psycopg.Error:
                    pass  # (the connection is gone: the server rolled the transaction back)
                if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                    conn.close()  # (not out of the transaction: never reused)
            raise

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        cursor = self._cursor()
        cursor.execute(self._sql(sql), params)
        return list(cursor.fetchall())

    def columns(self, table: str) -> list[str]:
        return [str(r["column_name"]) for r in self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? "
            "ORDER BY ordinal_position", (table,))]

    def version(self) -> int:
        conn = self._connection()
        conn.execute("CREATE TABLE IF NOT EXISTS tccdeploy_schema (version INTEGER NOT NULL)")
        rows = conn.execute("SELECT version FROM tccdeploy_schema").fetchall()
        return int(rows[0]["version"]) if rows else 0

    def migrate(self, steps: list[str]) -> None:
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_KEY,))  # two replicas starting at once
            conn.execute("CREATE TABLE IF NOT EXISTS tccdeploy_schema (version INTEGER NOT NULL)")
            rows = conn.execute("SELECT version FROM tccdeploy_schema").fetchall()
            current = int(rows[0]["version"]) if rows else 0
            for number in range(current, len(steps)):
                conn.execute(steps[number])
            if current < len(steps):
                conn.execute("DELETE FROM tccdeploy_schema")
                conn.execute("INSERT INTO tccdeploy_schema (version) VALUES (%s)", (len(steps),))

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class _PostgresTx:
    """A PostgreSQL write under way: its opening (BEGIN, the lock, the `first` read) still unsent
    until its first statement, and the writes deferred until the next."""

    def __init__(self, cursor: Any, literal: Any, translate: Any, serialized: bool, opening: list[str],
                 first: str | None) -> None:
        self.cursor, self._literal, self.translate, self.serialized = cursor, literal, translate, serialized
        self._pending = [*opening, *([first] if first is not None else [])]  # sent with the first statement
        self._first_at = len(opening) if first is not None else None  # its place among them
        self._first: list[dict[str, Any]] | None = None
        self._deferred: list[str] = []
        self.sent = False  # anything went to the server (a failure then rolls back)

    @property
    def first(self) -> list[dict[str, Any]] | None:
        if self._first_at is not None:
            self._send(None, ())
        return self._first

    @first.setter
    def first(self, rows: list[dict[str, Any]] | None) -> None:
        self._first = rows

    def defer(self, sql: str, params: tuple = ()) -> None:
        """A write whose result nobody reads, sent with the transaction's next statement or its
        COMMIT: an audit entry, a row inserted once its checks passed. A failure among them fails
        that statement or the commit, and the transaction rolls back whole. Its values become
        literals (psycopg's client-side quoting, `ClientCursor.mogrify`), as a simple query with
        several statements needs."""
        self._deferred.append(self._literal.mogrify(self.translate(sql), params))

    def execute(self, sql: str, params: tuple = ()) -> _Result:
        self._send(self.translate(sql), params)
        cursor = self.cursor
        rows = list(cursor.fetchall()) if cursor.description else []
        return _Result(rows, cursor.rowcount)

    def commit(self) -> None:
        if self.sent or self._deferred:
            self._send("COMMIT", ())
            if self.cursor.statusmessage != "COMMIT":  # (PostgreSQL answers ROLLBACK for an aborted transaction)
                raise StoreFailure("store.unavailable", f"the transaction ended in {self.cursor.statusmessage!r}, "
                                                        "not a commit")

    def _send(self, statement: str | None, params: tuple) -> None:
        """statement (None: only what waits), after whatever waits to be sent, in one round trip;
        the cursor then holds statement's result."""
        waiting = [*self._pending, *self._deferred]
        self._pending, self._deferred = [], []
        self.sent = True
        if not waiting:  # (alone: the extended protocol, with the statement prepared once used a few times)
            self.cursor.execute(statement, params)
            return
        if statement is not None:
            waiting.append(self._literal.mogrify(statement, params) if params else statement)
        cursor = self.cursor
        cursor.execute(";\n".join(waiting))  # (no parameters: one simple query, each statement in turn)
        for place in range(len(waiting) - 1):
            if place == self._first_at:
                self._first = list(cursor.fetchall())
            if not cursor.nextset():  # (each statement gives a result: fewer means one swallowed the rest)
                raise StoreFailure("store.unavailable", f"{len(waiting)} statements sent, {place + 1} answered")
        if self._first_at == len(waiting) - 1:
            self._first = list(cursor.fetchall())
        self._first_at = None


# SQLite's primary result codes that mean "the store cannot take this now", not "this SQL is wrong".
_SQLITE_UNAVAILABLE = ("SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_READONLY",
                       "SQLITE_PROTOCOL", "SQLITE_NOLCK")


class StoreFailure(Exception):
    """An outage already named: what a `tc serve` front process gets for one its decision process
    met (`store.full`, `store.unavailable`), or for the decision process gone
    (`service.decision-lost`: fronts.py)."""

    def __init__(self, reason: str, cause: str):
        super().__init__(reason, cause)
        self.reason, self.cause = reason, cause

    def __str__(self) -> str:
        return f"{self.reason} ({self.cause})"


def store_failure(exc: BaseException) -> str | None:
    """'store.full' or 'store.unavailable' when exc says the database (or the disk under it)
    cannot take a write or answer now: an outage the caller may retry, not its input's fault and
    not a bug; None for anything else."""
    if isinstance(exc, StoreFailure):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "store.full"
    if isinstance(exc, sqlite3.Error):
        name = str(getattr(exc, "sqlite_errorname", "") or "")
        if name.startswith("SQLITE_FULL") or "database or disk is full" in str(exc):
            return "store.full"
        if name.startswith(_SQLITE_UNAVAILABLE):
            return "store.unavailable"
        return None
    module = type(exc).__module__
    if module.startswith("psycopg"):
        import psycopg

        if isinstance(exc, psycopg.errors.DiskFull):
            return "store.full"
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return "store.unavailable"
    return None


def open_backend(location: str) -> SQLiteBackend | PostgresBackend:
    return PostgresBackend(location) if is_url(location) else SQLiteBackend(location)
