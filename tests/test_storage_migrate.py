"""schema.sql and the migration runner against the real MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from payments.config import MysqlDsn
from payments.errors import DependencyUnavailable
from payments.storage.migrate import (
    Step,
    current_version,
    latest_version,
    load_steps,
    lock_name,
    migrate,
    parse_schema,
    schema_path,
)
from payments.storage.pool import Pool

EXPECTED_TABLES = {
    "schema_version",
    "payments",
    "payment_events",
    "callback_outbox",
    "callback_attempts",
    "provider_callbacks",
    "refunds",
    "refund_events",
}


async def tables(pool: Pool) -> dict[str, tuple[str, str]]:
    async with pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT TABLE_NAME, ENGINE, TABLE_COLLATION FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = DATABASE()"
        )
    return {name: (engine, collation) for name, engine, collation in rows}


async def versions(pool: Pool) -> list[int]:
    async with pool.connection() as conn:
        rows = await conn.fetchall("SELECT version FROM schema_version ORDER BY version")
    return [int(version) for (version,) in rows]


@pytest.fixture
async def empty_pool(empty_db_dsn: MysqlDsn) -> AsyncIterator[Pool]:
    pool = Pool(empty_db_dsn, 2, 2, 60)
    try:
        yield pool
    finally:
        await pool.aclose()


def test_schema_file_names_no_database() -> None:
    text = schema_path().read_text(encoding="utf-8").upper()
    assert "USE " not in text
    assert "CREATE DATABASE" not in text
    assert "CREATE TABLE IF NOT EXISTS" in text
    for line in text.splitlines():
        if line.startswith("CREATE TABLE"):
            assert "IF NOT EXISTS" in line, line


def test_parse_schema_splits_steps_and_statements() -> None:
    steps = parse_schema(
        "-- header comment; with a semicolon\n"
        "-- migrate:step 1 first\n"
        "CREATE TABLE a (\n"
        "    -- a comment; inside\n"
        "    id INT\n"
        ");\n"
        "CREATE TABLE b (id INT);\n"
        "-- migrate:step 2 second\n"
        "ALTER TABLE a ADD COLUMN IF NOT EXISTS x INT;\n"
    )
    assert steps == [
        Step(1, ("CREATE TABLE a (\n    id INT\n)", "CREATE TABLE b (id INT)")),
        Step(2, ("ALTER TABLE a ADD COLUMN IF NOT EXISTS x INT",)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "-- migrate:step 2\nSELECT 1;\n",  # must start at 1
        "-- migrate:step 1\nSELECT 1;\n-- migrate:step 1\nSELECT 2;\n",  # repeated
        "-- migrate:step 1\nSELECT 1\n",  # no closing ';'
        "SELECT 1;\n-- migrate:step 1\nSELECT 1;\n",  # SQL outside a step
        "-- only comments\n",
    ],
)
def test_parse_schema_refuses_mistakes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schema(text)


async def test_migrate_creates_the_schema_and_records_the_version(empty_pool: Pool) -> None:
    latest = latest_version()
    assert await migrate(empty_pool) == latest
    found = await tables(empty_pool)
    assert set(found) == EXPECTED_TABLES
    for engine, collation in found.values():
        assert engine == "InnoDB"
        assert collation.startswith("utf8mb4")
    assert await versions(empty_pool) == list(range(1, latest + 1))
    async with empty_pool.connection() as conn:
        assert await current_version(conn) == latest


async def test_migrate_is_idempotent(empty_pool: Pool) -> None:
    first = await migrate(empty_pool)
    async with empty_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payment_events (payment_id, kind, from_status, to_status, reason,"
            " created_at) VALUES (1, 'created', 0, 1, '', UTC_TIMESTAMP(6))"
        )
    assert await migrate(empty_pool) == first
    assert await migrate(empty_pool) == first
    assert await versions(empty_pool) == list(range(1, first + 1))
    async with empty_pool.connection() as conn:  # data survives a re-run
        assert await conn.fetchone("SELECT COUNT(*) FROM payment_events") == (1,)


async def test_concurrent_migrations_apply_each_step_once(empty_db_dsn: MysqlDsn) -> None:
    pools = [Pool(empty_db_dsn, 1, 1, 60) for _ in range(4)]
    results: list[int] = []

    async def run(pool: Pool) -> None:
        results.append(await migrate(pool))

    try:
        async with trio.open_nursery() as nursery:
            for pool in pools:
                nursery.start_soon(run, pool)
        assert results == [latest_version()] * 4
        assert await versions(pools[0]) == list(range(1, latest_version() + 1))
        assert set(await tables(pools[0])) == EXPECTED_TABLES
    finally:
        for pool in pools:
            await pool.aclose()


async def test_a_new_step_is_applied_once_on_top(empty_pool: Pool) -> None:
    steps = load_steps()
    assert await migrate(empty_pool, steps=steps) == len(steps)
    upgrade = [
        *steps,
        Step(
            len(steps) + 1,
            (
                "ALTER TABLE payments"
                " ADD COLUMN IF NOT EXISTS note VARCHAR(32) NOT NULL DEFAULT ''",
                "CREATE TABLE IF NOT EXISTS later_table (id INT PRIMARY KEY) ENGINE=InnoDB",
            ),
        ),
    ]
    assert await migrate(empty_pool, steps=upgrade) == len(steps) + 1
    assert await migrate(empty_pool, steps=upgrade) == len(steps) + 1
    assert await versions(empty_pool) == list(range(1, len(steps) + 2))
    assert "later_table" in await tables(empty_pool)
    async with empty_pool.connection() as conn:
        assert await conn.fetchone("SELECT COUNT(note) FROM payments") == (0,)


async def test_a_database_ahead_of_the_code_is_left_alone(empty_pool: Pool) -> None:
    await migrate(empty_pool)
    async with empty_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (99, UTC_TIMESTAMP(6))"
        )
    assert await migrate(empty_pool) == 99


async def test_migrate_waits_for_the_lock_and_gives_up(empty_pool: Pool) -> None:
    await migrate(empty_pool)
    other = Pool(empty_pool.dsn, 1, 1, 60)
    try:
        async with other.connection() as holder:
            # Take the lock the way another migrating process would.
            assert await holder.fetchone(
                "SELECT GET_LOCK(%s, 0)", (lock_name(empty_pool.dsn.database),)
            ) == (1,)
            with trio.fail_after(3), pytest.raises(DependencyUnavailable):
                await migrate(empty_pool, lock_timeout=0.2)
    finally:
        await other.aclose()
    assert await migrate(empty_pool, lock_timeout=0.2) == latest_version()  # released


async def test_callback_deliveries_step_keeps_existing_callbacks_and_reruns_cleanly(
    empty_pool: Pool,
) -> None:
    """Callback deliveries (step 6) on a database with callbacks from before it; each
    statement may run again after a crash halfway (DDL commits one at a time)."""
    steps = load_steps()
    deliveries = steps[5]  # step 6: callback deliveries
    before = deliveries.version - 1
    assert await migrate(empty_pool, steps=steps[:before]) == before
    async with empty_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO callback_outbox (payment_id, status, delivery_id, url, request_id,"
            " payload, state, next_attempt_at, created_at, updated_at) VALUES"
            " (7, 10, 'msg_old', 'https://x/cb', 'r', '{}', 'failed', UTC_TIMESTAMP(6),"
            " UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
        )
    assert await migrate(empty_pool) == latest_version()
    async with empty_pool.connection() as conn:
        for statement in deliveries.statements:
            await conn.execute(statement)
        row = await conn.fetchone(
            "SELECT kind, refund_id, resend, state FROM callback_outbox"
            " WHERE delivery_id = 'msg_old'"
        )
        keys = {
            name
            for (name,) in await conn.fetchall(
                "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'callback_outbox'"
            )
        }
    assert row == ("payment", 0, 0, "failed")
    assert "uq_callback_outbox_payment_status" not in keys
    assert {
        "uq_callback_outbox_announcement",
        "ix_callback_outbox_state_created",
        "ix_callback_outbox_state_updated",
    } <= keys
