"""A subscription checkout's events, delivered to the real service in Stripe's order and
in the order Stripe does not promise but delivers sometimes (issue 14).

The sandbox emits, after a paid subscription checkout: ``checkout.session.completed``,
``invoice.created``, ``invoice.finalized``, ``customer.subscription.created``,
``invoice.paid``, ``invoice.payment_succeeded`` (StripeState._announce_first_invoice).
Stripe delivers events concurrently and says so, so the first ``invoice.paid`` may reach
the service before the completed session that tells it the subscription id. Here each
event is delivered alone, in a chosen order, and the service must end the same way:
PAID, with the subscription id it needs to cancel and to match the renewals.
"""

from __future__ import annotations

import pytest

from payments.model import Payment, PaymentStatus, PaymentType
from tests.fixtures.app import Stack

pytestmark = pytest.mark.timeout(60)

STRIPE_ORDER = [
    "checkout.session.completed",
    "invoice.created",
    "invoice.finalized",
    "customer.subscription.created",
    "invoice.paid",
    "invoice.payment_succeeded",
]


async def paid_silently(stack: Stack) -> tuple[Payment, dict[str, str]]:
    """A recurring payment whose checkout completed at the sandbox with nothing sent
    yet; the event id of each type."""
    payment = await stack.create_payment(payment_type=PaymentType.RECURRING)
    endpoint, stack.sandbox.state.webhook = stack.sandbox.state.webhook, None
    before = len(stack.sandbox.state.events)
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    stack.sandbox.state.webhook = endpoint
    emitted = stack.sandbox.state.events[before:]
    assert [e["type"] for e in emitted] == STRIPE_ORDER
    return payment, {e["type"]: e["id"] for e in emitted}


async def deliver(stack: Stack, event_id: str) -> None:
    """One event, alone, answered before the next is sent."""
    stack.sandbox.webhooks.resend(event_id)
    await stack.events_delivered()
    # Answered 2xx: a refusal would be retried, then dropped, and prove nothing.
    attempts = stack.sandbox.state.deliveries_of(event_id)
    assert attempts and attempts[-1].ok, attempts


async def test_stripe_order_pays_and_keeps_the_subscription(stack: Stack) -> None:
    payment, ids = await paid_silently(stack)
    for type_ in STRIPE_ORDER:
        await deliver(stack, ids[type_])
    paid = await stack.payment(payment.id)
    subscription_id = stack.sandbox.state.sessions[payment.provider_payment_id]["subscription"]
    assert (paid.status, paid.provider_subscription_id) == (PaymentStatus.PAID, subscription_id)
    history = await stack.history(payment.id)
    assert sorted(c.event_type for c in history.callbacks) == sorted(STRIPE_ORDER)
    assert [e.status for e in history.outbox] == [PaymentStatus.PAID]  # one callback


async def test_the_first_invoice_paid_before_the_completed_session(stack: Stack) -> None:
    """Stripe does not promise order: ``invoice.paid`` first is PAID with the
    subscription id the invoice names (the session that says it comes later)."""
    payment, ids = await paid_silently(stack)
    await deliver(stack, ids["invoice.paid"])
    subscription_id = stack.sandbox.state.sessions[payment.provider_payment_id]["subscription"]
    early = await stack.payment(payment.id)
    assert early.status == PaymentStatus.PAID
    assert early.provider_subscription_id == subscription_id
    for type_ in STRIPE_ORDER:
        if type_ != "invoice.paid":
            await deliver(stack, ids[type_])
    final = await stack.payment(payment.id)
    assert (final.status, final.provider_subscription_id) == (PaymentStatus.PAID, subscription_id)
    history = await stack.history(payment.id)
    assert [e.status for e in history.outbox] == [PaymentStatus.PAID]


async def test_renewals_are_accepted_and_recorded_and_the_payment_stays_paid(
    stack: Stack,
) -> None:
    """What README "Coming from the Go service" says of renewal events."""
    payment, ids = await paid_silently(stack)
    for type_ in STRIPE_ORDER:
        await deliver(stack, ids[type_])
    subscription_id = stack.sandbox.state.sessions[payment.provider_payment_id]["subscription"]
    failed = stack.sandbox.state.fail_invoice(subscription_id)  # next period: card declined
    renewed = stack.sandbox.state.pay_invoice(subscription_id)  # then paid on retry
    assert failed["id"] == renewed["id"] and renewed["billing_reason"] == "subscription_cycle"
    await stack.events_delivered()
    for event in stack.sandbox.state.events[-2:]:
        attempts = stack.sandbox.state.deliveries_of(event["id"])
        assert [a.status for a in attempts] == [200], (event["type"], attempts)
    final = await stack.payment(payment.id)
    assert final.status == PaymentStatus.PAID
    history = await stack.history(payment.id)
    types = [c.event_type for c in history.callbacks]
    assert types.count("invoice.paid") == 2 and "invoice.payment_failed" in types
    assert [e.status for e in history.outbox] == [PaymentStatus.PAID]  # heard once
