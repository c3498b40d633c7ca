"""The expirer: ends payments nobody completed within PAYMENTS_PENDING_TIMEOUT_MINUTES.

Every PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES each CREATED, PENDING or PROCESSING
payment older than the timeout (by ``created_at``) is closed at the provider and then
moved to EXPIRED (event row, payment and callback-outbox row in one unit of work; the
dispatcher is told after the commit). The provider is asked under the payment's lease
(``expire``, payments/storage/leases.py), never under its row lock or holding a session,
as the reconciler does.

The order is chosen for money (payments/closing.py, shared with cancel): a payment is
marked EXPIRED only once no one can pay it any more, and never when it was paid; the
provider's answer (PAID, PROCESSING) is followed instead. The provider unreachable: the
payment is left as it is (an error in the summary) and tried on the next pass.

A provider that refuses to close or to describe a payment (say "no such session", as
after a Stripe account change) leaves it untouched and counted as an error each pass:
expiring it could hide a checkout still payable elsewhere, so an operator should look.
A PROCESSING payment whose delayed payment is still on its way stays PROCESSING: the
provider's success or failure event (or the reconciler) settles it.

In bulk first: Checkout Sessions are made with ``expires_at`` (payments/providers/
stripe.py), so Stripe closes them itself. The provider is asked once (a listing, under
one deadline) which of a batch's checkouts it expired, holding no session and no lock;
then the batch is claimed in one query (row locks by primary key, SKIP LOCKED: two
processes take disjoint batches) and those expired, never paid, move to EXPIRED with
multi-row writes in one short commit (Work.change_statuses). What is left (a
checkout still open, a payment link, a subscription, a CREATED row, the provider not
answering) goes through the per-payment path above, after that commit.
"""

from __future__ import annotations

from datetime import datetime

import trio

from payments.closing import CLOSING_CALLS, close_at_provider
from payments.errors import PaymentsError
from payments.jobs.batch import ItemResult, JobSummary, Outcome, PaymentJob
from payments.leasing import give_back
from payments.model import Payment, PaymentStatus, ProviderType
from payments.providers.base import ExpiredListing, Provider
from payments.storage import claims, leases
from payments.storage import repository as repo

RECONCILED = "reconciled"
# Checkouts a provider lists a page (Stripe's largest): sizes the listing's deadline.
LISTING_PAGE = 100


