"""Opening a payment at its provider: what the provider object tells us, and the
CREATED -> PENDING change that records it.

Shared by create (the first try and its retries) and by closing, which replays the
create of a payment whose first try crashed, to find whatever the provider made.
"""

from __future__ import annotations

from payments.model import EventKind, Payment, PaymentStatus
from payments.providers.base import CheckoutResult
from payments.unit_of_work import PaymentSubject, Work


def apply_checkout(payment: Payment, result: CheckoutResult) -> None:
    """Record on ``payment`` the provider object made (or found again) for it."""
    payment.provider_payment_id = result.provider_payment_id
    payment.provider_subscription_id = result.provider_subscription_id
    payment.checkout_url = result.checkout_url


async def record_opened(work: Work, payment: Payment, result: CheckoutResult) -> None:
    """Move the locked CREATED ``payment`` to PENDING with its provider object.

    Stamped with ``created_at``: a new payment's two timestamps agree (as the Go
    service wrote them), whatever the provider call took.
    """
    apply_checkout(payment, result)
    await work.change_status(
        payment,
        PaymentStatus.PENDING,
        reason="",
        at=payment.created_at,
        subject=PaymentSubject(payment, kind=EventKind.PROVIDER_CREATED),
    )
