"""The reconciler settles refunds left PENDING whose event never came: the real
database, the Stripe emulator over HTTP without any webhook (the missed events), and
the refund aged with direct SQL."""

from __future__ import annotations

import json

import pytest
import trio

from payments.errors import DependencyUnavailable
from payments.jobs.batch import JobSummary
from payments.jobs.reconciler import Reconciler
from payments.model import Caller, NewRefund, Payment, PaymentStatus, Refund, RefundStatus
from payments.providers.registry import ProviderRegistry
from payments.sandbox import Sandbox, money
from payments.service import PaymentService
from payments.storage import outbox
from payments.storage import refunds as refund_store
from payments.storage.pool import Pool
from tests.jobs_support import age, create, job_settings, job_uow

pytestmark = pytest.mark.timeout(60)

R = RefundStatus
ORDERS = Caller("orders")
STALE = 20  # minutes: older than PAYMENTS_RECONCILE_STALE_AFTER_MINUTES (15)
RETRIEVE = "GET /v1/refunds/{id}"


def reconciler(pool: Pool, registry: ProviderRegistry, notified: list[Payment]) -> Reconciler:
    return Reconciler(job_uow(pool, notified), registry, job_settings())


async def pending_refund(
    pool: Pool, service: PaymentService, registry: ProviderRegistry, sandbox: Sandbox
) -> tuple[Payment, Refund]:
    """A PAID payment of 2500 and a refund of 1000 that Stripe left pending."""
    payment = await create(service)  # 2500
    sandbox.state.complete_session(payment.provider_payment_id)
    await age(pool, [payment], STALE)
    await reconciler(pool, registry, []).run_pass()
    sandbox.state.refund_hold = True
    refund = await service.refunds.create(ORDERS, NewRefund(payment.id, "refund-1", "orders", 1000))
    assert (refund.status, bool(refund.provider_refund_id)) == (R.PENDING, True)
    return payment, refund


async def age_refund(pool: Pool, refund: Refund, minutes: float = STALE) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE refunds SET updated_at = updated_at - INTERVAL %s SECOND WHERE id = %s",
            (int(minutes * 60), refund.id),
        )


async def stored(pool: Pool, refund: Refund) -> Refund:
    async with pool.connection() as conn:
        found = await refund_store.get_refund(conn, refund.id)
    assert found is not None
    return found


async def refund_callbacks(pool: Pool, payment: Payment) -> list[dict[str, object]]:
    async with pool.connection() as conn:
        entries = await outbox.entries_for_payment(conn, payment.id)
    return [json.loads(entry.payload) for entry in entries if entry.refund_id]


@pytest.mark.parametrize(("succeed", "status"), [(True, R.SUCCEEDED), (False, R.FAILED)])
async def test_a_pending_refund_settled_at_stripe_is_settled_here(
    db_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
    succeed: bool,
    status: RefundStatus,
) -> None:
    payment, refund = await pending_refund(db_pool, service, registry, stripe_sandbox)
    money.settle_refund(stripe_sandbox.state, refund.provider_refund_id, succeed=succeed)
    notified: list[Payment] = []

    fresh = await reconciler(db_pool, registry, notified).run_pass()
    assert fresh.moved_to == {}  # not stale yet: Stripe is not asked
    assert stripe_sandbox.state.count(RETRIEVE) == 0
    await age_refund(db_pool, refund)
    summary = await reconciler(db_pool, registry, notified).run_pass()

    assert summary.moved_to == {f"refund {status.name}": 1}
    assert (summary.changed, summary.errors) == (1, 0)
    after = await stored(db_pool, refund)
    assert after.status == status
    assert after.failure_reason == ("" if succeed else money.REFUND_FAILURE_REASONS[0])
    [body] = await refund_callbacks(db_pool, payment)
    assert body["refund"]["status"] == int(status)  # type: ignore[index]
    shown = await service.get(ORDERS, payment.id)
    assert shown.status == PaymentStatus.PAID
    assert (shown.refunded_cents, shown.refundable_cents) == (
        (1000, 1500) if succeed else (0, 2500)
    )
    assert [p.id for p in notified] == [payment.id]  # the dispatcher was woken
    async with db_pool.connection() as conn:
        events = await refund_store.list_refund_events(conn, refund.id)
    assert events[-1].reason == "reconciled"


async def test_a_refund_still_pending_at_stripe_waits_a_whole_window(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment, refund = await pending_refund(db_pool, service, registry, stripe_sandbox)
    await age_refund(db_pool, refund)
    first = await reconciler(db_pool, registry, []).run_pass()
    second = await reconciler(db_pool, registry, []).run_pass()
    assert (first.unchanged, first.changed) == (1, 0)
    assert second.checked == 0  # touched: not stale again for a window
    assert stripe_sandbox.state.count(RETRIEVE) == 1
    assert (await stored(db_pool, refund)).status == R.PENDING
    assert await refund_callbacks(db_pool, payment) == []


async def test_two_replicas_ask_stripe_once_and_settle_once(
    db_pool: Pool,
    second_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    payment, refund = await pending_refund(db_pool, service, registry, stripe_sandbox)
    money.settle_refund(stripe_sandbox.state, refund.provider_refund_id, succeed=False)
    await age_refund(db_pool, refund)
    stripe_sandbox.faults.delay(0.3, path="/v1/refunds/", method="GET")  # both in flight
    summaries: list[JobSummary] = []

    async def one(pool: Pool) -> None:
        summaries.append(await reconciler(pool, registry, []).run_pass())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, db_pool)
        nursery.start_soon(one, second_pool)

    assert stripe_sandbox.state.count(RETRIEVE) == 1
    assert sorted(s.changed for s in summaries) == [0, 1]
    assert sum(s.errors for s in summaries) == 0
    assert (await stored(db_pool, refund)).status == R.FAILED
    assert len(await refund_callbacks(db_pool, payment)) == 1


async def test_a_claim_whose_answer_was_lost_is_found_at_stripe(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    """Stripe made the refund but its answer never came (and nobody retried): the
    reconciler finds it by the refund_id in its metadata."""
    payment = await create(service)  # 2500
    stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, [payment], STALE)
    await reconciler(db_pool, registry, []).run_pass()
    stripe_sandbox.faults.delay(3, path="/v1/refunds", method="POST", after=True)
    with pytest.raises(DependencyUnavailable):  # the provider's timeout: 503
        await service.refunds.create(ORDERS, NewRefund(payment.id, "lost-1", "orders", 800))
    async with db_pool.connection() as conn:
        [claim] = await refund_store.list_refunds(conn, payment.id)
    assert (claim.status, claim.provider_refund_id) == (R.PENDING, "")
    await age_refund(db_pool, claim)

    summary = await reconciler(db_pool, registry, []).run_pass()

    assert summary.moved_to == {"refund SUCCEEDED": 1}
    after = await stored(db_pool, claim)
    assert after.status == R.SUCCEEDED
    [made] = stripe_sandbox.state.refunds.values()
    assert after.provider_refund_id == made["id"]
