"""Stripe's refund events against the whole service on loopback: the emulator refunds
(from the service, or "in Stripe's dashboard"), signs and posts its events to the
payment's route as the gateway forwards them, or a test posts them to the hashless
route as Stripe itself would; the real database checks what stuck. Nothing is mocked.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
from quart import request
from quart_trio import QuartTrio
from standardwebhooks.webhooks import Webhook

from payments.api.http import serve_http
from payments.jobs.dispatcher import Dispatcher
from payments.model import (
    Caller,
    EventKind,
    NewRefund,
    OutboxEntry,
    Payment,
    PaymentStatus,
    PaymentType,
    Refund,
    RefundEvent,
    RefundStatus,
)
from payments.sandbox import money
from payments.sandbox.webhooks import event_body
from payments.storage import outbox
from payments.storage import refunds as refund_store
from payments.storage.provider_callbacks import CallbackOutcome
from tests.fixtures.app import Stack
from tests.fixtures.sandbox import sign

pytestmark = pytest.mark.timeout(60)

R = RefundStatus
SVC_A = Caller("svc-a")
PROCESSED = "Provider callback processed"
SIGNING_SECRET = "whsec_cmVmdW5kLWNhbGxiYWNrLXNpZ25pbmctc2VjcmV0"


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
        yield client


async def paid_payment(stack: Stack, **changes: Any) -> Payment:
    """A payment made through the service and paid at the emulator (its events in)."""
    payment = await stack.create_payment(**changes)
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    await stack.events_delivered()
    paid = await stack.payment(payment.id)
    assert paid.status == PaymentStatus.PAID
    return paid


def charge_of(stack: Stack, payment: Payment) -> dict[str, Any]:
    """The charge that paid ``payment`` (its session's, or its first invoice's)."""
    state = stack.sandbox.state
    session = state.sessions[payment.provider_payment_id]
    intent_id = session["payment_intent"]
    if intent_id is None:  # a subscription: the PaymentIntent is the invoice payment's
        [paid] = [p for p in state.invoice_payments.values() if p["invoice"] == session["invoice"]]
        intent_id = paid["payment"]["payment_intent"]
    return state.charges[state.payment_intents[intent_id]["latest_charge"]]


def dashboard_refund(stack: Stack, payment: Payment, amount: int | None = None) -> dict[str, Any]:
    """A refund made in Stripe's dashboard: no metadata of ours."""
    return money.create_refund(stack.sandbox.state, charge_of(stack, payment), amount=amount)


async def service_refund(stack: Stack, payment: Payment, amount: int, **fields: Any) -> Refund:
    new = NewRefund(
        payment_id=payment.id,
        request_id=fields.pop("request_id", f"refund-{uuid.uuid4().hex[:10]}"),
        caller_service="svc-a",
        amount_cents=amount,
        **fields,
    )
    return await stack.service.refunds.create(SVC_A, new)


async def refunds_of(stack: Stack, payment: Payment) -> list[Refund]:
    async with stack.pool.connection() as conn:
        return await refund_store.list_refunds(conn, payment.id)


async def history_of(stack: Stack, refund: Refund) -> list[RefundEvent]:
    async with stack.pool.connection() as conn:
        return await refund_store.list_refund_events(conn, refund.id)


async def refund_callbacks(stack: Stack, payment: Payment) -> list[OutboxEntry]:
    async with stack.pool.connection() as conn:
        entries = await outbox.entries_for_payment(conn, payment.id)
    return [entry for entry in entries if entry.refund_id]


def emitted(stack: Stack, type_: str) -> list[dict[str, Any]]:
    return stack.sandbox.state.events_of(type_)


