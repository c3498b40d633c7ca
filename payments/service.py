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

from payments.closing import CLOSING_CALLS, Closing, close_at_provider
from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProviderRejected,
    ProviderTimeout,
)
from payments.leasing import LeasePolicy, Polling, give_back
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
from payments.storage import leases
from payments.storage import repository as repo
from payments.storage.database import Database, Deadlock, DuplicateKey
from payments.storage.payment_reads import PaymentReads
from payments.unit_of_work import UnitOfWork, Work
from payments.validation import check_free_text

log = logging.getLogger("payments.service")

MAX_CANCEL_REASON = 500
DEADLOCK_RETRIES = 3
_OPENABLE = (PaymentStatus.CREATED,)
# What closing may learn about a payment at the provider (kept on the row).
_PROVIDER_REFS = ("provider_payment_id", "provider_subscription_id", "checkout_url")


def _not_found() -> NotFound:
    return NotFound("payment not found")


class PaymentService:
    """Create, read, list and cancel payments for an authenticated caller."""

    def __init__(
        self,
        uow: UnitOfWork,
        providers: ProviderRegistry,
        provider_callback_base_url: str,
        lease: LeasePolicy | None = None,
    ) -> None:
        self._uow = uow
        self._lease = lease or LeasePolicy()
        self._pool = uow.database
        self._reads = PaymentReads(uow.database)
        self._providers = providers
        self._callback_base = provider_callback_base_url.rstrip("/")
        self.refunds = RefundService(uow, providers)

    @property
    def unit_of_work(self) -> UnitOfWork:
        """The write path it uses (the callback operations share it)."""
        return self._uow

    # --- create -------------------------------------------------------------------------

    async def create(self, caller: Caller, new: NewPayment) -> Payment:
        """Create a payment, or return the one this (caller_service, request_id) names.

        Exact without holding anything across the provider call. The row is committed as
        CREATED (the unique key on (caller_service, request_id) makes concurrent
        duplicates meet there), then one of them takes its lease (payments/leasing.py;
        one conditional UPDATE, so exactly one wins). The holder
        calls the provider, with an idempotency key derived from the request, holding no
        session or row lock, then moves the row to PENDING under its lock and gives the
        lease back. A duplicate waits for the lease (looking now and then, holding
        nothing) and finds PENDING: one provider call. A holder that fails gives the lease
        back; one that crashed lets it lapse; either way the next try repeats the call
        with the same key, so Stripe hands back the object it already made.
        """
        if not caller.may_act_for(new.caller_service):
            raise PermissionDenied("caller_service must be the calling service's own name")
        payment = await self._insert_or_load(new)
        if payment.status != PaymentStatus.CREATED:
            return await self._with_refund_totals(payment)  # a replay: it may have refunds
        payment, owner = await self._lease_to_open(payment)
        if owner is None:
            return payment
        return await self._open_at_provider(payment, owner)

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

    async def _lease_to_open(self, payment: Payment) -> tuple[Payment, str | None]:
        """The lease on the CREATED payment (the inserter nearly always gets it at once),
        or, while another holds it, wait: the payment once it moved on (no lease), or
        the lease once it is free (its holder failed or crashed)."""
        polling = Polling(self._lease.wait_seconds)
        while True:
            owner = leases.new_owner(leases.OPEN)
            async with self._pool.connection() as conn:
                seconds = self._lease.lease_seconds()
                if await leases.take(conn, payment.id, owner, seconds, _OPENABLE):
                    current = await repo.get_payment(conn, payment.id)
                    if current is not None:
                        return current, owner
                current = await repo.get_payment(conn, payment.id)
            if current is None:  # deleted: Stripe refused the concurrent duplicate
                raise _not_found()
            if current.status != PaymentStatus.CREATED:
                return current, None
            if polling.expired:
                raise ProviderTimeout("stripe is still creating this payment; retry")
            await polling.pause()

    async def _open_at_provider(self, payment: Payment, owner: str) -> Payment:
        """Make the provider object of the CREATED ``payment`` whose lease ``owner``
        holds, then record it (CREATED -> PENDING) and give the lease back."""
        provider = self._providers.get(payment.provider)
        try:
            result = await provider.create_checkout(payment)
        except ProviderRejected:
            # The request was bad after all: leave nothing behind, so a corrected
            # request with the same request_id can go through.
            await self._forget_refused(payment.id, owner)
            raise
        except BaseException:
            await give_back(self._pool, payment.id, owner)
            raise
        try:
            async with self._uow.begin() as work:
                current = await repo.get_payment(work.conn, payment.id, for_update=True)
                if current is None:
                    raise _not_found()
                if current.status == PaymentStatus.CREATED:
                    await record_opened(work, current, result)
                await leases.release(work.conn, current.id, owner)
        except BaseException:
            await give_back(self._pool, payment.id, owner)
            raise
        log.info(
            "payment opened at provider",
            extra={"payment_id": current.id, "provider_payment_id": current.provider_payment_id},
        )
        return current

    async def _forget_refused(self, payment_id: int, owner: str) -> None:
        async with self._uow.begin() as work:
            current = await repo.get_payment(work.conn, payment_id, for_update=True)
            if current is not None and current.status == PaymentStatus.CREATED:
                await repo.delete_payment(work.conn, payment_id)
            elif current is not None:
                await leases.release(work.conn, payment_id, owner)

    # --- read ---------------------------------------------------------------------------

    async def get(self, caller: Caller, payment_id: int) -> Payment:
        """One payment; another caller's answers NotFound so ids do not leak. Reads made
        at the same moment share one statement (payments/storage/payment_reads.py)."""
        payment = await self._reads.get(payment_id)
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
            payments = await repo.list_payments(conn, filters)
            await load_refund_totals(conn, payments)  # one query for the page
        return payments

    # --- cancel -------------------------------------------------------------------------

    async def cancel(self, caller: Caller, payment_id: int, reason: str = "") -> Payment:
        """Cancel a payment that is not over yet, at the provider too.

        Canceling a canceled payment returns it unchanged; PAID, FAILED and EXPIRED
        refuse. The provider is closed under the payment's lease, holding no row lock or
        session, so a create, another cancel or a job cannot close or open it meanwhile;
        the answer is applied under the row lock by the status machine, so a provider
        event that slipped in (the customer paid a moment ago) decides over the cancel.
        """
        reason = reason.strip()
        if len(reason) > MAX_CANCEL_REASON:
            raise InvalidArgument("reason", f"must be at most {MAX_CANCEL_REASON} characters")
        check_free_text(reason, "reason")
        payment, owner = await self._lease_for_cancel(caller, payment_id)
        if owner is None:
            return payment
        try:
            closing = await close_at_provider(self._providers.get(payment.provider), payment)
            async with self._uow.begin() as work:
                current = await repo.get_payment(work.conn, payment.id, for_update=True)
                if current is None:
                    raise _not_found()
                refused = await _conclude_cancel(work, current, payment, closing, reason)
                await leases.release(work.conn, current.id, owner)
        except BaseException:
            await give_back(self._pool, payment.id, owner)
            raise
        if refused is not None:
            log.warning(
                "cancel refused by the provider's state",
                extra={"payment_id": current.id, "status": current.status.name},
            )
            raise refused
        log.info("payment canceled", extra={"payment_id": current.id})
        return current

    async def _lease_for_cancel(
        self, caller: Caller, payment_id: int
    ) -> tuple[Payment, str | None]:
        """The caller's cancelable payment and the lease taken on it; no lease for a
        payment already CANCELED. Waits (holding nothing) while another holds it."""
        polling = Polling(self._lease.wait_seconds)
        while True:
            owner = leases.new_owner(leases.CANCEL)
            async with self._pool.connection() as conn:
                payment = await repo.get_payment(conn, payment_id)
                if payment is None or not caller.may_act_for(payment.caller_service):
                    raise _not_found()
                if payment.status == PaymentStatus.CANCELED:
                    return payment, None
                if payment.status not in CANCELABLE_STATUSES:
                    raise FailedPrecondition(
                        f"payment is {payment.status.name}; only CREATED, PENDING or "
                        "PROCESSING payments can be canceled"
                    )
                seconds = self._lease.lease_seconds(CLOSING_CALLS)
                if await leases.take(conn, payment_id, owner, seconds, CANCELABLE_STATUSES):
                    # Read again: it may have moved on between the look and the lease.
                    current = await repo.get_payment(conn, payment_id)
                    if current is not None:
                        return current, owner
            if polling.expired:
                raise ProviderTimeout("stripe is still working on this payment; retry")
            await polling.pause()

    async def _with_refund_totals(self, payment: Payment) -> Payment:
        async with self._pool.connection() as conn:
            await load_refund_totals(conn, (payment,))
        return payment

    # --- health -------------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """The database the use cases run on (readiness checks it)."""
        return self._pool

    async def ping_database(self) -> None:
        """Raise DependencyUnavailable when the database does not answer."""
        async with self._pool.connection() as conn:
            await repo.ping(conn)


