"""The repository against the real MariaDB: every function round-trips, duplicates are
DuplicateKey, list filters page correctly, and the lookups use indexes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import attrs
import pytest
import trio

from payments.errors import DependencyUnavailable, NotFound
from payments.model import (
    EventKind,
    ListFilter,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)
from payments.storage import repository as repo
from payments.storage.pool import Connection, DuplicateKey, Pool
from tests.fixtures.db import make_payment

UNICODE_METADATA = {
    "note": "Zahlung für Bestellung №42 — 支付 — 💳🧾",
    "emoji 🔑": "👩🏽‍💻",
    "quote": 'it\'s "quoted" \\ and ; -- not SQL',
}


async def insert(pool: Pool, payment: Payment) -> Payment:
    async with pool.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    return payment


# --- payments --------------------------------------------------------------------------


async def test_insert_and_get_round_trip_every_field(db_pool: Pool) -> None:
    created = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
    payment = make_payment(
        customer_ref="cüstomer-😀",
        resource_id="order-№-🧾",
        amount_cents=99_999_999,
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
        created_at=created,
        updated_at=created + timedelta(seconds=1),
    )
    await insert(db_pool, payment)
    assert payment.id > 0
    async with db_pool.connection() as conn:
        got = await repo.get_payment(conn, payment.id)
    assert got == payment
    assert got is not None
    assert got.metadata == UNICODE_METADATA
    assert got.created_at.tzinfo is UTC and got.created_at.microsecond == 123456
    assert isinstance(got.status, PaymentStatus) and isinstance(got.provider, ProviderType)


async def test_datetimes_are_stored_as_utc(db_pool: Pool) -> None:
    berlin = timezone(timedelta(hours=2))
    local = datetime(2025, 6, 1, 14, 0, 0, tzinfo=berlin)
    payment = await insert(db_pool, make_payment(created_at=local, updated_at=local))
    async with db_pool.connection() as conn:
        stored = await conn.fetchone("SELECT created_at FROM payments WHERE id = %s", (payment.id,))
        got = await repo.get_payment(conn, payment.id)
    assert stored == (datetime(2025, 6, 1, 12, 0, 0),)  # naive UTC in the column
    assert got is not None and got.created_at == local and got.created_at.tzinfo is UTC


async def test_naive_datetimes_are_refused(db_pool: Pool) -> None:
    async with db_pool.connection() as conn:
        with pytest.raises(ValueError, match="naive"):
            await repo.insert_payment(conn, make_payment(created_at=datetime(2025, 1, 1)))


async def test_missing_payment_is_none(db_pool: Pool) -> None:
    async with db_pool.connection() as conn:
        assert await repo.get_payment(conn, 424242) is None
        assert await repo.get_payment(conn, 0) is None
        assert await repo.get_payment_by_request(conn, "orders", "nope") is None
        assert await repo.get_payment_by_callback_hash(conn, "nope") is None
        assert await repo.get_payment_by_callback_hash(conn, "") is None
        assert await repo.get_payment_by_provider_ref(conn, "cs_nope") is None
        assert await repo.get_payment_by_provider_ref(conn, "") is None


async def test_lookups_by_request_hash_and_provider_refs(db_pool: Pool) -> None:
    one = await insert(db_pool, make_payment(provider_payment_id="cs_test_1"))
    two = await insert(
        db_pool, make_payment(provider_payment_id="plink_2", provider_subscription_id="sub_2")
    )
    await insert(db_pool, make_payment())  # no provider ids: '' must match nothing
    async with db_pool.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", one.request_id) == one
        assert await repo.get_payment_by_request(conn, "billing", one.request_id) is None
        assert await repo.get_payment_by_callback_hash(conn, two.provider_callback_hash) == two
        assert await repo.get_payment_by_provider_ref(conn, "cs_test_1") == one
        assert await repo.get_payment_by_provider_ref(conn, "plink_2") == two
        assert await repo.get_payment_by_provider_ref(conn, "sub_2") == two
    async with db_pool.transaction() as conn:
        assert await repo.get_payment_by_provider_ref(conn, "sub_2", for_update=True) == two
        assert (
            await repo.get_payment_by_callback_hash(
                conn, two.provider_callback_hash, for_update=True
            )
            == two
        )
        assert (
            await repo.get_payment_by_request(conn, "orders", two.request_id, for_update=True)
            == two
        )


async def test_request_ids_compare_exactly(db_pool: Pool) -> None:
    lower = await insert(db_pool, make_payment(request_id="order-1"))
    upper = await insert(db_pool, make_payment(request_id="ORDER-1"))  # not a duplicate
    async with db_pool.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", "ORDER-1") == upper
        assert await repo.get_payment_by_request(conn, "orders", "order-1") == lower


async def test_duplicate_caller_and_request_id_is_duplicate_key(db_pool: Pool) -> None:
    first = await insert(db_pool, make_payment(request_id="dup-1"))
    with pytest.raises(DuplicateKey) as caught:
        await insert(db_pool, make_payment(request_id="dup-1"))
    assert caught.value.key == "uq_payments_caller_request"
    assert "dup-1" not in str(caught.value)
    # The same request_id from another caller is another payment.
    other = await insert(db_pool, make_payment(request_id="dup-1", caller_service="billing"))
    assert other.id != first.id
    async with db_pool.connection() as conn:
        rows = await conn.fetchone("SELECT COUNT(*) FROM payments")
    assert rows == (2,)


async def test_duplicate_callback_hash_is_duplicate_key(db_pool: Pool) -> None:
    first = await insert(db_pool, make_payment())
    with pytest.raises(DuplicateKey) as caught:
        await insert(db_pool, make_payment(provider_callback_hash=first.provider_callback_hash))
    assert caught.value.key == "uq_payments_callback_hash"


async def test_duplicate_inside_a_transaction_rolls_it_back(db_pool: Pool) -> None:
    await insert(db_pool, make_payment(request_id="dup-2"))
    with pytest.raises(DuplicateKey):
        async with db_pool.transaction() as conn:
            await repo.insert_payment(conn, make_payment(request_id="other"))
            await repo.insert_payment(conn, make_payment(request_id="dup-2"))
    async with db_pool.connection() as conn:
        assert await repo.get_payment_by_request(conn, "orders", "other") is None
    assert db_pool.stats().closed_total == 0  # a duplicate does not cost the session


async def test_for_update_locks_the_row(db_pool: Pool) -> None:
    payment = await insert(db_pool, make_payment())
    async with db_pool.transaction() as conn:
        assert await repo.get_payment(conn, payment.id, for_update=True) == payment
        async with db_pool.transaction() as other:
            with pytest.raises(DependencyUnavailable):  # lock wait: retry later
                await other.fetchone(
                    "SELECT id FROM payments WHERE id = %s FOR UPDATE NOWAIT", (payment.id,)
                )


async def test_update_payment_writes_the_changing_fields(db_pool: Pool) -> None:
    payment = await insert(db_pool, make_payment(metadata={"k": "v"}))
    later = payment.updated_at + timedelta(minutes=5)
    changed = attrs.evolve(
        payment,
        status=PaymentStatus.PAID,
        provider_payment_id="cs_test_9",
        provider_subscription_id="sub_9",
        checkout_url="https://checkout.stripe.com/c/pay/cs_test_9",
        refunded_cents=500,
        updated_at=later,
        # Not written by update_payment: these stay as they were.
        amount_cents=1,
        metadata={"other": "x"},
    )
    async with db_pool.transaction() as conn:
        await repo.update_payment(conn, changed)
        got = await repo.get_payment(conn, payment.id)
    assert got == attrs.evolve(changed, amount_cents=payment.amount_cents, metadata={"k": "v"})
    # Writing the same values again is not "no such row".
    async with db_pool.transaction() as conn:
        await repo.update_payment(conn, changed)


async def test_update_missing_payment_is_not_found(db_pool: Pool) -> None:
    async with db_pool.transaction() as conn:
        with pytest.raises(NotFound):
            await repo.update_payment(conn, make_payment(id=987654))


async def test_delete_payment_removes_it_and_its_events(db_pool: Pool) -> None:
    keep = await insert(db_pool, make_payment())
    gone = await insert(db_pool, make_payment())
    async with db_pool.transaction() as conn:
        for payment in (keep, gone):
            await repo.insert_event(conn, created_event(payment))
        await repo.delete_payment(conn, gone.id)
    async with db_pool.connection() as conn:
        assert await repo.get_payment(conn, gone.id) is None
        assert await repo.list_events(conn, gone.id) == []
        assert await repo.get_payment(conn, keep.id) == keep
        assert len(await repo.list_events(conn, keep.id)) == 1


# --- events ----------------------------------------------------------------------------


def created_event(payment: Payment, **overrides: Any) -> PaymentEvent:
    fields: dict[str, Any] = {
        "payment_id": payment.id,
        "kind": EventKind.CREATED,
        "from_status": PaymentStatus.UNSPECIFIED,
        "to_status": PaymentStatus.CREATED,
        "created_at": payment.created_at,
    }
    fields.update(overrides)
    return PaymentEvent(**fields)


async def test_events_round_trip_in_order(db_pool: Pool) -> None:
    payment = await insert(db_pool, make_payment())
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    events = [
        created_event(payment, created_at=at),
        created_event(
            payment,
            kind=EventKind.PROVIDER_CREATED,
            from_status=PaymentStatus.CREATED,
            to_status=PaymentStatus.PENDING,
            created_at=at + timedelta(seconds=1),
        ),
        created_event(
            payment,
            kind=EventKind.STATUS_CHANGED,
            from_status=PaymentStatus.PENDING,
            to_status=PaymentStatus.PAID,
            reason="paid — bezahlt 💶",
            provider_event_id="evt_1",
            provider_event_type="checkout.session.completed",
            created_at=at + timedelta(seconds=2),
        ),
    ]
    async with db_pool.transaction() as conn:
        ids = [await repo.insert_event(conn, event) for event in events]
    assert ids == sorted(ids) and ids[0] > 0
    async with db_pool.connection() as conn:
        got = await repo.list_events(conn, payment.id)
        stored = await conn.fetchall(
            "SELECT provider_event_id FROM payment_events WHERE payment_id = %s ORDER BY id",
            (payment.id,),
        )
    assert got == [attrs.evolve(event, id=i) for event, i in zip(events, ids, strict=True)]
    assert stored == [(None,), (None,), ("evt_1",)]  # '' is stored as NULL


async def test_replayed_provider_event_is_duplicate_key(db_pool: Pool) -> None:
    payment = await insert(db_pool, make_payment())
    event = created_event(
        payment,
        kind=EventKind.PROVIDER_EVENT,
        provider_event_id="evt_replayed",
        provider_event_type="invoice.paid",
    )
    async with db_pool.transaction() as conn:
        await repo.insert_event(conn, event)
    with pytest.raises(DuplicateKey) as caught:
        async with db_pool.transaction() as conn:
            await repo.insert_event(conn, event)
    assert caught.value.key == "uq_payment_events_provider_event"


# --- list ------------------------------------------------------------------------------


async def seed_for_list(pool: Pool) -> list[Payment]:
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
    async with pool.transaction() as conn:
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


def ids(payments: Sequence[Payment]) -> list[int]:
    return [payment.id for payment in payments]


async def test_list_filters_order_limit_offset(db_pool: Pool) -> None:
    seeded = await seed_for_list(db_pool)
    newest_first = sorted(seeded, key=lambda p: p.id, reverse=True)

    async def listed(**filters: Any) -> list[int]:
        async with db_pool.connection() as conn:
            return ids(await repo.list_payments(conn, ListFilter(**filters)))

    def expect(predicate: Any) -> list[int]:
        return ids([p for p in newest_first if predicate(p)])

    assert await listed() == ids(newest_first)
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
    assert await listed(provider=ProviderType.STRIPE) == ids(newest_first)
    assert await listed(provider=ProviderType.UNSPECIFIED) == []
    assert await listed(caller_service="nobody") == []
    # paging
    assert await listed(limit=5) == ids(newest_first[:5])
    assert await listed(limit=5, offset=5) == ids(newest_first[5:10])
    assert await listed(limit=5, offset=10) == ids(newest_first[10:])
    assert await listed(limit=5, offset=50) == []
    # full entities come back, not just ids
    async with db_pool.connection() as conn:
        (top,) = await repo.list_payments(conn, ListFilter(limit=1))
    assert top == newest_first[0]


async def test_list_filter_values_are_parameters_not_sql(db_pool: Pool) -> None:
    await seed_for_list(db_pool)
    async with db_pool.connection() as conn:
        hostile = ListFilter(caller_service="orders' OR '1'='1", resource_id="%")
        assert await repo.list_payments(conn, hostile) == []
        assert (await conn.fetchone("SELECT COUNT(*) FROM payments")) == (12,)


# --- indexes ---------------------------------------------------------------------------


class RecordingConnection:
    """Passes statements to a real connection and keeps them, to EXPLAIN afterwards."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, Sequence[Any] | None]] = []

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetchone(sql, args)

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetchall(sql, args)


