"""The reconciler: heals payments whose provider event never arrived.

Every PAYMENTS_RECONCILE_INTERVAL_MINUTES it asks the provider about each PENDING or
PROCESSING payment with a provider object that nothing has touched for
PAYMENTS_RECONCILE_STALE_AFTER_MINUTES (a missed or lost webhook, an outage), and moves
it by the status machine with reason ``reconciled``: the event row, the payment and,
for a terminal status, the callback-outbox row in one unit of work, which tells the
dispatcher after the commit.

A payment the provider says nothing new about gets its ``updated_at`` touched. That
makes ``updated_at`` mean "last time the service knew where this payment stood" rather
than "last status change", and it is why each open payment costs one provider call per
stale window instead of one per pass (an abandoned checkout would otherwise be asked
about every two minutes until it expires). Expiry is unaffected: the expirer goes by
``created_at``. If callers ever need the exact time of the last status change, it is
the last STATUS_CHANGED event (or a separate ``checked_at`` column in a later step).
"""

from __future__ import annotations

from datetime import datetime

from payments.jobs.batch import ItemResult, Outcome, PaymentJob
from payments.model import utcnow
from payments.storage import claims
from payments.storage import repository as repo

REASON = "reconciled"


class Reconciler(PaymentJob):
    """``Reconciler(uow, providers, settings, rate_per_second=20, concurrency=4)``;
    ``await run_pass()`` for one pass, ``run(ctx)`` as a child."""

    selection = claims.STALE

    def _cutoff_minutes(self) -> float:
        return self._settings.reconcile_stale_after_minutes

    def _interval_minutes(self) -> float:
        return self._settings.reconcile_interval_minutes

    async def _work(self, candidate: claims.Candidate, cutoff: datetime) -> ItemResult:
        async with self._uow.begin() as work:
            payment = await claims.claim(work.conn, self.selection, candidate.id, cutoff)
            if payment is None:
                return ItemResult(Outcome.SKIPPED)
            provider = self._providers.get(payment.provider)
            state = await self._provider_call(lambda: provider.fetch_state(payment))
            if state.subscription_id:
                payment.provider_subscription_id = state.subscription_id
            target = state.status
            if target is not None and await work.change_status(payment, target, reason=REASON):
                result = ItemResult(Outcome.CHANGED, target)
            else:
                # Still open (or nothing the status machine allows): touch it, so it
                # waits a whole stale window before the next question.
                payment.updated_at = utcnow()
                await repo.update_payment(work.conn, payment)
                result = ItemResult(Outcome.UNCHANGED)
        return result
