"""Provider events -> status changes: the use case behind
``/webhooks/providers/{provider}/{callback_hash}`` and the hashless
``/webhooks/providers/{provider}`` (HTTP), and HandleProviderCallback (gRPC; an empty
callback_hash is the hashless form).

The signature is checked (by the route's provider, which alone knows its scheme)
before the database is asked anything, so a forger learns nothing, not even whether a
hash exists. Then, under the payment's row lock, the event must be about the route's
payment; its status change (by the status machine: late or out-of-order events are
recorded, never applied), event row, callback-outbox row and the record of this
callback commit together in one unit of work. A replayed event id hits the unique key
of the event row: acknowledged, nothing changed, recorded as a duplicate. Every refusal
is recorded on its own (so it survives) and raised.

Routing: the hashed route names its payment, and the event must then be about it. The
hashless route (one Stripe endpoint for every event) finds the payment by what the
event names: ``metadata.callback_hash``, the session, link or subscription id, a refund
the service knows (its Stripe id, or the refund_id the service put in its metadata),
then the PaymentIntent or charge stored on the payment. A money event whose
PaymentIntent no payment stores (a dashboard refund of a payment whose checkout event
was lost) makes the service ask the provider which of our checkouts that intent paid,
and store it there first; the provider down answers 503 (it sends the event again). An
event naming no known payment is recorded and acknowledged (Stripe sends every event of
the account there).
Refund events (payments.inbound_refunds) are recorded on the payment like any event,
which is what detects their replays, then move the refunds they report.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

import attrs

from payments.errors import (
    DependencyUnavailable,
    InvalidArgument,
    NotFound,
    PaymentsError,
    ProviderRejected,
    ProviderUnavailable,
)
from payments.inbound_refunds import apply_refunds
from payments.model import Payment, PaymentStatus, ProviderType, utcnow
from payments.providers.base import Provider, ProviderEvent
from payments.providers.registry import ProviderRegistry
from payments.refunding import find_own_refund
from payments.storage import leases, provider_callbacks
from payments.storage import refunds as refund_store
from payments.storage import repository as repo
from payments.storage.database import Connection, DuplicateKey
from payments.storage.provider_callbacks import CallbackOutcome, ProviderCallback
from payments.unit_of_work import UnitOfWork, Work

log = logging.getLogger("payments.inbound")

_REPLAYED_EVENT_KEY = "uq_payment_events_provider_event"


@attrs.frozen
class Received:
    """What became of an accepted event: the payment as it now stands (None: a
    hashless event naming no known payment), and how the event was taken (PROCESSED,
    or DUPLICATE for a replay)."""

    payment: Payment | None
    outcome: CallbackOutcome
    reason: str


class ProviderEvents:
    """Applies the providers' events to payments."""

    def __init__(self, uow: UnitOfWork, providers: ProviderRegistry) -> None:
        self._uow = uow
        self._pool = uow.database
        self._providers = providers

    async def receive(
        self, provider: str, callback_hash: str, payload: bytes, signature: str, request_id: str
    ) -> Received:
        """Apply one event posted for ``callback_hash`` under the provider route name
        ``provider``.

        Refusals: unknown provider or hash NotFound; bad signature, a body that is not
        an event, or an event about another payment InvalidArgument.
        """
        inbound = _Inbound(provider, callback_hash, payload, request_id, utcnow())
        if not callback_hash.strip():
            await self._check_route(inbound)
            raise await self._reject(inbound, InvalidArgument("callback_hash", "is required"))
        provider_type, provider, event = await self._verified(inbound, signature)
        if event.refunds or event.charge:
            await self._learn_intent_of(callback_hash, provider)
        return await self._apply_event(inbound, provider_type, provider, event)

    async def receive_unrouted(
        self, provider: str, payload: bytes, signature: str, request_id: str
    ) -> Received:
        """Apply one event posted to the provider's hashless route: the payment is the
        one the event names (see the module docstring); none known: recorded, and
        ``Received.payment`` is None. Refusals as :meth:`receive`'s."""
        inbound = _Inbound(provider, "", payload, request_id, utcnow())
        provider_type, source, event = await self._verified(inbound, signature)
        if (event.refunds or event.charge) and event.payment_intent:
            await self._route_money(inbound, provider_type, source, event)
        return await self._apply_event(inbound, provider_type, source, event)

    async def _route_money(
        self,
        inbound: _Inbound,
        provider_type: ProviderType,
        provider: Provider,
        event: ProviderEvent,
    ) -> None:
        """Before a money event is found to name no payment: when nothing it names is
        stored (a dashboard refund of a payment whose checkout event was lost), ask the
        provider which of our checkouts its PaymentIntent paid and store the intent and
        charge on that payment, so the event is routed to it. Outside any transaction.
        The provider down: 503, so it sends the event again rather than have it
        forgotten; an intent it ties to no payment of ours stores nothing."""
        async with self._pool.connection() as conn:
            if await find_payment(conn, provider_type, event, lock=False) is not None:
                return
        try:
            callback_hash = await provider.callback_hash_of_intent(event.payment_intent)
        except ProviderUnavailable:
            error = DependencyUnavailable("payment provider unavailable")
            reason = "the provider could not say which payment the money is"
            raise await self._reject(inbound, error, reason, event=event) from None
        except ProviderRejected as exc:
            log.warning("PaymentIntent not looked up: %s", exc.message)
            return
        if not callback_hash:
            return
        async with self._pool.transaction() as conn:
            payment = await repo.get_payment_by_callback_hash(conn, callback_hash, for_update=True)
            if payment is not None and (payment.provider or ProviderType.STRIPE) == provider_type:
                await repo.store_money_refs(conn, payment, event.payment_intent, event.charge)

    async def _check_route(self, inbound: _Inbound) -> tuple[ProviderType, Provider]:
        found = self._providers.for_events(inbound.provider)
        if found is None:
            raise await self._reject(inbound, NotFound("unknown provider"))
        return found

    async def _verified(
        self, inbound: _Inbound, signature: str
    ) -> tuple[ProviderType, Provider, ProviderEvent]:
        provider_type, source = await self._check_route(inbound)
        if not inbound.payload.strip():
            raise await self._reject(inbound, InvalidArgument("payload", "is required"))
        try:
            event = source.parse_event(inbound.payload, signature)
        except InvalidArgument as exc:
            raise await self._reject(inbound, exc, peek=True) from None
        return provider_type, source, event

    async def _learn_intent_of(self, callback_hash: str, provider: Provider) -> None:
        """Before a money event is checked against the hashed route's PAID payment:
        when the payment does not know its PaymentIntent yet (a recurring payment's
        events never tell it), ask the provider, outside any transaction. The provider
        being down is raised (503: the provider sends the event again)."""
        async with self._pool.connection() as conn:
            known = await repo.get_payment_by_callback_hash(conn, callback_hash)
        if known is not None and known.status == PaymentStatus.PAID:
            await self._learn_intent(provider, known)

    async def _learn_intent(self, provider: Provider, payment: Payment) -> None:
        """Store the PaymentIntent that paid ``payment`` if it is not stored yet: refund
        events, which carry no callback hash, are routed by it."""
        if payment.provider_payment_intent_id:
            return
        intent = await provider.payment_intent_of(payment)
        if not intent:
            return
        async with self._pool.transaction() as conn:
            locked = await repo.get_payment(conn, payment.id, for_update=True)
            if locked is not None:
                await repo.store_money_refs(conn, locked, intent, "")
        payment.provider_payment_intent_id = intent

    async def _apply_event(
        self,
        inbound: _Inbound,
        provider_type: ProviderType,
        provider: Provider,
        event: ProviderEvent,
    ) -> Received:
        rejection: tuple[PaymentsError, str] | None = None
        after: Payment | None = None
        async with self._uow.begin() as work:
            if inbound.callback_hash:
                payment = await repo.get_payment_by_callback_hash(
                    work.conn, inbound.callback_hash, for_update=True
                )
            else:
                payment = await find_payment(work.conn, provider_type, event)
            if payment is None and inbound.callback_hash:
                rejection = (NotFound("payment not found"), "unknown callback hash")
            elif payment is None:
                outcome, reason = CallbackOutcome.PROCESSED, "recorded: names no known payment"
                await provider_callbacks.insert(
                    work.conn,
                    inbound.record(outcome, reason, event.event_id, event.event_type, None),
                )
            elif problem := await _foreign_event(work.conn, payment, provider_type, event):
                rejection = (InvalidArgument("payload", "event is not about this payment"), problem)
            else:
                outcome, reason, after = await _apply(work, payment, event)
                if outcome is CallbackOutcome.PROCESSED and event.refunds:
                    notes = await apply_refunds(work, after, event)
                    reason = "; ".join([reason, *notes])
                await provider_callbacks.insert(
                    work.conn,
                    inbound.record(outcome, reason, event.event_id, event.event_type, after.id),
                )
        if rejection is not None:
            error, reason = rejection
            raise await self._reject(
                inbound, error, reason, event=event, payment_id=payment.id if payment else None
            )
        if after is not None and payment is not None and _became_paid(payment, after):
            try:  # the commit stands; a later refund event or refund learns it otherwise
                await self._learn_intent(provider, after)
            except PaymentsError as exc:
                log.warning(
                    "PaymentIntent not learnt: %s", exc.message, extra={"payment_id": after.id}
                )
        log.info(
            "provider event %s",
            outcome,
            extra={
                "payment_id": after.id if after else 0,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "reason": reason,
                "request_id": inbound.request_id,
            },
        )
        return Received(after, outcome, reason)

    async def _reject(
        self,
        inbound: _Inbound,
        error: PaymentsError,
        reason: str = "",
        *,
        event: ProviderEvent | None = None,
        payment_id: int | None = None,
        peek: bool = False,
    ) -> PaymentsError:
        """Record a refused callback in its own transaction; the error to raise.

        Best effort: when the database is down the refusal still answers (a bad
        signature stays bad); the failure to record it is logged.
        """
        if event is not None:
            event_id, event_type = event.event_id, event.event_type
        elif not inbound.callback_hash:
            # The hashless route is open to the provider (no API key): an unverified
            # body there is logged, never stored, so nobody can fill the table with it.
            log.info(
                "provider event refused",
                extra={"reason": reason or error.message, "request_id": inbound.request_id},
            )
            return error
        else:  # unverified, kept only to help whoever reads the record
            event_id, event_type = _peek_event(inbound.payload) if peek else ("", "")
        try:
            async with self._pool.connection() as conn:
                if payment_id is None and inbound.callback_hash.strip():
                    known = await repo.get_payment_by_callback_hash(conn, inbound.callback_hash)
                    payment_id = known.id if known is not None else None
                await provider_callbacks.insert(
                    conn,
                    inbound.record(
                        CallbackOutcome.REJECTED,
                        reason or error.message,
                        event_id,
                        event_type,
                        payment_id,
                    ),
                )
        except DependencyUnavailable:
            log.warning("could not record a rejected provider callback")
        log.info(
            "provider callback rejected",
            extra={
                "reason": reason or error.message,
                "payment_id": payment_id or 0,
                "event_id": event_id,
                "request_id": inbound.request_id,
            },
        )
        return error


