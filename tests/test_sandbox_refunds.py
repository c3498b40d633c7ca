"""Refunds in the emulator, through the official SDK: the paid session's (or invoice's)
PaymentIntent and Charge, partial and full refunds with idempotent replay, Stripe's
errors, the signed refund events, the hold-pending switch and the dashboard's forms."""

# The emulator, its webhook receiver and SDK client are test_sandbox_events' fixtures,
# imported by name (hence the parameters shadowing them).
# ruff: noqa: F811

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import stripe

from payments.sandbox import Sandbox
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY, WEBHOOK_SECRET
from tests.test_sandbox_events import (  # noqa: F401  (fixtures)
    Receiver,
    client,
    idle,
    receiver,
    recurring_params,
    sandbox,
    session_params,
)

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


async def paid_intent(sandbox: Sandbox, client: stripe.StripeClient, hash_: str = "h-1") -> str:
    """A paid one-time Checkout Session's PaymentIntent id (2500 usd)."""
    session = await client.v1.checkout.sessions.create_async(params=session_params(hash_))
    sandbox.state.pay_session(session.id)
    paid = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert paid.payment_intent is not None
    return str(paid.payment_intent)


async def control(sandbox: Sandbox, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as http:
        return await http.post(
            f"/_sandbox/{path}",
            json=body,
            headers={"Authorization": f"Bearer {SANDBOX_SECRET_KEY}"},
        )


def event_types(sandbox: Sandbox) -> list[str]:
    return [
        e["type"] for e in sandbox.state.events if e["type"].split(".")[0] in ("refund", "charge")
    ]


async def test_a_paid_session_has_a_succeeded_intent_and_charge(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    intent_id = await paid_intent(sandbox, client)
    intent = await client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.amount, intent.amount_received) == ("succeeded", 2500, 2500)
    charge = await client.v1.charges.retrieve_async(str(intent.latest_charge))
    assert (charge.amount, charge.amount_refunded, charge.refunded) == (2500, 0, False)
    assert charge.payment_intent == intent_id


async def test_partial_refunds_then_the_rest_then_already_refunded(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    intent_id = await paid_intent(sandbox, client)
    params = {
        "payment_intent": intent_id,
        "amount": 1000,
        "reason": "requested_by_customer",
        "metadata": {"refund_request_id": "rr-1"},
    }
    first = await client.v1.refunds.create_async(params=params, options={"idempotency_key": "k1"})
    assert (first.status, first.amount, first.reason) == (
        "succeeded",
        1000,
        "requested_by_customer",
    )
    assert first.metadata["refund_request_id"] == "rr-1"
    replay = await client.v1.refunds.create_async(params=params, options={"idempotency_key": "k1"})
    assert replay.id == first.id
    assert len(sandbox.state.refunds) == 1  # the replay made nothing

    rest = await client.v1.refunds.create_async(params={"charge": first.charge})
    assert rest.amount == 1500  # no amount: all that is left
    charge = await client.v1.charges.retrieve_async(str(first.charge))
    assert (charge.amount_refunded, charge.refunded) == (2500, True)
    assert [r.id for r in charge.refunds.data] == [rest.id, first.id]

    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 1})
    error = caught.value.error
    assert error is not None
    assert (error.code, error.type) == ("charge_already_refunded", "invalid_request_error")
    assert error.message == f"Charge {first.charge} has already been refunded."
    assert caught.value.http_status == 400
    assert event_types(sandbox) == [
        "refund.created",
        "charge.refunded",
        "refund.created",
        "charge.refunded",
    ]


async def test_more_than_is_left_is_amount_too_large_and_changes_nothing(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    intent_id = await paid_intent(sandbox, client)
    await client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 2000})
    events = len(sandbox.state.events)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 501})
    error = caught.value.error
    assert error is not None
    assert (error.code, error.param) == ("amount_too_large", "amount")
    assert error.message == (
        "Refund amount ($5.01) is greater than unrefunded amount on charge ($5.00)"
    )
    assert len(sandbox.state.refunds) == 1
    assert len(sandbox.state.events) == events


