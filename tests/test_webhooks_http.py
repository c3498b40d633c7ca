"""Provider callbacks over HTTP, end to end: the emulator emits an event, signs it as
Stripe does and posts it (as the gateway forwards it) to the service on loopback; the
service checks it against the real database. Nothing is mocked.

``POST /webhooks/providers/{provider}/{hash}``: both body forms, the event mapping, the
refusals (each recorded), replays, out-of-order events, and one transaction per change.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio

from payments.api.wire import provider_callback_from_http
from payments.config import MysqlDsn
from payments.errors import InvalidArgument
from payments.inbound import ProviderEvents
from payments.model import (
    Caller,
    EventKind,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.sandbox.state import API_VERSION
from payments.sandbox.webhooks import event_body
from payments.storage.pool import Pool
from payments.storage.provider_callbacks import CallbackOutcome
from payments.unit_of_work import UnitOfWork
from tests.fixtures.app import GATEWAY_KEY, TEST_MAX_BODY_BYTES, Stack, closed_port
from tests.fixtures.sandbox import sign

pytestmark = pytest.mark.timeout(60)

S = PaymentStatus
PROCESSED = "Provider callback processed"


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
        yield client


def gateway_headers(request_id: str = "gw-1", key: str | None = GATEWAY_KEY) -> dict[str, str]:
    headers = {"X-Request-ID": request_id, "Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    return headers


def session_event(
    stack: Stack, payment: Payment, type_: str = "checkout.session.completed", **changes: Any
) -> dict[str, Any]:
    """A Stripe event about the payment's session as it stands at the emulator."""
    session = copy.deepcopy(stack.sandbox.state.sessions[payment.provider_payment_id])
    session.update(changes)
    return {
        "id": f"evt_test_{uuid.uuid4().hex}",
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()),
        "data": {"object": session},
        "livemode": False,
        "type": type_,
    }


async def post_raw(
    http: httpx.AsyncClient,
    callback_hash: str,
    body: str,
    *,
    timestamp: int | None = None,
    header: str = "Stripe-Signature",
    signature: str | None = None,
    provider: str = "stripe",
    key: str | None = GATEWAY_KEY,
) -> httpx.Response:
    """POST a raw event, signed now (or at ``timestamp``) unless ``signature`` is given."""
    if signature is None:
        signature = sign(body, int(time.time()) if timestamp is None else timestamp)
    headers = gateway_headers(key=key)
    if signature:
        headers[header] = signature
    return await http.post(
        f"/webhooks/providers/{provider}/{callback_hash}", content=body, headers=headers
    )


async def delivered(stack: Stack, payment: Payment) -> Payment:
    await stack.events_delivered()
    return await stack.payment(payment.id)


def outcomes(history: Any) -> list[str]:
    return [str(c.outcome) for c in history.callbacks]


# --- the happy path ---------------------------------------------------------------------


