"""The refunds storage (payments/storage/refunds.py), on both backends (``database``).

Same rules as tests/test_storage_contract.py: DuplicateKey names the same index on both,
a duplicate leaves the transaction usable, datetimes come back aware UTC with
microseconds, text is full Unicode; plus the refund rules the schema carries: unique
(caller_service, request_id), unique provider_refund_id only where set, a payment's
refunds oldest first, and the amount sums under the payment's row lock.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import trio

from payments.errors import NotFound
from payments.model import (
    EventKind,
    Payment,
    PaymentStatus,
    Refund,
    RefundEvent,
    RefundRefused,
    RefundStatus,
    RefundTotals,
    refund_amount,
    utcnow,
)
from payments.storage import refunds as store
from payments.storage import repository as repo
from payments.storage.database import Connection, Database, DuplicateKey
from payments.storage.sqlite import SqliteDatabase
from tests.fixtures.db import make_payment
from tests.storage_support import RecordingConnection

T0 = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
UNICODE_METADATA = {"note": "Rückerstattung №7 — 退款 — 💸", "quote": 'it\'s "x"; -- y'}


async def paid_payment(db: Database, amount_cents: int = 1000) -> Payment:
    payment = make_payment(status=PaymentStatus.PAID, amount_cents=amount_cents)
    async with db.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    return payment


def make_refund(payment: Payment, **overrides: Any) -> Refund:
    fields: dict[str, Any] = {
        "id": 0,
        "payment_id": payment.id,
        "request_id": f"rf-{secrets.token_hex(6)}",
        "caller_service": payment.caller_service,
        "amount_cents": 100,
        "currency": payment.currency,
        "status": RefundStatus.PENDING,
        "request_fingerprint": secrets.token_hex(32),
        "created_at": T0,
        "updated_at": T0,
    }
    fields.update(overrides)
    return Refund(**fields)


async def insert(db: Database, refund: Refund) -> Refund:
    async with db.transaction() as conn:
        refund.id = await store.insert_refund(conn, refund)
    return refund


async def test_a_refund_round_trips_every_field(database: Database) -> None:
    payment = await paid_payment(database)
    refund = await insert(
        database,
        make_refund(
            payment,
            request_id="Rf-Ü-1",
            reason="requested_by_customer",
            failure_reason="",
            provider_refund_id="re_123",
            metadata=UNICODE_METADATA,
        ),
    )
    assert refund.id > 0
    async with database.connection() as conn:
        got = await store.get_refund(conn, refund.id)
    assert got == refund
    assert got is not None and got.created_at.tzinfo is not None
    assert got.created_at.microsecond == 123456
    # Unset values come back as the entity holds them ('' not None).
    bare = await insert(database, make_refund(payment))
    async with database.connection() as conn:
        got = await store.get_refund(conn, bare.id)
        assert await store.get_refund(conn, 0) is None
        assert await store.get_refund(conn, bare.id + 1000) is None
    assert got == bare and got.provider_refund_id == "" and got.metadata == {}


async def test_request_id_names_one_refund_per_caller(database: Database) -> None:
    payment = await paid_payment(database)
    first = await insert(database, make_refund(payment, request_id="rf-1"))
    async with database.transaction() as conn:
        with pytest.raises(DuplicateKey) as caught:
            await store.insert_refund(conn, make_refund(payment, request_id="rf-1"))
        assert caught.value.key == "uq_refunds_caller_request"
        # The transaction goes on after the duplicate.
        other = make_refund(payment, request_id="rf-1", caller_service="billing")
        other.id = await store.insert_refund(conn, other)
        # Exact comparison: another case is another request.
        upper = make_refund(payment, request_id="RF-1")
        upper.id = await store.insert_refund(conn, upper)
    async with database.connection() as conn:
        assert await store.get_refund_by_request(conn, payment.caller_service, "rf-1") == first
        assert await store.get_refund_by_request(conn, "billing", "rf-1") == other
        assert await store.get_refund_by_request(conn, payment.caller_service, "RF-1") == upper
        assert await store.get_refund_by_request(conn, "nobody", "rf-1") is None


async def test_provider_refund_id_is_unique_only_where_set(database: Database) -> None:
    payment = await paid_payment(database)
    one = await insert(database, make_refund(payment))
    two = await insert(database, make_refund(payment))  # both without a Stripe id
    three = await insert(database, make_refund(payment, provider_refund_id="re_A"))
    async with database.transaction() as conn:
        with pytest.raises(DuplicateKey) as caught:
            await store.insert_refund(conn, make_refund(payment, provider_refund_id="re_A"))
        assert caught.value.key == "uq_refunds_provider_refund_id"
        one.provider_refund_id = "re_A"
        with pytest.raises(DuplicateKey) as caught:
            await store.update_refund(conn, one)
        assert caught.value.key == "uq_refunds_provider_refund_id"
        one.provider_refund_id = "re_B"
        await store.update_refund(conn, one)
    async with database.connection() as conn:
        assert await store.get_refund_by_provider_id(conn, "re_A") == three
        assert await store.get_refund_by_provider_id(conn, "re_B") == one
        assert await store.get_refund_by_provider_id(conn, "") is None
        assert await store.get_refund_by_provider_id(conn, "re_none") is None
        assert (await store.get_refund(conn, two.id)) == two


async def test_refunds_by_provider_ids_are_the_payments_own(database: Database) -> None:
    payment, other = await paid_payment(database), await paid_payment(database)
    a = await insert(database, make_refund(payment, provider_refund_id="re_mine_a"))
    b = await insert(database, make_refund(payment, provider_refund_id="re_mine_b"))
    await insert(database, make_refund(payment))  # no Stripe id yet
    await insert(database, make_refund(other, provider_refund_id="re_theirs"))
    async with database.connection() as conn:
        found = await store.refunds_by_provider_ids(
            conn, payment.id, ["re_mine_b", "re_theirs", "re_none", "", "re_mine_a", "re_mine_a"]
        )
        assert sorted(found, key=lambda r: r.id) == [a, b]
        assert await store.refunds_by_provider_ids(conn, payment.id, ["", ""]) == []
        assert await store.refunds_by_provider_ids(conn, other.id, ["re_theirs"]) != []


async def test_a_payments_refunds_come_oldest_first(database: Database) -> None:
    payment, other = await paid_payment(database), await paid_payment(database)
    mine = [await insert(database, make_refund(payment, amount_cents=n)) for n in (3, 1, 2)]
    await insert(database, make_refund(other))
    async with database.connection() as conn:
        assert await store.list_refunds(conn, payment.id) == mine
        assert await store.list_refunds(conn, payment.id + 1000) == []


async def test_update_writes_the_changing_fields_only(database: Database) -> None:
    payment = await paid_payment(database)
    refund = await insert(database, make_refund(payment, reason="duplicate"))
    later = T0 + timedelta(minutes=5, microseconds=1)
    changed = make_refund(
        payment,
        id=refund.id,
        request_id="rf-other",
        amount_cents=999,
        reason="fraudulent",
        status=RefundStatus.FAILED,
        failure_reason="charge_already_refunded " + "x" * 600,
        provider_refund_id="re_9",
        updated_at=later,
    )
    async with database.transaction() as conn:
        await store.update_refund(conn, changed)
    async with database.connection() as conn:
        got = await store.get_refund(conn, refund.id)
    assert got is not None
    assert (got.status, got.provider_refund_id, got.updated_at) == (
        RefundStatus.FAILED,
        "re_9",
        later,
    )
    assert got.failure_reason == changed.failure_reason[: store.MAX_FAILURE_REASON]
    # What the caller asked for never changes after creation.
    assert (got.request_id, got.amount_cents, got.reason, got.created_at) == (
        refund.request_id,
        refund.amount_cents,
        "duplicate",
        T0,
    )
    changed.id = refund.id + 1000
    async with database.transaction() as conn:
        with pytest.raises(NotFound):
            await store.update_refund(conn, changed)


async def test_totals_sum_pending_and_succeeded_per_payment(database: Database) -> None:
    payment, other, bare = [await paid_payment(database) for _ in range(3)]
    amounts = {
        RefundStatus.PENDING: (100, 20),
        RefundStatus.SUCCEEDED: (300, 4),
        RefundStatus.FAILED: (5000,),
        RefundStatus.CANCELED: (60000,),
    }
    made = [
        await insert(database, make_refund(payment, status=status, amount_cents=amount))
        for status, values in amounts.items()
        for amount in values
    ]
    await insert(database, make_refund(other, status=RefundStatus.SUCCEEDED, amount_cents=7))
    async with database.connection() as conn:
        totals = await store.refund_totals(conn, payment.id)
        assert totals == RefundTotals(pending_cents=120, succeeded_cents=304)
        assert totals == RefundTotals.of(made)
        assert await store.refund_totals(conn, bare.id) == RefundTotals()
        many = await store.refund_totals_for(conn, [payment.id, other.id, bare.id, payment.id])
        assert await store.refund_totals_for(conn, []) == {}
    assert many == {payment.id: totals, other.id: RefundTotals(succeeded_cents=7)}
    assert all(type(v) is int for t in many.values() for v in (t.pending_cents, t.succeeded_cents))


async def test_stale_pending_refunds_for_the_reconciler(database: Database) -> None:
    payment = await paid_payment(database)
    old = await insert(database, make_refund(payment, updated_at=T0))
    older = await insert(database, make_refund(payment, updated_at=T0 - timedelta(hours=1)))
    await insert(database, make_refund(payment, status=RefundStatus.SUCCEEDED))
    await insert(database, make_refund(payment, updated_at=T0 + timedelta(hours=1)))
    cutoff = T0 + timedelta(seconds=1)
    async with database.connection() as conn:
        assert await store.list_pending_refunds(conn, cutoff, 10) == [older, old]
        assert await store.list_pending_refunds(conn, cutoff, 1) == [older]


async def test_events_record_history_and_detect_replays(database: Database) -> None:
    payment = await paid_payment(database)
    one, two = (
        await insert(database, make_refund(payment)),
        await insert(database, make_refund(payment)),
    )

    def event(refund: Refund, **overrides: Any) -> RefundEvent:
        fields: dict[str, Any] = {
            "refund_id": refund.id,
            "payment_id": payment.id,
            "kind": EventKind.STATUS_CHANGED,
            "from_status": RefundStatus.PENDING,
            "to_status": RefundStatus.SUCCEEDED,
            "created_at": T0,
        }
        fields.update(overrides)
        return RefundEvent(**fields)

    created = event(
        one,
        kind=EventKind.CREATED,
        from_status=RefundStatus.UNSPECIFIED,
        to_status=RefundStatus.PENDING,
    )
    settled = event(
        one, provider_event_id="evt_1", provider_event_type="charge.refunded", reason="ü"
    )
    async with database.transaction() as conn:
        ids = [await store.insert_refund_event(conn, e) for e in (created, settled)]
        with pytest.raises(DuplicateKey) as caught:
            await store.insert_refund_event(conn, event(one, provider_event_id="evt_1"))
        assert caught.value.key == "uq_refund_events_provider_event"
        # One provider event may move several refunds: recorded once for each.
        await store.insert_refund_event(conn, event(two, provider_event_id="evt_1"))
        await store.insert_refund_event(conn, event(two, kind=EventKind.CREATED))
    async with database.connection() as conn:
        history = await store.list_refund_events(conn, one.id)
        assert len(await store.list_refund_events(conn, two.id)) == 2
    assert history == [
        RefundEvent(**{**_fields(created), "id": ids[0]}),
        RefundEvent(**{**_fields(settled), "id": ids[1]}),
    ]


def _fields(event: RefundEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in store.EVENT_COLUMNS}


async def test_a_refund_and_its_event_roll_back_together(database: Database) -> None:
    payment = await paid_payment(database)
    refund = make_refund(payment)
    with pytest.raises(RuntimeError):
        async with database.transaction() as conn:
            refund.id = await store.insert_refund(conn, refund)
            await store.insert_refund_event(
                conn,
                RefundEvent(
                    refund_id=refund.id,
                    payment_id=payment.id,
                    kind=EventKind.CREATED,
                    from_status=RefundStatus.UNSPECIFIED,
                    to_status=RefundStatus.PENDING,
                    created_at=utcnow(),
                ),
            )
            raise RuntimeError("crash before commit")
    async with database.connection() as conn:
        assert await store.list_refunds(conn, payment.id) == []
        assert await store.list_refund_events(conn, refund.id) == []


async def test_locked_reads_see_the_row(database: Database) -> None:
    payment = await paid_payment(database)
    refund = await insert(database, make_refund(payment, provider_refund_id="re_L"))
    async with database.transaction() as conn:
        assert await store.get_refund(conn, refund.id, for_update=True) == refund
        assert await store.get_refund_by_provider_id(conn, "re_L", for_update=True) == refund
        by_request = await store.get_refund_by_request(
            conn, refund.caller_service, refund.request_id, for_update=True
        )
        assert by_request == refund


async def test_concurrent_refunds_under_the_payment_lock_never_exceed_it(
    database: Database,
) -> None:
    """The use case's pattern: lock the payment, sum, check, insert PENDING, commit.
    Ten concurrent 300-cent refunds of 1000 cents: exactly three fit."""
    payment = await paid_payment(database, amount_cents=1000)
    outcomes: list[str] = []

    async def one(n: int) -> None:
        try:
            async with database.transaction() as conn:
                locked = await repo.get_payment(conn, payment.id, for_update=True)
                assert locked is not None
                totals = await store.refund_totals(conn, payment.id)
                await trio.sleep(0.01)  # widen the window a missing lock would let through
                amount = refund_amount(locked.status, locked.amount_cents, totals, 300)
                await store.insert_refund(conn, make_refund(payment, amount_cents=amount))
            outcomes.append("ok")
        except RefundRefused:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(one, n)
    async with database.connection() as conn:
        stored = await store.list_refunds(conn, payment.id)
        totals = await store.refund_totals(conn, payment.id)
    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 7
    assert [r.amount_cents for r in stored] == [300, 300, 300]
    assert totals.pending_cents == 900


async def test_refund_queries_use_indexes(sqlite_db: SqliteDatabase) -> None:
    """No refund lookup, list or sum scans a whole table (SQLite's plans, no ANALYZE)."""
    async with sqlite_db.transaction() as conn:
        payments = []
        for n in range(40):
            payment = make_payment(status=PaymentStatus.PAID)
            payment.id = await repo.insert_payment(conn, payment)
            payments.append(payment)
            for k in range(3):
                refund = make_refund(payment, provider_refund_id=f"re_{n}_{k}")
                refund.id = await store.insert_refund(conn, refund)
    async with sqlite_db.connection() as conn:
        recorder = RecordingConnection(conn)
        rec = cast(Connection, recorder)
        await store.get_refund(rec, refund.id, for_update=True)
        await store.get_refund_by_request(rec, refund.caller_service, refund.request_id)
        await store.get_refund_by_provider_id(rec, "re_3_1")
        await store.list_refunds(rec, payment.id)
        await store.list_pending_refunds(rec, T0, 10)
        await store.refund_totals(rec, payment.id)
        await store.refund_totals_for(rec, [p.id for p in payments[:5]])
        await store.list_refund_events(rec, refund.id)
        await store.refunds_by_provider_ids(rec, payment.id, ["re_39_0", "re_39_2"])
        assert len(recorder.statements) == 9
        for sql, args in recorder.statements:
            plan = [row[3] for row in await conn.fetchall("EXPLAIN QUERY PLAN " + sql, args)]
            scans = [step for step in plan if step.startswith("SCAN") and "USING" not in step]
            assert not [s for s in scans if "refund" in s], (sql, plan)
