"""The SQLite backend of the storage contract (database.py), for the embedded profile.

Why it is built this way:

* One process, one connection, one writer. The stdlib ``sqlite3`` module blocks, so
  every statement runs in a worker thread (``trio.to_thread.run_sync``) and the event
  loop never waits on the disk. The connection is lent to one task at a time under a
  ``trio.Lock`` held for the whole checkout or transaction, so it is only ever used by
  one thread at a time (``check_same_thread`` is off for that reason alone).
* Transactions start with ``BEGIN IMMEDIATE``: they hold the file's write lock from
  their first statement, so the row locks the service relies on (``FOR UPDATE``, the
  jobs' claims) become the one writer lock, which is exact for one process. Another
  process using the same file (a one-off job, the sqlite3 shell) waits up to
  ``busy_timeout`` for it and then fails with "database unavailable"; correct, but
  serialized: scaling out needs MySQL.
* Every statement has a deadline (``query_timeout``, PAYMENTS_DB_QUERY_TIMEOUT_SECONDS).
  Past it, or when its task is cancelled, the statement is interrupted
  (``sqlite3_interrupt``, safe from another thread): SQLite stops it cleanly, the
  connection's state stays known, the request answers "database unavailable" and a
  transaction is rolled back, shielded, on the way out. A thread that does not come back
  even then (stuck in the file system, say) is left behind with its connection: that
  connection is discarded (closed when the thread ends) and the next checkout opens the
  file afresh, so no other task ever shares a connection with a running thread.
* The file is opened in WAL mode (readers never block the writer), with
  ``synchronous=FULL`` by default (a committed payment survives a power cut), after
  checks that turn a bad file into a :class:`DatabaseStartupError` naming it: a
  directory that cannot be made or written, a file that is not a database, a corrupt
  one (``PRAGMA quick_check``), one locked by another process, one that belongs to
  something else. Then the schema (schema.sqlite.sql) is brought up to date.
* The repositories' SQL needs little from here: ``%s`` placeholders become ``?``,
  datetimes are stored as fixed-width ISO text (UTC, microseconds: text order is time
  order) and read back as naive UTC ``datetime`` by a converter on the
  ``DATETIME_TEXT`` column type, and a UNIQUE violation becomes :class:`DuplicateKey`
  with the index name schema.sql uses (SQLite's message names the columns; the index
  is looked up from them).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from payments.errors import DependencyUnavailable
from payments.storage.database import (
    UNAVAILABLE,
    DatabaseStartupError,
    DuplicateKey,
    PoolStats,
)
from payments.storage.dialect import SQLITE, Dialect
from payments.storage.migrate import migrate

log = logging.getLogger("payments.storage.sqlite")

T = TypeVar("T")

DATETIME_TYPE = "DATETIME_TEXT"
SYNCHRONOUS_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# Primary result codes (sqlite3.h).
_BUSY, _LOCKED, _NOMEM, _READONLY, _INTERRUPT, _IOERR, _CORRUPT = 5, 6, 7, 8, 9, 10, 11
_FULL, _CANTOPEN, _PROTOCOL, _NOTADB = 13, 14, 15, 26
# The database cannot serve us now (locked elsewhere, disk trouble), as opposed to a bad
# statement: like MySQL's unavailable errors, these surface as DependencyUnavailable.
_UNAVAILABLE_CODES = frozenset(
    {_BUSY, _LOCKED, _NOMEM, _READONLY, _INTERRUPT, _IOERR, _CORRUPT, _FULL, _CANTOPEN}
    | {_PROTOCOL, _NOTADB}
)
_CONSTRAINT_PRIMARYKEY = 1555
_CONSTRAINT_UNIQUE = 2067
_UNIQUE_FAILED = re.compile(r"UNIQUE constraint failed: (.+)$")
_UNIQUE_INDEX = re.compile(r"index '([^']+)'")
_PLACEHOLDER = re.compile(r"%(.)")
# How long an interrupted statement's thread gets to come back before it is given up.
INTERRUPT_GRACE_SECONDS = 1.0


# --- values ---------------------------------------------------------------------------


def datetime_to_text(value: datetime) -> str:
    """The stored form: naive UTC, always six fractional digits (fixed width, so text
    comparison in SQL is time comparison). An aware value is converted to UTC first."""
    if value.tzinfo is not None and value.utcoffset() is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ", timespec="microseconds")


def _datetime_from_text(raw: bytes) -> datetime:
    return datetime.fromisoformat(raw.decode("ascii"))


# Process-wide by sqlite3's design, but keyed on this schema's own type name, so no
# other user of sqlite3 is affected.
sqlite3.register_converter(DATETIME_TYPE, _datetime_from_text)


def _adapt(value: Any) -> Any:
    return datetime_to_text(value) if isinstance(value, datetime) else value


@functools.lru_cache(maxsize=1024)
def _qmark(sql: str) -> str:
    """``%s`` -> ``?`` and ``%%`` -> ``%``, as trio-mysql reads the same text."""

    def one(match: re.Match[str]) -> str:
        if match[1] == "s":
            return "?"
        if match[1] == "%":
            return "%"
        raise ValueError(f"unsupported placeholder %{match[1]} (use %s)")

    return _PLACEHOLDER.sub(one, sql)


def _prepare(sql: str, args: Sequence[Any] | None) -> tuple[str, tuple[Any, ...]]:
    if args is None:  # as with trio-mysql: no formatting at all without arguments
        return sql, ()
    return _qmark(sql), tuple(_adapt(value) for value in args)


# --- errors ---------------------------------------------------------------------------


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and _code(exc) in _UNAVAILABLE_CODES


def _unavailable(exc: BaseException, during: str) -> DependencyUnavailable:
    log.warning(
        "database unavailable during %s: %s",
        during,
        getattr(exc, "sqlite_errorname", type(exc).__name__),
    )
    return DependencyUnavailable(UNAVAILABLE)


def describe(exc: BaseException, busy_timeout: float) -> str:
    """What an sqlite3 error at start means for the operator (after the file's name)."""
    code = _code(exc)
    if code in (_BUSY, _LOCKED):
        return (
            f"is locked by another process (still locked after {busy_timeout:g}s): stop the"
            " process using it, or point PAYMENTS_SQLITE_PATH at another file"
        )
    if code == _NOTADB:
        return (
            "is not an SQLite database (file is not a database): move it away, or point"
            " PAYMENTS_SQLITE_PATH at another file"
        )
    if code == _CORRUPT:
        return (
            f"is corrupt ({exc}): restore it from a backup, or move it away to start with"
            " an empty database"
        )
    if code == _READONLY:
        return f"is read-only ({exc}): check the permissions of the file and its directory"
    if code == _CANTOPEN:
        return f"cannot be opened ({exc}): check the path and its directory's permissions"
    if code == _FULL:
        return "cannot be written: the disk is full"
    if code == _IOERR:
        return f"cannot be read or written ({exc})"
    return f"cannot be used ({type(exc).__name__}: {exc})"


class _UniqueKeys:
    """Maps SQLite's "UNIQUE constraint failed: t.a, t.b" to the index name (the key
    name MySQL reports), read from the schema itself so it never drifts from it."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, tuple[str, ...]], str] = {}

    def duplicate(
        self, raw: sqlite3.Connection, exc: sqlite3.IntegrityError
    ) -> DuplicateKey | None:
        """The DuplicateKey ``exc`` is, or None for other constraints (CHECK, NOT NULL).

        Runs in the worker thread that owns ``raw`` (it may read the schema)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code == _CONSTRAINT_PRIMARYKEY:
            return DuplicateKey("PRIMARY")
        if code != _CONSTRAINT_UNIQUE:
            return None
        message = str(exc)
        named = _UNIQUE_INDEX.search(message)
        if named:
            return DuplicateKey(named[1])
        failed = _UNIQUE_FAILED.search(message)
        if not failed:
            return DuplicateKey("")
        qualified = [part.strip() for part in failed[1].split(",")]
        table = qualified[0].split(".", 1)[0]
        key = (table, tuple(part.split(".", 1)[-1] for part in qualified))
        if key not in self._names:
            self._load(raw)
        return DuplicateKey(self._names.get(key, ""))

    def _load(self, raw: sqlite3.Connection) -> None:
        tables = [
            row[0]
            for row in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            for _seq, index, unique, origin, *_ in raw.execute(
                "SELECT * FROM pragma_index_list(?)", (table,)
            ):
                if not unique:
                    continue
                columns = tuple(
                    row[2]
                    for row in raw.execute(
                        "SELECT * FROM pragma_index_info(?) ORDER BY seqno", (index,)
                    )
                )
                self._names[(table, columns)] = "PRIMARY" if origin == "pk" else index


# --- the connection -------------------------------------------------------------------


class SqliteConnection:
    """The connection as lent for one checkout; refuses use after the checkout ended.

    Placeholders are ``%s``, as on MySQL. Statements run in a worker thread, one at a
    time; failures are classified here (DuplicateKey, DependencyUnavailable, or the
    sqlite3 error itself for a bad statement).
    """

    dialect: Dialect = SQLITE

    def __init__(
        self,
        raw: sqlite3.Connection,
        keys: _UniqueKeys,
        query_timeout: float | None = None,
        on_stuck: Callable[[sqlite3.Connection, trio.Event], None] | None = None,
    ) -> None:
        self._raw: sqlite3.Connection | None = raw
        self._keys = keys
        self._busy = False
        self._timeout = query_timeout if query_timeout is not None else math.inf
        self._on_stuck = on_stuck
        self.discarded = False  # a thread still runs on it: never touch it again

    @property
    def in_transaction(self) -> bool:
        return self._raw is not None and self._raw.in_transaction

    async def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run a statement; the rows an UPDATE/DELETE matched (0 for others)."""
        return await self._run(sql, args, lambda cursor: max(cursor.rowcount, 0))

    async def insert(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run an INSERT; the rowid (AUTOINCREMENT id) it generated."""
        return await self._run(sql, args, lambda cursor: int(cursor.lastrowid or 0))

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> tuple[Any, ...] | None:
        """Run a query; its first row, or None."""

        def first(cursor: sqlite3.Cursor) -> tuple[Any, ...] | None:
            row = cursor.fetchone()
            return None if row is None else tuple(row)

        return await self._run(sql, args, first)

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query; every row."""
        return await self._run(sql, args, lambda cursor: [tuple(row) for row in cursor])

    async def ping(self) -> None:
        """A trivial statement through the worker thread; DependencyUnavailable on failure."""
        await self.fetchone("SELECT 1")

    async def _run(
        self, sql: str, args: Sequence[Any] | None, read: Callable[[sqlite3.Cursor], T]
    ) -> T:
        raw = self._raw
        if raw is None:
            raise RuntimeError("an SQLite connection was used after its checkout ended")
        if self._busy:
            raise RuntimeError("an SQLite connection was used by two tasks at once")
        query, params = _prepare(sql, args)
        keys = self._keys

        def work() -> T:
            cursor = raw.cursor()
            try:
                cursor.execute(query, params)
                return read(cursor)
            except sqlite3.IntegrityError as exc:
                duplicate = keys.duplicate(raw, exc)
                if duplicate is not None:
                    raise duplicate from exc
                raise
            finally:
                cursor.close()

        self._busy = True
        try:
            return await self._in_thread(raw, work)
        except sqlite3.Error as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc, "a query") from exc
            raise
        finally:
            self._busy = False

    async def _in_thread(self, raw: sqlite3.Connection, work: Callable[[], T]) -> T:
        """Run ``work`` in a worker thread within the deadline; interrupt it past the
        deadline or on cancellation, and give the connection up if it will not stop."""
        finished = trio.Event()
        results: list[outcome.Outcome[T]] = []
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
            results.append(result)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished.set)

        trio.lowlevel.start_thread_soon(work, deliver)
        try:
            with trio.move_on_after(self._timeout) as deadline:
                await finished.wait()
        finally:
            if not finished.is_set():
                raw.interrupt()
                with trio.CancelScope(shield=True), trio.move_on_after(INTERRUPT_GRACE_SECONDS):
                    await finished.wait()
                if not finished.is_set():
                    self.discarded = True
                    if self._on_stuck is not None:
                        self._on_stuck(raw, finished)
        if deadline.cancelled_caught:
            log.warning("SQLite statement timed out after %gs", self._timeout)
        if not finished.is_set():
            raise DependencyUnavailable(UNAVAILABLE)
        return results[0].unwrap()

    def _end(self) -> None:
        self._raw = None


# --- the database ---------------------------------------------------------------------


class SqliteDatabase:
    """One SQLite file used by this process.

    Building it does no I/O (so ``open_database`` stays synchronous, like
    ``Pool.from_settings``); the file is opened, checked and migrated by the first
    checkout, under the lock, once. Call :meth:`start` (or run any checkout, such as
    ``migrate(db)``) at start so a bad file stops the start: until the file is open,
    a checkout that fails to open it raises :class:`DatabaseStartupError` and the next
    one tries again. :meth:`open` builds and starts in one step.

    ``async with db.connection() as conn`` lends the connection (autocommit);
    ``async with db.transaction() as conn`` wraps it in BEGIN IMMEDIATE ... COMMIT,
    rolling back when the block raises or is cancelled. A task waiting longer than
    ``acquire_timeout`` for the connection gets DependencyUnavailable, as a task
    waiting for an exhausted MySQL pool does. Implements
    :class:`payments.storage.database.Database`.

    ``check_integrity`` runs ``PRAGMA quick_check`` at open (it reads the whole file
    once: milliseconds for a development database).
    """

    dialect: Dialect = SQLITE

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "FULL",
        check_integrity: bool = True,
        apply_schema: bool = True,
        acquire_timeout: float | None = 30.0,
        query_timeout: float | None = 5.0,
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._check_integrity = check_integrity
        self._apply_schema = apply_schema
        self._acquire_timeout = acquire_timeout
        self._query_timeout = query_timeout
        self._raw: sqlite3.Connection | None = None  # None until opened, or once closed
        self._lock = trio.Lock()
        self._keys = _UniqueKeys()
        self._in_use = False
        self._closed = False
        self._opened_total = 0

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **options: Any) -> SqliteDatabase:
        """Build and :meth:`start`: the file is open, checked and migrated on return."""
        db = cls(path, **options)
        await db.start()
        return db

    async def start(self) -> None:
        """Open, check and migrate the file now (if not yet); DatabaseStartupError,
        naming the file, when it cannot be used."""
        async with self.connection():
            pass

    @property
    def path(self) -> Path:
        return self._path

    def stats(self) -> PoolStats:
        """The connection as a pool of one, so /healthz reads the same on both backends."""
        is_open = int(self._raw is not None)
        return PoolStats(
            open=is_open,
            idle=int(is_open and not self._in_use),
            in_use=int(self._in_use),
            connecting=0,
            waiting=self._lock.statistics().tasks_waiting,
            max_open=1,
            max_idle=1,
            opened_total=self._opened_total,
            closed_total=self._opened_total - is_open,
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[SqliteConnection]:
        """Lend the connection (autocommit) to this task until the block ends. An
        unfinished transaction is rolled back on the way out, whatever ended the block."""
        raw = await self._acquire()
        conn = SqliteConnection(raw, self._keys, self._query_timeout, self._discard)
        try:
            yield conn
        finally:
            conn._end()
            try:
                if not conn.discarded and raw.in_transaction:
                    await self._rollback(raw)
            finally:
                self._in_use = False
                if self._closed:
                    await self._close_raw()
                self._lock.release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteConnection]:
        """Lend the connection inside BEGIN IMMEDIATE (the write lock, from the start);
        COMMIT when the block ends, ROLLBACK if it raises or is cancelled."""
        async with self.connection() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            yield conn
            await conn.execute("COMMIT")

    async def _acquire(self) -> sqlite3.Connection:
        """Take the lock (bounded by acquire_timeout) and the open connection."""
        if self._closed:
            raise DependencyUnavailable(UNAVAILABLE)
        if self._lock.statistics().owner is trio.lowlevel.current_task():
            # trio.Lock would raise too, less clearly: the MySQL pool would lend a
            # second session here, SQLite has one.
            raise RuntimeError("this task already holds the SQLite connection (nested checkout)")
        timeout = self._acquire_timeout if self._acquire_timeout is not None else float("inf")
        with trio.move_on_after(timeout) as waited:
            await self._lock.acquire()
        if waited.cancelled_caught:
            log.warning("SQLite connection busy: not lent within %.1fs", timeout)
            raise DependencyUnavailable(UNAVAILABLE)
        try:
            if self._closed:
                raise DependencyUnavailable(UNAVAILABLE)
            raw = self._raw if self._raw is not None else await self._open()
        except BaseException:
            self._lock.release()
            raise
        self._in_use = True
        return raw

    async def _open(self) -> sqlite3.Connection:
        """Connect, check and migrate (under the lock); keep the connection on success."""
        raw = await trio.to_thread.run_sync(
            functools.partial(
                _connect, self._path, self._busy_timeout, self._synchronous, self._check_integrity
            )
        )
        try:
            if self._apply_schema:
                conn = SqliteConnection(raw, self._keys)
                try:
                    await migrate(conn)
                finally:
                    conn._end()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(raw.close)
            cause = exc.__cause__ if isinstance(exc, DependencyUnavailable) else exc
            if isinstance(cause, sqlite3.Error):
                problem = describe(cause, self._busy_timeout)
                raise DatabaseStartupError(_display(self._path), problem) from None
            raise
        self._raw = raw
        self._opened_total += 1
        log.info(
            "SQLite database %s open (WAL, synchronous=%s)", _display(self._path), self._synchronous
        )
        return raw

    def _discard(self, raw: sqlite3.Connection, finished: trio.Event) -> None:
        """Give up ``raw``: a worker thread is stuck on it. The next checkout opens the
        file again; ``raw`` is closed once its thread comes back."""
        log.error("SQLite statement did not stop when interrupted; reopening the database")
        if self._raw is raw:
            self._raw = None

        async def close_when_done() -> None:
            await finished.wait()
            with contextlib.suppress(sqlite3.Error):
                await trio.to_thread.run_sync(raw.close)

        trio.lowlevel.spawn_system_task(close_when_done)

    @staticmethod
    async def _rollback(raw: sqlite3.Connection) -> None:
        """Shielded: a cancelled transaction must not stay open on the connection."""
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(raw.rollback)
            except sqlite3.Error as exc:
                log.warning("SQLite rollback failed: %s", getattr(exc, "sqlite_errorname", exc))

    async def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(raw.close)
            except sqlite3.Error as exc:  # closing anyway
                log.warning("SQLite close failed: %s", getattr(exc, "sqlite_errorname", exc))

    async def aclose(self) -> None:
        """Refuse new checkouts; close the file now, or when the holder gives it back."""
        self._closed = True
        if self._raw is None or self._lock.statistics().owner is trio.lowlevel.current_task():
            return
        async with self._lock:
            await self._close_raw()


# --- opening --------------------------------------------------------------------------


def _display(path: Path) -> str:
    return os.path.abspath(path)


def _connect(
    path: Path, busy_timeout: float, synchronous: str, check_integrity: bool
) -> sqlite3.Connection:
    """Blocking, in a worker thread: the checks before the file is trusted."""
    name = _display(path)

    def fail(problem: str) -> DatabaseStartupError:
        return DatabaseStartupError(name, problem)

    if path.is_dir():
        raise fail("is a directory, not a database file")
    directory = path.absolute().parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create its directory {directory}: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".payments-probe-"):
            pass
    except OSError as exc:
        raise fail(
            f"its directory {directory} is not writable ({exc.strerror or exc}); SQLite"
            " keeps its -wal and -shm files beside the database"
        ) from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise fail("is not readable and writable by this user")
    try:
        raw = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
            check_same_thread=False,  # one thread at a time, under SqliteDatabase's lock
            detect_types=sqlite3.PARSE_DECLTYPES,
            cached_statements=256,
        )
    except sqlite3.Error as exc:
        raise fail(describe(exc, busy_timeout)) from None
    try:
        raw.execute("PRAGMA schema_version").fetchone()  # reads the header: not a database?
        (mode,) = raw.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise fail(f"cannot be switched to WAL mode (journal_mode is {mode})")
        raw.execute(f"PRAGMA synchronous = {synchronous}")
        if check_integrity:
            problems = [str(row[0]) for row in raw.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise fail(
                    f"is corrupt ({'; '.join(problems)}): restore it from a backup, or move"
                    " it away to start with an empty database"
                )
        tables = {
            str(row[0])
            for row in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if tables and "schema_version" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise fail(
                f"is not a payments database (it has tables {shown} but no schema_version):"
                " point PAYMENTS_SQLITE_PATH at another file"
            )
    except BaseException as exc:
        raw.close()
        if isinstance(exc, sqlite3.Error):
            raise fail(describe(exc, busy_timeout)) from None
        raise
    return raw