@attrs.frozen
class _Inbound:
    """A provider callback as it arrived, for its record."""

    provider: str
    callback_hash: str
    payload: bytes
    request_id: str
    received_at: datetime

    def record(
        self,
        outcome: CallbackOutcome,
        reason: str,
        event_id: str,
        event_type: str,
        payment_id: int | None,
    ) -> ProviderCallback:
        return ProviderCallback(
            provider=self.provider,
            callback_hash=self.callback_hash,
            outcome=outcome,
            payload=self.payload.decode("utf-8", errors="replace"),
            received_at=self.received_at,
            reason=reason,
            request_id=self.request_id,
            event_id=event_id,
            event_type=event_type,
            payment_id=payment_id,
        )


async def _apply(
    work: Work, payment: Payment, event: ProviderEvent
) -> tuple[CallbackOutcome, str, Payment]:
    """Apply ``event`` to the locked ``payment``: (outcome, reason, the payment after)."""
    updated = attrs.evolve(payment)
    revealed = _reveal(updated, event)  # written with the status change, or on its own below
    target = event.target_status or payment.status
    # Expiring the checkout is how a cancel closes it: Stripe's "expired" event for that
    # must not beat the cancel to the payment's end (the cancel holds its lease).
    closing = target == PaymentStatus.EXPIRED and (
        await leases.live_purpose(work.conn, payment.id) == leases.CANCEL
    )
    if closing:
        target = payment.status
    try:
        changed = await work.change_status(
            updated,
            target,
            reason=f"provider event {event.event_type}",
            provider_event_id=event.event_id,
            provider_event_type=event.event_type,
        )
    except DuplicateKey as exc:
        if exc.key != _REPLAYED_EVENT_KEY:
            raise
        # Only the failed INSERT is undone; the transaction goes on to record it.
        return CallbackOutcome.DUPLICATE, "event already recorded", payment
    if changed:
        reason = f"{payment.status.name} -> {updated.status.name}"
        return CallbackOutcome.PROCESSED, reason, updated
    if revealed:
        updated.updated_at = utcnow()
        await repo.update_payment(work.conn, updated)
    if closing:
        reason = "recorded, not applied: a cancel is closing this payment"
    elif event.target_status is None:
        reason = "recorded: the event type moves no status"
    elif event.target_status == payment.status:
        reason = f"recorded: payment is already {payment.status.name}"
    else:
        reason = (
            f"recorded, not applied: {payment.status.name} -> "
            f"{event.target_status.name} is not allowed"
        )
        if event.target_status == PaymentStatus.PAID:
            # Money arrived for a payment that already ended otherwise: a person
            # has to look (refund, or reopen by hand).
            log.warning(
                "payment received for a payment that is %s",
                payment.status.name,
                extra={"payment_id": payment.id, "event_id": event.event_id},
            )
    return CallbackOutcome.PROCESSED, reason, updated


