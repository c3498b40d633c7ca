"""StripeProvider.fetch_state against the emulator over HTTP: what a Checkout Session, a
payment link's sessions and a subscription say of a payment, and how errors map. Also
that cancelling a payment link leaves none of its sessions payable."""

from __future__ import annotations

from typing import Any

import pytest

from payments.errors import ProviderRejected, ProviderUnavailable
from payments.model import Payment, PaymentMethod, PaymentStatus, PaymentType
from payments.providers.base import ProviderState
from payments.providers.stripe import StripeProvider
from payments.sandbox import Sandbox
from tests.fixtures.sandbox import make_payment
from tests.jobs_support import SESSION_EXPIRE, SESSION_GET, SESSION_LIST

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

SUBSCRIPTION_GET = "GET /v1/subscriptions/{id}"


async def _opened(provider: StripeProvider, **overrides: Any) -> Payment:
    payment = make_payment(**overrides)
    result = await provider.create_checkout(payment)
    payment.provider_payment_id = result.provider_payment_id
    payment.checkout_url = result.checkout_url
    payment.status = PaymentStatus.PENDING
    return payment


async def _hosted(provider: StripeProvider, **overrides: Any) -> Payment:
    return await _opened(provider, payment_method=PaymentMethod.HOSTED_CARD, **overrides)


async def _link(provider: StripeProvider, **overrides: Any) -> Payment:
    return await _opened(provider, payment_method=PaymentMethod.PAYMENT_LINK, **overrides)


def _paid(sandbox: Sandbox, session_id: str) -> ProviderState:
    """PAID with the money the emulator says paid ``session_id``: its PaymentIntent (a
    subscription's: its first invoice's) and that intent's charge."""
    state = sandbox.state
    session = state.sessions[session_id]
    intent_id = session["payment_intent"]
    if intent_id is None:
        [paid] = [p for p in state.invoice_payments.values() if p["invoice"] == session["invoice"]]
        intent_id = paid["payment"]["payment_intent"]
    return ProviderState(
        PaymentStatus.PAID,
        subscription_id=session["subscription"] or "",
        payment_intent=intent_id,
        charge=state.payment_intents[intent_id]["latest_charge"] or "",
    )


# --- hosted card, one-time ----------------------------------------------------------------


