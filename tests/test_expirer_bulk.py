"""Expiry in bulk: Checkout Sessions made with ``expires_at`` are closed by Stripe
itself (the emulator does it on its own clock), and the expirer then concludes each
batch with one claim, one listing of expired sessions and one commit, never expiring
a payment whose session was paid; two expirers share a backlog fairly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from payments.jobs.batch import JobSummary
from payments.jobs.expirer import Expirer
from payments.model import Payment, PaymentStatus, ProviderType
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider, session_lifetime
from payments.sandbox import Sandbox
from payments.service import PaymentService
from payments.storage import leases
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.fixtures.sandbox import CALLBACK_BASE_URL
from tests.jobs_support import (
    SESSION_EXPIRE,
    SESSION_GET,
    SESSION_LIST,
    age,
    count_rows,
    create_many,
    job_settings,
    job_uow,
    load,
    pass_held_by,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

TIMEOUT_MINUTES = 60
OLD_S = 61 * 60


@pytest.fixture
async def lifetime_registry(stripe_sandbox: Sandbox) -> AsyncIterator[ProviderRegistry]:
    """Stripe on the emulator, its sessions made with expires_at (60 min timeout)."""
    provider = StripeProvider(
        secret_key=stripe_sandbox.secret_key,
        api_base=stripe_sandbox.url,
        timeout_seconds=2.0,
        max_network_retries=0,
        session_lifetime_seconds=session_lifetime(TIMEOUT_MINUTES),
    )
    yield ProviderRegistry({ProviderType.STRIPE: provider})
    await provider.aclose()


@pytest.fixture
def lifetime_service(db_pool: Pool, lifetime_registry: ProviderRegistry) -> PaymentService:
    return PaymentService(UnitOfWork(db_pool), lifetime_registry, CALLBACK_BASE_URL)


def test_session_lifetime_only_within_stripes_bounds() -> None:
    assert session_lifetime(60) == 3600
    assert session_lifetime(24 * 60) == 86400
    assert session_lifetime(30) is None  # no slack left for the create to reach Stripe
    assert session_lifetime(24 * 60 + 1) is None
    assert session_lifetime(5) is None


async def age_everywhere(pool: Pool, sandbox: Sandbox, payments: list[Payment]) -> None:
    """61 minutes into the past, here and at Stripe (the sessions' created/expires_at)."""
    await age(pool, payments, OLD_S / 60)
    for payment in payments:
        sandbox.state.age_session(payment.provider_payment_id, OLD_S)


async def until_stripe_expired(sandbox: Sandbox, count: int) -> None:
    """The emulator closes due sessions on its own within a second or so."""
    done = trio.Event()

    def listen(_: object) -> None:
        if len(sandbox.state.events_of("checkout.session.expired")) >= count:
            done.set()

    sandbox.state.listeners.append(listen)
    try:
        listen(None)
        with trio.fail_after(10):
            await done.wait()
    finally:
        sandbox.state.listeners.remove(listen)


async def expired_at_stripe(
    pool: Pool, service: PaymentService, sandbox: Sandbox, count: int, parallel: int = 4
) -> list[Payment]:
    """``count`` payments made with expires_at, aged past it here and at the emulator,
    and closed by Stripe itself (their expired events lost)."""
    payments = await create_many(service, count, parallel=parallel)
    await age_everywhere(pool, sandbox, payments)
    await until_stripe_expired(sandbox, count)
    return payments


async def test_sessions_carry_expires_at_and_stripe_closes_them_itself(
    db_pool: Pool, lifetime_service: PaymentService, stripe_sandbox: Sandbox
) -> None:
    [payment] = await create_many(lifetime_service, 1)
    session = stripe_sandbox.state.sessions[payment.provider_payment_id]
    assert session["expires_at"] == int(payment.created_at.timestamp()) + 3600
    assert session["status"] == "open"

    stripe_sandbox.state.clock_offset = 3600
    await until_stripe_expired(stripe_sandbox, 1)

    assert session["status"] == "expired"
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 0  # nobody asked: Stripe did it


async def test_a_backlog_expires_in_bulk_and_a_paid_session_is_never_expired(
    db_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    payments = await create_many(lifetime_service, 150, parallel=8)
    paid = payments[::50]  # paid before the timeout; the events never arrived
    for payment in paid:
        stripe_sandbox.state.complete_session(payment.provider_payment_id)
    await age_everywhere(db_pool, stripe_sandbox, payments)
    await until_stripe_expired(stripe_sandbox, len(payments) - len(paid))
    notified: list[Payment] = []
    job = Expirer(
        job_uow(db_pool, notified), lifetime_registry, job_settings(), rate_per_second=None
    )

    summary = await job.run_pass()

    assert summary.expired == 147 and summary.moved_to["PAID"] == 3
    assert (summary.checked, summary.errors, summary.batches) == (150, 0, 2)
    for payment in paid:
        assert (await load(db_pool, payment)).status == PaymentStatus.PAID
    # Only the paid ones were asked about one by one (the expire refused, then a read).
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 3
    assert stripe_sandbox.state.count(SESSION_GET) <= 6
    # The 147 expired sessions are listed once in the pass (two pages), though both
    # batches' creation spans cover all of them; the second batch lists only the part of
    # its span (a second or so more, if the creates crossed one) not listed yet.
    lists = stripe_sandbox.state.requests_to(SESSION_LIST)
    assert 2 <= len(lists) <= 3
    assert len(lists) == 2 or "starting_after" not in lists[2].params
    assert sorted(p.id for p in notified) == [p.id for p in payments]
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM payments WHERE status = 40") == 147
    events = "FROM payment_events WHERE kind = 'status_changed' AND to_status = 40"
    assert await count_rows(db_pool, f"SELECT COUNT(DISTINCT payment_id) {events}") == 147
    assert await count_rows(db_pool, f"SELECT COUNT(*) {events}") == 147
    outbox = "SELECT COUNT(*) FROM callback_outbox WHERE status = 40 AND state = 'pending'"
    assert await count_rows(db_pool, outbox) == 147


async def test_two_expirers_share_a_backlog_fairly(
    db_pool: Pool,
    second_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    await expired_at_stripe(db_pool, lifetime_service, stripe_sandbox, 400, parallel=8)
    jobs = [
        Expirer(
            job_uow(pool), lifetime_registry, job_settings(job_batch_size=25), rate_per_second=None
        )
        for pool in (db_pool, second_pool)
    ]
    summaries: list[JobSummary] = []

    async def run(job: Expirer) -> None:
        summaries.append(await job.run_pass())

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)

    assert sum(s.expired for s in summaries) == 400
    assert sum(s.errors for s in summaries) == 0
    # Disjoint claims: each took whole batches the other did not hold.
    assert all(s.expired >= 100 for s in summaries), [s.expired for s in summaries]
    events = "FROM payment_events WHERE kind = 'status_changed'"
    assert await count_rows(db_pool, f"SELECT COUNT(*) {events}") == 400
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM callback_outbox") == 400


async def test_a_deadlock_victim_is_run_again_not_failed(
    db_pool: Pool,
    second_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
) -> None:
    """A real InnoDB deadlock: the job's transaction locks row a then wants b, while
    another (heavier: it changed rows, so InnoDB rolls back the job's) holds b and wants
    a. The job's attempt is run again and succeeds."""
    a, b, *others = await create_many(lifetime_service, 4)
    job = Expirer(job_uow(db_pool), lifetime_registry, job_settings(), rate_per_second=None)
    lock = "SELECT id FROM payments WHERE id = %s FOR UPDATE"
    job_holds_a, other_holds_b = trio.Event(), trio.Event()
    attempts = 0

    async def attempt() -> int:
        nonlocal attempts
        attempts += 1
        async with db_pool.transaction() as conn:
            await conn.fetchone(lock, (a.id,))
            if attempts == 1:
                job_holds_a.set()
                await other_holds_b.wait()
                await conn.fetchone(lock, (b.id,))  # waits for the other: the cycle
        return attempts

    async def other() -> None:
        async with second_pool.transaction() as conn:
            for payment in (b, *others):  # undo entries make it the heavier one
                await conn.execute(
                    "UPDATE payments SET updated_at = updated_at + INTERVAL 1 SECOND WHERE id = %s",
                    (payment.id,),
                )
            other_holds_b.set()
            await job_holds_a.wait()
            await trio.sleep(0.3)  # the job now waits for b
            await conn.fetchone(lock, (a.id,))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        assert await job._retrying(attempt) == 2
    assert attempts == 2


async def test_a_payment_leased_by_a_cancel_is_left_out_of_the_bulk_claim(
    db_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    # Stripe expired both sessions; one payment is leased by a cancel at Stripe about it
    # (its own expire call may be what closed the session): the bulk claim skips it as
    # the single claim does, and the other one expires in bulk.
    leased, free = await expired_at_stripe(db_pool, lifetime_service, stripe_sandbox, 2)
    async with db_pool.connection() as conn:
        assert await leases.take(conn, leased.id, "cancel:elsewhere", 30, [leased.status])
    job = Expirer(job_uow(db_pool), lifetime_registry, job_settings(), rate_per_second=None)

    summary = await job.run_pass()

    assert summary.expired == 1
    assert (await load(db_pool, leased)).status == PaymentStatus.PENDING
    assert (await load(db_pool, free)).status == PaymentStatus.EXPIRED


async def test_no_session_or_row_lock_is_held_while_the_listing_hangs(
    db_pool: Pool,
    second_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    payments = await expired_at_stripe(db_pool, lifetime_service, stripe_sandbox, 3)
    hang = stripe_sandbox.state.faults.hang(path="/v1/checkout/sessions", method="GET")
    job = Expirer(job_uow(db_pool), lifetime_registry, job_settings(), rate_per_second=None)
    ids = ", ".join(str(p.id) for p in payments)
    async with pass_held_by(hang, job) as summaries:
        assert db_pool.stats().in_use == 0  # the listing is waiting on Stripe now
        async with second_pool.transaction() as conn:  # NOWAIT: fails on a held row lock
            locked = await conn.fetchall(
                f"SELECT id FROM payments WHERE id IN ({ids}) FOR UPDATE NOWAIT"
            )
        assert len(locked) == len(payments)
        stripe_sandbox.state.faults.clear()

    assert summaries[0].expired == len(payments) and summaries[0].errors == 0
    assert await count_rows(db_pool, "SELECT COUNT(*) FROM payments WHERE status = 40") == 3


async def test_a_hung_listing_is_given_up_by_its_deadline(
    db_pool: Pool,
    lifetime_service: PaymentService,
    lifetime_registry: ProviderRegistry,
    stripe_sandbox: Sandbox,
) -> None:
    # Only the listing hangs (the per-payment path answers): the bulk step gives up
    # after one HTTP timeout (a batch of two fills one page), not the provider's own.
    await expired_at_stripe(db_pool, lifetime_service, stripe_sandbox, 2)
    stripe_sandbox.state.faults.hang(path="/v1/checkout/sessions", method="GET", times=1)
    settings = job_settings(stripe_http_timeout_seconds=0.3)
    job = Expirer(job_uow(db_pool), lifetime_registry, settings, rate_per_second=None)

    started = trio.current_time()
    summary = await job.run_pass()

    assert trio.current_time() - started < 1.5  # the provider's own timeout is 2 s
    assert summary.expired == 2 and summary.errors == 0  # one by one instead
    stripe_sandbox.state.faults.clear()