def signed(event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The body and headers Stripe itself posts (no gateway headers)."""
    body = event_body(event)
    return body.encode(), {
        "Stripe-Signature": sign(body, int(time.time())),
        "Content-Type": "application/json",
    }


def forged_event(type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A new event (fresh id) about ``obj`` as it stands, signed like Stripe's."""
    return {
        "id": f"evt_test_{uuid.uuid4().hex}",
        "object": "event",
        "created": int(time.time()),
        "data": {"object": copy.deepcopy(obj)},
        "type": type_,
    }


async def post_to_payment_route(
    http: httpx.AsyncClient, stack: Stack, payment: Payment, event: dict[str, Any]
) -> httpx.Response:
    body, headers = signed(event)
    headers.update(stack.headers(stack.key_gateway, "gw-test"))
    return await http.post(
        f"/webhooks/providers/stripe/{payment.provider_callback_hash}",
        content=body,
        headers=headers,
    )


# --- the payment's own route (events forwarded by the gateway) -------------------------


async def test_a_dashboard_refund_is_recorded_as_stripe_re_id_and_called_back(
    stack: Stack,
) -> None:
    payment = await paid_payment(stack, amount_cents=2500)
    made = dashboard_refund(stack, payment, amount=1000)
    await stack.events_delivered()

    [refund] = await refunds_of(stack, payment)
    assert (refund.request_id, refund.caller_service) == (f"stripe:{made['id']}", "svc-a")
    assert (refund.amount_cents, refund.currency, refund.status) == (1000, "USD", R.SUCCEEDED)
    assert refund.provider_refund_id == made["id"]
    assert refund.request_fingerprint == ""
    # Both events (refund.created, charge.refunded) were taken; one record.
    history = await stack.history(payment.id)
    types = {c.event_type for c in history.callbacks if c.outcome == CallbackOutcome.PROCESSED}
    assert {"refund.created", "charge.refunded"} <= types
    [callback] = await refund_callbacks(stack, payment)
    assert callback.refund_id == refund.id
    assert callback.url == payment.status_callback_url
    body = json.loads(callback.payload)
    assert body["refund"]["id"] == refund.id
    assert body["refund"]["status"] == int(R.SUCCEEDED)
    assert body["payment"]["refunded_cents"] == 1000
    assert body["payment"]["refundable_cents"] == 1500
    shown = await stack.service.get(SVC_A, payment.id)
    assert (shown.refunded_cents, shown.refundable_cents) == (1000, 1500)
    # The payment learnt its PaymentIntent and charge (refund events route by them).
    stored = await stack.payment(payment.id)
    assert stored.provider_charge_id == made["charge"]
    assert stored.provider_payment_intent_id == made["payment_intent"]


async def test_events_about_the_services_own_refund_make_no_second_record(
    stack: Stack,
) -> None:
    payment = await paid_payment(stack, amount_cents=2500)
    created = await service_refund(stack, payment, 700, reason="requested_by_customer")
    await stack.events_delivered()
    assert len(emitted(stack, "refund.created")) == 1

    [refund] = await refunds_of(stack, payment)
    assert refund.id == created.id and refund.status == R.SUCCEEDED
    events = await history_of(stack, refund)
    assert "refund.created" in {e.provider_event_type for e in events}
    assert len(await refund_callbacks(stack, payment)) == 1  # one callback, not one per path


async def test_an_event_that_outruns_the_create_binds_to_the_claim_by_metadata(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """The service's claim is committed, Stripe made the refund, the commit of its id
    has not happened (or crashed): the event finds the claim by its metadata."""
    payment = await paid_payment(stack, amount_cents=2500)
    stack.sandbox.state.refund_hold = True
    claim = await service_refund(stack, payment, 600)
    await stack.events_delivered()
    async with stack.pool.transaction() as conn:  # as if the id was never stored
        claim = await refund_store.get_refund(conn, claim.id)  # type: ignore[assignment]
        assert claim is not None and claim.provider_refund_id
        re_id, claim.provider_refund_id = claim.provider_refund_id, ""
        await refund_store.update_refund(conn, claim)
    settled = money.settle_refund(stack.sandbox.state, re_id, succeed=True)
    await stack.events_delivered()
    [refund] = await refunds_of(stack, payment)
    assert (refund.id, refund.provider_refund_id, refund.status) == (claim.id, re_id, R.SUCCEEDED)
    assert settled["metadata"]["refund_id"] == str(claim.id)


async def test_an_event_without_our_refund_id_binds_to_the_claim_by_request_id(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await paid_payment(stack, amount_cents=2500)
    stack.sandbox.state.webhook = None
    claim = await service_refund(stack, payment, 400, request_id="refund-by-request-id")
    async with stack.pool.transaction() as conn:  # Stripe's id never stored
        stored = await refund_store.get_refund(conn, claim.id)
        assert stored is not None
        re_id, stored.provider_refund_id = stored.provider_refund_id, ""
        await refund_store.update_refund(conn, stored)
    made = dict(stack.sandbox.state.refunds[re_id])
    made["metadata"] = {"request_id": "refund-by-request-id"}
    response = await post_to_payment_route(
        http, stack, payment, forged_event("refund.updated", made)
    )
    assert response.status_code == 200, response.text
    [refund] = await refunds_of(stack, payment)
    assert (refund.id, refund.provider_refund_id, refund.status) == (claim.id, re_id, R.SUCCEEDED)


async def test_a_pending_refund_that_fails_later_gives_the_amount_back(stack: Stack) -> None:
    payment = await paid_payment(stack, amount_cents=2500)
    stack.sandbox.state.refund_hold = True
    created = await service_refund(stack, payment, 2000)
    await stack.events_delivered()
    assert created.status == R.PENDING
    shown = await stack.service.get(SVC_A, payment.id)
    assert (shown.refunded_cents, shown.refundable_cents) == (0, 500)
    assert await refund_callbacks(stack, payment) == []  # nothing terminal yet

    money.settle_refund(
        stack.sandbox.state, created.provider_refund_id, succeed=False, reason="declined"
    )
    await stack.events_delivered()
    [refund] = await refunds_of(stack, payment)
    assert (refund.status, refund.failure_reason) == (R.FAILED, "declined")
    shown = await stack.service.get(SVC_A, payment.id)
    assert (shown.refunded_cents, shown.refundable_cents) == (0, 2500)
    [callback] = await refund_callbacks(stack, payment)
    assert json.loads(callback.payload)["refund"]["failure_reason"] == "declined"
    assert callback.status == PaymentStatus.PAID  # the payment stays PAID


async def test_refund_failed_after_succeeded_is_recorded_and_changes_nothing(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await paid_payment(stack)
    made = dashboard_refund(stack, payment, amount=500)
    await stack.events_delivered()
    late = dict(made, status="failed", failure_reason="lost_or_stolen_card")
    event = forged_event("refund.failed", late)
    response = await post_to_payment_route(http, stack, payment, event)
    assert response.status_code == 200, response.text
    [refund] = await refunds_of(stack, payment)
    assert (refund.status, refund.failure_reason) == (R.SUCCEEDED, "")
    [row] = [e for e in await history_of(stack, refund) if e.provider_event_id == event["id"]]
    assert (row.kind, row.from_status, row.to_status) == (
        EventKind.PROVIDER_EVENT,
        R.SUCCEEDED,
        R.SUCCEEDED,
    )
    assert row.reason.startswith("not applied")
    assert len(await refund_callbacks(stack, payment)) == 1


async def test_a_charge_list_costs_what_it_changes_not_every_refund_again(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """``charge.refunded`` lists every refund of the charge each time: the ones stored
    at the status listed are left alone (no history row each, which made a payment's
    refunds quadratic); one the service never heard of is still recorded from it."""
    payment = await paid_payment(stack, amount_cents=5000)
    for _ in range(4):
        dashboard_refund(stack, payment, amount=100)
    await stack.events_delivered()
    stored = await refunds_of(stack, payment)
    assert [r.status for r in stored] == [R.SUCCEEDED] * 4
    histories = {r.id: await history_of(stack, r) for r in stored}
    listeners = list(stack.sandbox.state.listeners)
    stack.sandbox.state.listeners.clear()  # its own events are lost
    try:
        lost = dashboard_refund(stack, payment, amount=100)
    finally:
        stack.sandbox.state.listeners.extend(listeners)
    event = forged_event("charge.refunded", charge_of(stack, payment))
    assert len(event["data"]["object"]["refunds"]["data"]) == 5

    response = await post_to_payment_route(http, stack, payment, event)
    assert response.status_code == 200, response.text

    after = await refunds_of(stack, payment)
    [found] = [r for r in after if r.provider_refund_id == lost["id"]]
    assert (found.request_id, found.status, found.amount_cents) == (
        f"stripe:{lost['id']}",
        R.SUCCEEDED,
        100,
    )
    for refund in stored:
        assert await history_of(stack, refund) == histories[refund.id]
    assert len(await refund_callbacks(stack, payment)) == 5
    shown = await stack.service.get(SVC_A, payment.id)
    assert (shown.refunded_cents, shown.refundable_cents) == (500, 4500)


async def test_a_replayed_refund_event_is_acknowledged_and_changes_nothing(
    stack: Stack,
) -> None:
    payment = await paid_payment(stack)
    dashboard_refund(stack, payment, amount=500)
    await stack.events_delivered()
    before = await refunds_of(stack, payment)
    for event in emitted(stack, "refund.created") + emitted(stack, "charge.refunded"):
        stack.sandbox.webhooks.resend(event["id"])
    await stack.events_delivered()
    assert await refunds_of(stack, payment) == before
    history = await stack.history(payment.id)
    assert [c.outcome for c in history.callbacks].count(CallbackOutcome.DUPLICATE) == 2
    assert len(await refund_callbacks(stack, payment)) == 1


async def test_a_refund_of_another_payment_is_refused_on_this_payments_route(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    mine = await paid_payment(stack)
    other = await paid_payment(stack)
    made = dashboard_refund(stack, other, amount=300)
    await stack.events_delivered()
    response = await post_to_payment_route(http, stack, mine, forged_event("refund.updated", made))
    assert response.status_code == 400
    assert response.json() == {"error": "payload: event is not about this payment"}
    assert await refunds_of(stack, mine) == []
    assert len(await refunds_of(stack, other)) == 1


async def test_a_dashboard_refund_of_a_recurring_payment_is_routed_by_its_intent(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """A subscription's events never name its PaymentIntent: the service asks Stripe
    once the payment is PAID, so the refund's events (no metadata, no callback hash)
    still find it, on the payment's route and on the hashless one."""
    payment = await paid_payment(stack, payment_type=PaymentType.RECURRING, amount_cents=1200)
    charge = charge_of(stack, payment)
    assert (await stack.payment(payment.id)).provider_payment_intent_id == charge["payment_intent"]
    made = dashboard_refund(stack, payment, amount=200)
    await stack.events_delivered()
    [refund] = await refunds_of(stack, payment)
    assert (refund.request_id, refund.status) == (f"stripe:{made['id']}", R.SUCCEEDED)
    assert len(await refund_callbacks(stack, payment)) == 1

    stack.sandbox.state.webhook = None
    second = dashboard_refund(stack, payment, amount=300)
    [created] = [
        e for e in emitted(stack, "refund.created") if e["data"]["object"]["id"] == second["id"]
    ]
    body, headers = signed(created)
    response = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["payment"]["refunded_cents"] == 500
    assert len(await refunds_of(stack, payment)) == 2


# --- the hashless route (Stripe's one endpoint) ------------------------------------------


async def test_the_hashless_route_routes_refund_events_by_their_money_ids(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await paid_payment(stack, amount_cents=2500)
    stack.sandbox.state.webhook = None  # Stripe posts to the hashless route itself
    made = dashboard_refund(stack, payment, amount=900)
    [created] = emitted(stack, "refund.created")
    body, headers = signed(created)
    response = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["message"] == PROCESSED
    assert document["payment"]["id"] == payment.id
    assert document["payment"]["refunded_cents"] == 900
    assert response.headers["X-Request-ID"]  # made up: Stripe sends none
    [refund] = await refunds_of(stack, payment)
    assert (refund.request_id, refund.status) == (f"stripe:{made['id']}", R.SUCCEEDED)
    # The same event again (Stripe retries): acknowledged, nothing new.
    again = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert again.status_code == 200
    assert await refunds_of(stack, payment) == [refund]
    outcomes = [c.outcome for c in (await stack.history(payment.id)).callbacks]
    assert outcomes[-2:] == [CallbackOutcome.PROCESSED, CallbackOutcome.DUPLICATE]


async def test_the_hashless_route_takes_payment_events_too(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    stack.sandbox.state.webhook = None
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    [completed] = emitted(stack, "checkout.session.completed")
    body, headers = signed(completed)
    response = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["payment"]["status"] == int(PaymentStatus.PAID)
    assert (await stack.payment(payment.id)).provider_payment_intent_id


async def test_the_hashless_route_records_an_event_naming_no_known_payment(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    stranger = {"id": "re_unknown", "object": "refund", "amount": 100, "currency": "usd"}
    stranger.update(status="succeeded", payment_intent="pi_unknown", charge="ch_unknown")
    event = forged_event("refund.created", stranger)
    body, headers = signed(event)
    response = await http.post("/webhooks/providers/stripe", content=body, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"message": PROCESSED}
    async with stack.pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT outcome, event_id, payment_id, callback_hash FROM provider_callbacks"
        )
        assert await conn.fetchall("SELECT id FROM refunds") == []
    assert rows == [("processed", event["id"], None, "")]


async def test_the_hashless_route_refuses_a_bad_signature_and_stores_nothing(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    event = forged_event("refund.created", {"id": "re_x", "object": "refund", "amount": 1})
    body = event_body(event).encode()
    bad = await http.post(
        "/webhooks/providers/stripe",
        content=body,
        headers={"Stripe-Signature": sign(body, int(time.time()), "whsec_other")},
    )
    assert (bad.status_code, bad.json()) == (
        400,
        {"error": "signature: does not match the payload"},
    )
    missing = await http.post("/webhooks/providers/stripe", content=body)
    assert (missing.status_code, missing.json()) == (400, {"error": "signature: is required"})
    unknown = await http.post("/webhooks/providers/adyen", content=body)
    assert unknown.status_code == 404
    async with stack.pool.connection() as conn:
        assert await conn.fetchall("SELECT id FROM provider_callbacks") == []


# --- the status callback, delivered -----------------------------------------------------


@attrs.define
class Receiver:
    """A status-callback receiver on loopback that keeps every request."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = attrs.field(factory=list)


async def start_receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver()
    app = QuartTrio("receiver")

    @app.post("/callbacks")
    async def take() -> tuple[str, int]:
        headers = {name.lower(): value for name, value in request.headers.items()}
        receiver.received.append((headers, await request.get_data()))
        return "", 204

    port = await nursery.start(partial(serve_http, app, "127.0.0.1", 0))
    receiver.url = f"http://127.0.0.1:{port}/callbacks"
    return receiver


async def test_the_refund_callback_reaches_the_caller_signed_with_its_own_webhook_id(
    stack: Stack,
) -> None:
    receiver = await start_receiver(stack.nursery)
    payment = await paid_payment(stack, amount_cents=2500, status_callback_url=receiver.url)
    dashboard_refund(stack, payment, amount=2500)
    await stack.events_delivered()
    settings = attrs.evolve(
        stack.settings,
        callback_signing_secret=SIGNING_SECRET,
        callback_allowed_hosts=("127.0.0.1",),  # the receiver is on loopback
    )
    async with Dispatcher(stack.pool, settings) as dispatcher:
        result = await dispatcher.run_pass()
    assert result.delivered == 2  # the payment's PAID and the refund's
    by_id = {headers["webhook-id"]: body for headers, body in receiver.received}
    [refund_entry] = await refund_callbacks(stack, payment)
    body = by_id[refund_entry.delivery_id]
    headers = next(h for h, b in receiver.received if b == body)
    Webhook(SIGNING_SECRET).verify(body, headers)  # raises when the signature is wrong
    document = json.loads(body)
    [refund] = await refunds_of(stack, payment)
    assert document["refund"]["id"] == refund.id
    assert document["refund"]["request_id"] == refund.request_id
    assert document["refund"]["status"] == int(R.SUCCEEDED)
    assert document["payment"]["id"] == payment.id
    assert document["payment"]["status"] == int(PaymentStatus.PAID)
    assert (document["payment"]["refunded_cents"], document["payment"].get("refundable_cents")) == (
        2500,
        None,  # 0 is left out of the JSON
    )
    assert len(set(by_id)) == 2  # each announcement its own webhook-id