@pytest.mark.parametrize(
    ("params", "param", "status"),
    [
        ({"amount": 0}, "amount", 400),
        ({"amount": -5}, "amount", 400),
        ({"reason": "bored"}, "reason", 400),
        ({"payment_intent": "pi_missing"}, "payment_intent", 404),
        ({"charge": "ch_missing"}, "charge", 404),
        ({"surprise": "x"}, "surprise", 400),
    ],
)
async def test_bad_refund_parameters_are_named(
    sandbox: Sandbox,
    client: stripe.StripeClient,
    params: dict[str, Any],
    param: str,
    status: int,
) -> None:
    intent_id = await paid_intent(sandbox, client)
    with pytest.raises(stripe.StripeError) as caught:
        await client.v1.refunds.create_async(params={"payment_intent": intent_id, **params})
    assert caught.value.http_status == status
    assert caught.value.error is not None and caught.value.error.param == param
    assert len(sandbox.state.refunds) == 0


async def test_an_unpaid_intent_has_nothing_to_refund(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id, payment_status="unpaid")  # delayed method
    intent_id = sandbox.state.sessions[session.id]["payment_intent"]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.refunds.create_async(params={"payment_intent": intent_id})
    assert caught.value.error is not None and caught.value.error.param == "payment_intent"
    sandbox.state.succeed_async_payment(session.id)  # the money arrives: now it can
    refund = await client.v1.refunds.create_async(params={"payment_intent": intent_id})
    assert refund.amount == 2500


async def test_retrieve_and_list_with_filters(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    one = await paid_intent(sandbox, client, "h-1")
    two = await paid_intent(sandbox, client, "h-2")
    a = await client.v1.refunds.create_async(params={"payment_intent": one, "amount": 100})
    b = await client.v1.refunds.create_async(params={"payment_intent": one, "amount": 200})
    c = await client.v1.refunds.create_async(params={"payment_intent": two})
    assert (await client.v1.refunds.retrieve_async(b.id)).amount == 200
    everything = await client.v1.refunds.list_async()
    assert [r.id for r in everything.data] == [c.id, b.id, a.id]
    by_intent = await client.v1.refunds.list_async(params={"payment_intent": one})
    assert [r.id for r in by_intent.data] == [b.id, a.id]
    by_charge = await client.v1.refunds.list_async(params={"charge": str(c.charge)})
    assert [r.id for r in by_charge.data] == [c.id]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.refunds.retrieve_async("re_missing")
    assert caught.value.http_status == 404


async def test_a_held_refund_stays_pending_then_fails_and_gives_the_amount_back(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    intent_id = await paid_intent(sandbox, client, "h-held")
    assert (await control(sandbox, "refunds/hold", {"hold": True})).json() == {"hold": True}
    pending = await client.v1.refunds.create_async(params={"payment_intent": intent_id})
    assert pending.status == "pending"
    # Pending money counts: nothing is left to refund meanwhile.
    with pytest.raises(stripe.InvalidRequestError, match="already been refunded"):
        await client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 1})

    failed = await control(sandbox, f"refunds/{pending.id}/fail", {"failure_reason": "declined"})
    assert failed.status_code == 200, failed.text
    assert (failed.json()["status"], failed.json()["failure_reason"]) == ("failed", "declined")
    again = await control(sandbox, f"refunds/{pending.id}/succeed", {})
    assert again.status_code == 400  # only a pending refund moves
    charge = await client.v1.charges.retrieve_async(str(pending.charge))
    assert (charge.amount_refunded, charge.refunded) == (0, False)

    # The switch held one refund only; the amount is refundable again.
    later = await client.v1.refunds.create_async(params={"payment_intent": intent_id})
    assert (later.status, later.amount) == ("succeeded", 2500)
    assert event_types(sandbox) == [
        "refund.created",
        "refund.updated",
        "refund.failed",
        "refund.created",
        "charge.refunded",
    ]
    # Each went to the payment's callback URL, signed, though refunds carry no metadata.
    await idle(sandbox)
    refund_posts = [r for r in receiver.received if b'"refund.' in r.body]
    assert {r.path for r in refund_posts} == {"/hooks/h-held"}
    for post in refund_posts:
        event = stripe.Webhook.construct_event(
            post.body.decode(), post.headers["stripe-signature"], WEBHOOK_SECRET
        )
        assert event.data.object.payment_intent == intent_id


