"""The unit of work on both backends: a status change writes its event row, the row and
(terminal) the outbox row together, refusals write nothing, and the dispatcher hears
of a change only once it is committed."""

from __future__ import annotations

import pytest

from payments.model import EventKind, Payment, PaymentEvent, PaymentStatus
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection, Database, DuplicateKey
from payments.unit_of_work import UnitOfWork
from tests.fixtures.db import make_payment

S = PaymentStatus


class Boom(Exception):
    """Raised inside a unit of work to roll it back."""


async def stored(database: Database, status: PaymentStatus = S.PENDING) -> Payment:
    """A payment row with ``status``, no history."""
    payment = make_payment(status=status)
    async with database.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    return payment


async def locked(conn: Connection, payment: Payment) -> Payment:
    """``payment`` read under its row lock, as every writer reads it."""
    fresh = await repo.get_payment(conn, payment.id, for_update=True)
    assert fresh is not None
    return fresh


async def history(database: Database, payment: Payment) -> tuple[Payment, list[PaymentEvent], int]:
    """The stored row, its events and its number of outbox rows."""
    async with database.connection() as conn:
        row = await repo.get_payment(conn, payment.id)
        events = await repo.list_events(conn, payment.id)
        entries = await outbox.entries_for_payment(conn, payment.id)
    assert row is not None
    return row, events, len(entries)


async def test_a_terminal_change_is_announced_only_after_the_commit(database: Database) -> None:
    notified: list[tuple[int, PaymentStatus]] = []
    uow = UnitOfWork(database, on_terminal=lambda p: notified.append((p.id, p.status)))
    payment = await stored(database)
    async with uow.begin() as work:
        current = await locked(work.conn, payment)
        assert await work.change_status(current, S.PAID, reason="test")
        assert notified == []  # not committed yet: the dispatcher would not see the row
    assert notified == [(payment.id, S.PAID)]
    row, events, outbox_rows = await history(database, payment)
    assert row.status == S.PAID and row.updated_at == current.updated_at
    assert [(e.kind, e.from_status, e.to_status, e.reason) for e in events] == [
        (EventKind.STATUS_CHANGED, S.PENDING, S.PAID, "test")
    ]
    assert outbox_rows == 1


async def test_a_rolled_back_change_is_never_announced_nor_kept(database: Database) -> None:
    notified: list[Payment] = []
    uow = UnitOfWork(database, on_terminal=notified.append)
    payment = await stored(database)
    with pytest.raises(Boom):
        async with uow.begin() as work:
            assert await work.change_status(
                await locked(work.conn, payment), S.CANCELED, reason="x"
            )
            raise Boom
    assert notified == []
    row, events, outbox_rows = await history(database, payment)
    assert (row.status, events, outbox_rows) == (S.PENDING, [], 0)


async def test_a_change_that_does_not_end_the_payment_queues_no_callback(
    database: Database,
) -> None:
    notified: list[Payment] = []
    payment = await stored(database)
    async with UnitOfWork(database, on_terminal=notified.append).begin() as work:
        assert await work.change_status(await locked(work.conn, payment), S.PROCESSING, reason="x")
    row, events, outbox_rows = await history(database, payment)
    assert (row.status, len(events), outbox_rows, notified) == (S.PROCESSING, 1, 0, [])


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.PAID, S.CANCELED),
        (S.EXPIRED, S.PAID),
        (S.CANCELED, S.PENDING),
        (S.PROCESSING, S.PENDING),
        (S.PENDING, S.CREATED),
        (S.PENDING, S.PENDING),
        (S.PENDING, S.UNSPECIFIED),
    ],
)
async def test_the_status_machine_refuses_and_nothing_is_written(
    database: Database, current: PaymentStatus, new: PaymentStatus
) -> None:
    notified: list[Payment] = []
    payment = await stored(database, current)
    async with UnitOfWork(database, on_terminal=notified.append).begin() as work:
        held = await locked(work.conn, payment)
        assert not await work.change_status(held, new, reason="x")
        assert held.status == current
    row, events, outbox_rows = await history(database, payment)
    assert (row.status, row.updated_at, events, outbox_rows, notified) == (
        current,
        payment.updated_at,
        [],
        0,
        [],
    )


async def test_a_refused_provider_event_is_recorded_but_not_applied(database: Database) -> None:
    payment = await stored(database, S.CANCELED)
    async with UnitOfWork(database).begin() as work:
        assert not await work.change_status(
            await locked(work.conn, payment),
            S.PAID,
            reason="provider event invoice.paid",
            provider_event_id="evt_late",
            provider_event_type="invoice.paid",
        )
    row, events, outbox_rows = await history(database, payment)
    assert (row.status, outbox_rows) == (S.CANCELED, 0)
    assert [
        (e.kind, e.from_status, e.to_status, e.reason, e.provider_event_id) for e in events
    ] == [
        (
            EventKind.PROVIDER_EVENT,
            S.CANCELED,
            S.CANCELED,
            "not applied: provider event invoice.paid",
            "evt_late",
        )
    ]


async def test_a_replayed_provider_event_changes_nothing(database: Database) -> None:
    """The event row goes first: a replay fails on its unique key before the payment or
    the outbox is touched, and the transaction can still commit (the inbound use case
    records the duplicate in it)."""
    notified: list[Payment] = []
    uow = UnitOfWork(database, on_terminal=notified.append)
    payment = await stored(database)
    async with uow.begin() as work:
        assert await work.change_status(
            await locked(work.conn, payment), S.PROCESSING, reason="x", provider_event_id="evt_1"
        )
    async with uow.begin() as work:
        held = await locked(work.conn, payment)
        with pytest.raises(DuplicateKey):
            await work.change_status(held, S.PAID, reason="again", provider_event_id="evt_1")
    row, events, outbox_rows = await history(database, payment)
    assert (row.status, len(events), outbox_rows, notified) == (S.PROCESSING, 1, 0, [])


async def test_a_failing_notifier_does_not_undo_the_committed_change(database: Database) -> None:
    def broken(payment: Payment) -> None:
        raise RuntimeError("channel gone")

    payment = await stored(database)
    async with UnitOfWork(database, on_terminal=broken).begin() as work:
        assert await work.change_status(await locked(work.conn, payment), S.EXPIRED, reason="x")
    row, _, outbox_rows = await history(database, payment)
    assert (row.status, outbox_rows) == (S.EXPIRED, 1)  # the dispatcher's sweep finds it