def _became_paid(before: Payment, after: Payment) -> bool:
    return after.status == PaymentStatus.PAID and before.status != PaymentStatus.PAID


def _reveal(payment: Payment, event: ProviderEvent) -> bool:
    """Take the provider ids ``event`` tells of that ``payment`` lacks (its subscription;
    the PaymentIntent and charge, which refunds and their events need); True if any."""
    revealed = False
    for field, value in (
        ("provider_subscription_id", event.subscription_id),
        ("provider_payment_intent_id", event.payment_intent),
        ("provider_charge_id", event.charge),
    ):
        if value and not getattr(payment, field):
            setattr(payment, field, value)
            revealed = True
    return revealed


async def _foreign_event(
    conn: Connection, payment: Payment, provider_type: ProviderType, event: ProviderEvent
) -> str:
    """Why ``event`` is not about ``payment`` ("" when it is).

    Our ``metadata.callback_hash`` on the provider's object names the payment outright;
    without it, one of the object ids (session, link, subscription; PaymentIntent or
    charge once stored) must be the payment's, or a refund the event reports must be
    one of the payment's. The event is signed, so none of these can be forged.
    """
    if (payment.provider or ProviderType.STRIPE) != provider_type:
        return f"the payment is not a {ProviderRegistry.name_of(provider_type)} payment"
    if event.callback_hash:
        if event.callback_hash != payment.provider_callback_hash:
            return "metadata.callback_hash names another payment"
        return ""
    known = {
        payment.provider_payment_id,
        payment.provider_subscription_id,
        payment.provider_payment_intent_id,
        payment.provider_charge_id,
    } - {""}
    if known.intersection((*event.refs, event.payment_intent, event.charge)):
        return ""
    for report in event.refunds:
        refund = await find_own_refund(conn, payment, report)
        if refund is not None and refund.payment_id == payment.id:
            return ""
    return "the event's objects are not this payment's"


