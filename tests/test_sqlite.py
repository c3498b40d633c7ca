"""The SQLite backend's own rules (the shared contract is in test_storage_contract.py).

What is pinned here: the file is opened as the embedded profile needs it (directory
made, WAL, durable commits, schema applied and versioned like MySQL's, schema.sqlite.sql
matching schema.sql); every bad file stops the start with a DatabaseStartupError naming
it (never a bare sqlite3 traceback); the one connection is lent to one task at a time,
off the event loop; and a lock held by another process reads "database unavailable".
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from payments.config import ConfigError, MysqlDsn, Settings
from payments.errors import DependencyUnavailable
from payments.model import utcnow
from payments.storage import claims, outbox, provider_callbacks
from payments.storage import repository as repo
from payments.storage.backends import DEFAULT_SQLITE_PATH, open_database, sqlite_path_from
from payments.storage.database import Connection, DatabaseStartupError, DuplicateKey
from payments.storage.dialect import MYSQL, SQLITE
from payments.storage.migrate import Step, current_version, load_steps, migrate
from payments.storage.pool import Pool
from payments.storage.sqlite import SqliteDatabase, datetime_to_text
from tests.fixtures.db import make_payment
from tests.storage_support import record_payment_reads, varied_payment

# Holds a lock on the database file named by argv[1] until its stdin closes.
LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


def raw_connect(path: Path) -> sqlite3.Connection:
    """A second, plain connection to the file (as another process or the sqlite3 shell)."""
    return sqlite3.connect(path, isolation_level=None, timeout=0)


def absolute(path: Path) -> str:
    return os.path.abspath(path)


async def open_fails(path: Path, **options: object) -> DatabaseStartupError:
    """Opening ``path`` fails with a DatabaseStartupError naming the file."""
    with pytest.raises(DatabaseStartupError) as caught:
        await SqliteDatabase.open(path, **options)  # type: ignore[arg-type]
    error = caught.value
    assert isinstance(error, ConfigError)  # the CLI prints it without a traceback
    assert error.path == absolute(path)
    assert str(error).startswith(f"SQLite database {absolute(path)}: ")
    return error


def list_dir(directory: Path) -> list[Path]:
    return list(directory.iterdir())


# --- opening ---------------------------------------------------------------------------


async def test_open_makes_the_directory_and_a_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "var" / "payments.db"
    db = await SqliteDatabase.open(path)
    try:
        assert path.is_file() and db.path == path
        async with db.connection() as conn:
            assert await conn.fetchone("PRAGMA journal_mode") == ("wal",)
            assert await conn.fetchone("PRAGMA synchronous") == (2,)  # FULL
            assert await conn.fetchone("PRAGMA busy_timeout") == (5000,)
            assert await current_version(conn) == len(load_steps(dialect=SQLITE))
        assert path.with_name("payments.db-wal") in list_dir(path.parent)
    finally:
        await db.aclose()
    assert db.stats().open == 0


async def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    for _ in range(2):
        db = await SqliteDatabase.open(path)
        await db.aclose()
    with raw_connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
    assert versions == [step.version for step in load_steps(dialect=SQLITE)]


async def test_a_new_step_is_applied_once_and_a_failing_step_not_at_all(
    sqlite_db: SqliteDatabase,
) -> None:
    steps = load_steps(dialect=SQLITE)
    good = [*steps, Step(len(steps) + 1, ("CREATE TABLE extra (id INTEGER PRIMARY KEY)",))]
    assert await migrate(sqlite_db, steps=good) == len(good)
    assert await migrate(sqlite_db, steps=good) == len(good)
    bad = [
        *good,
        Step(len(good) + 1, ("CREATE TABLE half (id INTEGER)", "CREATE TABLE broken (")),
    ]
    with pytest.raises(sqlite3.OperationalError):
        await migrate(sqlite_db, steps=bad)
    async with sqlite_db.connection() as conn:
        assert await current_version(conn) == len(good)
        tables = {row[0] for row in await conn.fetchall("SELECT name FROM sqlite_master")}
        assert "extra" in tables and "half" not in tables  # DDL rolled back with the step
        assert not conn.in_transaction  # type: ignore[attr-defined]
    # A database ahead of the code (a newer release) is left alone.
    assert await migrate(sqlite_db, steps=steps) == len(good)


async def test_open_database_picks_the_backend_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_db_dsn: MysqlDsn
) -> None:
    pool = open_database(Settings(mysql_dsn=test_db_dsn), sqlite_path=tmp_path / "x.db")
    assert isinstance(pool, Pool) and pool.dialect == MYSQL
    await pool.aclose()
    assert not (tmp_path / "x.db").exists()  # MySQL set: no SQLite file is made

    db = open_database(Settings(sqlite_path=str(tmp_path / "set.db")))
    assert isinstance(db, SqliteDatabase) and db.path == tmp_path / "set.db"
    assert db.stats().open == 0  # nothing opened yet
    assert await migrate(db) == len(load_steps(dialect=SQLITE))  # opens, checks, migrates
    assert db.stats().open == 1
    await db.aclose()

    monkeypatch.chdir(tmp_path)
    db = open_database(Settings(), sqlite_path="  ")
    assert isinstance(db, SqliteDatabase) and db.path == DEFAULT_SQLITE_PATH
    await db.start()
    await db.aclose()
    assert (tmp_path / "var" / "payments.db").is_file()
    assert sqlite_path_from("~/p.db") == Path.home() / "p.db"


def test_the_two_schema_files_have_the_same_steps() -> None:
    mysql, sqlite = load_steps(dialect=MYSQL), load_steps(dialect=SQLITE)
    assert [s.version for s in sqlite] == [s.version for s in mysql]


async def test_the_sqlite_schema_matches_the_mysql_schema(
    sqlite_db: SqliteDatabase, test_db_dsn: MysqlDsn
) -> None:
    """Same tables, columns in the same order, same index names and uniqueness, and a
    datetime column on one is a datetime column on the other."""
    pool = Pool(test_db_dsn, 1, 1, 0)
    try:
        async with pool.connection() as conn:
            rows = await conn.fetchall(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, ORDINAL_POSITION"
            )
            index_rows = await conn.fetchall(
                "SELECT DISTINCT TABLE_NAME, INDEX_NAME, NON_UNIQUE FROM"
                " information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()"
                " AND INDEX_NAME <> 'PRIMARY'"
            )
    finally:
        await pool.aclose()
    mysql_columns: dict[str, list[tuple[str, bool]]] = {}
    for table, column, data_type in rows:
        mysql_columns.setdefault(table, []).append((column, data_type == "datetime"))
    mysql_indexes = {(table, index, not non_unique) for table, index, non_unique in index_rows}

    sqlite_columns: dict[str, list[tuple[str, bool]]] = {}
    sqlite_indexes: set[tuple[str, str, bool]] = set()
    async with sqlite_db.connection() as conn:
        tables = await conn.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        for (table,) in tables:
            info = await conn.fetchall("SELECT name, type FROM pragma_table_info(%s)", (table,))
            sqlite_columns[table] = [(name, kind == "DATETIME_TEXT") for name, kind in info]
            for name, unique, origin in await conn.fetchall(
                'SELECT name, "unique", origin FROM pragma_index_list(%s)', (table,)
            ):
                assert origin == "c", f"{table}.{name}: indexes are named CREATE INDEX"
                sqlite_indexes.add((table, name, bool(unique)))
    assert sqlite_columns == mysql_columns
    assert sqlite_indexes == mysql_indexes


# --- bad input -------------------------------------------------------------------------


async def test_random_bytes_are_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    path.write_bytes(os.urandom(8192))
    error = await open_fails(path)
    assert "is not an SQLite database" in str(error)
    assert "PAYMENTS_SQLITE_PATH" in str(error)


async def test_a_text_file_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    path.write_text("MYSQL_DSN=mysql://root@127.0.0.1/payments\n" * 50)
    error = await open_fails(path)
    assert "is not an SQLite database" in str(error)


async def test_a_corrupt_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    db = await SqliteDatabase.open(path)
    async with db.transaction() as conn:
        for _ in range(150):
            await repo.insert_payment(conn, make_payment(metadata={"pad": "x" * 400}))
    await db.aclose()
    size = path.stat().st_size
    assert size > 16 * 4096
    with path.open("r+b") as file:  # the header survives, pages behind it do not
        file.seek(2 * 4096)
        file.write(os.urandom(size - 3 * 4096))
    error = await open_fails(path)
    assert "is corrupt" in str(error) and "backup" in str(error)


async def test_another_apps_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    with raw_connect(path) as conn:
        conn.execute("CREATE TABLE payments (id INTEGER, who TEXT)")
    error = await open_fails(path)
    assert "is not a payments database" in str(error) and "payments" in error.problem
    with raw_connect(path) as conn:  # untouched: no tables of ours were added
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"payments"}


@asynccontextmanager
async def lock_held_by_another_process(path: Path) -> AsyncIterator[None]:
    """Another process holds ``BEGIN EXCLUSIVE`` on ``path`` for the block."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        with trio.fail_after(10):
            assert (await process.stdout.receive_some()).startswith(b"locked")
        yield
    finally:
        await process.stdin.aclose()
        with trio.fail_after(10):
            await process.wait()