async def test_a_held_refund_can_succeed_later(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    intent_id = await paid_intent(sandbox, client)
    sandbox.state.refund_hold = True
    pending = await client.v1.refunds.create_async(
        params={"payment_intent": intent_id, "amount": 700}
    )
    done = await control(sandbox, f"refunds/{pending.id}/succeed", {})
    assert done.json()["status"] == "succeeded"
    refunded = sandbox.state.events_of("charge.refunded")
    assert [e["data"]["object"]["amount_refunded"] for e in refunded] == [700]
    assert refunded[0]["data"]["object"]["refunds"]["data"][0]["status"] == "succeeded"


async def test_a_paid_invoice_names_its_intent_and_it_refunds(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=recurring_params())
    sandbox.state.pay_session(session.id)
    invoice_id = sandbox.state.sessions[session.id]["invoice"]
    payments = await client.v1.invoice_payments.list_async(params={"invoice": invoice_id})
    assert len(payments.data) == 1
    assert payments.data[0].status == "paid"
    intent_id = payments.data[0].payment.payment_intent
    refund = await client.v1.refunds.create_async(
        params={"payment_intent": str(intent_id), "amount": 500}
    )
    assert refund.amount == 500
    route = sandbox.state.callback_routes[str(refund.charge)]
    assert route == "hash-sub"


async def test_the_dashboard_shows_refunds_and_refunds_from_the_stripe_side(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    intent_id = await paid_intent(sandbox, client, "h-dash")
    charge_id = sandbox.state.payment_intents[intent_id]["latest_charge"]
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as browser:
        hold = await browser.post("/_sandbox/dashboard/refunds/hold", data={"hold": "on"})
        assert hold.status_code == 303
        made = await browser.post(
            "/_sandbox/dashboard/refunds", data={"charge": charge_id, "amount": "900"}
        )
        assert made.status_code == 303, made.text
        refused = await browser.post(
            "/_sandbox/dashboard/refunds", data={"charge": charge_id, "amount": "99999"}
        )
        assert refused.status_code == 400
        assert "greater than unrefunded amount" in refused.text
        page = await browser.get("/_sandbox/dashboard")
        (refund,) = sandbox.state.refunds.values()
        assert refund["status"] == "pending"
        assert refund["metadata"] == {}  # made at "Stripe", not by the service
        assert charge_id in page.text
        assert f"/_sandbox/dashboard/refunds/{refund['id']}/succeed" in page.text
        settled = await browser.post(f"/_sandbox/dashboard/refunds/{refund['id']}/succeed")
        assert settled.status_code == 303
    assert sandbox.state.refunds[refund["id"]]["status"] == "succeeded"
    await idle(sandbox)
    paths = {r.path for r in receiver.received if json.loads(r.body)["type"] == "charge.refunded"}
    assert paths == {"/hooks/h-dash"}


async def test_the_callback_sink_answers_and_the_dashboard_lists_it(sandbox: Sandbox) -> None:
    """The quick start's status_callback_url: it answers 200 and shows what came,
    never the service's key."""
    body = {"payment": {"id": 7, "status": 10}, "refund": {"id": 3, "status": 2}}
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as http:
        answer = await http.post(
            "/_sandbox/callbacks/demo",
            json=body,
            headers={"X-API-Key": "service-secret-key", "webhook-id": "msg_1"},
        )
        assert (answer.status_code, answer.json()) == (200, {"received": True})
        assert (await http.get("/_sandbox/callbacks/demo")).status_code == 405
        page = (await http.get("/_sandbox/dashboard")).text
    assert "payment 7: status 10; refund 3: status 2" in page
    assert "/_sandbox/callbacks/demo" in page and "msg_1" in page
    assert "service-secret-key" not in page
