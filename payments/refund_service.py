"""Refund use cases: create, get and list a payment's refunds, and settle a claim that
never reached Stripe.

Exactly once, never more than was paid (CONTRACT.md "Refunds"), in three steps, none
holding a connection or row lock across the Stripe call (DESIGN.md):

1. **Claim.** Under the payment's row lock the refundable amount is read from the
   refunds table and the PENDING refund row committed: concurrent refunds queue on the
   lock, so together they never exceed the amount, and only a claim that fits goes on.
   The unique (caller_service, request_id) key makes concurrent duplicates meet here.
2. **Stripe.** ``refunds.create`` with the idempotency key derived from
   (caller_service, request_id) and parameters taken from the stored claim, so a repeat
   of the call gets the refund the first one made.
3. **Settle.** Under the lock again, the refund takes Stripe's id and status through the
   unit of work (event row; a terminal status also writes the callback).

A crash (or Stripe down: 503) between 1 and 3 leaves a PENDING claim without a Stripe
id, holding its amount. The same request again repeats step 2 with the same key and
completes it. A claim nobody retries is settled by :meth:`RefundService.resolve_unsent`
(the reconciler's call for a claim idle past its staleness age): Stripe's refunds of
the payment are searched for the claim's refund_id; found, it takes that refund's
state; not found, Stripe never made it, so it is FAILED ("never reached Stripe") and its
amount is refundable again, with a callback. Every attempt stamps the claim's
updated_at before calling Stripe and the reconciler only fails a claim whose stamp it
saw before asking Stripe, so it never fails a claim whose Stripe call may be under way.
"""

from __future__ import annotations

import logging
from datetime import datetime

from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    NotFound,
    ProviderRejected,
    ProviderUnavailable,
)
from payments.model import (
    Caller,
    NewRefund,
    Payment,
    Refund,
    RefundRefused,
    RefundStatus,
    refund_amount,
    utcnow,
)
from payments.providers.base import ProviderRefund
from payments.providers.registry import ProviderRegistry
from payments.refunding import (
    apply_provider_refund,
    insert_pending,
    move_refund,
)
from payments.storage import refunds as store
from payments.storage import repository as repo
from payments.storage.database import Connection, Deadlock, DuplicateKey
from payments.unit_of_work import UnitOfWork

log = logging.getLogger("payments.refund_service")

DEADLOCK_RETRIES = 3
NEVER_SENT = "never reached Stripe: the request was not retried"
UNAVAILABLE = "payment provider unavailable; retry the request with the same request_id"


def _refund_not_found() -> NotFound:
    return NotFound("refund not found")


def _payment_not_found() -> NotFound:
    return NotFound("payment not found")