async def test_a_new_file_locked_by_another_process_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    async with lock_held_by_another_process(path):
        started = trio.current_time()
        error = await open_fails(path, busy_timeout=0.2)
        assert trio.current_time() - started < 5
    assert "is locked by another process (still locked after 0.2s)" in str(error)


async def test_our_wal_database_with_its_writer_lock_held_stops_the_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "payments.db"
    await (await SqliteDatabase.open(path)).aclose()
    async with lock_held_by_another_process(path):
        error = await open_fails(path, busy_timeout=0.2)
    assert "is locked by another process" in str(error)
    await (await SqliteDatabase.open(path)).aclose()  # fine once the lock is gone


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create files in. Root ignores permission bits,
    so as root a directory of a filesystem that refuses new files is used instead."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        return directory
    for candidate in (Path("/sys/kernel"), Path("/sys"), Path("/proc/self")):
        try:
            (candidate / "payments-probe").touch()
        except OSError:
            return candidate
    pytest.fail("found no directory that refuses new files, even to root")


async def test_an_unwritable_directory_stops_the_start(tmp_path: Path) -> None:
    directory = unwritable_directory(tmp_path)
    error = await open_fails(directory / "payments.db")
    assert f"its directory {directory} is not writable" in str(error)


async def test_a_directory_that_cannot_be_made_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "var"
    blocker.write_text("a file where the directory should be")
    error = await open_fails(blocker / "payments.db")
    assert f"cannot create its directory {blocker}" in str(error)


