"""A payment's life after create: Stripe's events reach the service's webhook route
(the emulator signs and forwards them as the gateway does), the payment ends, and the
caller hears of it through a status callback (a receiver on loopback).

Covers: the event mapping on the real route (completed -> PAID, expired -> EXPIRED),
cancel's callback, the callback's headers and Standard Webhooks signature, a replayed
event changing nothing, refused callbacks (bad or missing signature, unknown hash or
provider) over HTTP and gRPC, and a callback retried until the caller answers 2xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
import trio
from standardwebhooks.webhooks import Webhook

from e2e.harness import (
    APP_API_KEY,
    CALLBACK_SIGNING_SECRET,
    GATEWAY_KEY,
    STRIPE_WEBHOOK_SECRET,
    CallbackReceiver,
    GrpcClient,
    Received,
    SandboxProcess,
    ServiceProcess,
    create_body,
    eventually,
    headers,
    rid,
)
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus

Spawn = Callable[..., ServiceProcess]
PROCESSED = "Provider callback processed"


async def create(http: httpx.AsyncClient, receiver: CallbackReceiver, **changes: Any) -> Any:
    path = f"/callbacks/{rid('cb')}"
    body = create_body(status_callback_url=receiver.url(path), **changes)
    response = await http.post("/payments", json=body, headers=headers())
    assert response.status_code == 201, response.text
    payment = response.json()["payment"]
    payment["_callback_path"] = path
    return payment


async def until_status(
    http: httpx.AsyncClient, payment_id: int, status: PaymentStatus
) -> dict[str, Any]:
    async def check() -> Any:
        response = await http.get(f"/payments/{payment_id}", headers=headers())
        current = response.json()["payment"]
        return current if current["status"] == status else None

    return await eventually(check)


async def until_callback(receiver: CallbackReceiver, path: str, count: int = 1) -> list[Received]:
    async def check() -> Any:
        received = receiver.requests_to(path)
        return received if len(received) >= count else None

    return await eventually(check)


def check_callback(callback: Received, payment: dict[str, Any]) -> None:
    """CONTRACT.md's status callback: POST {"payment": ...} with Content-Type, the
    payment's request id, our APP_API_KEY; signed (Standard Webhooks) since a signing
    secret is set."""
    assert callback.method == "POST"
    assert callback.headers["content-type"].startswith("application/json")
    assert callback.headers["x-request-id"] == payment["request_id"]
    assert callback.headers["x-api-key"] == APP_API_KEY
    Webhook(CALLBACK_SIGNING_SECRET).verify(callback.body, callback.headers)
    document = callback.json()
    assert list(document) == ["payment"]
    sent = document["payment"]
    for name in ("id", "request_id", "caller_service", "status", "provider_payment_id"):
        assert sent[name] == payment[name], name
    # Timestamps as HTTP and gRPC write them: RFC 3339 UTC to the second.
    assert sent["created_at"] == payment["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sent["updated_at"]), sent
    assert type(sent["id"]) is int and type(sent["amount_cents"]) is int


async def deliveries_of(sandbox: SandboxProcess, event_type: str, session_or_link: str) -> Any:
    events = [
        e
        for e in await sandbox.events()
        if e["type"] == event_type and e["data"]["object"]["id"] == session_or_link
    ]
    ids = {e["id"] for e in events}
    return [d for d in await sandbox.deliveries() if d["event_id"] in ids]


async def test_paid_at_stripe_reaches_the_caller(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await create(http, receiver)
    session_id = payment["provider_payment_id"]
    await sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    paid = await until_status(http, payment["id"], PaymentStatus.PAID)
    [callback] = await until_callback(receiver, payment["_callback_path"])
    check_callback(callback, paid)

    [delivery] = await deliveries_of(sandbox, "checkout.session.completed", session_id)
    assert delivery["status"] == 200
    assert delivery["url"].endswith(f"/webhooks/providers/stripe/{paid['provider_callback_hash']}")


async def test_expired_at_stripe_reaches_the_caller(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await create(http, receiver)
    await sandbox.control("POST", f"checkout/sessions/{payment['provider_payment_id']}/expire")
    expired = await until_status(http, payment["id"], PaymentStatus.EXPIRED)
    [callback] = await until_callback(receiver, payment["_callback_path"])
    check_callback(callback, expired)


async def test_recurring_paid_at_stripe(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await create(
        http, receiver, payment_type=2, recurring_interval="month", recurring_interval_count=1
    )
    session_id = payment["provider_payment_id"]
    await sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    paid = await until_status(http, payment["id"], PaymentStatus.PAID)
    [callback] = await until_callback(receiver, payment["_callback_path"])
    check_callback(callback, paid)
    subscription = (await sandbox.objects())["checkout_sessions"][session_id]["subscription"]
    assert subscription


async def test_cancel_reaches_the_caller_and_the_late_event_changes_nothing(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await create(http, receiver)
    response = await http.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert response.status_code == 200, response.text
    canceled = response.json()["payment"]
    [callback] = await until_callback(receiver, payment["_callback_path"])
    check_callback(callback, canceled)

    # expiring the session at Stripe emits checkout.session.expired: answered, recorded,
    # but a canceled payment stays canceled and the caller hears nothing more
    session_id = payment["provider_payment_id"]

    async def delivered() -> Any:
        found = await deliveries_of(sandbox, "checkout.session.expired", session_id)
        return found if any(d["status"] for d in found) else None

    [delivery] = await eventually(delivered)
    assert delivery["status"] == 200
    got = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert got.json()["payment"] == canceled
    await trio.sleep(0.3)
    assert len(receiver.requests_to(payment["_callback_path"])) == 1


async def test_replayed_event_changes_nothing(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await create(http, receiver)
    session_id = payment["provider_payment_id"]
    await sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    paid = await until_status(http, payment["id"], PaymentStatus.PAID)
    await until_callback(receiver, payment["_callback_path"])
    [delivery] = await deliveries_of(sandbox, "checkout.session.completed", session_id)

    await sandbox.control("POST", f"events/{delivery['event_id']}/resend")

    async def redelivered() -> Any:
        found = await deliveries_of(sandbox, "checkout.session.completed", session_id)
        return found if len(found) == 2 and found[1]["status"] else None

    second = (await eventually(redelivered))[1]
    assert second["status"] == 200
    got = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert got.json()["payment"] == paid
    await trio.sleep(0.3)
    assert len(receiver.requests_to(payment["_callback_path"])) == 1


# --- the callback route refusing ---------------------------------------------------------


def sign(body: bytes, secret: str = STRIPE_WEBHOOK_SECRET, at: int | None = None) -> str:
    stamp = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


@pytest.fixture
async def completed_event(
    http: httpx.AsyncClient, sandbox: SandboxProcess, receiver: CallbackReceiver
) -> tuple[dict[str, Any], bytes]:
    """A payment and the raw ``checkout.session.completed`` event of its session, which
    the emulator has not forwarded (no webhook configured in this test)."""
    payment = await create(http, receiver)
    session_id = payment["provider_payment_id"]
    await sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    [event] = [
        e
        for e in await sandbox.events()
        if e["type"] == "checkout.session.completed" and e["data"]["object"]["id"] == session_id
    ]
    return payment, json.dumps(event, indent=2).encode()


async def post_event(
    http: httpx.AsyncClient, callback_hash: str, body: bytes, signature: str | None
) -> httpx.Response:
    extra = {"Stripe-Signature": signature} if signature is not None else {}
    return await http.post(
        f"/webhooks/providers/stripe/{callback_hash}",
        content=body,
        headers={**headers(GATEWAY_KEY), "Content-Type": "application/json", **extra},
    )


async def test_callback_route_refusals_then_acceptance_over_http(
    http: httpx.AsyncClient, completed_event: tuple[dict[str, Any], bytes]
) -> None:
    payment, body = completed_event
    callback_hash = payment["provider_callback_hash"]

    forged = await post_event(http, callback_hash, body, sign(body, secret="whsec_wrong"))
    assert forged.status_code == 400, forged.text
    missing = await post_event(http, callback_hash, body, None)
    assert missing.status_code == 400, missing.text
    stale = await post_event(http, callback_hash, body, sign(body, at=int(time.time()) - 3600))
    assert stale.status_code == 400, stale.text
    unknown_hash = await post_event(http, "00000000-0000-4000-8000-000000000000", body, sign(body))
    assert unknown_hash.status_code == 404, unknown_hash.text
    other_provider = await http.post(
        f"/webhooks/providers/paypal/{callback_hash}",
        content=body,
        headers={**headers(GATEWAY_KEY), "Stripe-Signature": sign(body)},
    )
    assert other_provider.status_code == 404, other_provider.text
    got = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert got.json()["payment"]["status"] == PaymentStatus.PENDING

    accepted = await post_event(http, callback_hash, body, sign(body))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["message"] == PROCESSED
    assert accepted.json()["payment"]["status"] == PaymentStatus.PAID
    replayed = await post_event(http, callback_hash, body, sign(body))
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == accepted.json()


async def test_callback_route_envelope_over_http(
    http: httpx.AsyncClient, completed_event: tuple[dict[str, Any], bytes]
) -> None:
    """The gateway's forwarding envelope: {"payload": <raw event>, "signature": ...}."""
    payment, body = completed_event
    url = f"/webhooks/providers/stripe/{payment['provider_callback_hash']}"
    empty = await http.post(url, json={"payload": "", "signature": sign(body)}, headers=headers())
    assert empty.status_code == 400, empty.text
    envelope = {"payload": body.decode(), "signature": sign(body)}
    response = await http.post(url, json=envelope, headers=headers(GATEWAY_KEY))
    assert response.status_code == 200, response.text
    assert response.json()["payment"]["status"] == PaymentStatus.PAID


