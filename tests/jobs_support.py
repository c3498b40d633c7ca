"""Helpers shared by the reconciler and expirer tests: real payments made through the
service on the Stripe emulator, aged with direct SQL, and read back from the tables.
Their fixtures (registry, service, second_pool) are in tests/fixtures/jobs.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from payments.config import Settings
from payments.jobs.batch import JobSummary, PaymentJob
from payments.model import (
    Caller,
    CreatePaymentInput,
    EventKind,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
)
from payments.sandbox.state import Fault
from payments.service import PaymentService
from payments.storage import repository as repo
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from payments.validation import validate_create
from supervisor import ChildContext

ORDERS = Caller("orders")
SESSION_GET = "GET /v1/checkout/sessions/{id}"
SESSION_EXPIRE = "POST /v1/checkout/sessions/{id}/expire"
SESSION_LIST = "GET /v1/checkout/sessions"


def job_settings(**overrides: Any) -> Settings:
    """Settings with the documented job defaults unless overridden."""
    return attrs.evolve(
        Settings(
            reconcile_stale_after_minutes=15,
            pending_timeout_minutes=60,
            job_batch_size=100,
            reconcile_interval_minutes=2,
            expire_pending_interval_minutes=5,
        ),
        **overrides,
    )


def job_uow(pool: Pool, notified: list[Payment] | None = None) -> UnitOfWork:
    """The unit of work a job writes through; ``notified`` collects the payments it
    tells the dispatcher of."""
    return UnitOfWork(pool, on_terminal=notified.append if notified is not None else None)


async def create(
    service: PaymentService,
    *,
    method: PaymentMethod = PaymentMethod.HOSTED_CARD,
    payment_type: PaymentType = PaymentType.ONE_TIME,
) -> Payment:
    """A PENDING payment with its Stripe object, made the way a caller makes one."""
    recurring = payment_type == PaymentType.RECURRING
    new = validate_create(
        CreatePaymentInput(
            request_id=f"req-{uuid.uuid4().hex}",
            caller_service="orders",
            resource_type="order",
            resource_id="42",
            amount_cents=2500,
            currency="eur",
            payment_method=int(method),
            payment_type=int(payment_type),
            recurring_interval="month" if recurring else "",
            recurring_interval_count=1 if recurring else 0,
            status_callback_url="https://orders.internal/cb",
        )
    )
    payment = await service.create(ORDERS, new)
    assert payment.status == PaymentStatus.PENDING
    return payment


async def create_many(service: PaymentService, count: int, parallel: int = 4) -> list[Payment]:
    """``count`` hosted-card payments, made ``parallel`` at a time (keeps setup fast)."""
    made: list[Payment] = []
    limit = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limit:
            made.append(await create(service))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return sorted(made, key=lambda p: p.id)


async def age(
    pool: Pool, payments: Iterable[Payment], minutes: float, *, columns: str = "both"
) -> None:
    """Move created_at and/or updated_at ``minutes`` into the past."""
    ids = [p.id for p in payments]
    sets = {
        "both": ["created_at", "updated_at"],
        "created": ["created_at"],
        "updated": ["updated_at"],
    }[columns]
    assignments = ", ".join(f"{c} = {c} - INTERVAL %s SECOND" for c in sets)
    placeholders = ", ".join(["%s"] * len(ids))
    async with pool.connection() as conn:
        await conn.execute(
            f"UPDATE payments SET {assignments} WHERE id IN ({placeholders})",
            [int(minutes * 60)] * len(sets) + ids,
        )


async def load(pool: Pool, payment: Payment) -> Payment:
    async with pool.connection() as conn:
        stored = await repo.get_payment(conn, payment.id)
    assert stored is not None
    return stored


async def status_changes(pool: Pool, payment: Payment) -> list[tuple[PaymentStatus, str]]:
    """(to_status, reason) of the payment's STATUS_CHANGED events, oldest first."""
    async with pool.connection() as conn:
        events = await repo.list_events(conn, payment.id)
    return [(e.to_status, e.reason) for e in events if e.kind == EventKind.STATUS_CHANGED]


async def outbox_statuses(pool: Pool, payment: Payment) -> list[PaymentStatus]:
    async with pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT status FROM callback_outbox WHERE payment_id = %s ORDER BY id", (payment.id,)
        )
    return [PaymentStatus(row[0]) for row in rows]


async def count_rows(pool: Pool, sql: str, args: Iterable[Any] = ()) -> int:
    async with pool.connection() as conn:
        row = await conn.fetchone(sql, list(args))
    assert row is not None
    return int(row[0])


@asynccontextmanager
async def pass_held_by(fault: Fault, job: PaymentJob) -> AsyncIterator[list[JobSummary]]:
    """Run a pass of ``job`` in the background; the block starts once the pass has hit
    ``fault`` (a hang, say) and the pass has ended when it exits (its summary then in
    the list)."""
    summaries: list[JobSummary] = []

    async def run() -> None:
        summaries.append(await job.run_pass())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(5):
            while fault.hits == 0:  # noqa: ASYNC110  (a counter, no event)
                await trio.sleep(0.01)
        yield summaries


def child_context(stopping: trio.Event, started: list[bool] | None = None) -> ChildContext:
    """A ChildContext like the supervisor hands out, for running ``run(ctx)`` directly."""
    flags = started if started is not None else []
    return ChildContext("job", restarts=0, stopping=stopping, on_started=lambda: flags.append(True))
