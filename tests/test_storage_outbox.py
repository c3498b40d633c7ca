"""The callback outbox against the real database: claims, leases, attempts.

The lease rules are what make many dispatcher replicas safe, so each is pinned here:
a claimed row is invisible to other claimers until its lease ends, a locked row is
skipped rather than waited for, an expired lease is taken over, and a worker whose
lease was taken over cannot write its stale outcome.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import trio

from payments.config import MysqlDsn
from payments.model import OutboxEntry, OutboxState, PaymentStatus, utcnow
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.outbox import CallbackAttempt
from payments.storage.pool import Pool
from payments.unit_of_work import Work
from tests.fixtures.db import make_payment

LEASE = 60.0


async def queue_callbacks(
    pool: Pool,
    count: int = 1,
    url: str = "https://orders.internal/payments/callback",
    status: PaymentStatus = PaymentStatus.PAID,
) -> list[OutboxEntry]:
    """``count`` payments moved to ``status`` the way the service does it (their
    outbox rows written by the unit of work); the rows, oldest first."""
    entries = []
    async with pool.transaction() as conn:
        for _ in range(count):
            payment = make_payment(status=PaymentStatus.PENDING, status_callback_url=url)
            payment.id = await repo.insert_payment(conn, payment)
            assert await Work(conn).change_status(payment, status, reason="test")
            entries.extend(await outbox.entries_for_payment(conn, payment.id))
    return entries


def later(seconds: float = 1.0) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


async def fetch(pool: Pool, outbox_id: int) -> OutboxEntry:
    async with pool.connection() as conn:
        entry = await outbox.get_entry(conn, outbox_id)
    assert entry is not None
    return entry


def attempt_of(entry: OutboxEntry, at: datetime, status_code: int | None = 500) -> CallbackAttempt:
    return CallbackAttempt(entry.id, entry.attempts + 1, at, status_code, "HTTP 500", 12)


async def test_lifecycle_queues_one_callback_per_terminal_status(db_pool: Pool) -> None:
    (entry,) = await queue_callbacks(db_pool)
    assert entry.state == OutboxState.PENDING
    assert entry.delivery_id.startswith("msg_")
    assert entry.claimed_by == "" and entry.claimed_until is None
    assert '"status":10' in entry.payload


async def test_claim_takes_due_rows_oldest_first_and_stamps_the_lease(db_pool: Pool) -> None:
    entries = await queue_callbacks(db_pool, 3)
    now = later()
    claimed = await outbox.claim_due(db_pool, "worker-a", now, LEASE, limit=2)
    assert [e.id for e in claimed] == [e.id for e in entries[:2]]
    until = now + timedelta(seconds=LEASE)
    for entry in claimed:
        assert (entry.claimed_by, entry.claimed_until) == ("worker-a", until)
        stored = await fetch(db_pool, entry.id)
        assert (stored.claimed_by, stored.claimed_until) == ("worker-a", until)
    # The leased rows are invisible to the next claimer; the third is not.
    again = await outbox.claim_due(db_pool, "worker-b", now, LEASE, limit=10)
    assert [e.id for e in again] == [entries[2].id]


async def test_claim_ignores_rows_not_yet_due_and_rows_not_pending(db_pool: Pool) -> None:
    first, second = await queue_callbacks(db_pool, 2)
    async with db_pool.connection() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET next_attempt_at = %s WHERE id = %s",
            (repo.to_db_datetime(later(3600)), first.id),
        )
        await conn.execute(
            "UPDATE callback_outbox SET state = 'delivered' WHERE id = %s", (second.id,)
        )
    assert await outbox.claim_due(db_pool, "w", later(), LEASE, limit=10) == []
    # Due once the clock reaches it.
    claimed = await outbox.claim_due(db_pool, "w", later(3601), LEASE, limit=10)
    assert [e.id for e in claimed] == [first.id]


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


async def test_an_expired_lease_is_taken_over(db_pool: Pool) -> None:
    (entry,) = await queue_callbacks(db_pool)
    start = later()
    (mine,) = await outbox.claim_due(db_pool, "crashed", start, LEASE, limit=1)
    half_way = start + timedelta(seconds=LEASE / 2)
    assert await outbox.claim_due(db_pool, "other", half_way, LEASE, limit=1) == []
    expired = start + timedelta(seconds=LEASE)
    (taken,) = await outbox.claim_due(db_pool, "other", expired, LEASE, limit=1)
    assert taken.id == mine.id == entry.id
    stored = await fetch(db_pool, entry.id)
    assert stored.claimed_by == "other"
    assert stored.claimed_until == expired + timedelta(seconds=LEASE)


async def test_a_stale_worker_cannot_overwrite_the_new_owner(db_pool: Pool) -> None:
    (entry,) = await queue_callbacks(db_pool)
    start = later()
    (stale,) = await outbox.claim_due(db_pool, "slow", start, LEASE, limit=1)
    takeover = start + timedelta(seconds=LEASE + 1)
    (fresh,) = await outbox.claim_due(db_pool, "fast", takeover, LEASE, limit=1)

    async with db_pool.transaction() as conn:
        written = await outbox.record_attempt(
            conn, stale, "slow", attempt_of(stale, takeover), OutboxState.FAILED, takeover
        )
        assert not written
        assert not await outbox.release(conn, stale, "slow")
        assert await outbox.attempts_for(conn, entry.id) == []
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.claimed_by) == (OutboxState.PENDING, 0, "fast")

    async with db_pool.transaction() as conn:
        assert await outbox.record_attempt(
            conn,
            fresh,
            "fast",
            attempt_of(fresh, takeover, 200),
            OutboxState.DELIVERED,
            takeover,
        )
    stored = await fetch(db_pool, entry.id)
    assert stored.state == OutboxState.DELIVERED


async def test_the_same_worker_cannot_record_under_its_own_expired_lease(db_pool: Pool) -> None:
    await queue_callbacks(db_pool)
    start = later()
    (old,) = await outbox.claim_due(db_pool, "w", start, LEASE, limit=1)
    (new,) = await outbox.claim_due(db_pool, "w", start + timedelta(seconds=LEASE), LEASE, 1)
    async with db_pool.transaction() as conn:
        assert not await outbox.record_attempt(
            conn, old, "w", attempt_of(old, start), OutboxState.PENDING, start
        )
        assert await outbox.record_attempt(
            conn, new, "w", attempt_of(new, start), OutboxState.PENDING, start
        )


async def test_record_attempt_keeps_history_and_releases_the_claim(db_pool: Pool) -> None:
    (entry,) = await queue_callbacks(db_pool)
    t1 = later()
    (claimed,) = await outbox.claim_due(db_pool, "w", t1, LEASE, limit=1)
    retry_at = t1 + timedelta(minutes=5)
    long_error = "x" * 2000
    async with db_pool.transaction() as conn:
        assert await outbox.record_attempt(
            conn,
            claimed,
            "w",
            CallbackAttempt(entry.id, 1, t1, None, long_error, 10_000),
            OutboxState.PENDING,
            retry_at,
        )
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.next_attempt_at) == (
        OutboxState.PENDING,
        1,
        retry_at,
    )
    assert (stored.claimed_by, stored.claimed_until) == ("", None)
    assert len(stored.last_error) == outbox.ERROR_MAX_CHARS
    # Not due again before retry_at.
    assert await outbox.claim_due(db_pool, "w", retry_at - timedelta(seconds=1), LEASE, 1) == []

    (claimed,) = await outbox.claim_due(db_pool, "w", retry_at, LEASE, limit=1)
    async with db_pool.transaction() as conn:
        assert await outbox.record_attempt(
            conn,
            claimed,
            "w",
            CallbackAttempt(entry.id, 2, retry_at, 204, "", 35),
            OutboxState.DELIVERED,
            retry_at,
        )
        attempts = await outbox.attempts_for(conn, entry.id)
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.delivered_at, stored.last_error) == (
        OutboxState.DELIVERED,
        2,
        retry_at,
        "",
    )
    assert [(a.attempt, a.attempted_at, a.status_code, a.latency_ms) for a in attempts] == [
        (1, t1, None, 10_000),
        (2, retry_at, 204, 35),
    ]
    assert attempts[0].error.endswith("...") and len(attempts[0].error) == outbox.ERROR_MAX_CHARS
    # Delivered rows are never claimed again.
    assert await outbox.claim_due(db_pool, "w", retry_at + timedelta(days=1), LEASE, 1) == []


async def test_release_makes_a_row_claimable_at_once(db_pool: Pool) -> None:
    (entry,) = await queue_callbacks(db_pool)
    now = later()
    (claimed,) = await outbox.claim_due(db_pool, "w", now, LEASE, limit=1)
    async with db_pool.connection() as conn:
        assert await outbox.release(conn, claimed, "w")
    (again,) = await outbox.claim_due(db_pool, "other", now, LEASE, limit=1)
    assert again.id == entry.id


async def test_next_due_at_sees_retries_and_leases_within_the_horizon(db_pool: Pool) -> None:
    first, second = await queue_callbacks(db_pool, 2)
    now = later()
    async with db_pool.connection() as conn:
        # Both are due now.
        assert await outbox.next_due_at(conn, now) == first.next_attempt_at
    (claimed,) = await outbox.claim_due(db_pool, "w", now, LEASE, limit=1)
    retry_at = now + timedelta(minutes=10)
    async with db_pool.transaction() as conn:
        await outbox.record_attempt(
            conn, claimed, "w", attempt_of(claimed, now), OutboxState.PENDING, retry_at
        )
    (leased,) = await outbox.claim_due(db_pool, "other", now, LEASE, limit=1)
    assert leased.id == second.id
    async with db_pool.connection() as conn:
        # `second` is due but leased: claimable when its lease ends.
        assert await outbox.next_due_at(conn, now + timedelta(minutes=1)) == leased.claimed_until
        assert await outbox.next_due_at(conn, now - timedelta(days=1)) is None
    async with db_pool.connection() as conn:
        await outbox.release(conn, leased, "other")
        await conn.execute(
            "UPDATE callback_outbox SET state = 'delivered' WHERE id = %s", (second.id,)
        )
        assert await outbox.next_due_at(conn, now + timedelta(minutes=1)) is None
        assert await outbox.next_due_at(conn, now + timedelta(minutes=20)) == retry_at


@pytest.mark.parametrize("worker_id", ["", "w" * 65])
async def test_claim_refuses_a_bad_worker_id(db_pool: Pool, worker_id: str) -> None:
    with pytest.raises(ValueError, match="worker_id"):
        await outbox.claim_due(db_pool, worker_id, later(), LEASE, limit=1)
