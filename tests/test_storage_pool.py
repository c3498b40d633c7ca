"""The connection pool against the real MariaDB: bounds, reuse, lost and cancelled
sessions, transactions, and failures that must read "database unavailable"."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import pytest
import trio
import trio_mysql

from payments.config import ConfigError, MysqlDsn, Settings
from payments.errors import DependencyUnavailable
from payments.storage import pool as pool_module
from payments.storage import repository as repo
from payments.storage.pool import Pool
from tests.fixtures.db import MysqlServer, make_payment


@pytest.fixture
async def admin(mysql_server: MysqlServer) -> AsyncIterator[Pool]:
    """A separate server-level pool to watch and KILL the pool's sessions."""
    pool = Pool(mysql_server.dsn, 1, 1, 0)
    try:
        yield pool
    finally:
        await pool.aclose()


async def sessions(admin: Pool, database: str) -> dict[int, str]:
    """Server sessions using ``database``: thread id -> current statement."""
    async with admin.connection() as conn:
        rows = await conn.fetchall(
            "SELECT ID, COALESCE(INFO, '') FROM information_schema.PROCESSLIST WHERE DB = %s",
            (database,),
        )
    return {int(thread): info for thread, info in rows}


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Poll the server until ``check`` holds (it closes sessions a moment after us)."""
    with trio.move_on_after(within):
        while True:
            if await check():
                return True
            await trio.sleep(0.01)
    return await check()


async def wait_sessions(admin: Pool, database: str, count: int, within: float = 2.0) -> None:
    async def check() -> bool:
        return len(await sessions(admin, database)) == count

    assert await eventually(check, within), await sessions(admin, database)


async def wait_gone(admin: Pool, database: str, thread_id: int, within: float = 2.0) -> None:
    async def check() -> bool:
        return thread_id not in await sessions(admin, database)

    assert await eventually(check, within), await sessions(admin, database)


async def kill(admin: Pool, thread_id: int) -> None:
    async with admin.connection() as conn:
        await conn.execute("KILL %s", (thread_id,))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- sessions --------------------------------------------------------------------------


async def test_sessions_are_utf8mb4_autocommit_utc(db_pool: Pool) -> None:
    async with db_pool.connection() as conn:
        row = await conn.fetchone(
            "SELECT @@session.time_zone, @@session.autocommit, @@character_set_connection,"
            " @@character_set_results, @@session.sql_mode LIKE %s",
            ("%STRICT_ALL_TABLES%",),
        )
        assert await conn.fetchone("SELECT %s", ("zahlung 💳",)) == ("zahlung 💳",)
    assert row == ("+00:00", 1, "utf8mb4", "utf8mb4", 1)
    stats = db_pool.stats()
    assert (stats.open, stats.idle, stats.in_use) == (1, 1, 0)


async def test_a_session_is_reused(db_pool: Pool) -> None:
    async with db_pool.connection() as conn:
        first = conn.thread_id
    async with db_pool.connection() as conn:
        assert conn.thread_id == first
    assert db_pool.stats().opened_total == 1


async def test_server_error_propagates_and_keeps_the_session(db_pool: Pool) -> None:
    async with db_pool.connection() as conn:
        with pytest.raises(trio_mysql.err.ProgrammingError):
            await conn.fetchone("SELEKT 1")
        assert not conn.broken
        assert await conn.fetchone("SELECT 1") == (1,)
    assert db_pool.stats().closed_total == 0


# --- bounds ----------------------------------------------------------------------------


async def test_never_opens_more_than_max_open(empty_db_dsn: MysqlDsn, admin: Pool) -> None:
    pool = Pool(empty_db_dsn, max_open=3, max_idle=3, max_lifetime_seconds=60)
    peak_pool = peak_server = peak_waiting = done = 0

    async def worker() -> None:
        nonlocal done
        async with pool.connection() as conn:
            await conn.fetchone("SELECT SLEEP(0.02)")
        done += 1

    async def watch() -> None:
        nonlocal peak_pool, peak_server, peak_waiting
        while True:
            stats = pool.stats()
            peak_pool = max(peak_pool, stats.open)
            peak_waiting = max(peak_waiting, stats.waiting)
            peak_server = max(peak_server, len(await sessions(admin, empty_db_dsn.database)))
            await trio.sleep(0.003)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as workers:
                for _ in range(30):
                    workers.start_soon(worker)
            nursery.cancel_scope.cancel()
        assert done == 30
        assert peak_pool == 3  # reached the bound, never passed it
        assert 1 <= peak_server <= 3
        assert peak_waiting > 0  # tasks really queued for a slot
        stats = pool.stats()
        assert (stats.in_use, stats.open, stats.opened_total) == (0, 3, 3)
    finally:
        await pool.aclose()


async def test_trims_idle_sessions_to_max_idle(empty_db_dsn: MysqlDsn, admin: Pool) -> None:
    pool = Pool(empty_db_dsn, max_open=5, max_idle=2, max_lifetime_seconds=60)
    all_in, release = trio.Event(), trio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with pool.connection() as conn:
            await conn.fetchone("SELECT 1")
            holding += 1
            if holding == 5:
                all_in.set()
            await release.wait()

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(hold)
            await all_in.wait()
            assert pool.stats().in_use == 5
            await wait_sessions(admin, empty_db_dsn.database, 5)
            release.set()
        stats = pool.stats()
        assert (stats.open, stats.idle, stats.in_use) == (2, 2, 0)
        assert (stats.opened_total, stats.closed_total) == (5, 3)
        await wait_sessions(admin, empty_db_dsn.database, 2)
    finally:
        await pool.aclose()
    await wait_sessions(admin, empty_db_dsn.database, 0)


async def test_retires_sessions_past_max_lifetime(empty_db_dsn: MysqlDsn) -> None:
    pool = Pool(empty_db_dsn, max_open=2, max_idle=2, max_lifetime_seconds=0.3)
    try:
        async with pool.connection() as conn:
            first = conn.thread_id
        async with pool.connection() as conn:
            assert conn.thread_id == first  # young: reused
        await trio.sleep(0.35)
        async with pool.connection() as conn:  # old while idle: replaced before reuse
            second = conn.thread_id
            assert second != first
            await trio.sleep(0.35)  # grows old while in use
        stats = pool.stats()
        assert (stats.idle, stats.open, stats.closed_total) == (0, 0, 2)  # closed on return
        async with pool.connection() as conn:
            assert conn.thread_id not in (first, second)
    finally:
        await pool.aclose()


async def test_waiting_for_a_slot_times_out_as_unavailable(empty_db_dsn: MysqlDsn) -> None:
    pool = Pool(empty_db_dsn, 1, 1, 60, acquire_timeout=0.2)
    try:
        async with pool.connection():
            with (
                trio.fail_after(2),
                pytest.raises(DependencyUnavailable, match=r"^database unavailable$"),
            ):
                async with pool.connection():
                    pass
        assert pool.stats().waiting == 0
        async with pool.connection() as conn:  # the slot came back
            assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


# --- lost sessions ---------------------------------------------------------------------


async def test_session_killed_while_idle_is_replaced(empty_db_dsn: MysqlDsn, admin: Pool) -> None:
    pool = Pool(empty_db_dsn, max_open=2, max_idle=2, max_lifetime_seconds=60)
    try:
        async with pool.connection() as conn:
            victim = conn.thread_id
        await kill(admin, victim)
        await wait_gone(admin, empty_db_dsn.database, victim)
        async with pool.connection() as conn:
            assert conn.thread_id != victim
            assert await conn.fetchone("SELECT 1") == (1,)
        stats = pool.stats()
        assert (stats.opened_total, stats.closed_total, stats.open) == (2, 1, 1)
    finally:
        await pool.aclose()


async def test_dead_idle_session_found_by_ping(
    empty_db_dsn: MysqlDsn, admin: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the socket looked fine (a silent network drop): the ping must catch it.
    monkeypatch.setattr(pool_module, "_socket_looks_alive", lambda raw: True)
    pool = Pool(empty_db_dsn, 2, 2, 60, ping_after_idle_seconds=0)
    try:
        async with pool.connection() as conn:
            victim = conn.thread_id
        await kill(admin, victim)
        await wait_gone(admin, empty_db_dsn.database, victim)
        async with pool.connection() as conn:
            assert conn.thread_id != victim
            assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


async def test_session_killed_while_in_use_fails_once_then_recovers(
    empty_db_dsn: MysqlDsn, admin: Pool
) -> None:
    pool = Pool(empty_db_dsn, max_open=1, max_idle=1, max_lifetime_seconds=60)
    try:
        async with pool.connection() as conn:
            victim = conn.thread_id
            await kill(admin, victim)
            await wait_gone(admin, empty_db_dsn.database, victim)
            with pytest.raises(DependencyUnavailable) as caught:
                await conn.fetchone("SELECT 'a secret statement'")
            assert str(caught.value) == "database unavailable"  # no SQL, no server text
            assert conn.broken
        assert (pool.stats().open, pool.stats().in_use) == (0, 0)
        with trio.fail_after(2):
            async with pool.connection() as conn:
                assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


# --- cancellation ----------------------------------------------------------------------


async def test_cancelled_query_closes_the_session_and_frees_the_slot(
    empty_db_dsn: MysqlDsn, admin: Pool
) -> None:
    pool = Pool(empty_db_dsn, max_open=1, max_idle=1, max_lifetime_seconds=60)
    try:
        started = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            async with pool.connection() as conn:
                victim = conn.thread_id
                await conn.fetchone("SELECT SLEEP(5)")
        assert scope.cancelled_caught
        assert trio.current_time() - started < 1.5
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.open) == (0, 0, 0)
        # The server stops the abandoned statement too (KILL), long before its 5 s.
        await wait_gone(admin, empty_db_dsn.database, victim, within=1.0)
        with trio.fail_after(2):  # max_open=1: a leaked slot would hang here
            async with pool.connection() as conn:
                assert conn.thread_id != victim
                assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


async def test_cancelled_transaction_commits_nothing(db_pool: Pool) -> None:
    payment = make_payment()
    with trio.move_on_after(0.2):
        async with db_pool.transaction() as conn:
            await repo.insert_payment(conn, payment)
            await conn.fetchone("SELECT SLEEP(5)")
    assert db_pool.stats().in_use == 0
    with trio.fail_after(2):
        async with db_pool.connection() as conn:
            got = await repo.get_payment_by_request(conn, "orders", payment.request_id)
    assert got is None


async def test_cancelled_between_statements_in_a_transaction_rolls_back(
    db_pool: Pool, admin: Pool
) -> None:
    payment = make_payment()
    with trio.move_on_after(0.1):
        async with db_pool.transaction() as conn:
            await repo.insert_payment(conn, payment)
            await trio.sleep(5)  # cancelled here, no statement on the wire
    assert db_pool.stats().in_use == 0
    # The session is closed at once (we still hold `conn`: no garbage collector helps),
    # so the server rolls back and frees the row locks now, not later.
    await wait_gone(admin, db_pool.dsn.database, conn.thread_id, within=1.0)
    async with db_pool.connection() as other:
        assert await repo.get_payment_by_request(other, "orders", payment.request_id) is None


async def test_cancelled_while_waiting_for_a_slot_takes_none(empty_db_dsn: MysqlDsn) -> None:
    pool = Pool(empty_db_dsn, max_open=1, max_idle=1, max_lifetime_seconds=60)
    try:
        async with pool.connection():
            with trio.move_on_after(0.1) as scope:
                async with pool.connection():
                    pass
            assert scope.cancelled_caught
            assert pool.stats().waiting == 0
        with trio.fail_after(2):
            async with pool.connection() as conn:
                assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


async def test_a_cancelled_task_takes_no_idle_session(empty_db_dsn: MysqlDsn) -> None:
    """The idle session is lent without waiting for anything, but a task already
    cancelled still never gets it (it would be closed and KILLed at its first query)."""
    pool = Pool(empty_db_dsn, max_open=2, max_idle=2, max_lifetime_seconds=60)
    try:
        async with pool.connection() as conn:
            kept = conn.thread_id
        with trio.CancelScope() as scope:
            scope.cancel()
            async with pool.connection():
                raise AssertionError("lent to a cancelled task")
        assert scope.cancelled_caught
        stats = pool.stats()
        assert (stats.idle, stats.in_use, stats.opened_total, stats.closed_total) == (1, 0, 1, 0)
        async with pool.connection() as conn:
            assert conn.thread_id == kept
            assert await conn.fetchone("SELECT 1") == (1,)
    finally:
        await pool.aclose()


# --- transactions ----------------------------------------------------------------------


async def test_transaction_commits_on_success(db_pool: Pool) -> None:
    async with db_pool.transaction() as conn:
        payment_id = await repo.insert_payment(conn, make_payment())
        assert conn.in_transaction
    assert not conn.in_transaction
    other = Pool(db_pool.dsn, 1, 1, 60)
    try:
        async with other.connection() as conn:
            assert await repo.get_payment(conn, payment_id) is not None
    finally:
        await other.aclose()


async def test_transaction_rolls_back_on_exception(db_pool: Pool) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with db_pool.transaction() as conn:
            payment_id = await repo.insert_payment(conn, make_payment())
            raise RuntimeError("boom")
    async with db_pool.connection() as conn:
        assert not conn.in_transaction
        assert await repo.get_payment(conn, payment_id) is None
    stats = db_pool.stats()
    assert (stats.opened_total, stats.closed_total) == (1, 0)  # the session was kept


# --- unreachable -----------------------------------------------------------------------


async def test_refused_connection_is_unavailable_quickly() -> None:
    dsn = MysqlDsn(host="127.0.0.1", port=free_port(), user="root", password="", database="x")
    pool = Pool(dsn, 2, 2, 60, connect_timeout=2)
    with trio.fail_after(1), pytest.raises(DependencyUnavailable) as caught:
        async with pool.connection():
            pass
    assert str(caught.value) == "database unavailable"
    assert attrs.astuple(pool.stats())[:4] == (0, 0, 0, 0)


async def test_silent_server_times_out_as_unavailable() -> None:
    async def never_speak(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, never_speak, 0)
        port = listeners[0].socket.getsockname()[1]
        dsn = MysqlDsn(host="127.0.0.1", port=port, user="root", password="", database="x")
        pool = Pool(dsn, 1, 1, 60, connect_timeout=0.3)
        for _ in range(2):  # the slot comes back after a timeout
            with trio.fail_after(2), pytest.raises(DependencyUnavailable):
                async with pool.connection():
                    pass
        assert (pool.stats().in_use, pool.stats().connecting) == (0, 0)
        nursery.cancel_scope.cancel()


async def test_bad_credentials_are_unavailable(test_db_dsn: MysqlDsn) -> None:
    dsn = attrs.evolve(test_db_dsn, user="payments_no_such_user", password="wrong-secret")
    pool = Pool(dsn, 1, 1, 60)
    with pytest.raises(DependencyUnavailable) as caught:
        async with pool.connection():
            pass
    assert "wrong-secret" not in str(caught.value)
    assert str(caught.value) == "database unavailable"


async def test_closed_pool_refuses_and_closes_returning_sessions(empty_db_dsn: MysqlDsn) -> None:
    pool = Pool(empty_db_dsn, 2, 2, 60)
    async with pool.connection():
        pass
    async with pool.connection() as conn:
        await pool.aclose()
        assert pool.stats().idle == 0
        assert await conn.fetchone("SELECT 1") == (1,)  # in use: still works
    assert pool.stats().open == 0
    with pytest.raises(DependencyUnavailable):
        async with pool.connection():
            pass


def test_pool_from_settings_uses_the_mysql_settings(test_db_dsn: MysqlDsn) -> None:
    settings = Settings(
        mysql_dsn=test_db_dsn,
        mysql_max_open_conns=7,
        mysql_max_idle_conns=3,
        mysql_conn_max_lifetime_minutes=0.5,
    )
    pool = Pool.from_settings(settings)
    stats = pool.stats()
    assert (stats.max_open, stats.max_idle, stats.open) == (7, 3, 0)
    assert pool._max_lifetime == 30
    assert (
        Pool.from_settings(attrs.evolve(settings, mysql_conn_max_lifetime_minutes=0))._max_lifetime
        is None
    )
    with pytest.raises(ConfigError, match="MYSQL_DSN"):
        Pool.from_settings(Settings())
