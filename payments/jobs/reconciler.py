"""The reconciler: heals payments whose provider event never arrived.

Every PAYMENTS_RECONCILE_INTERVAL_MINUTES it asks the provider about each PENDING or
PROCESSING payment with a provider object that nothing has touched for
PAYMENTS_RECONCILE_STALE_AFTER_MINUTES (a missed or lost webhook, an outage), and moves
it by the status machine with reason ``reconciled``: the event row, the payment and,
for a terminal status, the callback-outbox row in one unit of work, which tells the
dispatcher after the commit. A payment it makes PAID gets the PaymentIntent and charge
that paid it too (the lost checkout event would have told them): a refund made in
Stripe's dashboard is routed by them. The provider is asked under the payment's lease
(payments/storage/leases.py), never under its row lock or holding a session: a hung
provider then stalls this job's item, not the requests and events that need the row.

A payment the provider says nothing new about gets its ``updated_at`` touched. That
makes ``updated_at`` mean "last time the service knew where this payment stood" rather
than "last status change", and it is why each open payment costs one provider call per
stale window instead of one per pass (an abandoned checkout would otherwise be asked
about every two minutes until it expires). Expiry is unaffected: the expirer goes by
``created_at``. If callers ever need the exact time of the last status change, it is
the last STATUS_CHANGED event (or a separate ``checked_at`` column in a later step).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import trio

from payments.jobs.batch import ItemResult, JobSummary, Outcome, PaymentJob
from payments.jobs.refund_settling import RefundSettler
from payments.leasing import give_back
from payments.model import Payment, PaymentStatus, utcnow
from payments.providers.base import ProviderState
from payments.storage import claims, leases
from payments.storage import repository as repo
from payments.unit_of_work import Work

REASON = "reconciled"


class Reconciler(PaymentJob):
    """``Reconciler(uow, providers, settings, rate_per_second=20, concurrency=4)``;
    ``await run_pass()`` for one pass, ``run(ctx)`` as a child."""

    selection = claims.STALE

    def _cutoff_minutes(self) -> float:
        return self._settings.reconcile_stale_after_minutes

    async def run_pass(
        self,
        *,
        stopping: trio.Event | None = None,
        on_progress: Callable[[JobSummary], None] | None = None,
    ) -> JobSummary:
        """The payments' pass, then the stale PENDING refunds' (same summary)."""
        summary = await super().run_pass(stopping=stopping, on_progress=on_progress)
        if not summary.stopped:
            settler = RefundSettler(
                self._uow,
                self._providers,
                self._provider_call,
                self._settings.job_batch_size,
                self._concurrency,
            )
            cutoff = utcnow() - timedelta(minutes=self._cutoff_minutes())
            checked = summary.checked
            await settler.run_pass(summary, cutoff, stopping)
            if on_progress is not None and summary.checked > checked:
                on_progress(summary)
        return summary

    def _interval_minutes(self) -> float:
        return self._settings.reconcile_interval_minutes

    async def _work(self, candidate: claims.Candidate, cutoff: datetime) -> ItemResult:
        """Claim and lease the payment in one short transaction, ask the provider holding
        nothing, then apply the answer under the row lock (re-checked: an event may
        have moved it meanwhile) and give the lease back."""
        owner = leases.new_owner(leases.RECONCILE)
        statuses = self.selection.statuses
        async with self._uow.begin() as work:
            payment = await claims.claim(work.conn, self.selection, candidate.id, cutoff)
            if payment is None or not await leases.take(
                work.conn, payment.id, owner, self._lease.lease_seconds(), statuses
            ):
                return ItemResult(Outcome.SKIPPED)  # worked elsewhere, now or already
        try:
            provider = self._providers.get(payment.provider)
            state = await self._provider_call(lambda: provider.fetch_state(payment))
            async with self._uow.begin() as work:
                current = await repo.get_payment(work.conn, payment.id, for_update=True)
                if current is None or current.status not in statuses:
                    result = ItemResult(Outcome.SKIPPED)  # an event settled it meanwhile
                    if current is not None and current.status == PaymentStatus.PAID:
                        # ... without telling its money (a subscription's events never do)
                        await repo.store_money_refs(
                            work.conn, current, state.payment_intent, state.charge
                        )
                else:
                    result = await _apply(work, current, state)
                await leases.release(work.conn, payment.id, owner)
        except BaseException:
            await give_back(self._pool, payment.id, owner)
            raise
        return result


async def _apply(work: Work, payment: Payment, state: ProviderState) -> ItemResult:
    if state.subscription_id:
        payment.provider_subscription_id = state.subscription_id
    # Written with the status change: a dashboard refund's events find the payment by
    # them even though its checkout event was lost.
    repo.fill_money_refs(payment, state.payment_intent, state.charge)
    target = state.status
    if target is not None and await work.change_status(payment, target, reason=REASON):
        return ItemResult(Outcome.CHANGED, target)
    # Still open (or nothing the status machine allows): touch it, so it waits a whole
    # stale window before the next question.
    payment.updated_at = utcnow()
    await repo.update_payment(work.conn, payment)
    return ItemResult(Outcome.UNCHANGED)