async def test_callback_over_grpc(
    grpc_client: GrpcClient, completed_event: tuple[dict[str, Any], bytes]
) -> None:
    payment, body = completed_event
    request = pb.HandleProviderCallbackRequest(
        request_id=rid("grpc-cb"),
        provider="stripe",
        callback_hash=payment["provider_callback_hash"],
        signature=sign(body, secret="whsec_wrong"),
        payload=body.decode(),
    )
    code, details, _ = await grpc_client.error("HandleProviderCallback", request, key=GATEWAY_KEY)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    request.signature = sign(body)
    request.callback_hash = "00000000-0000-4000-8000-000000000000"
    code, details, _ = await grpc_client.error("HandleProviderCallback", request, key=GATEWAY_KEY)
    assert code == grpc.StatusCode.NOT_FOUND, details
    request.callback_hash = payment["provider_callback_hash"]
    reply, _ = await grpc_client.call("HandleProviderCallback", request, key=GATEWAY_KEY)
    assert reply.message == PROCESSED
    assert reply.payment.id == payment["id"]
    assert reply.payment.status == PaymentStatus.PAID


# --- callbacks retried ------------------------------------------------------------------


async def test_status_callback_is_retried_until_2xx(
    spawn: Spawn, sandbox: SandboxProcess, receiver: CallbackReceiver
) -> None:
    """The caller answers 500, then 503, then 200: three attempts with one stable
    webhook-id, the last one delivered. (A process of its own with short intervals.)"""
    process = await trio.to_thread.run_sync(
        spawn,
        {
            "PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES": "0.003",
            "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": "0.003",
        },
    )
    async with httpx.AsyncClient(base_url=process.http_url, timeout=15) as http:
        payment = await create(http, receiver)
        path = payment["_callback_path"]
        receiver.answer(path, 500, 503)
        response = await http.post(f"/payments/{payment['id']}/cancel", headers=headers())
        assert response.status_code == 200, response.text
        attempts = await until_callback(receiver, path, count=3)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    for attempt in attempts:
        check_callback(attempt, response.json()["payment"])
    await trio.sleep(1)
    assert len(receiver.requests_to(path)) == 3, "delivered callback sent again"
    code = await trio.to_thread.run_sync(process.terminate)
    assert code == 0, process.log_text()[-3000:]
