"""The reconciler against the real database and the Stripe emulator over HTTP.

Payments are made through the service (so Stripe has their objects), moved at the
emulator without any webhook (the missed event), and aged with direct SQL.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
import trio
import trio.testing

from payments.config import MysqlDsn, Settings
from payments.errors import DependencyUnavailable
from payments.jobs.batch import JobSummary, TokenBucket
from payments.jobs.reconciler import Reconciler
from payments.model import (
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    utcnow,
)
from payments.providers.registry import ProviderRegistry
from payments.sandbox import Sandbox
from payments.service import PaymentService
from payments.storage import claims
from payments.storage.pool import Pool
from payments.storage.timestamps import to_db_datetime
from payments.unit_of_work import UnitOfWork
from tests.fixtures.app import closed_port
from tests.jobs_support import (
    SESSION_GET,
    SESSION_LIST,
    age,
    child_context,
    count_rows,
    create,
    create_many,
    job_settings,
    job_uow,
    load,
    outbox_statuses,
    status_changes,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

STALE = 20  # minutes: older than PAYMENTS_RECONCILE_STALE_AFTER_MINUTES (15)


def reconciler(
    pool: Pool,
    registry: ProviderRegistry,
    notified: list[Payment] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> Reconciler:
    """A Reconciler with the default job settings; ``notified`` collects the
    payments the unit of work tells the dispatcher of."""
    return Reconciler(job_uow(pool, notified), registry, settings or job_settings(), **options)


# --- healing missed events -------------------------------------------------------------------


async def test_a_missed_event_is_healed(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    stripe_sandbox.state.complete_session(payment.provider_payment_id)  # no webhook sent
    await age(db_pool, [payment], STALE)
    notified: list[Payment] = []

    summary = await reconciler(db_pool, registry, notified).run_pass()

    assert (summary.checked, summary.changed, summary.errors) == (1, 1, 0)
    assert summary.moved_to == {"PAID": 1}
    stored = await load(db_pool, payment)
    assert stored.status == PaymentStatus.PAID
    assert utcnow() - stored.updated_at < timedelta(minutes=1)
    assert await status_changes(db_pool, payment) == [(PaymentStatus.PAID, "reconciled")]
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.PAID]
    assert [p.id for p in notified] == [payment.id]
    assert notified[0].status == PaymentStatus.PAID


async def test_an_expired_session_expires_the_payment(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    stripe_sandbox.state.expire_session(payment.provider_payment_id)
    await age(db_pool, [payment], STALE)
    summary = await reconciler(db_pool, registry).run_pass()
    assert summary.moved_to == {"EXPIRED": 1} and summary.expired == 1
    assert (await load(db_pool, payment)).status == PaymentStatus.EXPIRED
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.EXPIRED]


async def test_a_paid_payment_link_is_paid(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service, method=PaymentMethod.PAYMENT_LINK)
    stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    await age(db_pool, [payment], STALE)
    summary = await reconciler(db_pool, registry).run_pass()
    assert summary.changed == 1
    assert (await load(db_pool, payment)).status == PaymentStatus.PAID
    assert stripe_sandbox.state.count(SESSION_LIST) == 1


@pytest.mark.parametrize("method", [PaymentMethod.HOSTED_CARD, PaymentMethod.PAYMENT_LINK])
async def test_a_subscription_is_paid_with_its_id(
    db_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
    method: PaymentMethod,
) -> None:
    payment = await create(service, method=method, payment_type=PaymentType.RECURRING)
    if method == PaymentMethod.HOSTED_CARD:
        session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    else:
        session = stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    await age(db_pool, [payment], STALE)
    await reconciler(db_pool, registry).run_pass()
    stored = await load(db_pool, payment)
    assert stored.status == PaymentStatus.PAID
    assert stored.provider_subscription_id == session["subscription"]
    assert await outbox_statuses(db_pool, payment) == [PaymentStatus.PAID]


async def test_a_delayed_payment_moves_to_processing_then_paid(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    stripe_sandbox.state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    await age(db_pool, [payment], STALE)
    notified: list[Payment] = []
    job = reconciler(db_pool, registry, notified)
    assert (await job.run_pass()).moved_to == {"PROCESSING": 1}
    assert notified == []  # not terminal: no callback, no notice
    assert await outbox_statuses(db_pool, payment) == []
    stripe_sandbox.state.succeed_async_payment(payment.provider_payment_id)
    await age(db_pool, [payment], STALE)
    assert (await job.run_pass()).moved_to == {"PAID": 1}
    assert await status_changes(db_pool, payment) == [
        (PaymentStatus.PROCESSING, "reconciled"),
        (PaymentStatus.PAID, "reconciled"),
    ]
    assert [p.id for p in notified] == [payment.id]


# --- what is left alone ----------------------------------------------------------------------


async def test_fresh_created_and_finished_payments_are_not_touched(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    fresh, finished = await create(service), await create(service)
    for payment in (fresh, finished):
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, [fresh], 10)  # younger than the stale window
    async with db_pool.connection() as conn:
        await conn.execute("UPDATE payments SET status = %s WHERE id = %s", (10, finished.id))
    await age(db_pool, [finished], STALE)
    before = {p.id: await load(db_pool, p) for p in (fresh, finished)}

    summary = await reconciler(db_pool, registry).run_pass()

    assert summary == JobSummary("reconcile")
    assert stripe_sandbox.state.count(SESSION_GET) == 0
    for payment in (fresh, finished):
        assert await load(db_pool, payment) == before[payment.id]
        assert await status_changes(db_pool, payment) == []


async def test_an_open_checkout_is_touched_and_not_asked_again_until_stale(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payment = await create(service)
    await age(db_pool, [payment], STALE)
    job = reconciler(db_pool, registry)
    summary = await job.run_pass()
    assert (summary.checked, summary.unchanged, summary.changed) == (1, 1, 0)
    stored = await load(db_pool, payment)
    assert stored.status == PaymentStatus.PENDING
    assert utcnow() - stored.updated_at < timedelta(minutes=1)
    assert await status_changes(db_pool, payment) == []
    assert await outbox_statuses(db_pool, payment) == []
    # Touched: the next pass has nothing to ask Stripe.
    assert (await job.run_pass()).checked == 0
    assert stripe_sandbox.state.count(SESSION_GET) == 1


# --- errors, rate, batches -------------------------------------------------------------------


async def test_one_provider_error_does_not_stop_the_batch(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payments = await create_many(service, 3)
    for payment in payments:
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, payments, STALE)
    broken = payments[0]
    fault = stripe_sandbox.faults.fail(
        500, path=f"/v1/checkout/sessions/{broken.provider_payment_id}", times=None
    )
    job = reconciler(db_pool, registry)

    summary = await job.run_pass()

    assert (summary.checked, summary.changed, summary.errors) == (3, 2, 1)
    assert summary.failed
    assert [(await load(db_pool, p)).status for p in payments] == [
        PaymentStatus.PENDING,
        PaymentStatus.PAID,
        PaymentStatus.PAID,
    ]
    # Left stale (not touched), so the next pass heals it once Stripe answers.
    stripe_sandbox.faults.remove(fault)
    summary = await job.run_pass()
    assert (summary.checked, summary.changed, summary.errors) == (1, 1, 0)
    assert (await load(db_pool, broken)).status == PaymentStatus.PAID


async def test_token_bucket_paces_calls_on_trio_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=10)
    times: list[float] = []

    async def take(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()
            times.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three workers share one budget
            nursery.start_soon(take, 7)
    assert len(times) == 21
    assert times[-1] - start == pytest.approx(2.0)  # the first is free, then 10/s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.1)
    await trio.sleep(5)  # idle: the bucket refills only up to its burst
    before = trio.current_time()
    await bucket.acquire()
    await bucket.acquire()
    assert trio.current_time() - before == pytest.approx(0.1)


async def test_stripe_calls_are_rate_limited(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payments = await create_many(service, 12)
    await age(db_pool, payments, STALE)
    job = reconciler(db_pool, registry, rate_per_second=40.0, concurrency=4)
    summary = await job.run_pass()
    assert summary.checked == 12
    times = sorted(r.at for r in stripe_sandbox.state.requests_to(SESSION_GET))
    assert len(times) == 12
    # The limiter paces sending (its exact windows: test_token_bucket_paces_calls_on_trio_time);
    # what the emulator sees is sending plus a delay a loaded machine varies by several ms,
    # so each window is allowed one interval of that jitter. Unpaced, 4 workers would send
    # these 12 within a few ms.
    assert times[-1] - times[0] >= 10 / 40
    for i in range(len(times) - 4):  # never 5 within 75 ms (4 intervals less one)
        assert times[i + 4] - times[i] >= 3 / 40


async def test_one_pass_drains_a_backlog_larger_than_a_batch(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payments = await create_many(service, 17)
    for payment in payments[1:]:
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, payments, STALE)
    progress: list[int] = []
    job = reconciler(
        db_pool, registry, settings=job_settings(job_batch_size=5), rate_per_second=None
    )

    summary = await job.run_pass(on_progress=lambda s: progress.append(s.checked))

    assert (summary.checked, summary.changed, summary.unchanged) == (17, 16, 1)
    assert summary.batches == 4 and progress == [5, 10, 15, 17]
    assert stripe_sandbox.state.count(SESSION_GET) == 17  # each asked about once


async def test_two_reconcilers_race_and_each_payment_is_worked_once(
    db_pool: Pool,
    second_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    payments = await create_many(service, 100)
    paid = payments[::2]  # the other half stays open: touched, not changed
    for payment in paid:
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, payments, STALE)
    jobs = [
        reconciler(pool, registry, settings=job_settings(job_batch_size=30), rate_per_second=None)
        for pool in (db_pool, second_pool)
    ]
    summaries: list[JobSummary] = []

    async def run(job: Reconciler) -> None:
        summaries.append(await job.run_pass())

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)

    assert sum(s.changed for s in summaries) == 50
    assert sum(s.unchanged for s in summaries) == 50
    assert all(s.changed + s.unchanged > 0 for s in summaries)  # both worked: a real race
    assert sum(s.errors for s in summaries) == 0
    # One worker per payment: a row the other touched or changed is no longer a candidate.
    assert stripe_sandbox.state.count(SESSION_GET) == 100
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM payments WHERE status = 10") == 50
    events = "FROM payment_events WHERE kind = 'status_changed'"
    assert await count_rows(db_pool, f"SELECT COUNT(*) {events}") == 50
    assert await count_rows(db_pool, f"SELECT COUNT(DISTINCT payment_id) {events}") == 50
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM callback_outbox") == 50


async def test_a_payment_locked_elsewhere_is_skipped_not_waited_on(
    db_pool: Pool,
    second_pool: Pool,
    service: PaymentService,
    registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    busy, free = await create_many(service, 2)
    for payment in (busy, free):
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, [busy, free], STALE)
    with trio.fail_after(5):  # InnoDB would wait 50 s for the lock
        async with second_pool.transaction() as other:  # say, a webhook being handled
            await other.fetchone("SELECT id FROM payments WHERE id = %s FOR UPDATE", (busy.id,))
            summary = await reconciler(db_pool, registry).run_pass()
    assert (summary.checked, summary.changed, summary.skipped) == (2, 1, 1)
    assert (await load(db_pool, busy)).status == PaymentStatus.PENDING
    assert (await load(db_pool, free)).status == PaymentStatus.PAID


# --- the supervised actor --------------------------------------------------------------------


async def test_run_repeats_on_its_interval_and_stops_when_asked(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    paid = trio.Event()
    job = Reconciler(
        UnitOfWork(db_pool, on_terminal=lambda payment: paid.set()),
        registry,
        job_settings(reconcile_interval_minutes=0.001),  # 60 ms
    )
    stopping = trio.Event()
    started: list[bool] = []
    payment = await create(service)
    stripe_sandbox.state.complete_session(payment.provider_payment_id)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run, child_context(stopping, started))
            await trio.sleep(0.2)  # a few passes with nothing stale
            await age(db_pool, [payment], STALE)  # becomes stale while the worker runs
            await paid.wait()  # healed by a later pass
            stopping.set()
    assert started == [True]
    assert job.passes >= 3
    assert (await load(db_pool, payment)).status == PaymentStatus.PAID


async def test_a_pass_stops_between_items(
    db_pool: Pool, service: PaymentService, registry: ProviderRegistry, stripe_sandbox: Sandbox
) -> None:
    payments = await create_many(service, 6)
    for payment in payments:
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age(db_pool, payments, STALE)
    stopping = trio.Event()
    job = Reconciler(
        UnitOfWork(db_pool, on_terminal=lambda payment: stopping.set()),
        registry,
        job_settings(),
        concurrency=1,
    )
    summary = await job.run_pass(stopping=stopping)
    assert summary.stopped and summary.changed == 1 and summary.checked == 1
    statuses = [(await load(db_pool, p)).status for p in payments]
    assert statuses.count(PaymentStatus.PAID) == 1


async def test_run_outlives_a_database_outage(registry: ProviderRegistry) -> None:
    dsn = MysqlDsn(host="127.0.0.1", port=closed_port(), user="root", password="", database="x")
    dead = Pool(dsn, connect_timeout=1)
    job = reconciler(dead, registry, settings=job_settings(reconcile_interval_minutes=0.001))
    with pytest.raises(DependencyUnavailable):
        await job.run_pass()
    stopping = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run, child_context(stopping))
            await trio.sleep(0.3)  # several failed passes, logged, not raised
            stopping.set()
    await dead.aclose()


# --- indexes ---------------------------------------------------------------------------------


async def _seed_for_explain(pool: Pool, count: int) -> None:
    """``count`` payments of every status and age, inserted in one statement."""
    statuses = [1, 2, 3, 10, 20, 40]
    now = utcnow()
    rows: list[Any] = []
    for n in range(count):
        at = to_db_datetime(now - timedelta(minutes=n))
        rows += [f"r{n}", str(n), statuses[n % 6], f"h{n}", f"cs_{n}", at, at]
    values = ", ".join(
        [
            "(%s, 'orders', 'order', %s, 100, 'EUR', %s, 1, 1, 1, 'https://x', %s,"
            " 'https://x', REPEAT('0', 64), %s, '{}', %s, %s)"
        ]
        * count
    )
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payments (request_id, caller_service, resource_type, resource_id,"
            " amount_cents, currency, status, payment_method, payment_type, provider,"
            " status_callback_url, provider_callback_hash, provider_callback_url,"
            " request_fingerprint, provider_payment_id, metadata, created_at, updated_at)"
            f" VALUES {values}",
            rows,
        )
        await conn.fetchall("ANALYZE TABLE payments")


@pytest.mark.parametrize("selection", [claims.STALE, claims.STUCK], ids=lambda s: s.job)
async def test_candidate_and_claim_queries_use_their_indexes(
    db_pool: Pool, selection: claims.Selection
) -> None:
    await _seed_for_explain(db_pool, 600)
    cutoff = utcnow() - timedelta(minutes=300)
    async with db_pool.connection() as conn:
        batch = await claims.candidates(conn, selection, cutoff, None, 50)
        assert len(batch) == 50 and batch == sorted(batch, key=lambda c: (c.at, c.id))
        assert {c.status for c in batch} <= set(selection.statuses)
        queries = [
            claims.candidates_query(selection, cutoff, None, 50),
            claims.candidates_query(selection, cutoff, batch[-1], 50),
        ]
        for sql, args in queries:
            plan = await conn.fetchall("EXPLAIN " + sql, args)
            reads = [row for row in plan if row[2] == "payments"]
            assert len(reads) == len(selection.statuses), plan
            for row in reads:
                assert row[3] == "range" and row[5] == selection.index, plan
        claim_args = [
            batch[0].id,
            *(int(s) for s in selection.statuses),
            to_db_datetime(cutoff),
            to_db_datetime(utcnow()),  # leases lapsed before now
        ]
        plan = await conn.fetchall("EXPLAIN " + claims._claim_sql(selection), claim_args)
        assert [row[3] for row in plan] == ["const"], plan
