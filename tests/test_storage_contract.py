"""The storage contract, run against both backends (``database``: MySQL, then SQLite).

Every repository, outbox, claims and provider_callbacks function is exercised here on
each backend, with the rules payments.storage.database lists: transactions commit or
roll back whole (also when cancelled), DuplicateKey names the same index on both, a
failed duplicate leaves the transaction usable, datetimes come back aware UTC with
microseconds, text is full Unicode and compares exactly, and list filters, paging and
the jobs' claims select the same rows in the same order. Backend-specific behaviour
lives beside it: the MySQL pool's session handling in test_storage_pool.py, MySQL's row
locks, SKIP LOCKED between replicas and query plans in test_storage_mysql.py, SQLite's
file checks and plans in test_sqlite.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
import trio

from payments.errors import DependencyUnavailable, NotFound
from payments.model import (
    EventKind,
    ListFilter,
    OutboxState,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)
from payments.storage import claims, outbox, provider_callbacks
from payments.storage import repository as repo
from payments.storage.database import Database, DuplicateKey, PoolStats
from payments.storage.migrate import current_version, latest_version, load_steps, migrate
from payments.storage.outbox import CallbackAttempt
from payments.storage.provider_callbacks import CallbackOutcome, ProviderCallback
from payments.unit_of_work import new_outbox_entry
from tests.fixtures.db import make_payment
from tests.storage_support import (
    LEASE,
    attempt_of,
    event_for,
    fetch,
    insert,
    later,
    queue_callbacks,
)

UNICODE_METADATA = {
    "note": "Zahlung für Bestellung №42 — 支付 — 💳🧾",
    "emoji 🔑": "👩🏽‍💻",
    "quote": 'it\'s "quoted" \\ and ; -- not SQL',
}
T0 = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)


async def count(db: Database, table: str) -> int:
    async with db.connection() as conn:
        row = await conn.fetchone(f"SELECT COUNT(*) FROM {table}")
    assert row is not None
    return int(row[0])


# --- the database itself ---------------------------------------------------------------


async def test_it_is_a_database_with_pool_shaped_stats(database: Database) -> None:
    assert isinstance(database, Database)
    async with database.connection() as conn:
        await conn.ping()
        assert conn.dialect == database.dialect
        assert database.stats().in_use == 1
    stats = database.stats()
    assert isinstance(stats, PoolStats)
    assert (stats.in_use, stats.waiting) == (0, 0) and stats.open >= 1


async def test_values_are_parameters_and_text_is_unicode(database: Database) -> None:
    async with database.connection() as conn:
        assert await conn.fetchone("SELECT %s", ("zahlung 💳 'x' %s",)) == ("zahlung 💳 'x' %s",)
        assert await conn.fetchone("SELECT %s + %s", (2, 3)) == (5,)
        assert await conn.fetchall("SELECT 1 UNION ALL SELECT 2") == [(1,), (2,)]


async def test_the_schema_is_at_the_latest_version(database: Database) -> None:
    steps = load_steps(dialect=database.dialect)
    async with database.connection() as conn:
        assert await current_version(conn) == latest_version(steps) == len(steps)
    assert await migrate(database) == len(steps)  # idempotent


async def test_a_transaction_commits_when_the_block_ends(database: Database) -> None:
    payment = make_payment()
    async with database.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    async with database.connection() as conn:
        assert await repo.get_payment(conn, payment.id) == payment


async def test_a_transaction_rolls_back_when_the_block_raises(database: Database) -> None:
    with pytest.raises(KeyError):
        async with database.transaction() as conn:
            await repo.insert_payment(conn, make_payment(request_id="gone"))
            raise KeyError("boom")
    async with database.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", "gone") is None
    # The session is usable afterwards, not stuck in the transaction.
    await insert(database, make_payment())
    assert await count(database, "payments") == 1


async def test_a_cancelled_transaction_commits_nothing(database: Database) -> None:
    with trio.CancelScope() as scope:
        async with database.transaction() as conn:
            await repo.insert_payment(conn, make_payment(request_id="cancelled"))
            scope.cancel()
            await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert await count(database, "payments") == 0
    await insert(database, make_payment())
    assert await count(database, "payments") == 1


async def test_a_connection_writes_in_autocommit(database: Database) -> None:
    payment = make_payment()
    async with database.connection() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    with pytest.raises(KeyError):
        async with database.connection() as conn:
            await repo.insert_payment(conn, make_payment())
            raise KeyError("after the write")
    assert await count(database, "payments") == 2


async def test_a_closed_database_is_unavailable(database: Database) -> None:
    await database.aclose()
    with pytest.raises(DependencyUnavailable, match="database unavailable"):
        async with database.connection():
            pass
    await database.aclose()  # twice is fine


async def test_concurrent_tasks_each_get_a_session(database: Database) -> None:
    """More tasks than sessions: all finish, none opens a session past the bound."""
    payment = await insert(database, make_payment())
    seen: list[int] = []

    async def lookup() -> None:
        async with database.connection() as conn:
            got = await repo.get_payment(conn, payment.id)
            assert got is not None
            seen.append(got.id)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(lookup)
    assert seen == [payment.id] * 50
    stats = database.stats()
    assert 1 <= stats.opened_total <= stats.max_open


# --- payments --------------------------------------------------------------------------


async def test_insert_and_get_round_trip_every_field(database: Database) -> None:
    payment = make_payment(
        customer_ref="cüstomer-😀",
        resource_id="order-№-🧾",
        amount_cents=9_223_372_036_854,
        currency="JPY",
        status=PaymentStatus.PENDING,
        payment_method=PaymentMethod.PAYMENT_LINK,
        payment_type=PaymentType.RECURRING,
        recurring_interval="month",
        recurring_interval_count=3,
        success_url="https://shop.example/ok?x=1&y=ü",
        cancel_url="https://shop.example/cancel",
        provider_payment_id="plink_123",
        provider_subscription_id="sub_456",
        checkout_url="https://buy.stripe.com/test_abc",
        refunded_cents=100,
        metadata=UNICODE_METADATA,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=1),
    )
    await insert(database, payment)
    assert payment.id > 0
    async with database.connection() as conn:
        got = await repo.get_payment(conn, payment.id)
    assert got == payment
    assert got is not None and got.metadata == UNICODE_METADATA
    assert got.created_at.tzinfo is UTC and got.created_at.microsecond == 123456
    assert isinstance(got.status, PaymentStatus) and isinstance(got.provider, ProviderType)


async def test_datetimes_are_stored_as_naive_utc_and_read_back_aware(database: Database) -> None:
    berlin = timezone(timedelta(hours=2))
    local = datetime(2025, 6, 1, 14, 0, 0, 7, tzinfo=berlin)
    payment = await insert(database, make_payment(created_at=local, updated_at=local))
    async with database.connection() as conn:
        stored = await conn.fetchone("SELECT created_at FROM payments WHERE id = %s", (payment.id,))
        got = await repo.get_payment(conn, payment.id)
        # Compared as times in SQL, not as text that happens to sort.
        before = await conn.fetchone(
            "SELECT COUNT(*) FROM payments WHERE created_at < %s",
            (repo.to_db_datetime(local + timedelta(microseconds=1)),),
        )
    assert stored == (datetime(2025, 6, 1, 12, 0, 0, 7),)
    assert got is not None and got.created_at == local and got.created_at.tzinfo is UTC
    assert before == (1,)


async def test_naive_datetimes_are_refused(database: Database) -> None:
    async with database.connection() as conn:
        with pytest.raises(ValueError, match="naive"):
            await repo.insert_payment(conn, make_payment(created_at=datetime(2025, 1, 1)))


async def test_missing_payments_are_none(database: Database) -> None:
    async with database.connection() as conn:
        assert await repo.get_payment(conn, 424242) is None
        assert await repo.get_payment(conn, 0) is None
        assert await repo.get_payment_by_request(conn, "orders", "nope") is None
        assert await repo.get_payment_by_callback_hash(conn, "nope") is None
        assert await repo.get_payment_by_callback_hash(conn, "") is None
        assert await repo.get_payment_by_provider_ref(conn, "cs_nope") is None
        assert await repo.get_payment_by_provider_ref(conn, "") is None


async def test_lookups_by_request_hash_and_provider_refs(database: Database) -> None:
    one = await insert(database, make_payment(provider_payment_id="cs_test_1"))
    two = await insert(
        database, make_payment(provider_payment_id="plink_2", provider_subscription_id="sub_2")
    )
    await insert(database, make_payment())  # no provider ids: '' must match nothing
    async with database.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", one.request_id) == one
        assert await repo.get_payment_by_request(conn, "billing", one.request_id) is None
        assert await repo.get_payment_by_callback_hash(conn, two.provider_callback_hash) == two
        assert await repo.get_payment_by_provider_ref(conn, "cs_test_1") == one
        assert await repo.get_payment_by_provider_ref(conn, "plink_2") == two
        assert await repo.get_payment_by_provider_ref(conn, "sub_2") == two
    async with database.transaction() as conn:
        assert await repo.get_payment(conn, one.id, for_update=True) == one
        assert await repo.get_payment_by_provider_ref(conn, "sub_2", for_update=True) == two
        hashed = await repo.get_payment_by_callback_hash(
            conn, two.provider_callback_hash, for_update=True
        )
        assert hashed == two
        by_request = await repo.get_payment_by_request(
            conn, "orders", two.request_id, for_update=True
        )
        assert by_request == two


async def test_the_newest_payment_wins_a_shared_provider_ref(database: Database) -> None:
    await insert(database, make_payment(provider_payment_id="cs_shared"))
    newer = await insert(database, make_payment(provider_subscription_id="cs_shared"))
    async with database.connection() as conn:
        assert await repo.get_payment_by_provider_ref(conn, "cs_shared") == newer


async def test_request_ids_compare_exactly(database: Database) -> None:
    lower = await insert(database, make_payment(request_id="order-1"))
    upper = await insert(database, make_payment(request_id="ORDER-1"))  # not a duplicate
    accented = await insert(database, make_payment(request_id="orde\u0301r-1"))
    # Unique per caller: the same request id from another caller is another payment.
    billing = await insert(database, make_payment(request_id="order-1", caller_service="billing"))
    async with database.connection() as conn:
        assert await repo.get_payment_by_request(conn, "billing", "order-1") == billing
        assert await repo.get_payment_by_request(conn, "orders", "ORDER-1") == upper
        assert await repo.get_payment_by_request(conn, "orders", "order-1") == lower
        assert await repo.get_payment_by_request(conn, "orders", "orde\u0301r-1") == accented


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"request_id": "dup-1"}, "uq_payments_caller_request"),
        ({"provider_callback_hash": "hash-dup"}, "uq_payments_callback_hash"),
    ],
)
async def test_duplicate_payments_name_their_key(
    database: Database, overrides: dict[str, str], key: str
) -> None:
    await insert(database, make_payment(**overrides))
    with pytest.raises(DuplicateKey) as caught:
        await insert(database, make_payment(**overrides))
    assert caught.value.key == key
    assert "dup-1" not in str(caught.value) and "hash-dup" not in str(caught.value)
    assert await count(database, "payments") == 1


async def test_a_duplicate_undoes_its_statement_and_the_transaction_goes_on(
    database: Database,
) -> None:
    payment = await insert(database, make_payment())
    replayed = event_for(payment, kind=EventKind.PROVIDER_EVENT, provider_event_id="evt_1")
    async with database.transaction() as conn:
        await repo.insert_event(conn, replayed)
    async with database.transaction() as conn:
        other = await repo.insert_payment(conn, make_payment(request_id="in-the-same-txn"))
        with pytest.raises(DuplicateKey) as caught:
            await repo.insert_event(conn, replayed)
        assert caught.value.key == "uq_payment_events_provider_event"
        await repo.insert_event(conn, event_for(payment, reason="after the duplicate"))
    async with database.connection() as conn:
        assert await repo.get_payment(conn, other) is not None
        events = await repo.list_events(conn, payment.id)
    assert [e.reason for e in events] == ["", "after the duplicate"]


async def test_a_duplicate_that_escapes_rolls_the_transaction_back(database: Database) -> None:
    await insert(database, make_payment(request_id="dup-2"))
    with pytest.raises(DuplicateKey):
        async with database.transaction() as conn:
            await repo.insert_payment(conn, make_payment(request_id="other"))
            await repo.insert_payment(conn, make_payment(request_id="dup-2"))
    async with database.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", "other") is None
    assert database.stats().closed_total == 0  # a duplicate does not cost the session


async def test_ids_are_not_reused_after_a_delete(database: Database) -> None:
    first = await insert(database, make_payment())
    async with database.transaction() as conn:
        await repo.delete_payment(conn, first.id)
    second = await insert(database, make_payment())
    assert second.id > first.id


async def test_update_payment_writes_the_changing_fields(database: Database) -> None:
    payment = await insert(database, make_payment(metadata={"k": "v"}))
    changed = attrs.evolve(
        payment,
        status=PaymentStatus.PAID,
        provider_payment_id="cs_test_9",
        provider_subscription_id="sub_9",
        checkout_url="https://checkout.stripe.com/c/pay/cs_test_9",
        provider_payment_intent_id="pi_9",
        provider_charge_id="ch_9",
        updated_at=payment.updated_at + timedelta(minutes=5, microseconds=3),
        # Not written by update_payment: these stay as they were (refunded_cents is
        # the refunds table's sum, written only by write_refunded_cents).
        refunded_cents=500,
        amount_cents=1,
        metadata={"other": "x"},
    )
    async with database.transaction() as conn:
        await repo.update_payment(conn, changed)
        got = await repo.get_payment(conn, payment.id)
    assert got == attrs.evolve(
        changed,
        amount_cents=payment.amount_cents,
        metadata={"k": "v"},
        refunded_cents=payment.refunded_cents,
    )
    async with database.transaction() as conn:
        await repo.write_refunded_cents(conn, payment.id, 700)
        refunded = await repo.get_payment(conn, payment.id)
        by_intent = await repo.get_payment_by_money_ref(conn, "pi_9", for_update=True)
        by_charge = await repo.get_payment_by_money_ref(conn, "pi_unknown", "ch_9")
        unknown = await repo.get_payment_by_money_ref(conn, "pi_unknown", "ch_unknown")
    assert refunded is not None and refunded.refunded_cents == 700
    assert by_intent is not None and by_intent.id == payment.id
    assert by_charge is not None and by_charge.id == payment.id
    assert unknown is None
    # Writing the same values again matches the row: not "no such row".
    async with database.transaction() as conn:
        await repo.update_payment(conn, changed)


async def test_update_of_a_missing_payment_is_not_found(database: Database) -> None:
    async with database.transaction() as conn:
        with pytest.raises(NotFound):
            await repo.update_payment(conn, make_payment(id=987654))


async def test_execute_counts_matched_rows(database: Database) -> None:
    payment = await insert(database, make_payment())
    async with database.connection() as conn:
        sql = "UPDATE payments SET refunded_cents = %s WHERE id = %s"
        assert await conn.execute(sql, (0, payment.id)) == 1  # unchanged, still matched
        assert await conn.execute(sql, (0, payment.id + 1)) == 0


async def test_delete_payment_removes_it_and_its_events(database: Database) -> None:
    keep = await insert(database, make_payment())
    gone = await insert(database, make_payment())
    async with database.transaction() as conn:
        for payment in (keep, gone):
            await repo.insert_event(conn, event_for(payment))
        await repo.delete_payment(conn, gone.id)
    async with database.connection() as conn:
        assert await repo.get_payment(conn, gone.id) is None
        assert await repo.list_events(conn, gone.id) == []
        assert await repo.get_payment(conn, keep.id) == keep
        assert len(await repo.list_events(conn, keep.id)) == 1


# --- events ----------------------------------------------------------------------------


async def test_events_round_trip_in_order(database: Database) -> None:
    payment = await insert(database, make_payment())
    events = [
        event_for(payment, created_at=T0),
        event_for(
            payment,
            kind=EventKind.PROVIDER_CREATED,
            from_status=PaymentStatus.CREATED,
            to_status=PaymentStatus.PENDING,
            created_at=T0 + timedelta(seconds=1),
        ),
        event_for(
            payment,
            kind=EventKind.STATUS_CHANGED,
            from_status=PaymentStatus.PENDING,
            to_status=PaymentStatus.PAID,
            reason="paid — bezahlt 💶",
            provider_event_id="evt_1",
            provider_event_type="checkout.session.completed",
            created_at=T0 + timedelta(seconds=2),
        ),
    ]
    async with database.transaction() as conn:
        ids = [await repo.insert_event(conn, event) for event in events]
    assert ids == sorted(ids) and ids[0] > 0
    async with database.connection() as conn:
        got = await repo.list_events(conn, payment.id)
        stored = await conn.fetchall(
            "SELECT provider_event_id FROM payment_events WHERE payment_id = %s ORDER BY id",
            (payment.id,),
        )
    assert got == [attrs.evolve(event, id=i) for event, i in zip(events, ids, strict=True)]
    assert stored == [(None,), (None,), ("evt_1",)]  # '' is stored as NULL: many may lack one


# --- list ------------------------------------------------------------------------------


async def seed_for_list(db: Database) -> list[Payment]:
    """Twelve payments across callers, resources and statuses, in id order."""
    specs = [
        ("orders", "order", "1", PaymentStatus.PENDING),
        ("orders", "order", "1", PaymentStatus.PAID),
        ("orders", "order", "2", PaymentStatus.PENDING),
        ("orders", "invoice", "1", PaymentStatus.FAILED),
        ("billing", "order", "1", PaymentStatus.PENDING),
        ("billing", "plan", "gold", PaymentStatus.PAID),
    ] * 2
    out = []
    async with db.transaction() as conn:
        for caller, resource_type, resource_id, status in specs:
            payment = make_payment(
                caller_service=caller,
                resource_type=resource_type,
                resource_id=resource_id,
                status=status,
            )
            payment.id = await repo.insert_payment(conn, payment)
            out.append(payment)
    return out


async def test_list_filters_order_limit_offset(database: Database) -> None:
    seeded = await seed_for_list(database)
    newest_first = sorted(seeded, key=lambda p: p.id, reverse=True)

    async def listed(**filters: Any) -> list[int]:
        async with database.connection() as conn:
            return [p.id for p in await repo.list_payments(conn, ListFilter(**filters))]

    def expect(predicate: Any) -> list[int]:
        return [p.id for p in newest_first if predicate(p)]

    assert await listed() == [p.id for p in newest_first]
    assert await listed(caller_service="orders") == expect(lambda p: p.caller_service == "orders")
    assert await listed(caller_service="orders", resource_type="order", resource_id="1") == expect(
        lambda p: (p.caller_service, p.resource_type, p.resource_id) == ("orders", "order", "1")
    )
    assert await listed(resource_type="order", resource_id="1") == expect(
        lambda p: (p.resource_type, p.resource_id) == ("order", "1")
    )
    assert await listed(status=PaymentStatus.PAID) == expect(
        lambda p: p.status == PaymentStatus.PAID
    )
    assert await listed(caller_service="billing", status=PaymentStatus.PENDING) == expect(
        lambda p: p.caller_service == "billing" and p.status == PaymentStatus.PENDING
    )
    assert await listed(request_id=seeded[3].request_id) == [seeded[3].id]
    assert await listed(caller_service="billing", request_id=seeded[3].request_id) == []
    assert await listed(provider=ProviderType.STRIPE) == [p.id for p in newest_first]
    assert await listed(provider=ProviderType.UNSPECIFIED) == []
    assert await listed(caller_service="ORDERS") == []  # exact, not case-folded
    assert await listed(limit=5) == [p.id for p in newest_first[:5]]
    assert await listed(limit=5, offset=5) == [p.id for p in newest_first[5:10]]
    assert await listed(limit=5, offset=10) == [p.id for p in newest_first[10:]]
    assert await listed(limit=5, offset=50) == []
    assert await listed(limit=0) == []
    assert await listed(limit=3, offset=-4) == [p.id for p in newest_first[:3]]
    async with database.connection() as conn:
        (top,) = await repo.list_payments(conn, ListFilter(limit=1))
        hostile = ListFilter(caller_service="orders' OR '1'='1", resource_id="%")
        assert await repo.list_payments(conn, hostile) == []
    assert top == newest_first[0]
    assert await count(database, "payments") == len(seeded)  # the values were only values


# --- outbox ----------------------------------------------------------------------------


async def test_change_status_writes_event_payment_and_one_outbox_row(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    assert entry.state == OutboxState.PENDING and entry.delivery_id.startswith("msg_")
    assert entry.claimed_by == "" and entry.claimed_until is None
    assert entry.next_attempt_at.tzinfo is UTC
    assert '"status":10' in entry.payload
    async with database.connection() as conn:
        payment = await repo.get_payment(conn, entry.payment_id)
        assert payment is not None and payment.status == PaymentStatus.PAID
        (event,) = await repo.list_events(conn, payment.id)
        assert (event.from_status, event.to_status) == (PaymentStatus.PENDING, PaymentStatus.PAID)
        # A second row for the same (payment, status) is ignored, not an error.
        assert await outbox.insert_entry(conn, new_outbox_entry(payment)) == 0
        assert await outbox.get_entry(conn, entry.id + 1000) is None


async def test_a_reused_delivery_id_is_duplicate_key(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    copy = attrs.evolve(entry, id=0, status=PaymentStatus.CANCELED)
    async with database.connection() as conn:
        with pytest.raises(DuplicateKey) as caught:
            await outbox.insert_entry(conn, copy)
    assert caught.value.key == "uq_callback_outbox_delivery"


async def test_claim_takes_due_rows_oldest_first_and_stamps_the_lease(database: Database) -> None:
    entries = await queue_callbacks(database, 3)
    now = later()
    claimed = await outbox.claim_due(database, "worker-a", now, LEASE, limit=2)
    assert [e.id for e in claimed] == [e.id for e in entries[:2]]
    until = now + timedelta(seconds=LEASE)
    for entry in claimed:
        assert (entry.claimed_by, entry.claimed_until) == ("worker-a", until)
        stored = await fetch(database, entry.id)
        assert (stored.claimed_by, stored.claimed_until) == ("worker-a", until)
    again = await outbox.claim_due(database, "worker-b", now, LEASE, limit=10)
    assert [e.id for e in again] == [entries[2].id]
    assert await outbox.claim_due(database, "worker-c", now, LEASE, limit=0) == []


async def test_claim_ignores_rows_not_yet_due_and_rows_not_pending(database: Database) -> None:
    first, second = await queue_callbacks(database, 2)
    async with database.connection() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET next_attempt_at = %s WHERE id = %s",
            (repo.to_db_datetime(later(3600)), first.id),
        )
        await conn.execute(
            "UPDATE callback_outbox SET state = 'delivered' WHERE id = %s", (second.id,)
        )
    assert await outbox.claim_due(database, "w", later(), LEASE, limit=10) == []
    claimed = await outbox.claim_due(database, "w", later(3601), LEASE, limit=10)
    assert [e.id for e in claimed] == [first.id]


async def test_concurrent_claimers_get_disjoint_rows(database: Database) -> None:
    entries = await queue_callbacks(database, 30)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    now = later()

    async def claim_all(worker: str) -> None:
        while batch := await outbox.claim_due(database, worker, now, LEASE, limit=4):
            got[worker].extend(e.id for e in batch)

    async with trio.open_nursery() as nursery:
        for worker in got:
            nursery.start_soon(claim_all, worker)
    claimed = [i for ids in got.values() for i in ids]
    assert sorted(claimed) == sorted(e.id for e in entries)  # each exactly once


async def test_an_expired_lease_is_taken_over(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    start = later()
    (mine,) = await outbox.claim_due(database, "crashed", start, LEASE, limit=1)
    half_way = start + timedelta(seconds=LEASE / 2)
    assert await outbox.claim_due(database, "other", half_way, LEASE, limit=1) == []
    expired = start + timedelta(seconds=LEASE)
    (taken,) = await outbox.claim_due(database, "other", expired, LEASE, limit=1)
    assert taken.id == mine.id == entry.id
    stored = await fetch(database, entry.id)
    assert (stored.claimed_by, stored.claimed_until) == (
        "other",
        expired + timedelta(seconds=LEASE),
    )


async def test_a_stale_worker_cannot_overwrite_the_new_owner(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    start = later()
    (stale,) = await outbox.claim_due(database, "slow", start, LEASE, limit=1)
    takeover = start + timedelta(seconds=LEASE + 1)
    (fresh,) = await outbox.claim_due(database, "fast", takeover, LEASE, limit=1)
    async with database.transaction() as conn:
        assert not await outbox.record_attempt(
            conn, stale, "slow", attempt_of(stale, takeover), OutboxState.FAILED, takeover
        )
        assert not await outbox.release(conn, stale, "slow")
        assert await outbox.attempts_for(conn, entry.id) == []
    stored = await fetch(database, entry.id)
    assert (stored.state, stored.attempts, stored.claimed_by) == (OutboxState.PENDING, 0, "fast")
    async with database.transaction() as conn:
        assert await outbox.record_attempt(
            conn, fresh, "fast", attempt_of(fresh, takeover, 200), OutboxState.DELIVERED, takeover
        )
    assert (await fetch(database, entry.id)).state == OutboxState.DELIVERED


async def test_the_same_worker_cannot_record_under_its_own_expired_lease(
    database: Database,
) -> None:
    await queue_callbacks(database)
    start = later()
    (old,) = await outbox.claim_due(database, "w", start, LEASE, limit=1)
    (new,) = await outbox.claim_due(database, "w", start + timedelta(seconds=LEASE), LEASE, 1)
    async with database.transaction() as conn:
        assert not await outbox.record_attempt(
            conn, old, "w", attempt_of(old, start), OutboxState.PENDING, start
        )
        assert await outbox.record_attempt(
            conn, new, "w", attempt_of(new, start), OutboxState.PENDING, start
        )


async def test_record_attempt_keeps_history_and_releases_the_claim(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    t1 = later()
    (claimed,) = await outbox.claim_due(database, "w", t1, LEASE, limit=1)
    retry_at = t1 + timedelta(minutes=5)
    long_error = "x😀" * 1000
    async with database.transaction() as conn:
        assert await outbox.record_attempt(
            conn,
            claimed,
            "w",
            CallbackAttempt(entry.id, 1, t1, None, long_error, 10_000),
            OutboxState.PENDING,
            retry_at,
        )
    stored = await fetch(database, entry.id)
    assert (stored.state, stored.attempts, stored.next_attempt_at) == (
        OutboxState.PENDING,
        1,
        retry_at,
    )
    assert (stored.claimed_by, stored.claimed_until) == ("", None)
    assert len(stored.last_error) == outbox.ERROR_MAX_CHARS
    assert await outbox.claim_due(database, "w", retry_at - timedelta(seconds=1), LEASE, 1) == []
    (claimed,) = await outbox.claim_due(database, "w", retry_at, LEASE, limit=1)
    async with database.transaction() as conn:
        assert await outbox.record_attempt(
            conn,
            claimed,
            "w",
            CallbackAttempt(entry.id, 2, retry_at, 204, "", 35),
            OutboxState.DELIVERED,
            retry_at,
        )
        attempts = await outbox.attempts_for(conn, entry.id)
    stored = await fetch(database, entry.id)
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
    assert attempts[0].attempted_at.tzinfo is UTC
    assert await outbox.claim_due(database, "w", retry_at + timedelta(days=1), LEASE, 1) == []


async def test_record_attempts_writes_a_batch_and_keeps_each_lease_guard(
    database: Database,
) -> None:
    """Many rows in one transaction: each still held under its lease is moved and gets
    its attempt row; one taken over by another worker, and one no longer pending, are
    left alone and reported False, in the caller's order."""
    delivered, retried, failed, taken, done = await queue_callbacks(database, 5)
    start = later()
    claimed = await outbox.claim_due(database, "w", start, LEASE, limit=5)
    assert [e.id for e in claimed] == [e.id for e in (delivered, retried, failed, taken, done)]
    by_id = {e.id: e for e in claimed}
    # `taken` is re-claimed by another worker after the lease ran out; `done` is
    # recorded on its own first, so it is no longer pending.
    takeover = start + timedelta(seconds=LEASE)
    async with database.transaction() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET claimed_by = 'other', claimed_until = %s WHERE id = %s",
            (takeover.replace(tzinfo=None), taken.id),
        )
        assert await outbox.record_attempt(
            conn,
            by_id[done.id],
            "w",
            attempt_of(by_id[done.id], start, 200),
            OutboxState.DELIVERED,
            start,
        )
    retry_at = start + timedelta(minutes=5)
    finished = [
        outbox.FinishedAttempt(
            by_id[taken.id], attempt_of(by_id[taken.id], start), OutboxState.FAILED, start
        ),
        outbox.FinishedAttempt(
            by_id[delivered.id],
            attempt_of(by_id[delivered.id], start, 204),
            OutboxState.DELIVERED,
            start,
        ),
        outbox.FinishedAttempt(
            by_id[retried.id],
            CallbackAttempt(retried.id, 1, start, None, "x😀" * 1000, 10_000),
            OutboxState.PENDING,
            retry_at,
        ),
        outbox.FinishedAttempt(
            by_id[done.id], attempt_of(by_id[done.id], start), OutboxState.FAILED, start
        ),
        outbox.FinishedAttempt(
            by_id[failed.id], attempt_of(by_id[failed.id], start, 400), OutboxState.FAILED, start
        ),
    ]
    async with database.transaction() as conn:
        assert await outbox.record_attempts(conn, "w", finished) == [
            False,
            True,
            True,
            False,
            True,
        ]
    stored = {e.id: await fetch(database, e.id) for e in claimed}
    assert (stored[delivered.id].state, stored[delivered.id].delivered_at) == (
        OutboxState.DELIVERED,
        start,
    )
    assert stored[delivered.id].last_error == ""
    row = stored[retried.id]
    assert (row.state, row.attempts, row.next_attempt_at, row.claimed_by, row.claimed_until) == (
        OutboxState.PENDING,
        1,
        retry_at,
        "",
        None,
    )
    assert len(row.last_error) == outbox.ERROR_MAX_CHARS and row.delivered_at is None
    assert (stored[failed.id].state, stored[failed.id].last_error) == (
        OutboxState.FAILED,
        "HTTP 500",
    )
    assert (stored[taken.id].state, stored[taken.id].claimed_by) == (OutboxState.PENDING, "other")
    assert stored[taken.id].attempts == 0
    assert stored[done.id].state == OutboxState.DELIVERED  # its own record stands
    async with database.connection() as conn:
        history = {e.id: await outbox.attempts_for(conn, e.id) for e in claimed}
    assert history[taken.id] == []
    assert [(a.status_code, a.latency_ms) for a in history[done.id]] == [(200, 12)]
    assert [(a.attempt, a.status_code) for a in history[delivered.id]] == [(1, 204)]
    (long,) = history[retried.id]
    assert (long.status_code, long.latency_ms, long.attempted_at) == (None, 10_000, start)
    assert long.error.endswith("...") and len(long.error) == outbox.ERROR_MAX_CHARS
    assert [a.status_code for a in history[failed.id]] == [400]


async def test_record_attempts_refuses_rows_this_worker_did_not_claim(
    database: Database,
) -> None:
    first, second = await queue_callbacks(database, 2)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, LEASE, limit=2)
    finished = [
        outbox.FinishedAttempt(e, attempt_of(e, now), OutboxState.FAILED, now) for e in claimed
    ]
    async with database.transaction() as conn:
        with pytest.raises(ValueError, match="not claimed by this worker"):
            await outbox.record_attempts(conn, "someone else", finished)
        assert await outbox.record_attempts(conn, "w", []) == []
    assert {(await fetch(database, e.id)).claimed_by for e in (first, second)} == {"w"}


async def test_release_makes_a_row_claimable_at_once(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    now = later()
    (claimed,) = await outbox.claim_due(database, "w", now, LEASE, limit=1)
    async with database.connection() as conn:
        assert await outbox.release(conn, claimed, "w")
    (again,) = await outbox.claim_due(database, "other", now, LEASE, limit=1)
    assert again.id == entry.id


async def test_next_due_at_sees_retries_and_leases_within_the_horizon(database: Database) -> None:
    first, second = await queue_callbacks(database, 2)
    now = later()
    async with database.connection() as conn:
        due = await outbox.next_due_at(conn, now)
        assert due == first.next_attempt_at and due is not None and due.tzinfo is UTC
    (claimed,) = await outbox.claim_due(database, "w", now, LEASE, limit=1)
    retry_at = now + timedelta(minutes=10, microseconds=17)
    async with database.transaction() as conn:
        await outbox.record_attempt(
            conn, claimed, "w", attempt_of(claimed, now), OutboxState.PENDING, retry_at
        )
    (leased,) = await outbox.claim_due(database, "other", now, LEASE, limit=1)
    assert leased.id == second.id
    async with database.connection() as conn:
        # `second` is due but leased: claimable when its lease ends.
        assert await outbox.next_due_at(conn, now + timedelta(minutes=1)) == leased.claimed_until
        assert await outbox.next_due_at(conn, now - timedelta(days=1)) is None
        await outbox.release(conn, leased, "other")
        await conn.execute(
            "UPDATE callback_outbox SET state = 'delivered' WHERE id = %s", (second.id,)
        )
        assert await outbox.next_due_at(conn, now + timedelta(minutes=1)) is None
        assert await outbox.next_due_at(conn, now + timedelta(minutes=20)) == retry_at


@pytest.mark.parametrize("worker_id", ["", "w" * 65])
async def test_claim_refuses_a_bad_worker_id(database: Database, worker_id: str) -> None:
    with pytest.raises(ValueError, match="worker_id"):
        await outbox.claim_due(database, worker_id, later(), LEASE, limit=1)


# --- claims (the reconciler's and expirer's candidates) -------------------------------


async def seed_for_claims(db: Database) -> list[Payment]:
    """Payments of every open status and a finished one, aged a minute apart with
    interleaved statuses, some without a provider object; oldest first."""
    statuses = [
        PaymentStatus.PENDING,
        PaymentStatus.PROCESSING,
        PaymentStatus.CREATED,
        PaymentStatus.PAID,
    ]
    out = []
    async with db.transaction() as conn:
        for n in range(24):
            at = T0 + timedelta(minutes=n, microseconds=n)
            payment = make_payment(
                status=statuses[n % 4],
                provider_payment_id="" if n % 5 == 0 else f"cs_{n}",
                created_at=at,
                updated_at=at,
            )
            payment.id = await repo.insert_payment(conn, payment)
            out.append(payment)
    return out


def expected(
    seeded: list[Payment], selection: claims.Selection, cutoff: datetime
) -> list[tuple[int, PaymentStatus, datetime]]:
    rows = [
        (p.id, p.status, getattr(p, selection.age_column))
        for p in seeded
        if p.status in selection.statuses
        and getattr(p, selection.age_column) < cutoff
        and (p.provider_payment_id or not selection.needs_provider_id)
    ]
    return sorted(rows, key=lambda row: (row[2], row[0]))


@pytest.mark.parametrize("selection", [claims.STALE, claims.STUCK], ids=lambda s: s.job)
async def test_candidates_are_oldest_first_and_page_by_keyset(
    database: Database, selection: claims.Selection
) -> None:
    seeded = await seed_for_claims(database)
    cutoff = T0 + timedelta(minutes=20)
    want = expected(seeded, selection, cutoff)
    got: list[claims.Candidate] = []
    after: claims.Candidate | None = None
    async with database.connection() as conn:
        while batch := await claims.candidates(conn, selection, cutoff, after, limit=4):
            assert len(batch) <= 4
            got.extend(batch)
            after = batch[-1]
    assert [(c.id, c.status, c.at) for c in got] == want
    assert all(c.at.tzinfo is UTC for c in got)
    # One batch holds the globally oldest rows, whichever status branch they come from.
    async with database.connection() as conn:
        first = await claims.candidates(conn, selection, cutoff, None, limit=3)
    assert [c.id for c in first] == [row[0] for row in want[:3]]


async def test_claim_returns_a_candidate_and_refuses_one_worked_meanwhile(
    database: Database,
) -> None:
    seeded = await seed_for_claims(database)
    cutoff = T0 + timedelta(minutes=30)
    pending = next(p for p in seeded if p.status == PaymentStatus.PENDING and p.provider_payment_id)
    created = next(p for p in seeded if p.status == PaymentStatus.CREATED)
    paid = next(p for p in seeded if p.status == PaymentStatus.PAID)
    async with database.transaction() as conn:
        assert await claims.claim(conn, claims.STALE, pending.id, cutoff) == pending
        assert await claims.claim(conn, claims.STALE, created.id, cutoff) is None  # not open
        assert await claims.claim(conn, claims.STUCK, created.id, cutoff) == created
        assert await claims.claim(conn, claims.STUCK, paid.id, cutoff) is None
        assert await claims.claim(conn, claims.STALE, pending.id, T0) is None  # too young
        # Worked by someone else in the meantime: no longer a candidate.
        pending.updated_at = cutoff + timedelta(seconds=1)
        await repo.update_payment(conn, pending)
        assert await claims.claim(conn, claims.STALE, pending.id, cutoff) is None


# --- provider callbacks ----------------------------------------------------------------


def callback(**overrides: Any) -> ProviderCallback:
    fields: dict[str, Any] = {
        "provider": "stripe",
        "callback_hash": "hash-1",
        "outcome": CallbackOutcome.PROCESSED,
        "payload": '{"id": "evt_1", "note": "💳"}',
        "received_at": T0,
        "reason": "PENDING -> PAID",
        "request_id": "req-1",
        "event_id": "evt_1",
        "event_type": "checkout.session.completed",
        "payment_id": 7,
    }
    fields.update(overrides)
    return ProviderCallback(**fields)


async def test_provider_callbacks_are_kept_and_found(database: Database) -> None:
    records = [
        callback(),
        callback(outcome=CallbackOutcome.DUPLICATE, reason="event already recorded"),
        callback(
            outcome=CallbackOutcome.REJECTED,
            event_id="",
            event_type="",
            payment_id=None,
            reason="bad signature — ✗",
            received_at=T0 + timedelta(microseconds=1),
        ),
        callback(event_id="evt_2", payment_id=8),
    ]
    async with database.transaction() as conn:
        ids = [await provider_callbacks.insert(conn, record) for record in records]
    stored = [attrs.evolve(record, id=i) for record, i in zip(records, ids, strict=True)]
    async with database.connection() as conn:
        assert await provider_callbacks.for_payment(conn, 7) == stored[:2]
        assert await provider_callbacks.for_event(conn, "evt_1") == stored[:2]
        assert await provider_callbacks.recent(conn, 3) == stored[:0:-1]
        assert await provider_callbacks.recent(conn, 0) == []
        (rejected,) = await conn.fetchall(
            "SELECT event_id, payment_id FROM provider_callbacks WHERE outcome = %s",
            ("rejected",),
        )
    assert rejected == (None, None)


async def test_provider_callback_values_are_cut_to_their_columns(database: Database) -> None:
    record = callback(
        provider="p" * 40,
        callback_hash="h" * 100,
        event_id="e" * 300,
        event_type="t" * 300,
        reason="r😀" * 400,
        request_id="q" * 200,
    )
    async with database.connection() as conn:
        record_id = await provider_callbacks.insert(conn, record)
        (got,) = await provider_callbacks.recent(conn, 1)
    assert got.id == record_id
    lengths = [len(got.provider), len(got.callback_hash), len(got.event_id), len(got.event_type)]
    assert lengths == [32, 64, 255, 255]
    assert (len(got.reason), len(got.request_id)) == (500, 128)
    assert got.reason.startswith("r😀")