async def test_a_completed_checkout_pays_the_payment_in_one_transaction(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    created = await http.post(
        "/payments",
        json={
            "request_id": "order-77",
            "caller_service": "svc-a",
            "resource_type": "order",
            "resource_id": "77",
            "amount_cents": 4200,
            "currency": "eur",
            "payment_method": 1,
            "payment_type": 1,
            "status_callback_url": "https://svc-a.internal/cb",
        },
        headers={"X-Request-ID": "create-77", "X-API-Key": stack.key_a},
    )
    assert created.status_code == 201, created.text
    payment = await stack.payment(created.json()["payment"]["id"])
    assert payment.status == S.PENDING

    stack.sandbox.state.complete_session(payment.provider_payment_id)
    paid = await delivered(stack, payment)

    assert paid.status == S.PAID
    [event] = stack.sandbox.state.events_of("checkout.session.completed")
    [delivery] = stack.sandbox.state.deliveries_of(event["id"])
    assert delivery.status == 200
    assert delivery.url == f"{stack.webhook_url}/{payment.provider_callback_hash}"
    history = await stack.history(payment.id)
    change = history.events[-1]
    assert (change.kind, change.from_status, change.to_status) == (
        EventKind.STATUS_CHANGED,
        S.PENDING,
        S.PAID,
    )
    assert change.provider_event_id == event["id"]
    assert change.provider_event_type == "checkout.session.completed"
    [entry] = history.outbox
    assert entry.status == S.PAID and entry.url == "https://svc-a.internal/cb"
    assert json.loads(entry.payload)["payment"]["status"] == int(S.PAID)
    # The callback carries the wire timestamps: to the second, as HTTP and gRPC do.
    stamps = {
        name: json.loads(entry.payload)["payment"][name] for name in ("created_at", "updated_at")
    }
    assert stamps == {
        "created_at": paid.created_at.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "updated_at": paid.updated_at.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }
    # Written by one change: the same instant everywhere.
    assert change.created_at == paid.updated_at == entry.created_at
    [record] = history.callbacks
    assert record.outcome == CallbackOutcome.PROCESSED
    assert record.event_id == event["id"] and record.reason == "PENDING -> PAID"
    assert record.request_id == delivery.request_id  # the gateway's X-Request-ID
    assert record.payload == event_body(event)
    assert [p.id for p in stack.terminal] == [payment.id]
    assert stack.terminal[0].status == S.PAID


async def test_the_status_change_and_its_rows_commit_together_or_not_at_all(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """When one write of the change fails, nothing of it stays; Stripe's retry applies it."""
    payment = await stack.create_payment()
    trigger = f"fail_processed_{uuid.uuid4().hex[:8]}"
    async with stack.pool.connection() as conn:
        await conn.execute(
            f"CREATE TRIGGER {trigger} BEFORE INSERT ON provider_callbacks FOR EACH ROW"
            " BEGIN IF NEW.outcome = 'processed' THEN"
            " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected'; END IF; END"
        )
    try:
        body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
        response = await post_raw(http, payment.provider_callback_hash, body)
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}
        assert (await stack.payment(payment.id)).status == S.PENDING
        history = await stack.history(payment.id)
        assert [e.kind for e in history.events] == [EventKind.CREATED, EventKind.PROVIDER_CREATED]
        assert history.outbox == [] and history.callbacks == []
        assert stack.terminal == []
    finally:
        async with stack.pool.connection() as conn:
            await conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    again = await post_raw(http, payment.provider_callback_hash, body)
    assert again.status_code == 200
    assert (await stack.payment(payment.id)).status == S.PAID
    assert len((await stack.history(payment.id)).outbox) == 1


async def test_the_answer_carries_the_message_and_the_payment(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    response = await post_raw(http, payment.provider_callback_hash, body)
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "gw-1"
    document = response.json()
    assert document["message"] == PROCESSED
    assert document["payment"]["id"] == payment.id
    assert document["payment"]["status"] == int(S.PAID)


# --- replays and concurrency ------------------------------------------------------------


async def test_a_replayed_event_is_acknowledged_and_changes_nothing(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    paid = await delivered(stack, payment)
    [event] = stack.sandbox.state.events_of("checkout.session.completed")

    stack.sandbox.webhooks.resend(event["id"])  # Stripe's "resend": same id and body
    assert await delivered(stack, payment) == paid
    assert [d.status for d in stack.sandbox.state.deliveries_of(event["id"])] == [200, 200]

    response = await post_raw(http, payment.provider_callback_hash, event_body(event))
    assert response.status_code == 200
    assert response.json()["message"] == PROCESSED
    assert response.json()["payment"]["status"] == int(S.PAID)

    history = await stack.history(payment.id)
    assert outcomes(history) == ["processed", "duplicate", "duplicate"]
    assert history.callbacks[1].reason == "event already recorded"
    assert [e.provider_event_id for e in history.events].count(event["id"]) == 1
    assert len(history.outbox) == 1
    assert len(stack.terminal) == 1
    assert await stack.payment(payment.id) == paid


async def test_the_same_event_delivered_twice_at_once_changes_the_payment_once(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    answers: list[httpx.Response] = []

    async def deliver() -> None:
        answers.append(await post_raw(http, payment.provider_callback_hash, body))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(deliver)

    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["payment"]["status"] for a in answers} == {int(S.PAID)}
    history = await stack.history(payment.id)
    assert sorted(outcomes(history)) == ["duplicate"] * 3 + ["processed"]
    assert [e.kind for e in history.events].count(EventKind.STATUS_CHANGED) == 1
    assert len(history.outbox) == 1
    assert len(stack.terminal) == 1


# --- refusals ---------------------------------------------------------------------------


async def test_a_tampered_body_is_refused_and_recorded(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    event = session_event(stack, payment, payment_status="paid", status="complete")
    body = event_body(event)
    signature = sign(body, int(time.time()))
    tampered = body.replace('"amount_total": 2500', '"amount_total": 1')
    assert tampered != body
    response = await post_raw(http, payment.provider_callback_hash, tampered, signature=signature)
    assert response.status_code == 400
    assert response.json() == {"error": "signature: does not match the payload"}
    assert (await stack.payment(payment.id)).status == S.PENDING
    [record] = (await stack.history(payment.id)).callbacks
    assert record.outcome == CallbackOutcome.REJECTED
    assert record.reason == "signature: does not match the payload"
    assert record.event_id == event["id"]  # as claimed: kept to help whoever reads it
    assert record.payload == tampered
    assert signature not in record.payload


@pytest.mark.parametrize(("offset", "state"), [(-330, "stale"), (+330, "future")])
async def test_a_timestamp_outside_the_tolerance_is_refused(
    stack: Stack, http: httpx.AsyncClient, offset: int, state: str
) -> None:
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    response = await post_raw(
        http, payment.provider_callback_hash, body, timestamp=int(time.time()) + offset
    )
    assert response.status_code == 400, state
    assert response.json() == {"error": "signature: timestamp is outside the tolerance"}
    assert (await stack.payment(payment.id)).status == S.PENDING
    assert outcomes(await stack.history(payment.id)) == ["rejected"]


async def test_stale_signatures_from_the_emulator_are_refused(stack: Stack) -> None:
    """The emulator signs with its own clock: ten minutes behind, its events are stale."""
    payment = await stack.create_payment()
    stack.sandbox.state.clock = lambda: time.time() - 600
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    await stack.events_delivered()
    deliveries = stack.sandbox.state.deliveries
    assert [d.status for d in deliveries] == [400, 400, 400]  # retried, as Stripe does
    assert (await stack.payment(payment.id)).status == S.PENDING
    assert outcomes(await stack.history(payment.id)) == ["rejected"] * 3


@pytest.mark.parametrize(
    ("body", "signature", "error"),
    [
        ("EVENT", "", "signature: is required"),
        ("", "t=1,v1=00", "payload: is required"),
        ('{"payload": "EVENT"}', "", "signature: is required"),
        ('{"payload": "", "signature": "t=1,v1=00"}', "", "payload: is required"),
        ('{"payload": 5, "signature": "t=1,v1=00"}', "", "payload: must be a string"),
        ("EVENT", "v1=abc", "signature: is malformed: expected t=<timestamp>,v1=<signature>"),
    ],
)
async def test_missing_signature_or_payload_is_a_400(
    stack: Stack, http: httpx.AsyncClient, body: str, signature: str, error: str
) -> None:
    payment = await stack.create_payment()
    event = event_body(session_event(stack, payment))
    response = await post_raw(
        http, payment.provider_callback_hash, body.replace("EVENT", event), signature=signature
    )
    assert response.status_code == 400
    assert response.json() == {"error": error}


async def test_a_signed_body_that_is_not_an_event_is_a_400(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    for body, error in (
        ("not json", "payload: is not valid JSON"),
        ('{"object": "event", "id": "evt_1"}', "payload: is not a Stripe event"),
        ("[1, 2]", "payload: is not a Stripe event"),
    ):
        response = await post_raw(http, payment.provider_callback_hash, body)
        assert response.status_code == 400
        assert response.json()["error"].startswith(error)
    assert outcomes(await stack.history(payment.id)) == ["rejected"] * 3


async def test_an_unknown_hash_is_a_404_and_recorded(stack: Stack, http: httpx.AsyncClient) -> None:
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    unknown = str(uuid.uuid4())
    response = await post_raw(http, unknown, body)
    assert response.status_code == 404
    assert response.json() == {"error": "payment not found"}
    assert (await stack.payment(payment.id)).status == S.PENDING
    async with stack.pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT outcome, reason, payment_id, request_id FROM provider_callbacks"
            " WHERE callback_hash = %s",
            (unknown,),
        )
    assert rows == [("rejected", "unknown callback hash", None, "gw-1")]


async def test_an_unknown_provider_is_a_404(stack: Stack, http: httpx.AsyncClient) -> None:
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment))
    response = await post_raw(http, payment.provider_callback_hash, body, provider="paypal")
    assert response.status_code == 404
    assert response.json() == {"error": "unknown provider"}
    [record] = (await stack.history(payment.id)).callbacks
    assert (record.provider, record.outcome) == ("paypal", CallbackOutcome.REJECTED)


async def test_an_event_about_another_payment_is_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """Sent to payment B's URL, an event about payment A changes neither (400)."""
    a = await stack.create_payment()
    b = await stack.create_payment()
    body = event_body(session_event(stack, a, payment_status="paid", status="complete"))
    response = await post_raw(http, b.provider_callback_hash, body)
    assert response.status_code == 400
    assert response.json() == {"error": "payload: event is not about this payment"}
    assert (await stack.payment(a.id)).status == S.PENDING
    assert (await stack.payment(b.id)).status == S.PENDING
    [record] = (await stack.history(b.id)).callbacks
    assert record.reason == "metadata.callback_hash names another payment"
    # Without our metadata, the object ids decide.
    event = session_event(stack, a, payment_status="paid", status="complete", metadata={})
    response = await post_raw(http, b.provider_callback_hash, event_body(event))
    assert response.status_code == 400
    reasons = [c.reason for c in (await stack.history(b.id)).callbacks]
    assert reasons[-1] == "the event's objects are not this payment's"
    assert (await stack.history(a.id)).callbacks == []


async def test_an_event_without_our_metadata_is_matched_by_its_session(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    event = session_event(stack, payment, payment_status="paid", status="complete", metadata={})
    response = await post_raw(http, payment.provider_callback_hash, event_body(event))
    assert response.status_code == 200
    assert (await stack.payment(payment.id)).status == S.PAID


async def test_the_route_needs_the_gateway_headers(stack: Stack, http: httpx.AsyncClient) -> None:
    """CONTRACT.md's headers hold on this route too: the gateway adds them."""
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    no_key = await post_raw(http, payment.provider_callback_hash, body, key=None)
    assert no_key.status_code == 401
    no_rid = await http.post(
        f"/webhooks/providers/stripe/{payment.provider_callback_hash}",
        content=body,
        headers={"X-API-Key": GATEWAY_KEY, "Stripe-Signature": sign(body, int(time.time()))},
    )
    assert no_rid.status_code == 400
    assert no_rid.json() == {"error": "X-Request-ID: header is required"}
    assert (await stack.payment(payment.id)).status == S.PENDING


async def test_a_body_over_the_limit_is_a_400(stack: Stack, http: httpx.AsyncClient) -> None:
    payment = await stack.create_payment()
    body = json.dumps({"payload": "x" * (TEST_MAX_BODY_BYTES + 1), "signature": "t=1,v1=0"})
    response = await post_raw(http, payment.provider_callback_hash, body, signature="")
    assert response.status_code == 400


# --- body forms -------------------------------------------------------------------------


async def test_the_gateway_envelope_form(stack: Stack) -> None:
    stack.sandbox.state.webhook = None
    stack.sandbox.configure_webhook(
        stack.webhook_url, stack.settings.stripe_webhook_secret, api_key=GATEWAY_KEY, envelope=True
    )
    payment = await stack.create_payment()
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.PAID
    [delivery] = stack.sandbox.state.deliveries
    assert delivery.envelope and delivery.status == 200


async def test_the_x_provider_signature_header(stack: Stack) -> None:
    stack.sandbox.configure_webhook(
        stack.webhook_url,
        stack.settings.stripe_webhook_secret,
        api_key=GATEWAY_KEY,
        signature_header="X-Provider-Signature",
    )
    payment = await stack.create_payment()
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.PAID


# --- the event mapping ------------------------------------------------------------------


async def test_a_delayed_payment_goes_processing_then_paid(stack: Stack) -> None:
    payment = await stack.create_payment()
    state = stack.sandbox.state
    state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    assert (await delivered(stack, payment)).status == S.PROCESSING
    assert stack.terminal == []
    state.succeed_async_payment(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.PAID
    history = await stack.history(payment.id)
    assert [(e.from_status, e.to_status) for e in history.events[-2:]] == [
        (S.PENDING, S.PROCESSING),
        (S.PROCESSING, S.PAID),
    ]
    assert [e.status for e in history.outbox] == [S.PAID]
    assert [p.status for p in stack.terminal] == [S.PAID]


async def test_a_failed_delayed_payment_fails(stack: Stack) -> None:
    payment = await stack.create_payment()
    stack.sandbox.state.fail_session(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.FAILED
    assert [e.status for e in (await stack.history(payment.id)).outbox] == [S.FAILED]


async def test_an_expired_session_expires_the_payment(stack: Stack) -> None:
    payment = await stack.create_payment()
    stack.sandbox.state.expire_session(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.EXPIRED
    assert [p.status for p in stack.terminal] == [S.EXPIRED]


async def test_late_events_are_recorded_and_never_regress_a_status(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment()
    state = stack.sandbox.state
    endpoint, state.webhook = state.webhook, None  # hold the deliveries back
    state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    state.succeed_async_payment(payment.provider_payment_id)
    completed, succeeded = state.events
    state.webhook = endpoint
    stack.sandbox.webhooks.resend(succeeded["id"])  # the later event arrives first
    assert (await delivered(stack, payment)).status == S.PAID
    stack.sandbox.webhooks.resend(completed["id"])  # -> PROCESSING: refused, recorded
    assert (await delivered(stack, payment)).status == S.PAID
    expired = session_event(stack, payment, "checkout.session.expired", status="expired")
    response = await post_raw(http, payment.provider_callback_hash, event_body(expired))
    assert response.status_code == 200
    assert response.json()["payment"]["status"] == int(S.PAID)

    history = await stack.history(payment.id)
    assert [c.reason for c in history.callbacks] == [
        "PENDING -> PAID",
        "recorded, not applied: PAID -> PROCESSING is not allowed",
        "recorded, not applied: PAID -> EXPIRED is not allowed",
    ]
    late = [e for e in history.events if e.kind == EventKind.PROVIDER_EVENT]
    assert [e.provider_event_id for e in late] == [completed["id"], expired["id"]]
    assert all(e.from_status == e.to_status == S.PAID for e in late)
    assert len(history.outbox) == 1 and len(stack.terminal) == 1


async def test_a_paid_payment_link(stack: Stack) -> None:
    payment = await stack.create_payment(payment_method=int(PaymentMethod.PAYMENT_LINK))
    assert payment.provider_payment_id.startswith("plink_")
    stack.sandbox.state.pay_payment_link(payment.provider_payment_id)
    assert (await delivered(stack, payment)).status == S.PAID


async def test_an_abandoned_payment_link_session_does_not_expire_the_payment(
    stack: Stack,
) -> None:
    payment = await stack.create_payment(payment_method=int(PaymentMethod.PAYMENT_LINK))
    state = stack.sandbox.state
    session = state.open_payment_link(payment.provider_payment_id)
    state.expire_session(session["id"])
    assert (await delivered(stack, payment)).status == S.PENDING
    [record] = (await stack.history(payment.id)).callbacks
    assert record.reason == "recorded: the event type moves no status"
    state.pay_payment_link(payment.provider_payment_id)  # the next visitor pays
    assert (await delivered(stack, payment)).status == S.PAID


async def _subscription_in_flight(stack: Stack, **changes: Any) -> tuple[Payment, str]:
    """A recurring payment whose first invoice is not paid yet (PROCESSING)."""
    payment = await stack.create_payment(payment_type=PaymentType.RECURRING, **changes)
    state = stack.sandbox.state
    if payment.payment_method == PaymentMethod.PAYMENT_LINK:
        session = state.pay_payment_link(payment.provider_payment_id, payment_status="unpaid")
    else:
        session = state.complete_session(payment.provider_payment_id, payment_status="unpaid")
    processing = await delivered(stack, payment)
    assert processing.status == S.PROCESSING
    assert processing.provider_subscription_id == session["subscription"]  # revealed, kept
    return processing, session["subscription"]


async def test_a_subscription_invoice_paid(stack: Stack) -> None:
    payment, subscription_id = await _subscription_in_flight(stack)
    invoice = stack.sandbox.state.pay_invoice(subscription_id)
    paid = await delivered(stack, payment)
    assert paid.status == S.PAID
    assert paid.provider_subscription_id == subscription_id
    last = (await stack.history(payment.id)).events[-1]
    assert last.provider_event_type == "invoice.paid"
    assert invoice["parent"]["subscription_details"]["subscription"] == subscription_id


async def test_a_subscription_invoice_failed(stack: Stack) -> None:
    payment, subscription_id = await _subscription_in_flight(stack)
    stack.sandbox.state.fail_invoice(subscription_id)
    assert (await delivered(stack, payment)).status == S.FAILED


async def test_a_deleted_subscription_cancels_the_payment(stack: Stack) -> None:
    payment, subscription_id = await _subscription_in_flight(
        stack, payment_method=int(PaymentMethod.PAYMENT_LINK)
    )
    stack.sandbox.state.cancel_subscription(subscription_id)
    canceled = await delivered(stack, payment)
    assert canceled.status == S.CANCELED
    assert [p.status for p in stack.terminal] == [S.CANCELED]


async def test_a_subscription_checkout_paid_at_once_keeps_its_subscription(stack: Stack) -> None:
    payment = await stack.create_payment(payment_type=PaymentType.RECURRING)
    session = stack.sandbox.state.complete_session(payment.provider_payment_id)
    paid = await delivered(stack, payment)
    assert paid.status == S.PAID
    assert paid.provider_subscription_id == session["subscription"]
    # The events around the first invoice came too (the sandbox sends Stripe's set):
    # recorded; only one of them moved the payment, and the caller heard once.
    history = await stack.history(payment.id)
    assert sorted(c.event_type for c in history.callbacks) == [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]
    assert [e.status for e in history.outbox] == [S.PAID]


async def test_money_for_a_canceled_payment_is_recorded_and_flagged(
    stack: Stack, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    payment = await stack.create_payment()
    event = session_event(stack, payment, payment_status="paid", status="complete")
    await stack.service.cancel(Caller("svc-a"), payment.id)
    await stack.events_delivered()  # the expiry that the cancel caused at Stripe
    response = await post_raw(http, payment.provider_callback_hash, event_body(event))
    assert response.status_code == 200
    assert response.json()["payment"]["status"] == int(S.CANCELED)
    history = await stack.history(payment.id)
    assert [(c.event_type, c.reason) for c in history.callbacks] == [
        ("checkout.session.expired", "recorded, not applied: CANCELED -> EXPIRED is not allowed"),
        ("checkout.session.completed", "recorded, not applied: CANCELED -> PAID is not allowed"),
    ]
    assert [e.status for e in history.outbox] == [S.CANCELED]
    assert any(
        r.levelname == "WARNING" and "payment received for a payment that is CANCELED" in r.message
        for r in caplog.records
    )


async def test_database_down_is_503_and_a_bad_signature_still_400(
    stack: Stack, test_db_dsn: MysqlDsn, stripe_provider: StripeProvider
) -> None:
    """Stripe retries a 503 (nothing is lost); a forged event stays refused."""
    dead = Pool(attrs.evolve(test_db_dsn, port=closed_port()), 2, 1, 0, connect_timeout=1)
    inbound = ProviderEvents(
        UnitOfWork(dead), ProviderRegistry({ProviderType.STRIPE: stripe_provider})
    )
    server = await stack.start_http(inbound=inbound)
    payment = await stack.create_payment()
    body = event_body(session_event(stack, payment, payment_status="paid", status="complete"))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        down = await post_raw(client, payment.provider_callback_hash, body)
        assert (down.status_code, down.json()) == (503, {"error": "database unavailable"})
        forged = await post_raw(client, payment.provider_callback_hash, body, signature="t=1,v1=0")
        assert forged.status_code == 400
    await dead.aclose()
    assert (await stack.payment(payment.id)).status == S.PENDING


async def test_rival_events_at_once_end_a_payment_once(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """Paid and expired racing: the row lock lets one win; the other is recorded."""
    payments = [await stack.create_payment() for _ in range(4)]
    bodies = {
        p.id: [
            event_body(session_event(stack, p, payment_status="paid", status="complete")),
            event_body(session_event(stack, p, "checkout.session.expired", status="expired")),
        ]
        for p in payments
    }
    async with trio.open_nursery() as nursery:
        for payment in payments:
            for body in bodies[payment.id]:
                nursery.start_soon(post_raw, http, payment.provider_callback_hash, body)
    for payment in payments:
        stored = await stack.payment(payment.id)
        history = await stack.history(payment.id)
        changes = [e for e in history.events if e.kind == EventKind.STATUS_CHANGED]
        assert [(e.from_status, e.to_status) for e in changes] == [(S.PENDING, stored.status)]
        assert [e.status for e in history.outbox] == [stored.status]
        assert outcomes(history) == ["processed", "processed"]
    assert sorted(p.id for p in stack.terminal) == sorted(p.id for p in payments)


def test_the_body_forms_are_told_apart() -> None:
    event = '{"object": "event", "id": "evt_1", "payload": "x"}'
    raw = provider_callback_from_http(event.encode(), {"X-Provider-Signature": "t=1,v1=a"})
    assert (raw.payload, raw.signature) == (event.encode(), "t=1,v1=a")
    blank_first = provider_callback_from_http(
        b"{}", {"Stripe-Signature": "  ", "X-Provider-Signature": "t=2,v1=b"}
    )
    assert blank_first.signature == "t=2,v1=b"
    envelope = json.dumps({"payload": event, "signature": "t=3,v1=c"}).encode()
    wrapped = provider_callback_from_http(envelope, {"Stripe-Signature": "t=9,v1=z"})
    assert (wrapped.payload, wrapped.signature) == (event.encode(), "t=3,v1=c")
    header_only = provider_callback_from_http(
        json.dumps({"payload": event}).encode(), {"Stripe-Signature": "t=4,v1=d"}
    )
    assert header_only.signature == "t=4,v1=d"
    with pytest.raises(InvalidArgument, match="payload: is not UTF-8 text"):
        provider_callback_from_http(b'{"payload": "\\ud800", "signature": "s"}', {})


async def test_the_customer_returning_from_checkout_gets_a_plain_page(stack: Stack) -> None:
    """The default success/cancel URL is the provider callback URL: a browser lands
    there with GET and no service headers, and must see a page, not a 405 or 400."""
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        done = await client.get("/webhooks/providers/stripe/some-hash?state=success")
        canceled = await client.get("/webhooks/providers/stripe/some-hash?state=cancel")
    assert done.status_code == 200 and "text/html" in done.headers["content-type"]
    assert "being processed" in done.text and "some-hash" not in done.text
    assert canceled.status_code == 200 and "not completed" in canceled.text