async def _conclude_cancel(
    work: Work, current: Payment, closed: Payment, closing: Closing, reason: str
) -> FailedPrecondition | None:
    """Apply the closing of ``closed`` (the leased copy, with the provider ids closing
    learned) to ``current`` (locked now); the refusal to raise, or None when canceled."""
    for field in _PROVIDER_REFS:
        if getattr(closed, field):
            setattr(current, field, getattr(closed, field))
    if current.status == PaymentStatus.CANCELED:  # ended so meanwhile (a provider event)
        return None
    moved = closing.provider_status
    if moved is not None and can_transition(current.status, moved):
        # Paid (or being paid, or ended) at the provider before the cancel reached it:
        # the provider's state decides. It is recorded and the cancel refused.
        await work.change_status(current, moved, reason="found at the provider on cancel")
        return FailedPrecondition(f"payment is {moved.name} at the provider; not canceled")
    if not closing.closed or moved is not None:
        await repo.update_payment(work.conn, current)  # provider ids it learned
        return FailedPrecondition(
            f"payment is {moved.name} at the provider; not canceled"
            if moved is not None
            else "the provider would not close the checkout; not canceled"
        )
    if current.status not in CANCELABLE_STATUSES:
        # A provider event ended it while the checkout was being closed.
        return FailedPrecondition(f"payment is {current.status.name}; not canceled")
    await work.change_status(current, PaymentStatus.CANCELED, reason=reason or "canceled by caller")
    return None