class Expirer(PaymentJob):
    """``Expirer(uow, providers, settings, rate_per_second=20, concurrency=4)``;
    ``await run_pass()`` for one pass, ``run(ctx)`` as a child."""

    selection = claims.STUCK
    batches_in_flight = 2
    # This pass's listings of expired checkouts, per provider (reset when a pass starts).
    _listings: dict[ProviderType, ExpiredListing]
    _listing_lock: trio.Lock

    def _cutoff_minutes(self) -> float:
        return self._settings.pending_timeout_minutes

    def _interval_minutes(self) -> float:
        return self._settings.expire_pending_interval_minutes

    async def _work(self, candidate: claims.Candidate, cutoff: datetime) -> ItemResult:
        """Claim and lease the payment in one short transaction, close it at the
        provider holding nothing (a hung provider stalls this item, not the requests and
        events that need the row or a pooled session), then apply the outcome under the
        row lock, re-checked (an event may have settled it meanwhile), and give the
        lease back."""
        owner = leases.new_owner(leases.EXPIRE)
        statuses = self.selection.statuses
        async with self._uow.begin() as work:
            payment = await claims.claim(work.conn, self.selection, candidate.id, cutoff)
            if payment is None or not await leases.take(
                work.conn, payment.id, owner, self._lease.lease_seconds(CLOSING_CALLS), statuses
            ):
                return ItemResult(Outcome.SKIPPED)
        try:
            known = _provider_refs(payment)
            target, reason = await self._settle(self._providers.get(payment.provider), payment)
            async with self._uow.begin() as work:
                current = await repo.get_payment(work.conn, payment.id, for_update=True)
                if current is None or current.status not in statuses:
                    result = ItemResult(Outcome.SKIPPED)  # an event settled it meanwhile
                else:
                    learnt = _learn_refs(current, payment, known)
                    if target is not None and await work.change_status(
                        current, target, reason=reason
                    ):
                        result = ItemResult(Outcome.CHANGED, target)
                    else:
                        if learnt:
                            # Nothing to move, but the provider object it learned is kept.
                            await repo.update_payment(work.conn, current)
                        result = ItemResult(Outcome.UNCHANGED)
                await leases.release(work.conn, payment.id, owner)
        except BaseException:
            await give_back(self._pool, payment.id, owner)
            raise
        return result

    def _begin_pass(self) -> None:
        self._listings = {}  # what Stripe expires from now on is news to this pass
        # One listing at a time: two batches in flight would list the same span twice.
        self._listing_lock = trio.Lock()

    async def _work_batch(
        self, batch: list[claims.Candidate], cutoff: datetime, summary: JobSummary
    ) -> list[claims.Candidate]:
        claimed, moved = await self._retrying(lambda: self._expire_in_bulk(batch, cutoff))
        summary.checked += len(batch) - len(claimed) + len(moved)
        summary.skipped += len(batch) - len(claimed)  # another process holds them, or done
        for _ in moved:
            summary.record(ItemResult(Outcome.CHANGED, PaymentStatus.EXPIRED))
        if moved:
            self._log.info(
                "expire moved %d payments to EXPIRED",
                len(moved),
                extra={"payment_ids": sorted(moved), "status": PaymentStatus.EXPIRED.name},
            )
        return [c for c in batch if c.id in claimed and c.id not in moved]

    async def _expire_in_bulk(
        self, batch: list[claims.Candidate], cutoff: datetime
    ) -> tuple[set[int], set[int]]:
        """Ask each provider which of the batch's checkouts it expired, holding nothing
        (an expired checkout stays expired, so the answer cannot go stale); then, in one
        short transaction, claim the batch and move those; (ids claimed, ids moved)."""
        ids = [c.id for c in batch]
        async with self._pool.connection() as conn:
            seen = await claims.peek_many(conn, self.selection, ids, cutoff)
        refs: set[str] = set()
        for provider_type in {p.provider for p in seen}:
            group = [p for p in seen if p.provider == provider_type]
            listing = self._listings.setdefault(provider_type, ExpiredListing())
            provider = self._providers.get(provider_type)
            refs |= await self._expired_checkouts(provider, group, listing)
        async with self._uow.begin() as work:
            payments = await claims.claim_many(work.conn, self.selection, ids, cutoff)
            expired = [p for p in payments if p.provider_payment_id in refs]
            moved = await work.change_statuses(
                expired, PaymentStatus.EXPIRED, reason=self._reason()
            )
        return {p.id for p in payments}, {p.id for p in moved}

    async def _expired_checkouts(
        self, provider: Provider, payments: list[Payment], listing: ExpiredListing
    ) -> set[str]:
        """The provider's bulk answer within one deadline (an HTTP timeout a page the
        batch may fill); none (all left to the per-payment path) when it cannot give one
        now."""
        pages = 1 + len(payments) // LISTING_PAGE
        try:
            async with self._listing_lock:
                with trio.fail_after(pages * self._settings.stripe_http_timeout_seconds):
                    return await self._provider_call(
                        lambda: provider.expired_checkouts(payments, listing)
                    )
        except trio.TooSlowError:
            self._log.warning("expire could not list expired checkouts: the provider is slow")
        except PaymentsError as exc:
            self._log.warning("expire could not list expired checkouts: %s", exc.message)
        return set()

    async def _settle(
        self, provider: Provider, payment: Payment
    ) -> tuple[PaymentStatus | None, str]:
        """Close the payment at the provider unless it was paid; what it becomes, and why.

        ProviderUnavailable propagates: nothing is written and the next pass retries.
        """
        closing = await close_at_provider(provider, payment, self._provider_call)
        if closing.provider_status is not None:
            return closing.provider_status, RECONCILED
        if closing.closed:
            return PaymentStatus.EXPIRED, self._reason()
        return None, RECONCILED

    def _reason(self) -> str:
        return f"not completed within {self._settings.pending_timeout_minutes:g} minutes"


_REFS = ("provider_payment_id", "provider_subscription_id", "checkout_url")


def _provider_refs(payment: Payment) -> tuple[str, ...]:
    return tuple(getattr(payment, field) for field in _REFS)


def _learn_refs(current: Payment, closed: Payment, known: tuple[str, ...]) -> bool:
    """Copy onto ``current`` (re-read) the provider refs closing learned on ``closed``
    (a replayed create's object, a subscription found); True when any."""
    learnt = False
    for field, before in zip(_REFS, known, strict=True):
        value = getattr(closed, field)
        if value != before and value and not getattr(current, field):
            setattr(current, field, value)
            learnt = True
    return learnt
