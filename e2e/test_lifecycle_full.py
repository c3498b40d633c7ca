"""A payment's whole life in real processes, from create to the caller's callback.

Each scenario runs its own ``payments serve`` on a database and emulator of its own
(the ``isolated`` fixture: its workers get settings no other test could live with), and
a receiver on loopback plays the calling service:

* paid: created over HTTP (and one over gRPC), the emulator completes the checkout
  and posts the signed ``checkout.session.completed`` event to the service, which
  marks it PAID; the receiver gets exactly one callback, signed the Standard Webhooks
  way (checked with the ``standardwebhooks`` library), with our X-API-Key and the
  payment's request id, within milliseconds of the event: the dispatcher's sweep is set
  to 10 minutes, so only the wake-up through its channel can bring it that fast;
* a missed event: the checkout completes while the emulator delivers no webhooks; the
  reconciler (tiny stale window and interval) asks Stripe, marks it PAID, and the
  caller hears;
* expiry: nobody pays; the expirer (tiny timeout) expires the session at Stripe, marks
  the payment EXPIRED, and the caller hears once (the emulator's own
  ``checkout.session.expired`` event, forwarded too, changes nothing more).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio
from standardwebhooks.webhooks import Webhook

from e2e.harness import (
    APP_API_KEY,
    CALLBACK_SIGNING_SECRET,
    CallbackReceiver,
    GrpcClient,
    Isolated,
    Received,
    ServiceProcess,
    create_body,
    create_message,
    eventually,
    forward_events,
    headers,
    payment_fields,
    rid,
)
from payments.model import PaymentStatus

# The dispatcher's sweep: far beyond the test, so a prompt callback proves the wake-up.
SWEEP_MINUTES = "10"
SWEEP_SECONDS = float(SWEEP_MINUTES) * 60
# What "at once" must beat by far: the sweep is 600 s.
PROMPT_SECONDS = 5.0
# How long to keep listening for a second (duplicate) callback.
QUIET_SECONDS = 1.0


async def create_http(http: httpx.AsyncClient, receiver: CallbackReceiver) -> dict[str, Any]:
    request_id = rid("life")
    body = create_body(request_id=request_id, status_callback_url=receiver.url(f"/cb/{request_id}"))
    response = await http.post("/payments", json=body, headers=headers())
    assert response.status_code == 201, response.text
    payment = response.json()["payment"]
    assert payment["status"] == PaymentStatus.PENDING
    return payment


async def get_payment(http: httpx.AsyncClient, payment_id: int) -> dict[str, Any]:
    response = await http.get(f"/payments/{payment_id}", headers=headers())
    assert response.status_code == 200, response.text
    return response.json()["payment"]


async def until_status(
    http: httpx.AsyncClient, payment_id: int, status: PaymentStatus, within: float = 10
) -> dict[str, Any]:
    async def check() -> Any:
        payment = await get_payment(http, payment_id)
        return payment if payment["status"] == status else None

    return await eventually(check, within)


async def only_callback(receiver: CallbackReceiver, request_id: str) -> Received:
    """The one callback for this payment: waits for it, then listens a while longer
    to make sure no second one follows."""
    path = f"/cb/{request_id}"

    async def arrived() -> list[Received]:
        return receiver.requests_to(path)

    await eventually(arrived, within=10)
    await trio.sleep(QUIET_SECONDS)
    received = receiver.requests_to(path)
    assert len(received) == 1, [r.headers.get("webhook-id") for r in received]
    return received[0]


def check_signed_callback(callback: Received, payment: dict[str, Any]) -> None:
    """CONTRACT.md's status callback, signed as Standard Webhooks: the library's own
    verifier accepts it (raises otherwise), and the body is {"payment": <as GET shows
    it now>}."""
    assert callback.method == "POST"
    assert callback.headers["content-type"].startswith("application/json")
    assert callback.headers["x-api-key"] == APP_API_KEY
    assert callback.headers["x-request-id"] == payment["request_id"]
    Webhook(CALLBACK_SIGNING_SECRET).verify(callback.body, callback.headers)
    # a tampered body fails the same verifier (so the check above means something)
    tampered = callback.body.replace(b'"status"', b'"status" ', 1)
    try:
        Webhook(CALLBACK_SIGNING_SECRET).verify(tampered, callback.headers)
    except Exception:
        pass
    else:
        raise AssertionError("a tampered callback body verified")
    document = callback.json()
    assert list(document) == ["payment"]
    assert document["payment"] == payment


async def outbox_of(isolated_db: Any, payment_id: int) -> list[tuple[Any, ...]]:
    return await isolated_db.rows(
        "SELECT status, state, attempts, delivery_id FROM callback_outbox WHERE payment_id = %s",
        payment_id,
    )


async def status_changes(isolated_db: Any, payment_id: int) -> list[tuple[Any, ...]]:
    return await isolated_db.rows(
        "SELECT from_status, to_status, reason FROM payment_events"
        " WHERE payment_id = %s AND kind = 'status_changed' ORDER BY id",
        payment_id,
    )


async def event_of(isolated: Isolated, event_type: str, session_id: str) -> dict[str, Any]:
    [event] = [
        e
        for e in await isolated.sandbox.events()
        if e["type"] == event_type and e["data"]["object"]["id"] == session_id
    ]
    return event


async def deliveries_of(isolated: Isolated, event_id: str) -> list[dict[str, Any]]:
    return [d for d in await isolated.sandbox.deliveries() if d["event_id"] == event_id]


async def paid_through_the_event(
    isolated: Isolated,
    service: ServiceProcess,
    http: httpx.AsyncClient,
    receiver: CallbackReceiver,
    isolated_db: Any,
    payment: dict[str, Any],
) -> float:
    """Complete the payment's checkout in the emulator; check PAID, the one signed
    callback and its outbox row; the seconds from the event's delivery to the callback."""
    session_id = payment["provider_payment_id"]
    assert session_id.startswith("cs_")
    await isolated.sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    callback = await only_callback(receiver, payment["request_id"])
    paid = await get_payment(http, payment["id"])
    assert paid["status"] == PaymentStatus.PAID
    check_signed_callback(callback, paid)
    assert callback.json()["payment"]["status"] == 10

    event = await event_of(isolated, "checkout.session.completed", session_id)
    [delivery] = await deliveries_of(isolated, event["id"])
    assert delivery["status"] == 200, delivery
    assert delivery["url"] == (
        f"{service.http_url}/webhooks/providers/stripe/{paid['provider_callback_hash']}"
    )
    [(status, state, attempts, delivery_id)] = await outbox_of(isolated_db, payment["id"])
    assert (status, state, attempts) == (PaymentStatus.PAID, "delivered", 1)
    assert callback.headers["webhook-id"] == delivery_id
    assert await status_changes(isolated_db, payment["id"]) == [
        (PaymentStatus.PENDING, PaymentStatus.PAID, "provider event checkout.session.completed")
    ]
    return callback.at - delivery["at"]


