"""Every database round trip has a deadline (PAYMENTS_DB_QUERY_TIMEOUT_SECONDS): a
database that stops answering costs a request that long, then "database unavailable",
and the session is discarded, never lent again.

MySQL: a real MariaDB behind a TCP proxy that is paused (connections stay open, no byte
moves). SQLite: a statement that runs too long is interrupted; one whose thread will not
stop costs the connection, and the next checkout opens the file again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from payments.config import MysqlDsn, Settings
from payments.errors import DependencyUnavailable
from payments.storage.backends import open_database
from payments.storage.migrate import latest_version, lock_name, migrate
from payments.storage.pool import Pool
from payments.storage.sqlite import SqliteDatabase
from tests.fixtures.proxy import PausableProxy

TIMEOUT = 0.5


def proxied(dsn: MysqlDsn, proxy: PausableProxy) -> MysqlDsn:
    return attrs.evolve(dsn, host="127.0.0.1", port=proxy.port, unix_socket="")


async def test_a_silent_database_answers_unavailable_within_the_query_timeout(
    test_db_dsn: MysqlDsn, mysql_proxy: PausableProxy
) -> None:
    pool = Pool(
        proxied(test_db_dsn, mysql_proxy),
        max_open=2,
        max_idle=2,
        query_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
    )
    try:
        async with pool.connection() as conn:
            assert await conn.fetchone("SELECT 1") == (1,)
            first = conn.thread_id
        mysql_proxy.pause()
        for _ in range(3):  # the idle session, then new ones that never get a handshake
            started = trio.current_time()
            with pytest.raises(DependencyUnavailable, match=r"^database unavailable$"):
                async with pool.connection() as conn:
                    await conn.fetchone("SELECT 1")
            assert trio.current_time() - started < TIMEOUT * 2 + 1  # not TCP's minutes
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.connecting) == (0, 0, 0)
        assert stats.closed_total >= 1  # the timed-out session was discarded
        mysql_proxy.resume()
        with trio.fail_after(5):
            async with pool.connection() as conn:
                assert conn.thread_id != first
                assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        mysql_proxy.resume()
        await pool.aclose()


async def test_a_statement_past_the_query_timeout_is_stopped_on_the_server(
    test_db_dsn: MysqlDsn, mysql_server_pool: Pool
) -> None:
    pool = Pool(test_db_dsn, 1, 1, 60, query_timeout=TIMEOUT)
    try:
        started = trio.current_time()
        with pytest.raises(DependencyUnavailable):
            async with pool.connection() as conn:
                victim = conn.thread_id
                await conn.fetchone("SELECT SLEEP(30)")
        assert trio.current_time() - started < TIMEOUT + 1
        assert pool.stats().open == 0  # never lent again
        with trio.fail_after(5):  # the background KILL ends it on the server
            while True:
                if not await _running(mysql_server_pool, victim):
                    break
                await trio.sleep(0.05)
        async with pool.connection() as conn:
            assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


async def _running(admin: Pool, thread_id: int) -> bool:
    async with admin.connection() as conn:
        row = await conn.fetchone(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (thread_id,)
        )
    return bool(row and row[0])


@pytest.fixture
async def mysql_server_pool(test_db_dsn: MysqlDsn) -> AsyncIterator[Pool]:
    pool = Pool(test_db_dsn, 1, 1, 0)
    yield pool
    await pool.aclose()


def test_the_setting_reaches_both_backends(test_db_dsn: MysqlDsn, tmp_path: Path) -> None:
    settings = Settings(mysql_dsn=test_db_dsn, db_query_timeout_seconds=1.5)
    pool = open_database(settings)
    assert isinstance(pool, Pool)
    assert (pool._query_timeout, pool._connect_timeout) == (1.5, 1.5)
    sqlite_db = open_database(attrs.evolve(settings, mysql_dsn=None), sqlite_path=tmp_path / "x")
    assert isinstance(sqlite_db, SqliteDatabase)
    assert sqlite_db._query_timeout == 1.5


# --- SQLite ---------------------------------------------------------------------------

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"


async def test_sqlite_statement_past_the_timeout_is_interrupted(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "t.db", query_timeout=TIMEOUT)
    try:
        started = trio.current_time()
        with pytest.raises(DependencyUnavailable, match=r"^database unavailable$"):
            async with db.transaction() as conn:
                await conn.execute("CREATE TABLE t (x INTEGER)")
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.fetchone(ENDLESS)
        assert trio.current_time() - started < TIMEOUT + 1
        async with db.connection() as conn:  # same connection, rolled back, usable
            assert await conn.fetchone("SELECT count(*) FROM sqlite_master WHERE name = 't'") == (
                0,
            )
        assert db.stats().opened_total == 1
    finally:
        await db.aclose()


async def test_sqlite_statement_that_will_not_stop_costs_its_connection(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "t.db", query_timeout=TIMEOUT)
    release = threading.Event()
    try:
        async with db.connection() as conn:
            # A function the interrupt cannot reach: the thread stays busy in Python.
            raw = conn._raw
            assert isinstance(raw, sqlite3.Connection)
            raw.create_function("block", 0, lambda: release.wait(10))
        started = trio.current_time()
        with pytest.raises(DependencyUnavailable):
            async with db.connection() as conn:
                await conn.fetchone("SELECT block()")
        assert trio.current_time() - started < TIMEOUT + 1.5
        async with db.connection() as conn:  # a fresh connection, not the stuck one
            assert conn._raw is not raw
            assert await conn.fetchone("SELECT 1") == (1,)
        assert db.stats().opened_total == 2
    finally:
        release.set()
        await db.aclose()


async def test_migrations_are_not_cut_by_the_query_timeout(empty_db_dsn: MysqlDsn) -> None:
    """Waiting for another replica's migration (and long DDL) outlives the deadline."""
    pool = Pool(empty_db_dsn, 2, 2, 60, query_timeout=0.3)
    other = Pool(empty_db_dsn, 1, 1, 60)
    try:
        async with other.connection() as holder:
            await holder.fetchone("SELECT GET_LOCK(%s, 0)", (lock_name(empty_db_dsn.database),))
            async with trio.open_nursery() as nursery:
                versions: list[int] = []

                async def run() -> None:
                    versions.append(await migrate(pool, lock_timeout=10))

                nursery.start_soon(run)
                await trio.sleep(0.8)  # well past the 0.3 s deadline
                await holder.fetchone(
                    "SELECT RELEASE_LOCK(%s)", (lock_name(empty_db_dsn.database),)
                )
        assert versions == [latest_version()]
        async with pool.connection() as conn:  # the session's deadline is back
            with pytest.raises(DependencyUnavailable):
                await conn.fetchone("SELECT SLEEP(2)")
    finally:
        await pool.aclose()
        await other.aclose()
