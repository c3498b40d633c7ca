"""The use cases against each real database (MySQL, SQLite) and the Stripe emulator
(no transports).

These pin the rules DESIGN.md puts on the service: exact idempotency (including a
crash between the Stripe call and the commit), conflicts, isolation, cancel, and an
event row with every change.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from payments.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ProviderRejected,
    ProviderUnavailable,
)
from payments.model import (
    Caller,
    CreatePaymentInput,
    EventKind,
    ListFilter,
    NewPayment,
    OutboxState,
    PaymentStatus,
    ProviderType,
)
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.sandbox import Sandbox
from payments.service import PaymentService
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Database
from payments.unit_of_work import UnitOfWork
from payments.validation import validate_create
from tests.fixtures.sandbox import CALLBACK_BASE_URL

ORDERS = Caller("orders")
BILLING = Caller("billing")
GATEWAY = Caller("gateway", trusted=True)
SESSIONS = "POST /v1/checkout/sessions"


def new_payment(**overrides: object) -> NewPayment:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "caller_service": "orders",
        "resource_type": "order",
        "resource_id": "42",
        "amount_cents": 2500,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": 1,
        "status_callback_url": "https://orders.internal/cb",
        "metadata": {"cart": "7"},
    }
    fields.update(overrides)
    return validate_create(CreatePaymentInput(**fields))  # type: ignore[arg-type]


@pytest.fixture
async def db_pool(database: Database) -> Database:
    """Every use case here runs on both backends (``database``: MySQL, then SQLite)."""
    return database


@pytest.fixture
def notified() -> list[int]:
    """Ids of the payments the unit of work told the dispatcher of, in order."""
    return []


@pytest.fixture
async def service(
    db_pool: Database, stripe_sandbox: Sandbox, notified: list[int]
) -> AsyncIterator[PaymentService]:
    provider = StripeProvider(
        secret_key=stripe_sandbox.secret_key,
        api_base=stripe_sandbox.url,
        timeout_seconds=2.0,
        max_network_retries=0,
    )
    uow = UnitOfWork(db_pool, on_terminal=lambda payment: notified.append(payment.id))
    yield PaymentService(uow, ProviderRegistry({ProviderType.STRIPE: provider}), CALLBACK_BASE_URL)
    await provider.aclose()


async def _count_payments(pool: Database) -> int:
    async with pool.connection() as conn:
        row = await conn.fetchone("SELECT COUNT(*) FROM payments")
    assert row is not None
    return int(row[0])


async def test_create_opens_a_checkout_session_and_records_events(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    payment = await service.create(ORDERS, new_payment())
    assert payment.status == PaymentStatus.PENDING
    session = stripe_sandbox.state.sessions[payment.provider_payment_id]
    assert payment.checkout_url == session["url"]
    assert session["metadata"]["callback_hash"] == payment.provider_callback_hash
    assert payment.provider_callback_url == f"{CALLBACK_BASE_URL}/{payment.provider_callback_hash}"
    async with db_pool.connection() as conn:
        stored = await repo.get_payment(conn, payment.id)
        events = await repo.list_events(conn, payment.id)
    assert stored == payment
    assert [(e.kind, e.from_status, e.to_status) for e in events] == [
        (EventKind.CREATED, PaymentStatus.UNSPECIFIED, PaymentStatus.CREATED),
        (EventKind.PROVIDER_CREATED, PaymentStatus.CREATED, PaymentStatus.PENDING),
    ]
    # A new payment's two timestamps agree (the Go service's callers compare them), and
    # the stored ones do too, to the microsecond.
    assert payment.updated_at == payment.created_at
    assert stored is not None and stored.updated_at == stored.created_at


async def test_replay_returns_the_same_payment_without_calling_stripe(
    service: PaymentService, stripe_sandbox: Sandbox
) -> None:
    first = await service.create(ORDERS, new_payment())
    again = await service.create(ORDERS, new_payment(metadata={"cart": "7"}))
    assert again.id == first.id and again.provider_payment_id == first.provider_payment_id
    assert stripe_sandbox.state.count(SESSIONS) == 1


async def test_same_request_id_with_other_parameters_is_a_conflict(
    service: PaymentService, db_pool: Database
) -> None:
    await service.create(ORDERS, new_payment())
    with pytest.raises(AlreadyExists):
        await service.create(ORDERS, new_payment(amount_cents=2600))
    assert await _count_payments(db_pool) == 1


async def test_request_ids_are_per_caller(service: PaymentService) -> None:
    a = await service.create(ORDERS, new_payment())
    b = await service.create(BILLING, new_payment(caller_service="billing"))
    assert a.id != b.id


async def test_concurrent_duplicates_make_one_payment_and_one_stripe_call(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    stripe_sandbox.faults.delay(0.3, path="/v1/checkout/sessions")  # widen the race
    results: list[int] = []

    async def create() -> None:
        results.append((await service.create(ORDERS, new_payment())).id)

    async with trio.open_nursery() as nursery:
        for _ in range(4):  # db_pool has 5 connections
            nursery.start_soon(create)
    assert len(set(results)) == 1 and len(results) == 4
    assert stripe_sandbox.state.count(SESSIONS) == 1
    assert await _count_payments(db_pool) == 1


async def test_crash_between_stripe_and_commit_is_completed_by_a_retry(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    # Stripe makes the session, but its answer never arrives before we "crash".
    stripe_sandbox.faults.delay(1.0, path="/v1/checkout/sessions", after=True)
    with trio.move_on_after(0.3) as scope:
        await service.create(ORDERS, new_payment())
    assert scope.cancelled_caught
    assert len(stripe_sandbox.state.sessions) == 1
    async with db_pool.connection() as conn:
        left = await repo.get_payment_by_request(conn, "orders", "req-1")
    assert left is not None and left.status == PaymentStatus.CREATED
    assert left.provider_payment_id == ""

    payment = await service.create(ORDERS, new_payment())
    assert payment.id == left.id and payment.status == PaymentStatus.PENDING
    assert len(stripe_sandbox.state.sessions) == 1  # replayed by the idempotency key
    assert payment.provider_payment_id in stripe_sandbox.state.sessions


async def test_stripe_unavailable_leaves_a_row_the_retry_completes(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    stripe_sandbox.faults.fail(500, path="/v1/checkout/sessions")
    with pytest.raises(ProviderUnavailable):
        await service.create(ORDERS, new_payment())
    payment = await service.create(ORDERS, new_payment())
    assert payment.status == PaymentStatus.PENDING
    assert len(stripe_sandbox.state.sessions) == 1
    assert await _count_payments(db_pool) == 1


async def test_stripe_refusal_leaves_nothing_behind(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    stripe_sandbox.faults.fail(
        400,
        path="/v1/checkout/sessions",
        error_type="invalid_request_error",
        message="Amount must convert to at least 50 cents.",
    )
    with pytest.raises(ProviderRejected, match="at least 50 cents"):
        await service.create(ORDERS, new_payment())
    assert await _count_payments(db_pool) == 0
    payment = await service.create(ORDERS, new_payment())  # the same request, now accepted
    assert payment.status == PaymentStatus.PENDING


async def test_a_caller_may_not_create_for_another_service(service: PaymentService) -> None:
    with pytest.raises(PermissionDenied):
        await service.create(BILLING, new_payment())
    assert (await service.create(GATEWAY, new_payment())).caller_service == "orders"


async def test_isolation_on_get_list_and_cancel(service: PaymentService) -> None:
    payment = await service.create(ORDERS, new_payment())
    with pytest.raises(NotFound):
        await service.get(BILLING, payment.id)
    with pytest.raises(NotFound):
        await service.cancel(BILLING, payment.id)
    assert await service.list(BILLING, ListFilter()) == []
    with pytest.raises(PermissionDenied):
        await service.list(BILLING, ListFilter(caller_service="orders"))
    assert (await service.get(GATEWAY, payment.id)).id == payment.id
    assert [p.id for p in await service.list(GATEWAY, ListFilter(caller_service="orders"))] == [
        payment.id
    ]
    with pytest.raises(NotFound):
        await service.get(ORDERS, payment.id + 1000)


async def test_cancel_expires_the_session_and_is_idempotent(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox, notified: list[int]
) -> None:
    payment = await service.create(ORDERS, new_payment())
    canceled = await service.cancel(ORDERS, payment.id, "  changed my mind ")
    assert canceled.status == PaymentStatus.CANCELED
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "expired"
    again = await service.cancel(ORDERS, payment.id)
    assert again == canceled
    assert notified == [payment.id]
    async with db_pool.connection() as conn:
        events = await repo.list_events(conn, payment.id)
    assert events[-1].to_status == PaymentStatus.CANCELED
    assert events[-1].reason == "changed my mind"
    assert len(events) == 3
    async with db_pool.connection() as conn:
        (entry,) = await outbox.entries_for_payment(conn, payment.id)
    assert entry.state == OutboxState.PENDING and entry.status == PaymentStatus.CANCELED
    assert entry.url == payment.status_callback_url and entry.request_id == payment.request_id
    body = json.loads(entry.payload)["payment"]
    assert body["id"] == payment.id and body["status"] == int(PaymentStatus.CANCELED)


@pytest.mark.parametrize(
    "status", [PaymentStatus.PAID, PaymentStatus.FAILED, PaymentStatus.EXPIRED]
)
async def test_cancel_refuses_finished_payments(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox, status: PaymentStatus
) -> None:
    payment = await service.create(ORDERS, new_payment())
    async with db_pool.transaction() as conn:
        await repo.update_payment(conn, attrs.evolve(payment, status=status))
    with pytest.raises(FailedPrecondition, match=status.name):
        await service.cancel(ORDERS, payment.id)
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "open"
    assert (await service.get(ORDERS, payment.id)).status == status


async def test_cancel_after_a_crash_closes_the_stripe_object_the_row_never_saw(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    stripe_sandbox.faults.delay(1.0, path="/v1/checkout/sessions", after=True)
    with trio.move_on_after(0.3):
        await service.create(ORDERS, new_payment())
    (session,) = stripe_sandbox.state.sessions.values()
    async with db_pool.connection() as conn:
        left = await repo.get_payment_by_request(conn, "orders", "req-1")
    assert left is not None and left.status == PaymentStatus.CREATED
    canceled = await service.cancel(ORDERS, left.id)
    assert canceled.status == PaymentStatus.CANCELED
    assert canceled.provider_payment_id == session["id"]
    assert stripe_sandbox.state.sessions[session["id"]]["status"] == "expired"
    assert len(stripe_sandbox.state.sessions) == 1


async def test_cancel_of_a_payment_link_deactivates_it(
    service: PaymentService, stripe_sandbox: Sandbox
) -> None:
    payment = await service.create(ORDERS, new_payment(payment_method=2))
    assert payment.provider_payment_id.startswith("plink_")
    await service.cancel(ORDERS, payment.id)
    assert stripe_sandbox.state.payment_links[payment.provider_payment_id]["active"] is False


async def test_database_gone_is_dependency_unavailable(
    service: PaymentService, db_pool: Database
) -> None:
    from payments.errors import DependencyUnavailable

    await db_pool.aclose()
    with pytest.raises(DependencyUnavailable):
        await service.create(ORDERS, new_payment())
    with pytest.raises(DependencyUnavailable):
        await service.ping_database()


async def _history(pool: Database, payment_id: int) -> tuple[PaymentStatus, list[PaymentStatus]]:
    async with pool.connection() as conn:
        payment = await repo.get_payment(conn, payment_id)
        entries = await outbox.entries_for_payment(conn, payment_id)
    assert payment is not None
    return payment.status, [entry.status for entry in entries]


async def test_cancel_of_a_link_paid_before_the_cancel_is_refused_and_records_paid(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    payment = await service.create(ORDERS, new_payment(payment_method=2))
    stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)  # its event is lost
    with pytest.raises(FailedPrecondition, match="PAID at the provider"):
        await service.cancel(ORDERS, payment.id)
    assert await _history(db_pool, payment.id) == (PaymentStatus.PAID, [PaymentStatus.PAID])


async def test_cancel_of_a_session_completed_before_the_cancel_is_refused(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    payment = await service.create(ORDERS, new_payment())
    stripe_sandbox.state.complete_session(payment.provider_payment_id)
    with pytest.raises(FailedPrecondition, match="PAID at the provider"):
        await service.cancel(ORDERS, payment.id)
    assert await _history(db_pool, payment.id) == (PaymentStatus.PAID, [PaymentStatus.PAID])


async def test_cancel_never_cancels_a_paid_subscription(
    service: PaymentService, db_pool: Database, stripe_sandbox: Sandbox
) -> None:
    recurring = new_payment(payment_type=2, recurring_interval="month", recurring_interval_count=1)
    payment = await service.create(ORDERS, recurring)
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    subscription_id = session["subscription"]
    async with db_pool.transaction() as conn:  # as if customer.subscription.created came first
        await repo.update_payment(
            conn, attrs.evolve(payment, provider_subscription_id=subscription_id)
        )
    with pytest.raises(FailedPrecondition):
        await service.cancel(ORDERS, payment.id)
    assert stripe_sandbox.state.subscriptions[subscription_id]["status"] == "active"
    assert (await _history(db_pool, payment.id))[0] == PaymentStatus.PAID
