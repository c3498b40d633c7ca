"""Refund events of a payment whose checkout event was lost, posted to the hashless
route as Stripe posts them: the reconciler stores the money that paid (PaymentIntent
and charge) when it makes the payment PAID, and the route asks Stripe which of our
checkouts an unknown PaymentIntent paid rather than forget the refund. The whole
service on loopback, the Stripe emulator, the real database; nothing mocked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from payments.jobs.reconciler import Reconciler
from payments.model import Caller, Payment, PaymentMethod, PaymentStatus, PaymentType, ProviderType
from payments.providers.base import Provider, ProviderState
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.sandbox import money
from payments.storage import refunds as refund_store
from payments.storage.provider_callbacks import CallbackOutcome
from tests.fixtures.app import Stack
from tests.jobs_support import age, job_settings, job_uow
from tests.test_refund_events import forged_event, signed

pytestmark = pytest.mark.timeout(60)

SVC_A = Caller("svc-a")
SESSION_LIST = "GET /v1/checkout/sessions"
STALE = 20  # minutes: older than PAYMENTS_RECONCILE_STALE_AFTER_MINUTES (15)


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
        yield client


def reconciler(stack: Stack, provider: Provider) -> Reconciler:
    registry = ProviderRegistry({ProviderType.STRIPE: provider})
    return Reconciler(job_uow(stack.pool), registry, job_settings())


async def paid_without_events(stack: Stack, **changes: Any) -> Payment:
    """A payment paid at the emulator whose events never reached the service (the
    webhook is off: Stripe's deliveries to it were lost); still PENDING here."""
    payment = await stack.create_payment(**changes)
    stack.sandbox.state.webhook = None
    if payment.payment_method == PaymentMethod.PAYMENT_LINK:
        stack.sandbox.state.pay_payment_link(payment.provider_payment_id)
    else:
        stack.sandbox.state.complete_session(payment.provider_payment_id)
    assert (await stack.payment(payment.id)).status == PaymentStatus.PENDING
    return payment


def paid_charge(stack: Stack, payment: Payment) -> dict[str, Any]:
    """The emulator's charge that paid ``payment``: its completed session's
    PaymentIntent's, or for a subscription its first invoice's."""
    state = stack.sandbox.state
    [session] = [
        s
        for s in state.sessions.values()
        if s["status"] == "complete"
        and payment.provider_payment_id in (s["id"], s.get("payment_link"))
    ]
    intent_id = session["payment_intent"]
    if intent_id is None:
        [paid] = [p for p in state.invoice_payments.values() if p["invoice"] == session["invoice"]]
        intent_id = paid["payment"]["payment_intent"]
    return state.charges[state.payment_intents[intent_id]["latest_charge"]]


async def post_dashboard_refund(
    stack: Stack, http: httpx.AsyncClient, payment: Payment, amount: int
) -> tuple[dict[str, Any], httpx.Response]:
    """A refund made in Stripe's dashboard, its ``refund.created`` event posted to the
    hashless route as Stripe posts it."""
    made = money.create_refund(stack.sandbox.state, paid_charge(stack, payment), amount=amount)
    [created] = [
        e
        for e in stack.sandbox.state.events_of("refund.created")
        if e["data"]["object"]["id"] == made["id"]
    ]
    body, headers = signed(created)
    return made, await http.post("/webhooks/providers/stripe", content=body, headers=headers)


async def refund_ids(stack: Stack, payment: Payment) -> list[str]:
    async with stack.pool.connection() as conn:
        return [r.request_id for r in await refund_store.list_refunds(conn, payment.id)]


# --- (a) the reconciler stores the money that paid -------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        {},
        {"payment_method": PaymentMethod.PAYMENT_LINK},
        {"payment_type": PaymentType.RECURRING},
    ],
    ids=["session", "payment-link", "subscription"],
)
async def test_a_payment_the_reconciler_makes_paid_routes_its_dashboard_refund(
    stack: Stack, http: httpx.AsyncClient, stripe_provider: StripeProvider, kind: dict[str, Any]
) -> None:
    payment = await paid_without_events(stack, amount_cents=2500, **kind)
    await age(stack.pool, [payment], STALE)

    summary = await reconciler(stack, stripe_provider).run_pass()

    assert summary.moved_to == {"PAID": 1}
    charge = paid_charge(stack, payment)
    stored = await stack.payment(payment.id)
    assert stored.status == PaymentStatus.PAID
    assert stored.provider_payment_intent_id == charge["payment_intent"]
    assert stored.provider_charge_id == charge["id"]
    listed = stack.sandbox.state.count(SESSION_LIST)

    made, response = await post_dashboard_refund(stack, http, payment, 900)

    assert response.status_code == 200, response.text
    assert response.json()["payment"]["id"] == payment.id
    assert response.json()["payment"]["refunded_cents"] == 900
    assert await refund_ids(stack, payment) == [f"stripe:{made['id']}"]
    assert stack.sandbox.state.count(SESSION_LIST) == listed  # routed by what was stored


class EventDuringTheQuestion:
    """The real provider, except that while the reconciler asks it about a payment
    (its claim committed, no lock held) an event makes that payment PAID without
    telling its money, as a subscription's events do when the lookup after them failed."""

    def __init__(self, provider: StripeProvider, stack: Stack) -> None:
        self._provider = provider
        self._stack = stack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)

    async def fetch_state(self, payment: Payment) -> ProviderState:
        await self._stack.set_status(payment.id, PaymentStatus.PAID)
        assert not (await self._stack.payment(payment.id)).provider_payment_intent_id
        return await self._provider.fetch_state(payment)


