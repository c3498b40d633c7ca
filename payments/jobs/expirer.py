"""The expirer: ends payments nobody completed within PAYMENTS_PENDING_TIMEOUT_MINUTES.

Every PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES each CREATED, PENDING or PROCESSING
payment older than the timeout (by ``created_at``) is closed at the provider and then
moved to EXPIRED (event row, payment and callback-outbox row in one unit of work; the
dispatcher is told after the commit).

The order is chosen for money (payments/closing.py, shared with cancel): a payment is
marked EXPIRED only once no one can pay it any more, and never when it was paid; the
provider's answer (PAID, PROCESSING) is followed instead. The provider unreachable: the
payment is left as it is (an error in the summary) and tried on the next pass.

A provider that refuses to close or to describe a payment (say "no such session", as
after a Stripe account change) leaves it untouched and counted as an error each pass:
expiring it could hide a checkout still payable elsewhere, so an operator should look.
A PROCESSING payment whose delayed payment is still on its way stays PROCESSING: the
provider's success or failure event (or the reconciler) settles it.
"""

from __future__ import annotations

from datetime import datetime

from payments.closing import close_at_provider
from payments.jobs.batch import ItemResult, Outcome, PaymentJob
from payments.model import Payment, PaymentStatus
from payments.providers.base import Provider
from payments.storage import claims
from payments.storage import repository as repo

RECONCILED = "reconciled"


class Expirer(PaymentJob):
    """``Expirer(uow, providers, settings, rate_per_second=20, concurrency=4)``;
    ``await run_pass()`` for one pass, ``run(ctx)`` as a child."""

    selection = claims.STUCK

    def _cutoff_minutes(self) -> float:
        return self._settings.pending_timeout_minutes

    def _interval_minutes(self) -> float:
        return self._settings.expire_pending_interval_minutes

    async def _work(self, candidate: claims.Candidate, cutoff: datetime) -> ItemResult:
        async with self._uow.begin() as work:
            payment = await claims.claim(work.conn, self.selection, candidate.id, cutoff)
            if payment is None:
                return ItemResult(Outcome.SKIPPED)
            known = _provider_refs(payment)
            target, reason = await self._settle(self._providers.get(payment.provider), payment)
            if target is not None and await work.change_status(payment, target, reason=reason):
                result = ItemResult(Outcome.CHANGED, target)
            else:
                if _provider_refs(payment) != known:
                    # Nothing to move, but the provider object it learned is kept.
                    await repo.update_payment(work.conn, payment)
                result = ItemResult(Outcome.UNCHANGED)
        return result

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


def _provider_refs(payment: Payment) -> tuple[str, str, str]:
    return (payment.provider_payment_id, payment.provider_subscription_id, payment.checkout_url)
