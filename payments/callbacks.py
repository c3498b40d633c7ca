"""Use cases of a payment's status callbacks for its owner: the delivery log and resend.

Transport-free like payments.service: the caller is authenticated already, another
caller's payment answers NotFound (ids do not leak). A resend is a new delivery (a new
``webhook-id``) of the payment's current state, queued through the unit of work, whose
post-commit notice wakes the dispatcher: it goes out at once, not on the next sweep.
"""

from __future__ import annotations

from payments.errors import FailedPrecondition, NotFound
from payments.model import (
    CallbackDelivery,
    Caller,
    DeliveryAttempt,
    OutboxEntry,
    Payment,
    utcnow,
)
from payments.storage import deliveries, outbox
from payments.storage import repository as repo
from payments.storage.database import Connection
from payments.storage.outbox import CallbackAttempt
from payments.unit_of_work import UnitOfWork, new_outbox_entry


def delivery_view(entry: OutboxEntry, attempts: list[CallbackAttempt]) -> CallbackDelivery:
    """The owner's view of one outbox row and its attempts."""
    return CallbackDelivery(
        id=entry.id,
        webhook_id=entry.delivery_id,
        kind=str(entry.kind),
        refund_id=entry.refund_id,
        state=str(entry.state),
        next_attempt_at=entry.next_attempt_at,
        created_at=entry.created_at,
        attempts=[
            DeliveryAttempt(
                at=a.attempted_at,
                status_code=a.status_code or 0,
                duration_ms=a.latency_ms,
                error=a.error,
            )
            for a in attempts
        ],
    )


async def _views(conn: Connection, entries: list[OutboxEntry]) -> list[CallbackDelivery]:
    found = await deliveries.attempts_by_outbox(conn, [e.id for e in entries])
    return [delivery_view(entry, found[entry.id]) for entry in entries]


def _owned(payment: Payment | None, caller: Caller) -> Payment:
    if payment is None or not caller.may_act_for(payment.caller_service):
        raise NotFound("payment not found")
    return payment


class CallbackOperations:
    """The delivery log and resend of one payment's callbacks."""

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow

    async def deliveries(self, caller: Caller, payment_id: int) -> list[CallbackDelivery]:
        """Every delivery of the payment (payment and refund callbacks), oldest first."""
        async with self._uow.database.connection() as conn:
            _owned(await repo.get_payment(conn, payment_id), caller)
            return await _views(conn, await outbox.entries_for_payment(conn, payment_id))

    async def resend(self, caller: Caller, payment_id: int) -> CallbackDelivery:
        """Queue a new delivery of the payment's current (terminal) state, due now."""
        async with self._uow.begin() as work:
            payment = _owned(await repo.get_payment(work.conn, payment_id, for_update=True), caller)
            if not payment.status.is_terminal:
                raise FailedPrecondition(
                    f"payment is {payment.status.name}; callbacks announce terminal statuses only"
                )
            if not payment.status_callback_url:
                raise FailedPrecondition("payment has no status_callback_url")
            entry = new_outbox_entry(payment, now=utcnow())
            entry.resend = await deliveries.next_resend_number(work.conn, entry)
            entry.id = await work.announce(payment, entry)
        return delivery_view(entry, [])