class RefundService:
    """Create, read and list refunds for an authenticated caller."""

    def __init__(self, uow: UnitOfWork, providers: ProviderRegistry) -> None:
        self._uow = uow
        self._pool = uow.database
        self._providers = providers

    # --- create -------------------------------------------------------------------------

    async def create(self, caller: Caller, new: NewRefund) -> Refund:
        """Refund a PAID payment of the caller, or return the refund this
        (caller_service, request_id) names (completing it at Stripe when an earlier
        attempt did not get there). Waits for Stripe's answer: the refund comes back
        SUCCEEDED, PENDING (Stripe has it; events settle it) or FAILED (Stripe refused).
        Raises DependencyUnavailable when Stripe cannot be asked: the claim stays, and
        a retry of the same request completes it.
        """
        refund, payment, fresh = await self._claim(caller, new)
        if refund.status != RefundStatus.PENDING or refund.provider_refund_id:
            return refund
        if not fresh or payment is None:
            stamped = await self._stamp_attempt(refund)
            if stamped is None:  # settled meanwhile (a concurrent retry, an event)
                return await self._read_refund(refund.id)
            payment, refund = stamped
        return await self._send(payment, refund)

    async def _claim(self, caller: Caller, new: NewRefund) -> tuple[Refund, Payment | None, bool]:
        """The PENDING refund committed for this request (True), or the one it already
        names (False); with its payment when the claim's transaction read it."""
        fingerprint = new.fingerprint()
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                refund, payment, fresh = await self._insert_claim(caller, new, fingerprint)
            except DuplicateKey:
                break  # the same request_id on another payment, committed meanwhile
            except Deadlock:
                if attempt == DEADLOCK_RETRIES:
                    raise
            else:
                return self._same_request(refund, fingerprint), payment, fresh
        async with self._pool.connection() as conn:
            existing = await store.get_refund_by_request(conn, new.caller_service, new.request_id)
        if existing is None:
            raise DependencyUnavailable("could not store the refund, retry the request")
        return self._same_request(existing, fingerprint), None, False

    @staticmethod
    def _same_request(refund: Refund, fingerprint: str) -> Refund:
        if refund.request_fingerprint != fingerprint:
            raise AlreadyExists("request_id already names a refund with different parameters")
        return refund

    async def _insert_claim(
        self, caller: Caller, new: NewRefund, fingerprint: str
    ) -> tuple[Refund, Payment, bool]:
        """Step 1 in one transaction: lock the payment, find the refund this request
        already names, or check the amount rules and insert the PENDING claim.

        Order matters on MySQL (REPEATABLE READ): the locking read of the payment comes
        before any plain read, so the plain reads after it (the request's refund, the
        totals) see every refund committed by whoever held the lock before.
        """
        async with self._uow.begin() as work:
            payment = await repo.get_payment(work.conn, new.payment_id, for_update=True)
            if payment is None or not caller.may_act_for(payment.caller_service):
                raise _payment_not_found()
            existing = await store.get_refund_by_request(
                work.conn, new.caller_service, new.request_id
            )
            if existing is not None:
                return existing, payment, False
            totals = await store.refund_totals(work.conn, payment.id)
            try:
                amount = refund_amount(
                    payment.status, payment.amount_cents, totals, new.amount_cents
                )
            except RefundRefused as exc:
                raise FailedPrecondition(exc.message) from None
            now = utcnow()
            refund = Refund(
                id=0,
                payment_id=payment.id,
                request_id=new.request_id,
                caller_service=new.caller_service,
                amount_cents=amount,
                currency=payment.currency,
                status=RefundStatus.PENDING,
                request_fingerprint=fingerprint,
                created_at=now,
                updated_at=now,
                reason=new.reason,
                metadata=dict(new.metadata),
            )
            await insert_pending(work.conn, refund, reason="requested by the caller")
        log.info(
            "refund claimed",
            extra={"payment_id": payment.id, "refund_id": refund.id, "amount_cents": amount},
        )
        return refund, payment, True

    async def _send(self, payment: Payment, claim: Refund) -> Refund:
        """Steps 2 and 3 for a PENDING claim without a Stripe id."""
        try:
            found = await self._providers.get(payment.provider).create_refund(payment, claim)
        except ProviderRejected as exc:
            log.info("stripe refused the refund", extra={"refund_id": claim.id})
            return await self._settle(claim, None, exc.message, "refused by Stripe")
        except ProviderUnavailable:
            raise DependencyUnavailable(UNAVAILABLE) from None
        return await self._settle(claim, found, "", "answered by Stripe")

    async def _stamp_attempt(self, claim: Refund) -> tuple[Payment, Refund] | None:
        """Mark a retry's Stripe attempt (updated_at) before it starts; None when the
        claim is no longer waiting for one."""
        async with self._uow.begin() as work:
            payment, refund = await self._lock(work.conn, claim)
            if refund.status != RefundStatus.PENDING or refund.provider_refund_id:
                return None
            refund.updated_at = utcnow()
            await store.update_refund(work.conn, refund)
        return payment, refund

    async def _settle(
        self, claim: Refund, found: ProviderRefund | None, refused: str, reason: str
    ) -> Refund:
        """Step 3: Stripe's refund (``found``), or its refusal (FAILED with ``refused``)."""
        async with self._uow.begin() as work:
            payment, refund = await self._lock(work.conn, claim)
            if found is None:
                await move_refund(
                    work,
                    payment,
                    refund,
                    RefundStatus.FAILED,
                    reason=reason,
                    failure_reason=refused,
                )
            else:
                await apply_provider_refund(work, payment, refund, found, reason=reason)
        log.info(
            "refund settled",
            extra={"refund_id": refund.id, "status": refund.status.name},
        )
        return refund

    # --- a claim nobody retried ---------------------------------------------------------

    async def resolve_unsent(self, refund_id: int, stale_before: datetime) -> Refund | None:
        """Settle a PENDING claim without a Stripe id that no attempt touched since
        ``stale_before`` (pick an age well above Stripe's timeout times its retries):
        Stripe's refund made for it is recorded, or, when Stripe has none, the claim is
        FAILED and its amount refundable again. None when the claim is not such a one
        (settled, or an attempt started since). ProviderUnavailable: ask again later.
        """
        async with self._pool.connection() as conn:
            refund = await store.get_refund(conn, refund_id)
            if refund is None:
                return None
            payment = await self._payment_of(conn, refund)
        seen = refund.updated_at
        if refund.status != RefundStatus.PENDING or refund.provider_refund_id:
            return None
        if seen >= stale_before:
            return None
        found = await self._providers.get(payment.provider).find_refund(payment, refund)
        async with self._uow.begin() as work:
            payment, refund = await self._lock(work.conn, refund)
            if refund.status != RefundStatus.PENDING or refund.provider_refund_id:
                return None
            if found is not None:
                reason = "found at Stripe by the reconciler"
                await apply_provider_refund(work, payment, refund, found, reason=reason)
            elif refund.updated_at == seen:  # no attempt started since Stripe was asked
                await move_refund(
                    work,
                    payment,
                    refund,
                    RefundStatus.FAILED,
                    reason=NEVER_SENT,
                    failure_reason=NEVER_SENT,
                )
            else:
                return None
        return refund

    # --- read ---------------------------------------------------------------------------

    async def get(self, caller: Caller, refund_id: int) -> Refund:
        """One refund; one of another caller's payments answers NotFound."""
        async with self._pool.connection() as conn:
            refund = await store.get_refund(conn, refund_id)
            payment = await repo.get_payment(conn, refund.payment_id) if refund else None
        if refund is None or payment is None or not caller.may_act_for(payment.caller_service):
            raise _refund_not_found()
        return refund

    async def list(self, caller: Caller, payment_id: int) -> list[Refund]:
        """A payment's refunds, oldest first; another caller's payment answers NotFound."""
        async with self._pool.connection() as conn:
            payment = await repo.get_payment(conn, payment_id)
            if payment is None or not caller.may_act_for(payment.caller_service):
                raise _payment_not_found()
            return await store.list_refunds(conn, payment_id)

    async def _read_refund(self, refund_id: int) -> Refund:
        async with self._pool.connection() as conn:
            refund = await store.get_refund(conn, refund_id)
        if refund is None:
            raise _refund_not_found()
        return refund

    # --- helpers ------------------------------------------------------------------------

    @staticmethod
    async def _lock(conn: Connection, claim: Refund) -> tuple[Payment, Refund]:
        """The claim's payment and the refund as stored now, locked in that order (the
        one lock order of every refund change). The payment's totals are not read here:
        a status change reads them after it writes the refund."""
        payment = await repo.get_payment(conn, claim.payment_id, for_update=True)
        locked = await store.get_refund(conn, claim.id, for_update=True)
        if payment is None or locked is None:
            raise _refund_not_found()
        return payment, locked

    @staticmethod
    async def _payment_of(conn: Connection, refund: Refund) -> Payment:
        payment = await repo.get_payment(conn, refund.payment_id)
        if payment is None:
            raise _payment_not_found()
        return payment