async def test_paid_at_stripe_reaches_the_caller_at_once(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    service = await isolated.aspawn({"PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": SWEEP_MINUTES})
    await forward_events(isolated.sandbox, service)
    grpc_client = GrpcClient(service.grpc_target)
    try:
        async with httpx.AsyncClient(base_url=service.http_url, timeout=15) as http:
            # over HTTP
            payment = await create_http(http, own_receiver)
            latency = await paid_through_the_event(
                isolated, service, http, own_receiver, isolated_db, payment
            )
            print(f"\nevent -> callback (HTTP-created payment): {latency * 1000:.1f} ms")
            assert latency < PROMPT_SECONDS, f"{latency:.2f}s: waited for a sweep?"

            # over gRPC
            request_id = rid("life-grpc")
            message = create_message(
                request_id=request_id, status_callback_url=own_receiver.url(f"/cb/{request_id}")
            )
            response, _ = await grpc_client.call("CreatePayment", message)
            created = payment_fields(response.payment)
            assert created["status"] == PaymentStatus.PENDING
            assert created == await get_payment(http, created["id"])
            latency = await paid_through_the_event(
                isolated, service, http, own_receiver, isolated_db, created
            )
            print(f"event -> callback (gRPC-created payment): {latency * 1000:.1f} ms")
            assert latency < PROMPT_SECONDS, f"{latency:.2f}s: waited for a sweep?"
    finally:
        grpc_client.close()
    assert len(own_receiver.received) == 2
    code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.log_text()[-3000:]


async def test_missed_event_is_healed_by_the_reconciler(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    service = await isolated.aspawn(
        {
            "PAYMENTS_RECONCILE_STALE_AFTER_MINUTES": "0.01",
            "PAYMENTS_RECONCILE_INTERVAL_MINUTES": "0.01",
            "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": SWEEP_MINUTES,
        }
    )
    async with httpx.AsyncClient(base_url=service.http_url, timeout=15) as http:
        payment = await create_http(http, own_receiver)

        # The reconciler looks at the open checkout (stale after 0.6 s, a pass every
        # 0.6 s) and leaves it alone: Stripe says it is still open.
        def looked_at_and_left() -> list[dict[str, Any]]:
            return [
                e
                for e in service.log_entries()
                if e.get("job") == "reconcile" and e.get("unchanged", 0) >= 1
            ]

        await eventually(lambda: trio.to_thread.run_sync(looked_at_and_left))
        assert (await get_payment(http, payment["id"]))["status"] == PaymentStatus.PENDING
        assert await status_changes(isolated_db, payment["id"]) == []

        # Paid while the emulator delivers no webhooks: the event is lost.
        await isolated.sandbox.control("DELETE", "webhook")
        session_id = payment["provider_payment_id"]
        await isolated.sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
        completed_at = time.time()
        event = await event_of(isolated, "checkout.session.completed", session_id)
        assert await deliveries_of(isolated, event["id"]) == []

        callback = await only_callback(own_receiver, payment["request_id"])
        paid = await get_payment(http, payment["id"])
        assert paid["status"] == PaymentStatus.PAID
        check_signed_callback(callback, paid)
        healed_in = callback.at - completed_at
        print(f"\ncompleted at Stripe -> callback via reconciler: {healed_in:.2f}s")
        assert healed_in < PROMPT_SECONDS

    assert await status_changes(isolated_db, payment["id"]) == [
        (PaymentStatus.PENDING, PaymentStatus.PAID, "reconciled")
    ]
    [(status, state, attempts, delivery_id)] = await outbox_of(isolated_db, payment["id"])
    assert (status, state, attempts) == (PaymentStatus.PAID, "delivered", 1)
    assert callback.headers["webhook-id"] == delivery_id
    assert await deliveries_of(isolated, event["id"]) == []  # still never delivered
    code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.log_text()[-3000:]


async def test_unpaid_payment_expires_everywhere(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    service = await isolated.aspawn(
        {
            "PAYMENTS_PENDING_TIMEOUT_MINUTES": "0.02",
            "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": "0.01",
            "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": SWEEP_MINUTES,
        }
    )
    # Stripe's own checkout.session.expired event is forwarded too: it must not make a
    # second status change or a second callback.
    await forward_events(isolated.sandbox, service)
    async with httpx.AsyncClient(base_url=service.http_url, timeout=15) as http:
        payment = await create_http(http, own_receiver)
        created_at = time.time()
        session_id = payment["provider_payment_id"]
        expired = await until_status(http, payment["id"], PaymentStatus.EXPIRED)
        callback = await only_callback(own_receiver, payment["request_id"])
        check_signed_callback(callback, expired)
        assert callback.json()["payment"]["status"] == 40
        print(f"\ncreated -> expiry callback (timeout 1.2 s): {callback.at - created_at:.2f}s")

    session = (await isolated.sandbox.objects())["checkout_sessions"][session_id]
    assert session["status"] == "expired"
    expire_calls = [
        r
        for r in await isolated.sandbox.requests()
        if r["endpoint"] == "POST /v1/checkout/sessions/{id}/expire" and session_id in r["path"]
    ]
    assert len(expire_calls) == 1, expire_calls
    assert expire_calls[0]["status"] == 200
    changes = await status_changes(isolated_db, payment["id"])
    assert [row[:2] for row in changes] == [(PaymentStatus.PENDING, PaymentStatus.EXPIRED)]
    assert "not completed within" in changes[0][2]
    [(status, state, attempts, delivery_id)] = await outbox_of(isolated_db, payment["id"])
    assert (status, state, attempts) == (PaymentStatus.EXPIRED, "delivered", 1)
    assert callback.headers["webhook-id"] == delivery_id

    # the emulator's expired event reached the service and was answered 200, recorded,
    # changing nothing
    event = await event_of(isolated, "checkout.session.expired", session_id)

    async def answered() -> Any:
        found = await deliveries_of(isolated, event["id"])
        return found if any(d["status"] for d in found) else None

    [delivery] = await eventually(answered)
    assert delivery["status"] == 200, delivery
    assert (
        await isolated_db.count(
            "SELECT COUNT(*) FROM payment_events WHERE payment_id = %s AND provider_event_id = %s",
            payment["id"],
            event["id"],
        )
        == 1
    )
    assert len(own_receiver.received) == 1
    code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.log_text()[-3000:]