# EXPLAIN access types that read through an index (not ALL: a table scan; not index:
# a whole-index scan).
INDEXED_ACCESS = {"const", "eq_ref", "ref", "range", "index_merge", "ref_or_null"}


async def test_lookups_and_list_filters_use_indexes(db_pool: Pool) -> None:
    statuses = [PaymentStatus.PENDING, PaymentStatus.PAID, PaymentStatus.EXPIRED]
    seeded: list[Payment] = []
    async with db_pool.transaction() as conn:
        for n in range(400):
            payment = make_payment(
                caller_service=f"svc-{n % 20}",
                resource_type=("order", "invoice", "plan")[n % 3],
                resource_id=str(n % 150),
                status=PaymentStatus.FAILED if n % 50 == 0 else statuses[n % 3],
                provider_payment_id=f"cs_{n}" if n % 2 else "",
                provider_subscription_id=f"sub_{n}" if n % 4 == 1 else "",
            )
            payment.id = await repo.insert_payment(conn, payment)
            await repo.insert_event(conn, created_event(payment))
            seeded.append(payment)
        await conn.fetchall("ANALYZE TABLE payments, payment_events")
    sample = seeded[201]
    filters = [
        ListFilter(caller_service="svc-3"),
        ListFilter(caller_service="svc-3", status=PaymentStatus.PAID),
        ListFilter(caller_service=sample.caller_service, request_id=sample.request_id),
        ListFilter(request_id=sample.request_id),
        ListFilter(resource_type="invoice", resource_id="7"),
        ListFilter(caller_service="svc-7", resource_type="invoice", resource_id="7"),
        ListFilter(status=PaymentStatus.FAILED),
    ]
    async with db_pool.connection() as conn:
        recorder = RecordingConnection(conn)
        rec = cast(Connection, recorder)
        await repo.get_payment(rec, sample.id)
        await repo.get_payment_by_request(rec, sample.caller_service, sample.request_id)
        await repo.get_payment_by_callback_hash(rec, sample.provider_callback_hash)
        await repo.get_payment_by_provider_ref(rec, "sub_201")
        await repo.list_events(rec, sample.id)
        for f in filters:
            await repo.list_payments(rec, f)
        assert len(recorder.statements) == 5 + len(filters)
        for sql, args in recorder.statements:
            plan = await conn.fetchall("EXPLAIN " + sql, args)
            reads = [row for row in plan if row[2] in ("payments", "payment_events")]
            assert reads, f"{sql} {args} -> {plan}"  # derived/union rows aside
            for _, _, _, access, _, key, *_ in reads:
                assert access in INDEXED_ACCESS and key, f"{sql} {args} -> {plan}"


async def test_lookups_finish_quickly_on_a_busy_pool(db_pool: Pool) -> None:
    """Many concurrent lookups through a five-session pool all complete."""
    payment = await insert(db_pool, make_payment())

    async def lookup() -> None:
        async with db_pool.connection() as conn:
            assert await repo.get_payment(conn, payment.id) == payment

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(lookup)
    assert db_pool.stats().opened_total <= 5
