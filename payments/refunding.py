"""Refund status changes: the refund's :class:`Subject` for the unit of work, and the
use-case steps both the request side (service) and the event side (inbound events,
reconciler) take to move a refund or record one found at the provider.

Every function here runs inside ``uow.begin()`` with the payment read ``for_update``
on that transaction (one lock order everywhere: the payment, then its refunds), so the
totals, the refund row and the callback's body are consistent with each other.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs

from payments.mapping import payment_to_json, refund_to_json
from payments.model import (
    EventKind,
    Payment,
    PaymentStatus,
    Refund,
    RefundEvent,
    RefundStatus,
    RefundTotals,
    can_refund_transition,
    utcnow,
)
from payments.providers.base import ProviderRefund
from payments.storage import refunds as store
from payments.storage import repository as repo
from payments.storage.database import Connection
from payments.unit_of_work import Change, Work
from payments.validation import OUTSIDE_REFUND_PREFIX

# The request_id of a refund made outside the service (CONTRACT.md): stripe:<re_id>;
# validation refuses it in a caller's request.
OUTSIDE_REQUEST_PREFIX = OUTSIDE_REFUND_PREFIX


async def load_refund_totals(conn: Connection, payments: Iterable[Payment]) -> None:
    """Set ``refunded_cents`` and the pending sum of each PAID payment from the refunds
    table (one query for all of them), so ``refundable_cents`` is right on this read.

    Only a PAID payment has anything refundable, and the row's own ``refunded_cents`` is
    written with every refund's status change (RefundSubject.apply, under the row lock):
    other payments need no second query, which keeps a plain read to one round trip."""
    page = [payment for payment in payments if payment.status == PaymentStatus.PAID]
    if not page:
        return
    totals = await store.refund_totals_for(conn, (payment.id for payment in page))
    for payment in page:
        payment.set_refund_totals(totals.get(payment.id, RefundTotals()))


@attrs.define
class RefundSubject:
    """A refund of ``payment`` moving on the refund status machine."""

    payment: Payment
    refund: Refund
    kind: EventKind = EventKind.STATUS_CHANGED

    @property
    def status(self) -> RefundStatus:
        return self.refund.status

    @property
    def refund_id(self) -> int:
        return self.refund.id

    def allows(self, new: enum.IntEnum) -> bool:
        return can_refund_transition(self.refund.status, RefundStatus(new))

    def is_terminal(self, status: enum.IntEnum) -> bool:
        return RefundStatus(status).is_terminal

    async def record(
        self, conn: Connection, new: enum.IntEnum, change: Change, *, applied: bool
    ) -> None:
        current = self.refund.status
        reason = change.reason
        if not applied and new != current:
            reason = f"not applied: {reason}"
        await store.insert_refund_event(
            conn,
            RefundEvent(
                refund_id=self.refund.id,
                payment_id=self.refund.payment_id,
                kind=self.kind if applied else EventKind.PROVIDER_EVENT,
                from_status=current,
                to_status=RefundStatus(new) if applied else current,
                created_at=change.at,
                reason=reason,
                provider_event_id=change.provider_event_id,
                provider_event_type=change.provider_event_type,
            ),
        )

    async def apply(self, conn: Connection, new: enum.IntEnum, change: Change) -> None:
        """Write the refund, then the payment's totals: the callback body (built next)
        carries the payment as it is after this change."""
        self.refund.status = RefundStatus(new)
        self.refund.updated_at = change.at
        await store.update_refund(conn, self.refund)
        await load_refund_totals(conn, (self.payment,))
        await repo.write_refunded_cents(conn, self.payment.id, self.payment.refunded_cents)

    def callback_body(self) -> Mapping[str, Any]:
        return {"payment": payment_to_json(self.payment), "refund": refund_to_json(self.refund)}


async def move_refund(
    work: Work,
    payment: Payment,
    refund: Refund,
    new_status: RefundStatus,
    *,
    reason: str,
    failure_reason: str = "",
    provider_refund_id: str = "",
    provider_event_id: str = "",
    provider_event_type: str = "",
    at: datetime | None = None,
) -> bool:
    """Move ``refund`` (read ``for_update`` after ``payment``) to ``new_status``; True
    when its status moved. The refund's Stripe id is learnt even when the status stays
    (a ``refund.created`` of a pending refund); ``failure_reason`` is kept with FAILED.
    A terminal status writes the callback ``{"payment", "refund"}`` to the outbox.
    Raises DuplicateKey for a provider event already recorded for this refund (a
    replay: acknowledge it, nothing was written).
    """
    at = at or utcnow()
    learnt = bool(provider_refund_id) and provider_refund_id != refund.provider_refund_id
    if learnt:
        refund.provider_refund_id = provider_refund_id
    failing = new_status == RefundStatus.FAILED
    if failure_reason and failing and can_refund_transition(refund.status, new_status):
        refund.failure_reason = failure_reason
    moved = await work.change_status(
        payment,
        new_status,
        reason=reason,
        provider_event_id=provider_event_id,
        provider_event_type=provider_event_type,
        at=at,
        subject=RefundSubject(payment, refund),
    )
    if learnt and not moved:
        refund.updated_at = at
        await store.update_refund(work.conn, refund)
    return moved


async def find_own_refund(
    conn: Connection, payment: Payment, found: ProviderRefund
) -> Refund | None:
    """The stored refund ``found`` is, locked: by its Stripe id, else (an event about a
    refund the service made, arriving before the service stored Stripe's id) by the
    refund_id in its metadata when that refund is this payment's; None: not recorded."""
    refund = await store.get_refund_by_provider_id(conn, found.provider_refund_id, for_update=True)
    if refund is None and found.refund_id:
        refund = await store.get_refund(conn, found.refund_id, for_update=True)
        if refund is not None and (
            refund.payment_id != payment.id
            or refund.provider_refund_id not in ("", found.provider_refund_id)
        ):
            refund = None
    return refund


async def record_provider_refund(
    work: Work,
    payment: Payment,
    found: ProviderRefund,
    *,
    reason: str,
    provider_event_id: str = "",
    provider_event_type: str = "",
    at: datetime | None = None,
) -> Refund:
    """Bring the stored refund in line with the provider's ``found`` (an event, or the
    reconciler's retrieve), forward only; a refund the service does not know (made in
    Stripe's dashboard) is recorded first as ``stripe:<re_id>`` of ``payment``'s
    caller, PENDING, then moved like any other (so it is called back when it ends).
    Also keeps the payment's PaymentIntent and charge ids when it lacked them.
    Returns the refund as stored now. DuplicateKey: a replayed provider event.
    """
    at = at or utcnow()
    refund = await find_own_refund(work.conn, payment, found)
    if refund is None:
        refund = Refund(
            id=0,
            payment_id=payment.id,
            request_id=f"{OUTSIDE_REQUEST_PREFIX}{found.provider_refund_id}",
            caller_service=payment.caller_service,
            amount_cents=found.amount_cents,
            currency=found.currency or payment.currency,
            status=RefundStatus.PENDING,
            request_fingerprint="",
            created_at=at,
            updated_at=at,
            reason=found.reason,
            provider_refund_id=found.provider_refund_id,
        )
        await insert_pending(work.conn, refund, reason="made at the provider")
    await apply_provider_refund(
        work,
        payment,
        refund,
        found,
        reason=reason,
        provider_event_id=provider_event_id,
        provider_event_type=provider_event_type,
        at=at,
    )
    return refund


async def apply_provider_refund(
    work: Work,
    payment: Payment,
    refund: Refund,
    found: ProviderRefund,
    *,
    reason: str,
    provider_event_id: str = "",
    provider_event_type: str = "",
    at: datetime | None = None,
) -> bool:
    """Move the stored ``refund`` (both rows locked) to where Stripe's ``found`` stands,
    taking its Stripe id and failure reason, and keep the payment's PaymentIntent and
    charge ids; True when the status moved."""
    await remember_money_ids(work.conn, payment, found)
    return await move_refund(
        work,
        payment,
        refund,
        found.status,
        reason=reason,
        failure_reason=found.failure_reason,
        provider_refund_id=found.provider_refund_id,
        provider_event_id=provider_event_id,
        provider_event_type=provider_event_type,
        at=at,
    )


async def insert_pending(conn: Connection, refund: Refund, *, reason: str) -> None:
    """Insert a PENDING refund and its CREATED event; sets ``refund.id``. DuplicateKey
    when (caller_service, request_id) or the Stripe id is recorded already."""
    refund.id = await store.insert_refund(conn, refund)
    await store.insert_refund_event(
        conn,
        RefundEvent(
            refund_id=refund.id,
            payment_id=refund.payment_id,
            kind=EventKind.CREATED,
            from_status=RefundStatus.UNSPECIFIED,
            to_status=RefundStatus.PENDING,
            created_at=refund.created_at,
            reason=reason,
        ),
    )


async def remember_money_ids(conn: Connection, payment: Payment, found: ProviderRefund) -> None:
    """Store the PaymentIntent and charge ids ``found`` names on the (locked) payment
    when it has none yet: refund events are routed to the payment by them."""
    intent = payment.provider_payment_intent_id or found.payment_intent_id
    charge = payment.provider_charge_id or found.charge_id
    if (intent, charge) == (payment.provider_payment_intent_id, payment.provider_charge_id):
        return
    payment.provider_payment_intent_id, payment.provider_charge_id = intent, charge
    await repo.update_payment(conn, payment)
