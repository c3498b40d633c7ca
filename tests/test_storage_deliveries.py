"""The callback-delivery storage (payments/storage/deliveries.py and the step-4 outbox
columns) on both backends: listing filters, bulk re-queue, pruning, resends, parking."""

from __future__ import annotations

from datetime import timedelta

import trio

from payments.model import CallbackKind, OutboxState, PaymentStatus, utcnow
from payments.storage import deliveries, outbox
from payments.storage.database import Database
from payments.storage.deliveries import DeliveryFilter
from payments.unit_of_work import new_outbox_entry
from tests.fixtures.db import make_payment
from tests.storage_support import attempt_of, fetch, later, queue_callbacks


async def finish(db: Database, entry: outbox.OutboxEntry, state: OutboxState) -> None:
    """Record one attempt of ``entry`` that leaves it in ``state`` (others untouched)."""
    now = later()
    code = 200 if state == OutboxState.DELIVERED else 500
    taken = await outbox.claim_due(db, "w", now, 60, 100)
    async with db.transaction() as conn:
        for claimed in taken:
            if claimed.id != entry.id:
                await outbox.release(conn, claimed, "w")
                continue
            attempt = attempt_of(claimed, now, code)
            assert await outbox.record_attempt(conn, claimed, "w", attempt, state, now)


async def test_new_columns_default_to_a_payment_announcement(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    stored = await fetch(database, entry.id)
    assert (stored.kind, stored.refund_id, stored.resend) == (CallbackKind.PAYMENT, 0, 0)


async def test_a_resend_is_a_new_row_with_the_next_number(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    async with database.transaction() as conn:
        payment = make_payment(id=entry.payment_id, status=PaymentStatus.PAID)
        again = new_outbox_entry(payment, now=utcnow())
        again.resend = await deliveries.next_resend_number(conn, again)
        assert again.resend == 1
        assert await outbox.insert_entry(conn, again) > 0
        # The same announcement and number twice is ignored, as before.
        assert await outbox.insert_entry(conn, new_outbox_entry(payment, now=utcnow())) == 0
        listed = await outbox.entries_for_payment(conn, entry.payment_id)
    assert [e.resend for e in listed] == [0, 1]
    assert listed[0].delivery_id != listed[1].delivery_id


async def test_requeue_moves_only_failed_rows_matching_the_filter(database: Database) -> None:
    failed, delivered, pending = await queue_callbacks(database, 3)
    await finish(database, failed, OutboxState.FAILED)
    await finish(database, delivered, OutboxState.DELIVERED)
    future = DeliveryFilter(since=utcnow() + timedelta(hours=1))
    assert await deliveries.requeue_failed(database, future, utcnow()) == 0
    other = DeliveryFilter(caller_service="someone-else")
    assert await deliveries.requeue_failed(database, other, utcnow()) == 0

    now = utcnow()
    assert await deliveries.requeue_failed(database, DeliveryFilter(), now) == 1
    stored = await fetch(database, failed.id)
    assert (stored.state, stored.attempts, stored.delivery_id) == (
        OutboxState.PENDING,
        0,
        failed.delivery_id,
    )
    assert (await fetch(database, delivered.id)).state == OutboxState.DELIVERED
    assert (await fetch(database, pending.id)).attempts == 0
    assert await deliveries.requeue_failed(database, DeliveryFilter(), now) == 0


async def test_concurrent_requeues_count_each_row_once(database: Database) -> None:
    entries = await queue_callbacks(database, 30)
    for entry in entries:
        await finish(database, entry, OutboxState.FAILED)
    counts: list[int] = []

    async def requeue() -> None:
        counts.append(await deliveries.requeue_failed(database, DeliveryFilter(), utcnow()))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(requeue)
    assert sum(counts) == 30


async def test_find_filters_and_attempts_in_one_query(database: Database) -> None:
    first, second = await queue_callbacks(database, 2)
    await finish(database, first, OutboxState.FAILED)
    async with database.connection() as conn:
        failed = await deliveries.find_deliveries(conn, DeliveryFilter(state=OutboxState.FAILED))
        everything = await deliveries.find_deliveries(conn, DeliveryFilter(caller_service="orders"))
        attempts = await deliveries.attempts_by_outbox(conn, [first.id, second.id])
    assert [e.id for e in failed] == [first.id]
    assert [e.id for e in everything] == [first.id, second.id]
    assert [a.status_code for a in attempts[first.id]] == [500] and attempts[second.id] == []


async def test_prune_deletes_old_finished_rows_and_their_attempts(database: Database) -> None:
    old, recent, waiting = await queue_callbacks(database, 3)
    await finish(database, old, OutboxState.DELIVERED)
    await finish(database, recent, OutboxState.GONE)
    cutoff = utcnow() + timedelta(seconds=5)  # everything finished so far is older
    assert await deliveries.prune(database, utcnow() - timedelta(days=1)) == 0
    async with database.connection() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET updated_at = %s WHERE id = %s",
            (utcnow() + timedelta(minutes=1), recent.id),
        )
    assert await deliveries.prune(database, cutoff) == 1
    async with database.connection() as conn:
        left = [e.id for e in await deliveries.find_deliveries(conn, DeliveryFilter())]
        gone_attempts = await outbox.attempts_for(conn, old.id)
    assert left == [recent.id, waiting.id] and gone_attempts == []


async def test_parked_rows_are_not_claimable_until_their_time(database: Database) -> None:
    first, second = await queue_callbacks(database, 2)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, 60, 10)
    assert await outbox.park(database, claimed[:1], "w", now + timedelta(seconds=3)) == 1
    async with database.connection() as conn:
        await outbox.release(conn, claimed[1], "w")
    assert [e.id for e in await outbox.claim_due(database, "v", now, 60, 10)] == [second.id]
    later_on = now + timedelta(seconds=3)
    assert [e.id for e in await outbox.claim_due(database, "v", later_on, 60, 10)] == [first.id]


async def test_a_claim_can_leave_out_busy_receivers(database: Database) -> None:
    (busy,) = await queue_callbacks(database, url="http://a_b:81/cb/1")
    (lookalike,) = await queue_callbacks(database, url="http://aXb:81/cb/2")  # _ is literal
    (longer_port,) = await queue_callbacks(database, url="http://a_b:810/cb/3")
    claimed = await outbox.claim_due(
        database, "w", later(), 60, 10, skip_prefixes=["http://a_b:81"]
    )
    assert sorted(e.id for e in claimed) == sorted([lookalike.id, longer_port.id])
    rest = await outbox.claim_due(database, "w", later(), 60, 10)
    assert [e.id for e in rest] == [busy.id]


async def test_a_refund_callback_is_its_own_announcement(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    payment = make_payment(id=entry.payment_id, status=PaymentStatus.PAID)
    refund = new_outbox_entry(payment, {"refund": {"id": 5}}, kind=CallbackKind.REFUND, refund_id=5)
    async with database.transaction() as conn:
        assert await outbox.insert_entry(conn, refund) > 0  # same payment and status: its own
        listed = await outbox.entries_for_payment(conn, entry.payment_id)
    assert [(e.kind, e.refund_id) for e in listed] == [
        (CallbackKind.PAYMENT, 0),
        (CallbackKind.REFUND, 5),
    ]