async def test_a_directory_in_place_of_the_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "payments.db").mkdir()
    error = await open_fails(tmp_path / "payments.db")
    assert "is a directory" in str(error)


async def test_open_database_reports_bad_files_at_the_first_checkout(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    path.write_bytes(b"\x00garbage" * 1000)
    db = open_database(Settings(), sqlite_path=path)
    with pytest.raises(DatabaseStartupError, match="is not an SQLite database"):
        await migrate(db)
    with pytest.raises(DatabaseStartupError):  # tried again, not cached as open
        async with db.connection():
            pass
    path.unlink()  # the operator moved the bad file away
    async with db.connection() as conn:
        assert await current_version(conn) == len(load_steps(dialect=SQLITE))
    await db.aclose()


async def test_a_start_that_met_a_lock_succeeds_once_it_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    db = SqliteDatabase(path, busy_timeout=0.1)
    async with lock_held_by_another_process(path):
        with pytest.raises(DatabaseStartupError, match="locked"):
            await db.start()
    await db.start()
    assert db.stats().open == 1
    await db.aclose()


# --- one connection, one task at a time, off the event loop ---------------------------


async def test_checkouts_are_serialized_and_counted(sqlite_db: SqliteDatabase) -> None:
    order: list[str] = []
    holding = trio.Event()
    release = trio.Event()

    async def holder() -> None:
        async with sqlite_db.transaction():
            order.append("holder in")
            holding.set()
            await release.wait()
            order.append("holder out")

    async def waiter() -> None:
        async with sqlite_db.connection():
            order.append("waiter in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await holding.wait()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        stats = sqlite_db.stats()
        assert (stats.in_use, stats.idle, stats.waiting) == (1, 0, 1)
        release.set()
    assert order == ["holder in", "holder out", "waiter in"]
    assert sqlite_db.stats().idle == 1


async def test_waiting_too_long_for_the_connection_is_unavailable(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "p.db", acquire_timeout=0.05)
    try:
        async with db.connection(), trio.open_nursery() as nursery:

            async def wait_for_it() -> None:
                with pytest.raises(DependencyUnavailable):
                    async with db.connection():
                        pass

            nursery.start_soon(wait_for_it)
    finally:
        await db.aclose()


async def test_misuse_fails_loudly(sqlite_db: SqliteDatabase) -> None:
    async with sqlite_db.connection() as conn:
        with pytest.raises(RuntimeError, match="nested checkout"):
            async with sqlite_db.transaction():
                pass
    with pytest.raises(RuntimeError, match="after its checkout ended"):
        await conn.fetchone("SELECT 1")


async def test_statements_run_off_the_event_loop(sqlite_db: SqliteDatabase) -> None:
    ticks = 0
    slow = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500000)"
        " SELECT COUNT(*) FROM n"
    )

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.005)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        started = trio.current_time()
        async with sqlite_db.connection() as conn:
            assert await conn.fetchone(slow) == (1500000,)
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert took > 0.05, "the query was too quick to tell"
    assert ticks >= took / 0.005 / 4  # the loop kept running while SQLite worked