async def test_the_reconciler_stores_the_money_of_a_payment_an_event_made_paid_meanwhile(
    stack: Stack, stripe_provider: StripeProvider
) -> None:
    payment = await paid_without_events(stack, payment_type=PaymentType.RECURRING)
    await age(stack.pool, [payment], STALE)
    provider = EventDuringTheQuestion(stripe_provider, stack)

    summary = await reconciler(stack, provider).run_pass()

    assert (summary.skipped, summary.errors) == (1, 0)  # the event settled it
    charge = paid_charge(stack, payment)
    stored = await stack.payment(payment.id)
    assert stored.status == PaymentStatus.PAID
    assert (stored.provider_payment_intent_id, stored.provider_charge_id) == (
        charge["payment_intent"],
        charge["id"],
    )


# --- (b) the route asks Stripe about a PaymentIntent it does not know --------------------


async def test_an_unknown_intent_is_looked_up_at_stripe_and_the_refund_recorded(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """PAID without its money stored (as the reconciler used to leave it): the event's
    PaymentIntent leads, through its Checkout Session's metadata, to the payment."""
    payment = await paid_without_events(stack, amount_cents=2500)
    await stack.set_status(payment.id, PaymentStatus.PAID)
    listed = stack.sandbox.state.count(SESSION_LIST)

    made, response = await post_dashboard_refund(stack, http, payment, 1000)

    assert response.status_code == 200, response.text
    assert response.json()["payment"]["id"] == payment.id
    assert stack.sandbox.state.count(SESSION_LIST) == listed + 1
    shown = await stack.service.get(SVC_A, payment.id)
    assert (shown.refunded_cents, shown.refundable_cents) == (1000, 1500)
    assert await refund_ids(stack, payment) == [f"stripe:{made['id']}"]
    stored = await stack.payment(payment.id)
    assert (stored.provider_payment_intent_id, stored.provider_charge_id) == (
        made["payment_intent"],
        made["charge"],
    )
    # The next event of that money is routed by what was stored: Stripe is not asked.
    again = forged_event("refund.updated", stack.sandbox.state.refunds[made["id"]])
    body, headers = signed(again)
    response = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert response.json()["payment"]["id"] == payment.id
    assert stack.sandbox.state.count(SESSION_LIST) == listed + 1


async def test_a_subscriptions_intent_is_found_through_its_first_invoice(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """A recurring payment made PAID by its events while Stripe was down for the
    PaymentIntent lookup: no session names the invoice's intent, so its customer's
    checkouts are searched for the one whose first invoice it paid."""
    payment = await paid_without_events(
        stack, payment_type=PaymentType.RECURRING, amount_cents=1200
    )
    await stack.set_status(payment.id, PaymentStatus.PAID)
    charge = paid_charge(stack, payment)

    made, response = await post_dashboard_refund(stack, http, payment, 200)

    assert response.status_code == 200, response.text
    assert response.json()["payment"]["refunded_cents"] == 200
    assert await refund_ids(stack, payment) == [f"stripe:{made['id']}"]
    stored = await stack.payment(payment.id)
    assert (stored.provider_payment_intent_id, stored.provider_charge_id) == (
        charge["payment_intent"],
        charge["id"],
    )


async def test_stripe_down_at_the_lookup_answers_503_and_the_resent_event_is_recorded(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await paid_without_events(stack, amount_cents=2500)
    await stack.set_status(payment.id, PaymentStatus.PAID)
    made = money.create_refund(stack.sandbox.state, paid_charge(stack, payment), amount=700)
    [created] = stack.sandbox.state.events_of("refund.created")
    body, headers = signed(created)
    stack.sandbox.faults.fail(500, path="/v1/checkout/sessions", method="GET", times=None)

    refused = await http.post("/webhooks/providers/stripe", content=body, headers=headers)

    assert (refused.status_code, refused.json()) == (
        503,
        {"error": "payment provider unavailable"},
    )
    assert await refund_ids(stack, payment) == []
    assert not (await stack.payment(payment.id)).provider_payment_intent_id
    async with stack.pool.connection() as conn:
        [(outcome, event_id)] = await conn.fetchall(
            "SELECT outcome, event_id FROM provider_callbacks"
        )
    assert (outcome, event_id) == (CallbackOutcome.REJECTED.value, created["id"])

    stack.sandbox.faults.clear()  # Stripe is back and sends the event again
    resent = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert resent.status_code == 200, resent.text
    assert resent.json()["payment"]["refunded_cents"] == 700
    assert await refund_ids(stack, payment) == [f"stripe:{made['id']}"]


async def test_an_intent_stripe_ties_to_no_payment_of_ours_is_recorded_and_acknowledged(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """Money of the account the service did not take (a checkout made elsewhere, no
    callback hash in its metadata): Stripe is asked, and the event is only recorded."""
    state = stack.sandbox.state
    state.webhook = None
    foreign = await stack.create_payment(amount_cents=1500)
    state.sessions[foreign.provider_payment_id]["metadata"] = {}  # as if made elsewhere
    state.complete_session(foreign.provider_payment_id)
    listed = state.count(SESSION_LIST)

    _, response = await post_dashboard_refund(stack, http, foreign, 500)

    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Provider callback processed"}
    assert state.count(SESSION_LIST) == listed + 1
    assert await refund_ids(stack, foreign) == []
    assert not (await stack.payment(foreign.id)).provider_payment_intent_id
