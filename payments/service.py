"""Use cases: create, get, list and cancel payments. Transport-free.

The transports authenticate the caller and decode input; everything that decides
what happens to a payment is here. Each status change writes its event row in the
same transaction; after a commit that ends a payment, ``on_terminal`` is told (the
dispatcher's channel), never before.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import attrs

from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
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
    check_transition,
    utcnow,
)
from payments.providers.base import CheckoutResult
from payments.providers.registry import ProviderRegistry
from payments.storage import repository as repo
from payments.storage.pool import Connection, DuplicateKey, Pool

log = logging.getLogger("payments.service")

MAX_CANCEL_REASON = 500


def _not_found() -> NotFound:
    return NotFound("payment not found")


def _apply_checkout(payment: Payment, result: CheckoutResult) -> None:
    payment.provider_payment_id = result.provider_payment_id
    payment.provider_subscription_id = result.provider_subscription_id
    payment.checkout_url = result.checkout_url


class PaymentService:
    """Create, read, list and cancel payments for an authenticated caller."""

    def __init__(
        self,
        pool: Pool,
        providers: ProviderRegistry,
        provider_callback_base_url: str,
        on_terminal: Callable[[Payment], None] | None = None,
    ) -> None:
        self._pool = pool
        self._providers = providers
        self._callback_base = provider_callback_base_url.rstrip("/")
        self._on_terminal = on_terminal or (lambda payment: None)

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
        try:
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
        except DuplicateKey:
            pass
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
        _apply_checkout(payment, result)
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
            provider = self._providers.get(payment.provider)
            if payment.status == PaymentStatus.CREATED:
                # A crash may have left a provider object the row does not know of;
                # replaying the create (same idempotency key) finds it so it is closed.
                try:
                    result = await provider.create_checkout(payment)
                except ProviderRejected:
                    result = None
                if result is not None:
                    _apply_checkout(payment, result)
            if payment.provider_payment_id:
                await provider.cancel(payment)
            await change_status(
                conn, payment, PaymentStatus.CANCELED, reason=reason or "canceled by caller"
            )
        self._on_terminal(payment)
        log.info("payment canceled", extra={"payment_id": payment.id})
        return payment

    # --- health -------------------------------------------------------------------------

    async def ping_database(self) -> None:
        """Raise DependencyUnavailable when the database does not answer."""
        async with self._pool.connection() as conn:
            await repo.ping(conn)