async def test_cancelled_while_waiting_takes_nothing(sqlite_db: SqliteDatabase) -> None:
    async with sqlite_db.connection():
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sqlite_db.connection().__aenter__)
                await trio.sleep_forever()
    assert sqlite_db.stats().waiting == 0
    async with sqlite_db.connection() as conn:
        assert await conn.fetchone("SELECT 1") == (1,)


async def test_aclose_waits_for_the_holder_then_closes(sqlite_db: SqliteDatabase) -> None:
    async with trio.open_nursery() as nursery, sqlite_db.transaction() as conn:
        nursery.start_soon(sqlite_db.aclose)
        await trio.testing.wait_all_tasks_blocked()
        await repo.insert_payment(conn, make_payment())  # still ours until the end
    assert sqlite_db.stats().open == 0
    with pytest.raises(DependencyUnavailable):
        async with sqlite_db.connection():
            pass
    with raw_connect(sqlite_db.path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM payments").fetchone() == (1,)


# --- other processes and the file ------------------------------------------------------


async def test_commits_are_visible_to_other_connections_and_open_work_is_not(
    sqlite_db: SqliteDatabase,
) -> None:
    other = raw_connect(sqlite_db.path)
    try:
        async with sqlite_db.transaction() as conn:
            await repo.insert_payment(conn, make_payment())
            assert other.execute("SELECT COUNT(*) FROM payments").fetchone() == (0,)
        assert other.execute("SELECT COUNT(*) FROM payments").fetchone() == (1,)
    finally:
        other.close()


async def test_a_transaction_holds_the_write_lock_from_its_start(
    sqlite_db: SqliteDatabase,
) -> None:
    """BEGIN IMMEDIATE: what the service reads under a "row lock" no other writer can
    change before the commit, even one in another process."""
    other = raw_connect(sqlite_db.path)
    try:
        async with sqlite_db.transaction() as conn:
            await repo.get_payment(conn, 1, for_update=True)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_a_lock_held_by_another_process_reads_unavailable(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "p.db", busy_timeout=0.1)
    other = raw_connect(db.path)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(DependencyUnavailable, match=r"^database unavailable$"):
            async with db.transaction() as conn:
                await repo.insert_payment(conn, make_payment())
        async with db.connection() as conn:  # reads go on beside a writer (WAL)
            assert await conn.fetchone("SELECT COUNT(*) FROM payments") == (0,)
        other.execute("ROLLBACK")
        async with db.transaction() as conn:
            await repo.insert_payment(conn, make_payment())
    finally:
        other.close()
        await db.aclose()


async def test_datetimes_are_fixed_width_utc_text_in_the_file(sqlite_db: SqliteDatabase) -> None:
    at = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    async with sqlite_db.transaction() as conn:
        await repo.insert_payment(conn, make_payment(created_at=at, updated_at=utcnow()))
    with raw_connect(sqlite_db.path) as raw:
        row = raw.execute("SELECT typeof(created_at), created_at FROM payments").fetchone()
    assert row == ("text", "2025-06-01 12:00:00.000000")
    berlin = timezone(timedelta(hours=2))
    assert datetime_to_text(datetime(2025, 6, 1, 14, 0, 0, 5, tzinfo=berlin)) == (
        "2025-06-01 12:00:00.000005"
    )


async def test_other_errors_are_bugs_not_duplicates(sqlite_db: SqliteDatabase) -> None:
    row = repo._payment_to_row(make_payment())
    row["metadata"] = "{not json"
    insert_bad = f"INSERT INTO payments ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})"
    async with sqlite_db.connection() as conn:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            await conn.insert(insert_bad, list(row.values()))
        with pytest.raises(DuplicateKey) as caught:
            await conn.insert(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (1, utcnow())
            )
        assert caught.value.key == "PRIMARY"
        with pytest.raises(sqlite3.OperationalError, match="syntax"):
            await conn.fetchone("SELEKT 1")
        with pytest.raises(ValueError, match="unsupported placeholder"):
            await conn.fetchone("SELECT %d", (1,))
        assert await conn.fetchone("SELECT %s LIKE '50%%'", ("50% off",)) == (1,)
        assert await conn.fetchone("SELECT '100%'") == ("100%",)  # no arguments: as written
        # An index made after the map of names was read is still named (it is reloaded).
        await conn.execute("CREATE UNIQUE INDEX uq_test_late ON payments (resource_id)")
        await repo.insert_payment(conn, make_payment(resource_id="r-1"))
        with pytest.raises(DuplicateKey) as caught:
            await repo.insert_payment(conn, make_payment(resource_id="r-1"))
        assert caught.value.key == "uq_test_late"


# --- query plans -------------------------------------------------------------------------


async def test_lookups_lists_and_job_queries_use_indexes(sqlite_db: SqliteDatabase) -> None:
    """No statement the service runs scans a whole table (the unfiltered list aside,
    which reads the newest rows by rowid)."""
    async with sqlite_db.transaction() as conn:
        for n in range(300):
            payment = varied_payment(n)
            payment.id = await repo.insert_payment(conn, payment)
        sample = payment
    # No ANALYZE: the service never runs it, so these are the plans it gets.
    cutoff = utcnow()
    async with sqlite_db.connection() as conn:
        recorder = await record_payment_reads(conn, sample)
        rec = cast(Connection, recorder)
        for selection in (claims.STALE, claims.STUCK):
            await claims.candidates(rec, selection, cutoff)
            await claims.claim(rec, selection, sample.id, cutoff)
        now = repo.to_db_datetime(cutoff)
        recorder.statements.append((outbox.due_query(SQLITE), (now, now, 10)))
        await outbox.next_due_at(rec, cutoff)
        await outbox.due_backlog(rec, cutoff)
        await outbox.entries_for_payment(rec, sample.id)
        await outbox.attempts_for(rec, 1)
        await provider_callbacks.for_payment(rec, sample.id)
        await provider_callbacks.for_event(rec, "evt_1")
        for sql, args in recorder.statements:
            plan = [row[3] for row in await conn.fetchall("EXPLAIN QUERY PLAN " + sql, args)]
            scans = [step for step in plan if step.startswith("SCAN") and "USING" not in step]
            assert not [s for s in scans if "payments" in s or "callback" in s], (sql, plan)
