"""The one write path: a transaction, the status changes made in it, and what happens
after its commit.

Every status change goes through :meth:`Work.change_status` (or its bulk form
:meth:`Work.change_statuses`), inside the transaction
that holds the row lock: it asks the status machine, writes the event row (first, so a
replayed provider event fails before anything changes), the row itself and, for a
terminal status, the callback-outbox row, and keeps a notice. Only after the commit
does the unit of work wake the dispatcher with the notices: before it, the dispatcher
would look for a row it cannot see yet; after a rollback there is nothing to announce.

What moves is a :class:`Subject`: the payment itself by default; a refund (its own
machine, event rows and callback body) plugs in the same way.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import attrs

from payments.model import (
    CallbackKind,
    EventKind,
    OutboxEntry,
    OutboxState,
    Payment,
    PaymentEvent,
    PaymentStatus,
    can_transition,
    utcnow,
)
from payments.observability import hooks, tracing
from payments.payment_json import payment_to_json
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection, Database

log = logging.getLogger("payments.unit_of_work")

# Told of each payment whose callback is due, after the commit (the dispatcher's
# DispatchNotifier). Must not block.
Notify = Callable[[Payment], object]


@attrs.frozen
class Change:
    """Why a status moves, and when (the event row's fields)."""

    reason: str
    at: datetime
    provider_event_id: str = ""
    provider_event_type: str = ""


class Subject(Protocol):
    """Something with a status machine that :meth:`Work.change_status` moves."""

    @property
    def payment(self) -> Payment:
        """The payment whose row lock is held and whose caller hears of the change."""
        ...

    @property
    def status(self) -> enum.IntEnum: ...

    def allows(self, new: enum.IntEnum) -> bool:
        """True when the subject's status machine lets its status move to ``new``."""
        ...

    def is_terminal(self, status: enum.IntEnum) -> bool: ...

    async def record(
        self, conn: Connection, new: enum.IntEnum, change: Change, *, applied: bool
    ) -> None:
        """Write the event row (``applied`` False: recorded only, status unchanged)."""
        ...

    async def apply(self, conn: Connection, new: enum.IntEnum, change: Change) -> None:
        """Set the new status on the subject and write its row."""
        ...

    def callback_body(self) -> Mapping[str, Any]:
        """The status callback's JSON body, fixed now."""
        ...

    @property
    def refund_id(self) -> int:
        """The refund a callback of this subject announces (0: the payment itself)."""
        ...


@attrs.define
class PaymentSubject:
    """A payment moving on the payment status machine.

    ``kind`` names the event row of an applied change (PROVIDER_CREATED for the opening).
    """

    payment: Payment
    kind: EventKind = EventKind.STATUS_CHANGED
    refund_id: int = 0  # a payment's own callback

    @property
    def status(self) -> PaymentStatus:
        return self.payment.status

    def allows(self, new: enum.IntEnum) -> bool:
        return can_transition(self.payment.status, PaymentStatus(new))

    def is_terminal(self, status: enum.IntEnum) -> bool:
        return PaymentStatus(status).is_terminal

    async def record(
        self, conn: Connection, new: enum.IntEnum, change: Change, *, applied: bool
    ) -> None:
        current = self.payment.status
        reason = change.reason
        if not applied and new != current:
            reason = f"not applied: {reason}"
        await repo.insert_event(
            conn,
            PaymentEvent(
                payment_id=self.payment.id,
                kind=self.kind if applied else EventKind.PROVIDER_EVENT,
                from_status=current,
                to_status=PaymentStatus(new) if applied else current,
                created_at=change.at,
                reason=reason,
                provider_event_id=change.provider_event_id,
                provider_event_type=change.provider_event_type,
            ),
        )

    async def apply(self, conn: Connection, new: enum.IntEnum, change: Change) -> None:
        self.payment.status = PaymentStatus(new)
        self.payment.updated_at = change.at
        await repo.update_payment(conn, self.payment)

    def callback_body(self) -> Mapping[str, Any]:
        return {"payment": payment_to_json(self.payment)}


class Work:
    """One transaction's connection and the notices its status changes collected."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.notices: list[Payment] = []
        self.moved: list[enum.IntEnum] = []  # counted once committed

    async def change_status(
        self,
        payment: Payment,
        new_status: enum.IntEnum,
        *,
        reason: str,
        provider_event_id: str = "",
        provider_event_type: str = "",
        at: datetime | None = None,
        subject: Subject | None = None,
    ) -> bool:
        """Move ``subject`` (default: ``payment``, read ``for_update`` on this
        transaction) to ``new_status``; True when it moved.

        When the status machine refuses (or the status is already ``new_status``)
        nothing changes; a provider event is still recorded (late or out-of-order events
        are kept, never applied). Raises DuplicateKey when ``provider_event_id`` was
        already recorded (a replay), before anything is written.
        """
        subject = subject if subject is not None else PaymentSubject(payment)
        change = Change(reason, at or utcnow(), provider_event_id, provider_event_type)
        if not subject.allows(new_status):
            if provider_event_id:
                await subject.record(self.conn, new_status, change, applied=False)
            return False
        await subject.record(self.conn, new_status, change, applied=True)
        await subject.apply(self.conn, new_status, change)
        self.moved.append(new_status)
        if subject.is_terminal(new_status):
            entry = new_outbox_entry(
                payment,
                subject.callback_body(),
                now=change.at,
                kind=CallbackKind.REFUND if subject.refund_id else CallbackKind.PAYMENT,
                refund_id=subject.refund_id,
            )
            await self.announce(payment, entry)
        return True

    async def announce(self, payment: Payment, entry: OutboxEntry) -> int:
        """Queue ``entry`` (a callback to ``payment``'s caller) and wake the dispatcher
        for it after the commit; the outbox row's id (0: already queued)."""
        outbox_id = await outbox.insert_entry(self.conn, entry)
        self.notices.append(payment)
        return outbox_id

    async def change_statuses(
        self, payments: Sequence[Payment], new_status: PaymentStatus, *, reason: str
    ) -> list[Payment]:
        """The bulk form of :meth:`change_status` for many payments (each read
        ``for_update`` on this transaction) moving to one status for one reason: the
        same machine check, event rows, row updates and outbox rows, written as one
        multi-row INSERT each and one UPDATE. Returns the payments that moved."""
        at = utcnow()
        moved = [p for p in payments if can_transition(p.status, new_status)]
        if not moved:
            return []
        await repo.insert_events(
            self.conn,
            [
                PaymentEvent(
                    payment_id=p.id,
                    kind=EventKind.STATUS_CHANGED,
                    from_status=p.status,
                    to_status=new_status,
                    created_at=at,
                    reason=reason,
                )
                for p in moved
            ],
        )
        await repo.set_statuses(self.conn, [p.id for p in moved], new_status, at)
        for payment in moved:
            payment.status = new_status
            payment.updated_at = at
        self.moved.extend([new_status] * len(moved))
        if new_status.is_terminal:
            await outbox.insert_entries(self.conn, [new_outbox_entry(p) for p in moved])
            self.notices.extend(moved)
        return moved


class UnitOfWork:
    """Opens :class:`Work` in a transaction on ``database``; after each commit, tells
    ``on_terminal`` (the dispatcher's notifier) of every payment whose callback is due."""

    def __init__(self, database: Database, on_terminal: Notify | None = None) -> None:
        self.database = database
        self._on_terminal = on_terminal

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Work]:
        """A transaction: COMMIT at the end, ROLLBACK (and no notice) on error."""
        with hooks.transaction_span():
            async with self.database.transaction() as conn:
                work = Work(conn)
                yield work
        hooks.status_changes_committed(work.moved)
        self._wake(work.notices)

    def _wake(self, notices: list[Payment]) -> None:
        if self._on_terminal is None:
            return
        for payment in notices:
            try:
                self._on_terminal(payment)
            except Exception:  # committed already: the dispatcher's sweep finds the row
                log.exception("dispatcher notice failed", extra={"payment_id": payment.id})


def new_outbox_entry(
    payment: Payment,
    body: Mapping[str, Any] | None = None,
    *,
    now: datetime | None = None,
    resend: int = 0,
    kind: CallbackKind = CallbackKind.PAYMENT,
    refund_id: int = 0,
) -> OutboxEntry:
    """The callback announcing ``payment``'s (terminal) status, due ``now`` (default:
    when the payment last changed); ``body`` defaults to ``{"payment": ...}``;
    ``resend`` numbers a caller-requested repeat (a new delivery, a new webhook-id);
    a refund's callback passes ``kind=CallbackKind.REFUND`` and its ``refund_id`` (the
    outbox's unique announcement is payment, kind, refund, status, resend)."""
    now = now or payment.updated_at
    document = body if body is not None else {"payment": payment_to_json(payment)}
    return OutboxEntry(
        payment_id=payment.id,
        status=payment.status,
        delivery_id=f"msg_{uuid.uuid4().hex}",
        url=payment.status_callback_url,
        request_id=payment.request_id,
        payload=json.dumps(document, separators=(",", ":"), ensure_ascii=False),
        state=OutboxState.PENDING,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
        traceparent=tracing.current_traceparent(),  # the callback continues this trace
        resend=resend,
        kind=kind,
        refund_id=refund_id,
    )
