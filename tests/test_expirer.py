"""The expirer against the real database and the Stripe emulator over HTTP: stuck
payments are closed at Stripe and EXPIRED, except when Stripe says they were paid (or
are being paid), and nothing is expired while Stripe cannot be reached."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from payments.config import Settings
from payments.jobs.batch import JobSummary
from payments.jobs.expirer import Expirer
from payments.model import Payment, PaymentMethod, PaymentStatus, PaymentType, ProviderType
from payments.providers.registry import ProviderRegistry
from payments.sandbox import Sandbox
from payments.service import PaymentService
from payments.storage import repository as repo
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.fixtures.db import make_payment
from tests.jobs_support import (
    SESSION_EXPIRE,
    SESSION_GET,
    age,
    child_context,
    count_rows,
    create,
    create_many,
    job_settings,
    job_uow,
    load,
    outbox_statuses,
    pass_held_by,
    status_changes,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

OLD = 61  # minutes: older than PAYMENTS_PENDING_TIMEOUT_MINUTES (60)
REASON = "not completed within 60 minutes"
SUBSCRIPTION_DELETE = "DELETE /v1/subscriptions/{id}"


def expirer(
    pool: Pool,
    registry: ProviderRegistry,
    notified: list[Payment] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> Expirer:
    """An Expirer with the default job settings; ``notified`` collects the
    payments the unit of work tells the dispatcher of."""
    return Expirer(job_uow(pool, notified), registry, settings or job_settings(), **options)


# --- expiry ---------------------------------------------------------------------------------


async def test_an_old_pending_payment_expires_here_and_at_stripe(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    await age(db_pool, [payment], OLD)
    notified: list[Payment] = []

    summary = await expirer(db_pool, registry, notified).run_pass()

    assert (summary.checked, summary.changed, summary.expired, summary.errors) == (1, 1, 1, 0)
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "expired"
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED
    assert await status_changes(db_pool, payment) == [(PaymentStatus.EXPIRED, REASON)]
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.EXPIRED]
    assert [(p.id, p.status) for p in notified] == [(payment.id, PaymentStatus.EXPIRED)]


async def test_a_session_paid_at_stripe_is_reconciled_not_expired(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    stripe_sandbox.state.complete_session(payment.provider_payment_id)  # its event was lost
    await age(db_pool, [payment], OLD)

    summary = await expirer(db_pool, registry).run_pass()

    assert summary.moved_to == {"PAID": 1} and summary.expired == 0
    assert (await load(db_pool, payment)).status == PaymentStatus.PAID
    assert await status_changes(db_pool, payment) == [(PaymentStatus.PAID, "reconciled")]
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.PAID]
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "complete"


async def test_stripe_down_leaves_the_payment_pending_for_the_next_pass(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    await age(db_pool, [payment], OLD)
    fault = stripe_sandbox.faults.fail(503, times=None)
    job = expirer(db_pool, registry)

    summary = await job.run_pass()

    assert (summary.checked, summary.errors, summary.changed) == (1, 1, 0)
    assert (await load(db_pool, payment)).status == PaymentStatus.PENDING
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "open"
    assert await status_changes(db_pool, payment) == []
    assert await outbox_statuses(db_pool, payment) == []
    stripe_sandbox.faults.remove(fault)
    assert (await job.run_pass()).expired == 1
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED


async def test_an_answer_lost_after_stripe_expired_the_session_is_retried_safely(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    await age(db_pool, [payment], OLD)
    # Stripe expires the session, but the answer never arrives (the 1 s client timeout).
    stripe_sandbox.faults.delay(
        2, path=f"/v1/checkout/sessions/{payment.provider_payment_id}/expire", after=True
    )
    job = expirer(db_pool, registry)
    assert (await job.run_pass()).errors == 1
    assert (await load(db_pool, payment)).status == PaymentStatus.PENDING
    summary = await job.run_pass()  # already expired at Stripe: that is what was wanted
    assert summary.expired == 1
    assert await status_changes(db_pool, payment) == [(PaymentStatus.EXPIRED, REASON)]


async def test_no_session_or_row_lock_is_held_while_stripe_hangs_and_a_payment_then_wins(
    db_pool: Pool,
    second_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    """The per-payment path asks Stripe under the payment's lease: while its expire call
    hangs, the checkout event that pays the payment takes the row at once (it used to
    wait for the row lock for as long as Stripe hung), and the expirer, answered at
    last that the session completed, expires nothing."""
    payment = await create(service)
    await age(db_pool, [payment], OLD)
    hang = stripe_sandbox.state.faults.hang(
        path=f"/v1/checkout/sessions/{payment.provider_payment_id}/expire"
    )
    async with pass_held_by(hang, expirer(db_pool, registry)) as summaries:
        assert db_pool.stats().in_use == 0  # the expire call is waiting on Stripe now
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
        async with UnitOfWork(second_pool).begin() as work:  # what the event does
            locked = await repo.get_payment(work.conn, payment.id, for_update=True)
            assert locked is not None
            await work.change_status(locked, PaymentStatus.PAID, reason="provider event")
        stripe_sandbox.state.faults.clear()

    [summary] = summaries
    assert (summary.errors, summary.expired, summary.skipped) == (0, 0, 1)
    assert (await load(db_pool, payment)).status == PaymentStatus.PAID
    released = "SELECT COUNT(*) FROM payments WHERE id = %s AND claimed_by = ''"
    assert await count_rows(db_pool, released, (payment.id,)) == 1  # the lease given back
    assert await status_changes(db_pool, payment) == [(PaymentStatus.PAID, "provider event")]
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "complete"


# --- payment links, delayed payments, subscriptions ---------------------------------------------


async def test_a_payment_link_is_deactivated_with_its_open_sessions(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service, method=PaymentMethod.PAYMENT_LINK)
    opened = stripe_sandbox.state.open_payment_link(payment.provider_payment_id)
    await age(db_pool, [payment], OLD)
    assert (await expirer(db_pool, registry).run_pass()).expired == 1
    assert stripe_sandbox.state.payment_links[payment.provider_payment_id]["active"] is False
    assert stripe_sandbox.state.sessions[opened["id"]]["status"] == "expired"
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.EXPIRED]


async def test_a_payment_link_paid_before_the_close_is_paid(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service, method=PaymentMethod.PAYMENT_LINK)
    stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    await age(db_pool, [payment], OLD)
    summary = await expirer(db_pool, registry).run_pass()
    assert summary.moved_to == {"PAID": 1}
    assert (await load(db_pool, payment)).status == PaymentStatus.PAID
    # Closed all the same: no second payment through it.
    assert stripe_sandbox.state.payment_links[payment.provider_payment_id]["active"] is False


async def test_money_on_its_way_is_not_expired(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    stripe_sandbox.state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    await age(db_pool, [payment], OLD)
    job = expirer(db_pool, registry)
    # PENDING: the expire is refused (complete), so Stripe's word is taken: PROCESSING.
    assert (await job.run_pass()).moved_to == {"PROCESSING": 1}
    # PROCESSING: asked first, still on its way: left alone, nothing closed.
    expires = stripe_sandbox.state.count(SESSION_EXPIRE)
    summary = await job.run_pass()
    assert (summary.checked, summary.unchanged) == (1, 1)
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == expires
    stripe_sandbox.state.succeed_async_payment(payment.provider_payment_id)
    assert (await job.run_pass()).moved_to == {"PAID": 1}
    assert await status_changes(db_pool, payment) == [
        (PaymentStatus.PROCESSING, "reconciled"),
        (PaymentStatus.PAID, "reconciled"),
    ]
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.PAID]


async def test_an_active_subscription_is_not_cancelled(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service, payment_type=PaymentType.RECURRING)
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    async with db_pool.connection() as conn:  # the subscription known, its payment missed
        await conn.execute(
            "UPDATE payments SET provider_subscription_id = %s WHERE id = %s",
            (session["subscription"], payment.id),
        )
    await age(db_pool, [payment], OLD)
    assert (await expirer(db_pool, registry).run_pass()).moved_to == {"PAID": 1}
    assert stripe_sandbox.state.subscriptions[session["subscription"]]["status"] == "active"
    assert stripe_sandbox.state.count(SUBSCRIPTION_DELETE) == 0
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 0


async def test_a_recurring_checkout_never_completed_expires(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service, payment_type=PaymentType.RECURRING)
    await age(db_pool, [payment], OLD)
    assert (await expirer(db_pool, registry).run_pass()).expired == 1
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "expired"
    assert stripe_sandbox.state.subscriptions == {}


# --- CREATED rows: a create that crashed ------------------------------------------------------


async def test_a_crashed_create_is_found_by_its_idempotency_key_and_closed(
    db_pool: Pool, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = make_payment(status=PaymentStatus.CREATED)
    async with db_pool.connection() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    # The create reached Stripe, then the process died before recording the answer.
    made = await registry.get(ProviderType.STRIPE).create_checkout(payment)
    await age(db_pool, [payment], OLD)

    summary = await expirer(db_pool, registry).run_pass()

    assert summary.expired == 1
    assert len(stripe_sandbox.state.sessions) == 1  # replayed, not made twice
    assert stripe_sandbox.state.sessions[made.provider_payment_id]["status"] == "expired"
    stored = await load(db_pool, payment)
    assert stored.status == PaymentStatus.EXPIRED
    assert stored.provider_payment_id == made.provider_payment_id
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.EXPIRED]


async def test_a_created_row_stripe_refuses_is_expired_without_an_object(
    db_pool: Pool, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = make_payment(status=PaymentStatus.CREATED, currency="ZZZ")  # Stripe refuses it
    async with db_pool.connection() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    await age(db_pool, [payment], OLD)
    assert (await expirer(db_pool, registry).run_pass()).expired == 1
    assert stripe_sandbox.state.sessions == {}
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED


# --- what is left alone ------------------------------------------------------------------------


async def test_young_and_finished_payments_are_not_touched(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    young, finished = await create(service), await create(service)
    await age(db_pool, [young], OLD, columns="updated")  # stale, but not old
    await age(db_pool, [young], 30, columns="created")
    async with db_pool.connection() as conn:
        await conn.execute("UPDATE payments SET status = 30 WHERE id = %s", (finished.id,))
    await age(db_pool, [finished], OLD)

    summary = await expirer(db_pool, registry).run_pass()

    assert summary == JobSummary("expire")
    assert stripe_sandbox.state.requests_to(SESSION_EXPIRE) == []
    assert (await load(db_pool, young)).status == PaymentStatus.PENDING
    assert stripe_sandbox.state.sessions[young.provider_payment_id]["status"] == "open"


# --- batches, replicas, the actor --------------------------------------------------------------


async def test_one_pass_drains_a_backlog_larger_than_a_batch(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payments = await create_many(service, 13)
    await age(db_pool, payments, OLD)
    broken = payments[3]
    stripe_sandbox.faults.fail(
        502, path=f"/v1/checkout/sessions/{broken.provider_payment_id}", times=None
    )
    job = expirer(db_pool, registry, settings=job_settings(job_batch_size=4), rate_per_second=None)

    summary = await job.run_pass()

    assert (summary.checked, summary.expired, summary.errors, summary.batches) == (13, 12, 1, 4)
    assert (await load(db_pool, broken)).status == PaymentStatus.PENDING
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 13  # the failed one tried once


async def test_two_expirers_race_and_each_payment_expires_once(
    db_pool: Pool,
    second_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    payments = await create_many(service, 100)
    await age(db_pool, payments, OLD)
    jobs = [
        expirer(pool, registry, settings=job_settings(job_batch_size=30), rate_per_second=None)
        for pool in (db_pool, second_pool)
    ]
    summaries: list[JobSummary] = []

    async def run(job: Expirer) -> None:
        summaries.append(await job.run_pass())

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)

    assert sum(s.expired for s in summaries) == 100
    assert all(s.expired > 0 for s in summaries)  # both worked: a real race
    assert sum(s.errors for s in summaries) == 0
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 100  # one worker per payment
    assert stripe_sandbox.state.count(SESSION_GET) == 0
    assert all(s["status"] == "expired" for s in stripe_sandbox.state.sessions.values())
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM payments WHERE status = 40") == 100
    events = "FROM payment_events WHERE kind = 'status_changed'"
    assert await count_rows(db_pool, f"SELECT COUNT(*) {events}") == 100
    assert await count_rows(db_pool, f"SELECT COUNT(DISTINCT payment_id) {events}") == 100
    assert (
        await count_rows(db_pool, "SELECT COUNT(*) FROM callback_outbox WHERE status = 40") == 100
    )


async def test_run_expires_on_its_interval_and_stops_when_asked(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry
) -> None:
    expired = trio.Event()
    job = Expirer(
        UnitOfWork(db_pool, on_terminal=lambda payment: expired.set()),
        registry,
        job_settings(expire_pending_interval_minutes=0.001),  # 60 ms
    )
    payment = await create(service)
    stopping = trio.Event()
    started: list[bool] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run, child_context(stopping, started))
            await trio.sleep(0.2)  # a few passes with nothing old enough
            await age(db_pool, [payment], OLD)
            await expired.wait()
            stopping.set()
    assert started == [True] and job.passes >= 3
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED
