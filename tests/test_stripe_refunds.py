"""The Stripe provider's refunds through the SDK against the emulator: the request it
sends, idempotency across a repeated call, and reading Stripe's refund objects."""

from __future__ import annotations

import pytest

from payments.errors import ProviderRejected
from payments.model import PaymentStatus, Refund, RefundStatus, utcnow
from payments.providers.stripe import StripeProvider, provider_refund
from payments.sandbox import Sandbox
from tests.fixtures.sandbox import make_payment

pytestmark = pytest.mark.timeout(30)


def make_refund(payment_id: int, **changes: object) -> Refund:
    now = utcnow()
    fields: dict[str, object] = {
        "id": 41,
        "payment_id": payment_id,
        "request_id": "ref-41",
        "caller_service": "orders",
        "amount_cents": 700,
        "currency": "EUR",
        "status": RefundStatus.PENDING,
        "request_fingerprint": "f" * 64,
        "created_at": now,
        "updated_at": now,
        "metadata": {"z": "1", "a": "2"},
    }
    fields.update(changes)
    return Refund(**fields)  # type: ignore[arg-type]


async def test_a_repeated_create_gets_the_refund_of_the_first(
    stripe_provider: StripeProvider, stripe_sandbox: Sandbox
) -> None:
    payment = make_payment()
    made = await stripe_provider.create_checkout(payment)
    payment.provider_payment_id = made.provider_payment_id
    stripe_sandbox.state.complete_session(made.provider_payment_id)
    payment.status = PaymentStatus.PAID
    refund = make_refund(payment.id, reason="fraudulent")
    first = await stripe_provider.create_refund(payment, refund)
    again = await stripe_provider.create_refund(payment, refund)
    assert again == first and first.status == RefundStatus.SUCCEEDED
    assert (first.amount_cents, first.currency, first.refund_id) == (700, "EUR", 41)
    assert first.payment_intent_id.startswith("pi_") and first.charge_id.startswith("ch_")
    [stored] = stripe_sandbox.state.refunds.values()
    assert stored["metadata"] == {"a": "2", "z": "1", "request_id": "ref-41", "refund_id": "41"}
    assert stored["reason"] == "fraudulent"
    calls = [r for r in stripe_sandbox.state.requests if r.endpoint == "POST /v1/refunds"]
    assert [c.idempotency_key for c in calls] == [refund.idempotency_key] * 2
    assert await stripe_provider.retrieve_refund(first.provider_refund_id) == first
    assert await stripe_provider.find_refund(payment, refund) == first
    assert await stripe_provider.find_refund(payment, make_refund(payment.id, id=42)) is None


async def test_a_payment_without_a_paid_checkout_is_refused(
    stripe_provider: StripeProvider,
) -> None:
    with pytest.raises(ProviderRejected, match="no PaymentIntent"):
        await stripe_provider.create_refund(make_payment(), make_refund(1))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("pending", RefundStatus.PENDING),
        ("requires_action", RefundStatus.PENDING),
        ("succeeded", RefundStatus.SUCCEEDED),
        ("failed", RefundStatus.FAILED),
        ("canceled", RefundStatus.CANCELED),
    ],
)
def test_an_event_refund_object_is_read(status: str, expected: RefundStatus) -> None:
    found = provider_refund(
        {
            "id": "re_1",
            "object": "refund",
            "amount": 300,
            "currency": "usd",
            "status": status,
            "failure_reason": "expired_or_canceled_card" if status == "failed" else None,
            "payment_intent": {"id": "pi_9", "object": "payment_intent"},  # expanded
            "charge": "ch_9",
            "reason": None,
            "metadata": {"refund_id": "17", "request_id": "r-17"},
        }
    )
    assert found.status == expected
    assert (found.amount_cents, found.currency) == (300, "USD")
    assert (found.payment_intent_id, found.charge_id) == ("pi_9", "ch_9")
    assert (found.refund_id, found.request_id, found.reason) == (17, "r-17", "")
    assert bool(found.failure_reason) == (status == "failed")
    dashboard = provider_refund({"id": "re_2", "status": "succeeded", "metadata": {}})
    assert (dashboard.refund_id, dashboard.request_id) == (0, "")
