"""Reads of one payment each, coalesced (payments/storage/payment_reads.py), on both
backends: what readers of one moment get is exactly what a read of their own returns;
a reader that comes after a statement left is never answered by it; the first reader's
cancellation or a failed statement fails nobody else wrongly; tenants stay apart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from payments.errors import DependencyUnavailable, NotFound
from payments.model import Caller, Payment, PaymentStatus, RefundStatus
from payments.providers.registry import ProviderRegistry
from payments.refunding import load_refund_totals
from payments.service import PaymentService
from payments.storage import repository as repo
from payments.storage.database import Database
from payments.storage.payment_reads import PaymentReads
from payments.unit_of_work import UnitOfWork
from tests.fixtures.db import make_payment, utcnow
from tests.storage_support import insert
from tests.test_storage_refunds import insert as insert_refund
from tests.test_storage_refunds import make_refund

pytestmark = pytest.mark.timeout(30)


async def alone(db: Database, payment_id: int) -> Payment | None:
    """What a read of its own returns (the service's read before coalescing)."""
    async with db.connection() as conn:
        payment = await repo.get_payment(conn, payment_id)
        if payment is not None:
            await load_refund_totals(conn, (payment,))
    return payment


async def read_all(reads: PaymentReads, ids: Sequence[int]) -> list[Payment | None]:
    """``ids`` read by as many tasks, started in the same moment."""
    found: list[Payment | None] = [None] * len(ids)

    async def one(index: int, payment_id: int) -> None:
        found[index] = await reads.get(payment_id)

    async with trio.open_nursery() as nursery:
        for index, payment_id in enumerate(ids):
            nursery.start_soon(one, index, payment_id)
    return found


async def some_payments(db: Database) -> list[Payment]:
    """Three payments, one PAID with a succeeded and a pending refund."""
    pending = await insert(db, make_payment())
    paid = await insert(db, make_payment(status=PaymentStatus.PAID, amount_cents=1000))
    await insert_refund(db, make_refund(paid, amount_cents=300, status=RefundStatus.SUCCEEDED))
    await insert_refund(db, make_refund(paid, amount_cents=200))
    other = await insert(db, make_payment(caller_service="billing", metadata={"k": "v"}))
    return [pending, paid, other]


async def test_readers_of_one_moment_get_what_a_read_alone_gets_from_one_statement(
    database: Database,
) -> None:
    payments = await some_payments(database)
    ids = [p.id for p in payments] * 3 + [10**12]  # each id three times, and one unknown
    reads = PaymentReads(database)
    found = await read_all(reads, ids)
    assert reads.statements == 1
    expected = {p.id: await alone(database, p.id) for p in payments}
    assert found == [expected.get(number) for number in ids]
    paid = found[1]
    assert paid is not None and (paid.refunded_cents, paid.pending_refund_cents) == (300, 200)
    assert paid.refundable_cents == 500
    # Readers of the same id each get their own object: nothing they do meets.
    assert len({id(p) for p in found if p is not None}) == len(ids) - 1
    assert found[2] is not None and found[5] is not None
    assert found[2].metadata is not found[5].metadata


async def test_a_reader_alone_reads_at_once(database: Database) -> None:
    (payment, *_) = await some_payments(database)
    reads = PaymentReads(database)
    assert await reads.get(payment.id) == await alone(database, payment.id)
    assert await reads.get(payment.id) == await alone(database, payment.id)
    assert await reads.get(0) is None and await reads.get(-5) is None
    assert reads.statements == 2


async def test_a_full_batch_starts_another(database: Database) -> None:
    payments = await some_payments(database)
    reads = PaymentReads(database, max_batch=3)
    ids = [p.id for p in payments] * 2 + [payments[0].id]
    found = await read_all(reads, ids)
    assert reads.statements == 3  # 3 + 3 + 1
    assert [p.id if p else None for p in found] == ids


class Gated:
    """The database, with every read held until the test lets it go."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.started = 0
        self.arrived = trio.Event()
        self.gate = trio.Event()
        self.fail: BaseException | None = None
        self.tasks: list[trio.lowlevel.Task] = []  # the task of each statement

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        self.started += 1
        self.tasks.append(trio.lowlevel.current_task())
        self.arrived.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        async with self.database.connection() as conn:
            yield conn


async def test_a_reader_after_the_statement_left_is_read_again_and_sees_the_change(
    database: Database,
) -> None:
    """The guarantee that no status is served stale: a reader that arrives once a
    statement is on its way waits for a statement of its own, sent after it arrived."""
    (payment, *_) = await some_payments(database)
    gated = Gated(database)
    reads = PaymentReads(gated)  # type: ignore[arg-type]
    got: dict[str, Payment | None] = {}

    async def read(name: str) -> None:
        got[name] = await reads.get(payment.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "before")
        await gated.arrived.wait()  # the first statement is on its way
        async with database.transaction() as conn:
            await repo.set_statuses(conn, [payment.id], PaymentStatus.CANCELED, utcnow())
        gated.arrived = trio.Event()
        nursery.start_soon(read, "after")
        await gated.arrived.wait()  # it did not join the first: a statement of its own
        assert gated.started == 2
        gated.gate.set()
    after = got["after"]
    assert after is not None and after.status == PaymentStatus.CANCELED
    assert reads.statements == 2


async def test_the_first_readers_cancellation_fails_no_one_else(database: Database) -> None:
    """The first reader reads for everyone; when its caller leaves mid-statement, the
    others read again rather than fail (and nothing outlives the cancelled request)."""
    (payment, *_) = await some_payments(database)
    gated = Gated(database)
    reads = PaymentReads(gated)  # type: ignore[arg-type]
    got: dict[str, Payment | None] = {}
    scopes: dict[trio.lowlevel.Task, tuple[str, trio.CancelScope]] = {}

    async def reader(name: str) -> None:
        with trio.CancelScope() as scope:
            scopes[trio.lowlevel.current_task()] = name, scope
            got[name] = await reads.get(payment.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "a")
        nursery.start_soon(reader, "b")
        await gated.arrived.wait()
        assert gated.started == 1  # one statement for both, held at the gate
        # Whichever of the two leads (trio picks the order), its caller leaves now.
        left, scope = scopes[gated.tasks[0]]
        scope.cancel()
        await trio.sleep(0.05)
        gated.gate.set()
    assert scope.cancelled_caught
    assert got == {"ab".replace(left, ""): await alone(database, payment.id)}
    assert reads.statements == 2  # the abandoned statement, and the other reader's own


async def test_a_failed_statement_fails_each_reader_with_an_error_of_its_own(
    database: Database,
) -> None:
    payments = await some_payments(database)
    gated = Gated(database)
    gated.fail = DependencyUnavailable("database unavailable")
    gated.gate.set()
    reads = PaymentReads(gated)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    async def one(payment_id: int) -> None:
        try:
            await reads.get(payment_id)
        except DependencyUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for payment in payments:
            nursery.start_soon(one, payment.id)
    assert reads.statements == 1
    assert len(errors) == 3 and len({id(e) for e in errors}) == 3
    assert all(str(e) == "database unavailable" for e in errors)
    # The next reader reads again.
    gated.fail = None
    assert await reads.get(payments[0].id) == await alone(database, payments[0].id)


async def test_tenants_reading_in_one_batch_see_only_their_own(database: Database) -> None:
    orders, _, billing = await some_payments(database)
    service = PaymentService(UnitOfWork(database), ProviderRegistry({}), "http://unused")
    results: dict[tuple[str, int], object] = {}

    async def read(caller: str, payment_id: int) -> None:
        try:
            results[caller, payment_id] = (await service.get(Caller(caller), payment_id)).id
        except NotFound as exc:
            results[caller, payment_id] = exc.message

    async with trio.open_nursery() as nursery:
        for caller in ("orders", "billing"):
            for payment in (orders, billing):
                nursery.start_soon(read, caller, payment.id)
    assert results == {
        ("orders", orders.id): orders.id,
        ("orders", billing.id): "payment not found",
        ("billing", orders.id): "payment not found",
        ("billing", billing.id): billing.id,
    }
