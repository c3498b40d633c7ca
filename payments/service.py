"""Use cases: create, get, list and cancel payments, and handle provider callbacks.
Transport-free.

The transports authenticate the caller and decode input; everything that decides
what happens to a payment is here. Each status change writes its event row in the
same transaction; after a commit that ends a payment, ``on_terminal`` is told (the
dispatcher's channel), never before.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime

import attrs

from payments.closing import apply_checkout, close_at_provider
from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PaymentsError,
    PermissionDenied,
    ProviderRejected,
)
from payments.lifecycle import change_status
from payments.model import (
    CANCELABLE_STATUSES,
    Caller,
    EventKind,
    ListFilter,
    NewPayment,
    Payment,
    PaymentEvent,
    PaymentStatus,
    ProviderType,
    can_transition,
    check_transition,
    utcnow,
)
from payments.providers.base import CheckoutResult, EventParser, ProviderEvent
from payments.providers.registry import ProviderRegistry
from payments.storage import provider_callbacks
from payments.storage import repository as repo
from payments.storage.database import Connection, Database, Deadlock, DuplicateKey
from payments.storage.provider_callbacks import CallbackOutcome, ProviderCallback

log = logging.getLogger("payments.service")

MAX_CANCEL_REASON = 500
DEADLOCK_RETRIES = 3
CALLBACK_PROCESSED = "Provider callback processed"
# The route's provider name -> the ProviderType its payments carry.
PROVIDER_NAMES: Mapping[str, ProviderType] = {"stripe": ProviderType.STRIPE}
_REPLAYED_EVENT_KEY = "uq_payment_events_provider_event"


def _not_found() -> NotFound:
    return NotFound("payment not found")


class PaymentService:
    """Create, read, list and cancel payments for an authenticated caller, and apply the
    provider's events to them.

    ``event_parsers`` maps a provider name of the callback route (``stripe``) to the
    parser that checks and reads its events; a provider without one is unknown (404).
    """

    def __init__(
        self,
        pool: Database,
        providers: ProviderRegistry,
        provider_callback_base_url: str,
        on_terminal: Callable[[Payment], None] | None = None,
        event_parsers: Mapping[str, EventParser] | None = None,
    ) -> None:
        self._pool = pool
        self._providers = providers
        self._callback_base = provider_callback_base_url.rstrip("/")
        self._on_terminal = on_terminal or (lambda payment: None)
        self._event_parsers = dict(event_parsers or {})

    # --- create -------------------------------------------------------------------------

    async def create(self, caller: Caller, new: NewPayment) -> Payment:
        """Create a payment, or return the one this (caller_service, request_id) names.

        Two steps make it exact. First the row is committed as CREATED (the unique key
        on (caller_service, request_id) makes concurrent duplicates meet here). Then,
        holding the row lock, the provider object is made with an idempotency key
        derived from the request, and the row moves to PENDING. A duplicate waits on the
        lock and finds PENDING: one provider call. A crash between the provider call
        and the commit leaves CREATED; the retry repeats the call with the same key, so
        Stripe hands back the object it already made.
        """
        if not caller.may_act_for(new.caller_service):
            raise PermissionDenied("caller_service must be the calling service's own name")
        payment = await self._insert_or_load(new)
        if payment.status != PaymentStatus.CREATED:
            return payment
        return await self._open_at_provider(payment.id)

    async def _insert_or_load(self, new: NewPayment) -> Payment:
        fingerprint = new.fingerprint()
        now = utcnow()
        callback_hash = str(uuid.uuid4())
        payment = Payment(
            id=0,
            request_fingerprint=fingerprint,
            status=PaymentStatus.CREATED,
            provider_callback_hash=callback_hash,
            provider_callback_url=f"{self._callback_base}/{callback_hash}",
            created_at=now,
            updated_at=now,
            **{
                field: getattr(new, field)
                for field in attrs.fields_dict(NewPayment)
                if field != "metadata"
            },
            metadata=dict(new.metadata),
        )
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                return await self._insert(payment, now)
            except DuplicateKey:
                break
            except Deadlock:
                # Concurrent inserts of one (caller_service, request_id) can deadlock in
                # InnoDB; the winner has committed or will, so the next try meets it.
                if attempt == DEADLOCK_RETRIES:
                    raise
        return await self._load_duplicate(new, fingerprint)

    async def _insert(self, payment: Payment, now: datetime) -> Payment:
        """Commit the CREATED row and its event; DuplicateKey when it already exists."""
        async with self._pool.transaction() as conn:
            payment.id = await repo.insert_payment(conn, payment)
            await repo.insert_event(
                conn,
                PaymentEvent(
                    payment_id=payment.id,
                    kind=EventKind.CREATED,
                    from_status=PaymentStatus.UNSPECIFIED,
                    to_status=PaymentStatus.CREATED,
                    created_at=now,
                ),
            )
        return payment

    async def _load_duplicate(self, new: NewPayment, fingerprint: str) -> Payment:
        async with self._pool.connection() as conn:
            existing = await repo.get_payment_by_request(conn, new.caller_service, new.request_id)
        if existing is None:  # the duplicate was on another key; cannot happen twice
            raise DependencyUnavailable("could not store the payment, retry the request")
        if existing.request_fingerprint != fingerprint:
            raise AlreadyExists("request_id already names a payment with different parameters")
        return existing

    async def _open_at_provider(self, payment_id: int) -> Payment:
        rejected: ProviderRejected | None = None
        async with self._pool.transaction() as conn:
            payment = await repo.get_payment(conn, payment_id, for_update=True)
            if payment is None:  # deleted by a concurrent duplicate that Stripe refused
                raise _not_found()
            if payment.status != PaymentStatus.CREATED:
                return payment  # a concurrent duplicate got there first
            provider = self._providers.get(payment.provider)
            try:
                result = await provider.create_checkout(payment)
            except ProviderRejected as exc:
                # The request was bad after all: leave nothing behind, so a corrected
                # request with the same request_id can go through. The delete must
                # commit, so the error is raised after the transaction.
                await repo.delete_payment(conn, payment.id)
                rejected = exc
            else:
                await self._record_opened(conn, payment, result)
        if rejected is not None:
            raise rejected
        log.info(
            "payment opened at provider",
            extra={"payment_id": payment.id, "provider_payment_id": payment.provider_payment_id},
        )
        return payment

    @staticmethod
    async def _record_opened(conn: Connection, payment: Payment, result: CheckoutResult) -> None:
        """Move a CREATED payment to PENDING with its provider object, and log the event."""
        previous = payment.status
        apply_checkout(payment, result)
        payment.status = check_transition(previous, PaymentStatus.PENDING)
        payment.updated_at = utcnow()
        await repo.update_payment(conn, payment)
        await repo.insert_event(
            conn,
            PaymentEvent(
                payment_id=payment.id,
                kind=EventKind.PROVIDER_CREATED,
                from_status=previous,
                to_status=payment.status,
                created_at=payment.updated_at,
            ),
        )

    # --- read ---------------------------------------------------------------------------

    async def get(self, caller: Caller, payment_id: int) -> Payment:
        """One payment; another caller's answers NotFound so ids do not leak."""
        async with self._pool.connection() as conn:
            payment = await repo.get_payment(conn, payment_id)
        if payment is None or not caller.may_act_for(payment.caller_service):
            raise _not_found()
        return payment

    async def list(self, caller: Caller, filters: ListFilter) -> list[Payment]:
        """Payments matching the filters, newest first; a caller sees only its own."""
        if not caller.trusted:
            if filters.caller_service and filters.caller_service != caller.service_name:
                raise PermissionDenied("caller_service must be the calling service's own name")
            filters = attrs.evolve(filters, caller_service=caller.service_name)
        async with self._pool.connection() as conn:
            return await repo.list_payments(conn, filters)

    # --- cancel -------------------------------------------------------------------------

    async def cancel(self, caller: Caller, payment_id: int, reason: str = "") -> Payment:
        """Cancel a payment that is not over yet, at the provider too.

        Canceling a canceled payment returns it unchanged; PAID, FAILED and EXPIRED
        refuse. The row stays locked across the provider call so a provider event or a
        concurrent create cannot slip in between.
        """
        reason = reason.strip()
        if len(reason) > MAX_CANCEL_REASON:
            raise InvalidArgument("reason", f"must be at most {MAX_CANCEL_REASON} characters")
        async with self._pool.transaction() as conn:
            payment = await repo.get_payment(conn, payment_id, for_update=True)
            if payment is None or not caller.may_act_for(payment.caller_service):
                raise _not_found()
            if payment.status == PaymentStatus.CANCELED:
                return payment
            if payment.status not in CANCELABLE_STATUSES:
                raise FailedPrecondition(
                    f"payment is {payment.status.name}; only CREATED, PENDING or "
                    "PROCESSING payments can be canceled"
                )
            closing = await close_at_provider(self._providers.get(payment.provider), payment)
            moved = closing.provider_status
            if moved is not None and can_transition(payment.status, moved):
                # Paid (or being paid, or ended) at the provider before the cancel reached
                # it: the provider's state decides. It is recorded and the cancel refused.
                await change_status(conn, payment, moved, reason="found at the provider on cancel")
                refused = FailedPrecondition(
                    f"payment is {moved.name} at the provider; not canceled"
                )
            elif not closing.closed or moved is not None:
                refused = FailedPrecondition(
                    f"payment is {moved.name} at the provider; not canceled"
                    if moved is not None
                    else "the provider would not close the checkout; not canceled"
                )
                await repo.update_payment(conn, payment)  # provider ids it learned
            else:
                await change_status(
                    conn, payment, PaymentStatus.CANCELED, reason=reason or "canceled by caller"
                )
                refused = None
        if payment.status.is_terminal:
            self._on_terminal(payment)
        if refused is not None:
            log.warning(
                "cancel refused by the provider's state",
                extra={"payment_id": payment.id, "status": payment.status.name},
            )
            raise refused
        log.info("payment canceled", extra={"payment_id": payment.id})
        return payment

    # --- provider callbacks -------------------------------------------------------------

    async def handle_provider_callback(
        self, provider: str, callback_hash: str, payload: bytes, signature: str, request_id: str
    ) -> tuple[str, Payment | None]:
        """Apply one provider event received at ``/webhooks/providers/{provider}/{hash}``.

        The signature is checked before the database is asked anything, so a forger
        learns nothing (not even whether a hash exists). Then, holding the payment's
        row lock, the event must be about the route's payment; its status change (by
        the status machine, so late or out-of-order events are recorded but never
        regress a status), event row, callback-outbox row and the record of this
        callback commit together. A replayed event id hits the unique key of the event
        row: acknowledged with the payment, nothing changed, recorded as a duplicate.
        Every refusal is recorded on its own (so it survives) and raised: unknown
        provider or hash NotFound; bad signature, a body that is not an event, or an
        event about another payment InvalidArgument.

        Returns the message for the caller and the payment as it now stands.
        """
        inbound = _Inbound(provider, callback_hash, payload, request_id, utcnow())
        name = provider.strip().lower()
        parser = self._event_parsers.get(name)
        if parser is None or name not in PROVIDER_NAMES:
            raise await self._reject(inbound, NotFound("unknown provider"))
        if not callback_hash.strip():
            raise await self._reject(inbound, InvalidArgument("callback_hash", "is required"))
        if not payload.strip():
            raise await self._reject(inbound, InvalidArgument("payload", "is required"))
        try:
            event = parser.parse(payload, signature)
        except InvalidArgument as exc:
            raise await self._reject(inbound, exc, peek=True) from None
        payment = await self._apply_event(inbound, PROVIDER_NAMES[name], event)
        return CALLBACK_PROCESSED, payment

    async def _apply_event(
        self, inbound: _Inbound, provider_type: ProviderType, event: ProviderEvent
    ) -> Payment:
        rejection: tuple[PaymentsError, str] | None = None
        async with self._pool.transaction() as conn:
            payment = await repo.get_payment_by_callback_hash(
                conn, inbound.callback_hash, for_update=True
            )
            if payment is None:
                rejection = (NotFound("payment not found"), "unknown callback hash")
            elif problem := _foreign_event(payment, provider_type, event):
                rejection = (InvalidArgument("payload", "event is not about this payment"), problem)
            else:
                outcome, reason, after, ended = await self._apply(conn, payment, event)
                await provider_callbacks.insert(
                    conn,
                    inbound.record(outcome, reason, event.event_id, event.event_type, after.id),
                )
        if rejection is not None:
            error, reason = rejection
            raise await self._reject(
                inbound, error, reason, event=event, payment_id=payment.id if payment else None
            )
        if ended:
            self._on_terminal(after)
        log.info(
            "provider event %s",
            outcome,
            extra={
                "payment_id": after.id,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "reason": reason,
                "request_id": inbound.request_id,
            },
        )
        return after

    @staticmethod
    async def _apply(
        conn: Connection, payment: Payment, event: ProviderEvent
    ) -> tuple[CallbackOutcome, str, Payment, bool]:
        """Apply ``event`` to the locked ``payment``: (outcome, reason, the payment after,
        whether it just ended)."""
        updated = attrs.evolve(payment)
        revealed = bool(event.subscription_id) and not payment.provider_subscription_id
        if revealed:  # written with the status change, or on its own below
            updated.provider_subscription_id = event.subscription_id
        target = event.target_status or payment.status
        try:
            changed = await change_status(
                conn,
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
            return CallbackOutcome.DUPLICATE, "event already recorded", payment, False
        if changed:
            reason = f"{payment.status.name} -> {updated.status.name}"
            return CallbackOutcome.PROCESSED, reason, updated, updated.status.is_terminal
        if revealed:
            updated.updated_at = utcnow()
            await repo.update_payment(conn, updated)
        if event.target_status is None:
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
        return CallbackOutcome.PROCESSED, reason, updated, False

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

    # --- health -------------------------------------------------------------------------

    async def ping_database(self) -> None:
        """Raise DependencyUnavailable when the database does not answer."""
        async with self._pool.connection() as conn:
            await repo.ping(conn)


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


def _foreign_event(payment: Payment, provider_type: ProviderType, event: ProviderEvent) -> str:
    """Why ``event`` is not about ``payment`` ("" when it is).

    Our ``metadata.callback_hash`` on the provider's object names the payment outright;
    without it, one of the object ids (session, link, subscription) must be the
    payment's. The event is signed, so neither can be forged.
    """
    if (payment.provider or ProviderType.STRIPE) != provider_type:
        return f"the payment is not a {provider_type.name.lower()} payment"
    if event.callback_hash:
        if event.callback_hash != payment.provider_callback_hash:
            return "metadata.callback_hash names another payment"
        return ""
    known = {payment.provider_payment_id, payment.provider_subscription_id} - {""}
    if known.intersection(event.refs):
        return ""
    return "the event's objects are not this payment's"


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
