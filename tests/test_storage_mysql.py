"""What only the MySQL backend has, against the real MariaDB: row locks between
sessions, ``SKIP LOCKED`` between dispatcher replicas, and query plans that read through
the indexes. Everything both backends promise is in test_storage_contract.py; the pool's
session handling is in test_storage_pool.py.

The outbox lease rules make many replicas safe only if a row one replica is claiming is
skipped by the others rather than waited for: pinned here with a second pool.
"""

from __future__ import annotations

from typing import cast

import pytest
import trio

from payments.config import MysqlDsn
from payments.errors import DependencyUnavailable
from payments.model import Payment
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection
from payments.storage.pool import Pool
from tests.fixtures.db import make_payment
from tests.storage_support import (
    LEASE,
    RecordingConnection,
    event_for,
    insert,
    later,
    queue_callbacks,
    record_payment_reads,
    varied_payment,
)

# EXPLAIN access types that read through an index (not ALL: a table scan; not index:
# a whole-index scan).
INDEXED_ACCESS = {"const", "eq_ref", "ref", "range", "index_merge", "ref_or_null"}


async def test_for_update_locks_the_row(db_pool: Pool) -> None:
    payment = await insert(db_pool, make_payment())
    async with db_pool.transaction() as conn:
        assert await repo.get_payment(conn, payment.id, for_update=True) == payment
        async with db_pool.transaction() as other:
            with pytest.raises(DependencyUnavailable):  # lock wait: retry later
                await other.fetchone(
                    "SELECT id FROM payments WHERE id = %s FOR UPDATE NOWAIT", (payment.id,)
                )


async def test_lookups_and_list_filters_use_indexes(db_pool: Pool) -> None:
    seeded: list[Payment] = []
    async with db_pool.transaction() as conn:
        for n in range(400):
            payment = varied_payment(n)
            payment.id = await repo.insert_payment(conn, payment)
            await repo.insert_event(conn, event_for(payment))
            seeded.append(payment)
        await conn.fetchall("ANALYZE TABLE payments, payment_events")
    sample = seeded[201]
    async with db_pool.connection() as conn:
        recorder = await record_payment_reads(conn, sample)
        for sql, args in recorder.statements:
            plan = await conn.fetchall("EXPLAIN " + sql, args)
            reads = [row for row in plan if row[2] in ("payments", "payment_events")]
            assert reads, f"{sql} {args} -> {plan}"  # derived/union rows aside
            for _, _, _, access, _, key, *_ in reads:
                assert access in INDEXED_ACCESS and key, f"{sql} {args} -> {plan}"


async def test_the_due_query_uses_its_index(db_pool: Pool) -> None:
    entries = await queue_callbacks(db_pool, 30)
    async with db_pool.connection() as conn:
        ids = [e.id for e in entries[:20]]
        marks = ", ".join(["%s"] * len(ids))
        await conn.execute(
            f"UPDATE callback_outbox SET state = 'delivered' WHERE id IN ({marks})", ids
        )
        await conn.execute("ANALYZE TABLE callback_outbox")
        now = repo.to_db_datetime(later())
        plan = await conn.fetchall(
            f"EXPLAIN {outbox.DUE_QUERY} FOR UPDATE SKIP LOCKED", (now, now, 10)
        )
    (row,) = plan
    access_type, key, extra = row[3], row[5], row[9] or ""
    assert key == "ix_callback_outbox_due"
    assert access_type == "range"
    assert "filesort" not in extra  # the index yields next_attempt_at order
    async with db_pool.connection() as conn:
        recorder = RecordingConnection(conn)
        await outbox.due_backlog(cast(Connection, recorder), later())
        ((sql, args),) = recorder.statements
        (row,) = await conn.fetchall("EXPLAIN " + sql, args)
    # The outbox gauges' count: a range read of the same index, never the table.
    assert (row[3], row[5]) == ("range", "ix_callback_outbox_due")
    assert "Using index" in (row[9] or "")


async def test_a_row_locked_by_another_claimer_is_skipped_not_waited_for(
    db_pool: Pool, test_db_dsn: MysqlDsn
) -> None:
    first, second = await queue_callbacks(db_pool, 2)
    other = Pool(test_db_dsn, max_open=1, max_idle=1)
    try:
        async with other.transaction() as holder:
            # Another replica in the middle of its claim transaction, holding `first`.
            await holder.fetchone(
                "SELECT id FROM callback_outbox WHERE id = %s FOR UPDATE", (first.id,)
            )
            with trio.fail_after(2):  # a lock wait would take innodb_lock_wait_timeout
                claimed = await outbox.claim_due(db_pool, "w", later(), LEASE, limit=10)
            assert [e.id for e in claimed] == [second.id]
    finally:
        await other.aclose()


async def test_concurrent_claims_from_two_pools_are_disjoint(
    db_pool: Pool, test_db_dsn: MysqlDsn
) -> None:
    entries = await queue_callbacks(db_pool, 60)
    other = Pool(test_db_dsn, max_open=2, max_idle=2)
    got: dict[str, list[int]] = {"a": [], "b": []}
    now = later()

    async def claim_all(pool: Pool, worker: str) -> None:
        while batch := await outbox.claim_due(pool, worker, now, LEASE, limit=7):
            got[worker].extend(e.id for e in batch)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim_all, db_pool, "a")
            nursery.start_soon(claim_all, other, "b")
    finally:
        await other.aclose()
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(e.id for e in entries)