async def find_payment(
    conn: Connection, provider_type: ProviderType, event: ProviderEvent, *, lock: bool = True
) -> Payment | None:
    """The payment a hashless event is about, locked (with ``lock``); None when it names
    none we know (see the module docstring for the order)."""
    found = await repo.get_payment_by_callback_hash(conn, event.callback_hash)
    for ref in event.refs:
        found = found or await repo.get_payment_by_provider_ref(conn, ref)
    for report in event.refunds:
        found = found or await _payment_of_refund(conn, report.provider_refund_id, report.refund_id)
    if found is None and (event.payment_intent or event.charge):
        found = await repo.get_payment_by_money_ref(conn, event.payment_intent, event.charge)
    if found is None or (found.provider or ProviderType.STRIPE) != provider_type:
        return None
    return await repo.get_payment(conn, found.id, for_update=True) if lock else found


async def _payment_of_refund(
    conn: Connection, provider_refund_id: str, refund_id: int
) -> Payment | None:
    """The payment of the refund Stripe calls ``provider_refund_id``, or of our refund
    ``refund_id`` (from the Stripe refund's metadata) while its Stripe id is unknown."""
    refund = await refund_store.get_refund_by_provider_id(conn, provider_refund_id)
    if refund is None and refund_id:
        refund = await refund_store.get_refund(conn, refund_id)
        if refund is not None and refund.provider_refund_id not in ("", provider_refund_id):
            refund = None
    return None if refund is None else await repo.get_payment(conn, refund.payment_id)


def _peek_event(payload: bytes) -> tuple[str, str]:
    """The id and type an unverified body claims, for the record of its refusal."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(document, dict):
        return "", ""
    event_id, event_type = document.get("id"), document.get("type")
    return (
        event_id if isinstance(event_id, str) else "",
        event_type if isinstance(event_type, str) else "",
    )
