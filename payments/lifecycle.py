"""The one way a payment's status changes after creation.

Cancel, provider events, the reconciler and the expirer all call
:func:`change_status` inside their own transaction, holding the payment's row lock. It
asks the status machine, writes the payment, its event row and, for a terminal
status, the callback-outbox row, all in that transaction: nothing is half-written.
The caller tells the dispatcher after the commit (never before: it would look for a
row it cannot see yet).
"""

from __future__ import annotations

import json
import uuid

from payments.model import (
    EventKind,
    OutboxEntry,
    OutboxState,
    Payment,
    PaymentEvent,
    PaymentStatus,
    can_transition,
    utcnow,
)
from payments.payment_json import payment_to_json
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection


async def change_status(
    conn: Connection,
    payment: Payment,
    new_status: PaymentStatus,
    *,
    reason: str,
    provider_event_id: str = "",
    provider_event_type: str = "",
) -> bool:
    """Move ``payment`` (read ``for_update`` on ``conn``) to ``new_status``.

    Returns False, writing nothing but the event row when a provider event is given
    (late or out-of-order events are recorded, never applied), when the status
    machine refuses the move. Raises DuplicateKey when ``provider_event_id`` was
    already recorded (a replay).
    """
    previous = payment.status
    now = utcnow()
    if previous == new_status or not can_transition(previous, new_status):
        if provider_event_id:
            await repo.insert_event(
                conn,
                PaymentEvent(
                    payment_id=payment.id,
                    kind=EventKind.PROVIDER_EVENT,
                    from_status=previous,
                    to_status=previous,
                    created_at=now,
                    reason=f"not applied: {reason}" if previous != new_status else reason,
                    provider_event_id=provider_event_id,
                    provider_event_type=provider_event_type,
                ),
            )
        return False
    # The event row goes first: a replayed provider event fails here, before any change.
    await repo.insert_event(
        conn,
        PaymentEvent(
            payment_id=payment.id,
            kind=EventKind.STATUS_CHANGED,
            from_status=previous,
            to_status=new_status,
            created_at=now,
            reason=reason,
            provider_event_id=provider_event_id,
            provider_event_type=provider_event_type,
        ),
    )
    payment.status = new_status
    payment.updated_at = now
    await repo.update_payment(conn, payment)
    if new_status.is_terminal:
        await outbox.insert_entry(conn, new_outbox_entry(payment))
    return True


def new_outbox_entry(payment: Payment) -> OutboxEntry:
    """The callback announcing ``payment``'s (terminal) status, due now."""
    now = payment.updated_at
    return OutboxEntry(
        payment_id=payment.id,
        status=payment.status,
        delivery_id=f"msg_{uuid.uuid4().hex}",
        url=payment.status_callback_url,
        request_id=payment.request_id,
        payload=json.dumps(
            {"payment": payment_to_json(payment)}, separators=(",", ":"), ensure_ascii=False
        ),
        state=OutboxState.PENDING,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
