"""Use cases over the unit of work: create, get, list and cancel payments.

The transports authenticate the caller and decode input; everything that decides what
happens to a payment is here (provider events: payments/inbound.py). Status changes go
through the unit of work, which also tells the dispatcher after the commit.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import attrs

from payments.closing import close_at_provider
from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProviderRejected,
)
from payments.model import (
    CANCELABLE_STATUSES,
    Caller,
    EventKind,
    ListFilter,
    NewPayment,
    Payment,
    PaymentEvent,
    PaymentStatus,
    can_transition,
    utcnow,
)
from payments.opening import record_opened
from payments.providers.registry import ProviderRegistry
from payments.refund_service import RefundService
from payments.refunding import load_refund_totals
from payments.storage import repository as repo
from payments.storage.database import Deadlock, DuplicateKey
from payments.unit_of_work import UnitOfWork

log = logging.getLogger("payments.service")

MAX_CANCEL_REASON = 500
DEADLOCK_RETRIES = 3


def _not_found() -> NotFound:
    return NotFound("payment not found")


class PaymentService:
    """Create, read, list and cancel payments for an authenticated caller."""

    def __init__(
        self, uow: UnitOfWork, providers: ProviderRegistry, provider_callback_base_url: str
    ) -> None:
        self._uow = uow
        self._pool = uow.database
        self._providers = providers
        self._callback_base = provider_callback_base_url.rstrip("/")
        self.refunds = RefundService(uow, providers)

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
            return await self._with_refund_totals(payment)  # a replay: it may have refunds
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
        async with self._uow.begin() as work:
            payment = await repo.get_payment(work.conn, payment_id, for_update=True)
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
                await repo.delete_payment(work.conn, payment.id)
                rejected = exc
            else:
                await record_opened(work, payment, result)
        if rejected is not None:
            raise rejected
        log.info(
            "payment opened at provider",
            extra={"payment_id": payment.id, "provider_payment_id": payment.provider_payment_id},
        )
        return payment

    # --- read ---------------------------------------------------------------------------

    async def get(self, caller: Caller, payment_id: int) -> Payment:
        """One payment; another caller's answers NotFound so ids do not leak."""
        async with self._pool.connection() as conn:
            payment = await repo.get_payment(conn, payment_id)
            if payment is None or not caller.may_act_for(payment.caller_service):
                raise _not_found()
            await load_refund_totals(conn, (payment,))
        return payment

    async def list(self, caller: Caller, filters: ListFilter) -> list[Payment]:
        """Payments matching the filters, newest first; a caller sees only its own."""
        if not caller.trusted:
            if filters.caller_service and filters.caller_service != caller.service_name:
                raise PermissionDenied("caller_service must be the calling service's own name")
            filters = attrs.evolve(filters, caller_service=caller.service_name)
        async with self._pool.connection() as conn:
            payments = await repo.list_payments(conn, filters)
            await load_refund_totals(conn, payments)  # one query for the page
        return payments

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
        async with self._uow.begin() as work:
            payment = await repo.get_payment(work.conn, payment_id, for_update=True)
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
                await work.change_status(payment, moved, reason="found at the provider on cancel")
                refused = FailedPrecondition(
                    f"payment is {moved.name} at the provider; not canceled"
                )
            elif not closing.closed or moved is not None:
                refused = FailedPrecondition(
                    f"payment is {moved.name} at the provider; not canceled"
                    if moved is not None
                    else "the provider would not close the checkout; not canceled"
                )
                await repo.update_payment(work.conn, payment)  # provider ids it learned
            else:
                await work.change_status(
                    payment, PaymentStatus.CANCELED, reason=reason or "canceled by caller"
                )
                refused = None
        if refused is not None:
            log.warning(
                "cancel refused by the provider's state",
                extra={"payment_id": payment.id, "status": payment.status.name},
            )
            raise refused
        log.info("payment canceled", extra={"payment_id": payment.id})
        return payment

    async def _with_refund_totals(self, payment: Payment) -> Payment:
        async with self._pool.connection() as conn:
            await load_refund_totals(conn, (payment,))
        return payment

    # --- health -------------------------------------------------------------------------

    async def ping_database(self) -> None:
        """Raise DependencyUnavailable when the database does not answer."""
        async with self._pool.connection() as conn:
            await repo.ping(conn)