async def test_an_open_session_concludes_nothing(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _hosted(stripe_provider)
    assert await stripe_provider.fetch_state(payment) == ProviderState(None)
    [get] = stripe_sandbox.state.requests_to(SESSION_GET)
    assert get.path.endswith(payment.provider_payment_id)


@pytest.mark.parametrize("amount", [2500, 0], ids=["paid", "no_payment_required"])
async def test_a_paid_session_is_paid(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider, amount: int
) -> None:
    payment = await _hosted(stripe_provider)
    if amount == 0:
        stripe_sandbox.state.sessions[payment.provider_payment_id]["amount_total"] = 0
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    assert session["payment_status"] == ("paid" if amount else "no_payment_required")
    state = await stripe_provider.fetch_state(payment)
    assert state == _paid(stripe_sandbox, session["id"])
    assert bool(state.charge) == bool(amount)


async def test_a_completed_unpaid_session_is_processing_until_the_money_arrives(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _hosted(stripe_provider)
    stripe_sandbox.state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    assert await stripe_provider.fetch_state(payment) == ProviderState(PaymentStatus.PROCESSING)
    stripe_sandbox.state.succeed_async_payment(payment.provider_payment_id)
    state = await stripe_provider.fetch_state(payment)
    assert state == _paid(stripe_sandbox, payment.provider_payment_id)
    assert state.charge


async def test_an_expired_session_is_expired(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _hosted(stripe_provider)
    stripe_sandbox.state.expire_session(payment.provider_payment_id)
    assert await stripe_provider.fetch_state(payment) == ProviderState(PaymentStatus.EXPIRED)


# --- subscriptions -------------------------------------------------------------------------


async def test_a_recurring_session_is_read_through_its_subscription(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _hosted(stripe_provider, payment_type=PaymentType.RECURRING)
    assert await stripe_provider.fetch_state(payment) == ProviderState(None)
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    subscription_id = session["subscription"]
    state = await stripe_provider.fetch_state(payment)
    assert state == _paid(stripe_sandbox, session["id"])
    assert state.subscription_id == subscription_id and state.charge
    assert stripe_sandbox.state.count(SUBSCRIPTION_GET) == 1
    # Once the payment knows its subscription, it is asked first; the money that paid
    # is looked up only while the payment lacks it.
    payment.provider_subscription_id = subscription_id
    assert await stripe_provider.fetch_state(payment) == _paid(stripe_sandbox, session["id"])
    payment.provider_payment_intent_id, payment.provider_charge_id = state.payment_intent, "ch_x"
    gets = stripe_sandbox.state.count(SESSION_GET)
    state = await stripe_provider.fetch_state(payment)
    assert state == ProviderState(PaymentStatus.PAID, subscription_id=subscription_id)
    assert stripe_sandbox.state.count(SESSION_GET) == gets
    stripe_sandbox.state.cancel_subscription(subscription_id)
    gets = stripe_sandbox.state.count(SESSION_GET)
    state = await stripe_provider.fetch_state(payment)
    assert state == ProviderState(PaymentStatus.CANCELED, subscription_id=subscription_id)
    assert stripe_sandbox.state.count(SESSION_GET) == gets


@pytest.mark.parametrize(
    ("stripe_status", "expected"),
    [
        ("active", PaymentStatus.PAID),
        ("trialing", PaymentStatus.PAID),
        ("past_due", PaymentStatus.PAID),
        ("unpaid", PaymentStatus.PAID),
        ("canceled", PaymentStatus.CANCELED),
        ("incomplete", PaymentStatus.PROCESSING),
        ("incomplete_expired", PaymentStatus.EXPIRED),
        ("paused", None),
        ("some_future_status", None),
    ],
)
async def test_subscription_statuses_map_to_payment_statuses(
    stripe_sandbox: Sandbox,
    stripe_provider: StripeProvider,
    stripe_status: str,
    expected: PaymentStatus | None,
) -> None:
    payment = await _hosted(stripe_provider, payment_type=PaymentType.RECURRING)
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    stripe_sandbox.state.subscriptions[session["subscription"]]["status"] = stripe_status
    state = await stripe_provider.fetch_state(payment)
    if expected == PaymentStatus.PAID:
        assert state == _paid(stripe_sandbox, session["id"])
    else:
        assert state == ProviderState(expected, subscription_id=session["subscription"])


async def test_a_recurring_session_completed_unpaid_is_processing(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _hosted(stripe_provider, payment_type=PaymentType.RECURRING)
    session = stripe_sandbox.state.complete_session(
        payment.provider_payment_id, payment_status="unpaid"
    )
    state = await stripe_provider.fetch_state(payment)
    assert state == ProviderState(PaymentStatus.PROCESSING, subscription_id=session["subscription"])


# --- payment links --------------------------------------------------------------------------


async def test_a_link_without_a_completed_session_concludes_nothing(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    assert await stripe_provider.fetch_state(payment) == ProviderState(None)
    stripe_sandbox.state.open_payment_link(payment.provider_payment_id)  # opened, not paid
    assert await stripe_provider.fetch_state(payment) == ProviderState(None)
    [first, _] = stripe_sandbox.state.requests_to(SESSION_LIST)
    assert first.params == {
        "payment_link": payment.provider_payment_id,
        "status": "complete",
        "limit": "100",
    }


async def test_a_link_with_a_paid_session_is_paid(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    stripe_sandbox.state.open_payment_link(payment.provider_payment_id)
    session = stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    assert await stripe_provider.fetch_state(payment) == _paid(stripe_sandbox, session["id"])


async def test_a_paid_session_wins_over_one_still_processing(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    link = payment.provider_payment_id
    # Customers who opened the link before its one allowed checkout completed.
    state = stripe_sandbox.state
    first, second, third = (state.open_payment_link(link)["id"] for _ in range(3))
    state.complete_session(first, payment_status="unpaid")
    assert await stripe_provider.fetch_state(payment) == ProviderState(PaymentStatus.PROCESSING)
    state.complete_session(second)
    state.complete_session(third, payment_status="unpaid")
    assert await stripe_provider.fetch_state(payment) == _paid(stripe_sandbox, second)


async def test_a_recurring_link_is_paid_with_its_subscription(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider, payment_type=PaymentType.RECURRING)
    session = stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    state = await stripe_provider.fetch_state(payment)
    assert state == _paid(stripe_sandbox, session["id"])
    assert state.subscription_id == session["subscription"]


async def test_the_paid_session_is_found_beyond_the_first_page(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    link = payment.provider_payment_id
    state = stripe_sandbox.state
    sessions = [state.open_payment_link(link)["id"] for _ in range(101)]
    state.complete_session(sessions[0])  # the oldest: listed last
    for session in sessions[1:]:
        state.complete_session(session, payment_status="unpaid")
    assert await stripe_provider.fetch_state(payment) == _paid(stripe_sandbox, sessions[0])
    assert stripe_sandbox.state.count(SESSION_LIST) == 2


async def test_a_deactivated_link_without_a_paid_session_stays_as_it_is(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    stripe_sandbox.state.payment_links[payment.provider_payment_id]["active"] = False
    assert await stripe_provider.fetch_state(payment) == ProviderState(None)


# --- no object, errors -----------------------------------------------------------------------


async def test_a_payment_without_a_provider_object_asks_nothing(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    assert await stripe_provider.fetch_state(make_payment()) == ProviderState(None)
    assert stripe_sandbox.state.requests == []


async def test_an_unknown_session_is_rejected(stripe_provider: StripeProvider) -> None:
    payment = make_payment(provider_payment_id="cs_test_unknown")
    with pytest.raises(ProviderRejected, match=r"No such checkout\.session"):
        await stripe_provider.fetch_state(payment)


@pytest.mark.parametrize("status", [500, 503, 429, 401])
async def test_an_outage_is_unavailable(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider, status: int
) -> None:
    payment = await _hosted(stripe_provider)
    stripe_sandbox.faults.fail(status, times=None)
    with pytest.raises(ProviderUnavailable) as info:
        await stripe_provider.fetch_state(payment)
    assert info.value.message == "payment provider unavailable"


async def test_a_dropped_connection_is_unavailable(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    stripe_sandbox.faults.drop(path="/v1/checkout/sessions")
    with pytest.raises(ProviderUnavailable):
        await stripe_provider.fetch_state(payment)


# --- cancel of a link closes its open sessions too --------------------------------------------


async def test_cancel_of_a_link_expires_the_sessions_still_open(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _link(stripe_provider)
    link = payment.provider_payment_id
    opened = stripe_sandbox.state.open_payment_link(link)
    paid = stripe_sandbox.state.pay_payment_link(link)
    await stripe_provider.cancel(payment)
    assert stripe_sandbox.state.payment_links[link]["active"] is False
    assert stripe_sandbox.state.sessions[opened["id"]]["status"] == "expired"
    assert stripe_sandbox.state.sessions[paid["id"]]["status"] == "complete"
    [expire] = stripe_sandbox.state.requests_to(SESSION_EXPIRE)
    assert expire.idempotency_key == f"{payment.idempotency_key}:expire:{opened['id']}"
    await stripe_provider.cancel(payment)  # again: nothing left open, still fine
    assert stripe_sandbox.state.count(SESSION_EXPIRE) == 1
