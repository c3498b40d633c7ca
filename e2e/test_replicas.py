"""Many replicas: two full ``payments serve`` processes on one database (the
``isolated`` fixture's), one emulator, one receiver.

* Paid: N payments created over both replicas (HTTP and gRPC, alternately), completed
  in the emulator with the events delivered alternately to one replica and the other;
  both dispatchers sweep every 0.6 s besides their wake-ups, so they race for the same
  outbox rows. Every callback arrives exactly once (by webhook-id and by payment id at
  the receiver), every outbox row is delivered at the first attempt, and every payment
  changed status once.
* Expired: N payments, both expirers (tiny timeout, a pass every 0.6 s) racing for
  them. Each payment is expired once (one STATUS_CHANGED row to EXPIRED), its
  session expired at Stripe by one call, its callback delivered once.
* Either way no (caller_service, request_id) names two rows.
"""

from __future__ import annotations

import collections
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
    ServiceProcess,
    create_body,
    create_message,
    eventually,
    forward_events,
    headers,
    payment_fields,
    received_by_payment,
    rid,
)
from payments.model import PaymentStatus

N = 60
# Creates in flight at once (over both replicas together).
CREATE_CONCURRENCY = 12
# Both dispatchers sweep this often, besides their own wake-ups, and claim small
# batches: with a receiver that takes a moment per callback, due rows pile up and both
# replicas claim from the same pile at once.
RACING = {
    "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": "0.01",
    "PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES": "0.01",
    "PAYMENTS_JOB_BATCH_SIZE": "5",
}
RECEIVER_DELAY = 0.05
# After everything arrived: listen this long for a duplicate (several sweeps).
QUIET_SECONDS = 2.0
EXPIRE = "POST /v1/checkout/sessions/{id}/expire"


async def start_replicas(isolated: Isolated, changes: dict[str, str]) -> list[ServiceProcess]:
    replicas: list[ServiceProcess] = []

    async def start() -> None:
        replicas.append(await isolated.aspawn(changes))

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(start)
    assert replicas[0].http_port != replicas[1].http_port
    return replicas


async def create_many(
    replicas: list[ServiceProcess], receiver: CallbackReceiver, count: int
) -> list[dict[str, Any]]:
    """``count`` payments, by turns over replica 0 and 1, HTTP and gRPC, concurrently."""
    created: list[dict[str, Any]] = []
    limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)
    grpc_clients = [GrpcClient(r.grpc_target) for r in replicas]
    try:
        async with (
            httpx.AsyncClient(timeout=15) as http,
            trio.open_nursery() as nursery,
        ):

            async def create(index: int) -> None:
                replica = replicas[index % 2]
                request_id = rid(f"rep{index}")
                url = receiver.url(f"/cb/{request_id}")
                async with limiter:
                    if index % 4 < 2:
                        response = await http.post(
                            f"{replica.http_url}/payments",
                            json=create_body(request_id=request_id, status_callback_url=url),
                            headers=headers(),
                        )
                        assert response.status_code == 201, response.text
                        payment = response.json()["payment"]
                    else:
                        message = create_message(request_id=request_id, status_callback_url=url)
                        reply, _ = await grpc_clients[index % 2].call("CreatePayment", message)
                        payment = payment_fields(reply.payment)
                assert payment["status"] == PaymentStatus.PENDING
                created.append(payment)

            for index in range(count):
                nursery.start_soon(create, index)
    finally:
        for client in grpc_clients:
            client.close()
    assert len({p["id"] for p in created}) == count
    return created


async def all_received(receiver: CallbackReceiver, count: int, within: float = 20) -> None:
    async def check() -> Any:
        return len(receiver.received) >= count

    await eventually(check, within)
    await trio.sleep(QUIET_SECONDS)


def check_exactly_once(
    receiver: CallbackReceiver, payments: list[dict[str, Any]], status: PaymentStatus
) -> None:
    """One signed callback per payment at the receiver, one per webhook-id."""
    received = list(receiver.received)
    by_webhook_id = collections.Counter(r.headers["webhook-id"] for r in received)
    twice = {k: v for k, v in by_webhook_id.items() if v > 1}
    assert not twice, f"webhook-ids delivered more than once: {twice}"
    by_payment = received_by_payment(received)
    assert sorted(by_payment) == sorted(p["id"] for p in payments)
    twice_by_payment = {k: len(v) for k, v in by_payment.items() if len(v) > 1}
    assert not twice_by_payment, f"payments called back more than once: {twice_by_payment}"
    assert len(received) == len(payments)
    wanted = {p["id"]: p for p in payments}
    for payment_id, [callback] in by_payment.items():
        Webhook(CALLBACK_SIGNING_SECRET).verify(callback.body, callback.headers)
        sent = callback.json()["payment"]
        assert sent["status"] == status
        assert callback.path == f"/cb/{wanted[payment_id]['request_id']}"
        assert callback.headers["x-request-id"] == wanted[payment_id]["request_id"]
        assert callback.headers["x-api-key"] == APP_API_KEY


async def check_database(db: Any, payments: list[dict[str, Any]], status: PaymentStatus) -> None:
    ids = sorted(p["id"] for p in payments)
    assert (
        await db.rows(
            "SELECT caller_service, request_id, COUNT(*) FROM payments"
            " GROUP BY caller_service, request_id HAVING COUNT(*) > 1"
        )
        == []
    )
    statuses = await db.rows("SELECT id, status FROM payments ORDER BY id")
    assert statuses == [(i, int(status)) for i in ids]
    outbox = await db.rows(
        "SELECT payment_id, status, state, attempts FROM callback_outbox ORDER BY payment_id"
    )
    assert outbox == [(i, int(status), "delivered", 1) for i in ids], outbox
    attempts = await db.rows(
        "SELECT o.payment_id, a.status_code FROM callback_attempts a"
        " JOIN callback_outbox o ON o.id = a.outbox_id ORDER BY o.payment_id"
    )
    assert attempts == [(i, 200) for i in ids], attempts
    changes = await db.rows(
        "SELECT payment_id, COUNT(*) FROM payment_events"
        " WHERE kind = 'status_changed' AND to_status = %s GROUP BY payment_id ORDER BY payment_id",
        int(status),
    )
    assert changes == [(i, 1) for i in ids], changes
    # and nothing else moved them: exactly one status change per payment in all
    assert await db.count("SELECT COUNT(*) FROM payment_events WHERE kind = 'status_changed'") == N


def deliveries_per_replica(replicas: list[ServiceProcess]) -> list[int]:
    """Callbacks each replica's dispatcher delivered (from its JSON log)."""
    return [
        sum(1 for e in r.log_entries() if e.get("message") == "callback attempt delivered")
        for r in replicas
    ]


async def test_two_replicas_deliver_every_callback_once(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    replicas = await start_replicas(isolated, RACING)
    payments = await create_many(replicas, own_receiver, N)
    own_receiver.delay = RECEIVER_DELAY

    # Complete every checkout; the emulator posts each event to one replica, then the
    # other (the webhook endpoint is taken when the event is emitted).
    sessions = [p["provider_payment_id"] for p in payments]
    for index, session_id in enumerate(sessions):
        await forward_events(isolated.sandbox, replicas[index % 2])
        await isolated.sandbox.control("POST", f"checkout/sessions/{session_id}/complete")

    await all_received(own_receiver, N)
    check_exactly_once(own_receiver, payments, PaymentStatus.PAID)
    await check_database(isolated_db, payments, PaymentStatus.PAID)

    # every event went to the replica its turn named, and was answered 200 once
    deliveries = await isolated.sandbox.deliveries()
    assert len(deliveries) == N and all(d["status"] == 200 for d in deliveries), deliveries
    ports = collections.Counter(int(d["url"].split(":")[2].split("/")[0]) for d in deliveries)
    assert ports == {replicas[0].http_port: N // 2, replicas[1].http_port: N // 2}
    print(f"\ncallbacks delivered per replica: {deliveries_per_replica(replicas)}")

    for replica in replicas:
        code = await trio.to_thread.run_sync(replica.terminate)
        assert code == 0, replica.log_text()[-3000:]


async def test_two_replicas_expire_every_payment_once(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    # Payments are due 3 s after their creation; both expirers pass every 0.6 s.
    replicas = await start_replicas(
        isolated,
        {
            **RACING,
            "PAYMENTS_PENDING_TIMEOUT_MINUTES": "0.05",
            "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": "0.01",
        },
    )
    # Stripe's checkout.session.expired events go to replica 0 as they happen: a third
    # party racing the expirers (it must change nothing more).
    await forward_events(isolated.sandbox, replicas[0])
    own_receiver.delay = RECEIVER_DELAY
    payments = await create_many(replicas, own_receiver, N)

    await all_received(own_receiver, N)
    check_exactly_once(own_receiver, payments, PaymentStatus.EXPIRED)
    await check_database(isolated_db, payments, PaymentStatus.EXPIRED)

    # one expire call per session at Stripe, each a success; each session expired once
    requests = await isolated.sandbox.requests()
    expire_calls = collections.Counter(
        r["path"].split("/")[4] for r in requests if r["endpoint"] == EXPIRE
    )
    sessions = sorted(p["provider_payment_id"] for p in payments)
    assert sorted(expire_calls) == sessions
    assert set(expire_calls.values()) == {1}, {k: v for k, v in expire_calls.items() if v > 1}
    assert all(r["status"] == 200 for r in requests if r["endpoint"] == EXPIRE)
    objects = await isolated.sandbox.objects()
    assert {objects["checkout_sessions"][s]["status"] for s in sessions} == {"expired"}
    expired_events = collections.Counter(
        e["data"]["object"]["id"]
        for e in await isolated.sandbox.events()
        if e["type"] == "checkout.session.expired"
    )
    assert sorted(expired_events) == sessions and set(expired_events.values()) == {1}

    # both expirers worked (the log says which moved what); the expirer calls Stripe
    # under the payment's lease, holding no row lock, so Stripe's own expired event may
    # conclude a payment first (the expirer then finds it EXPIRED and moves nothing)
    moved = [
        sum(1 for e in r.log_entries() if e.get("message") == "expire moved a payment to EXPIRED")
        for r in replicas
    ]
    by_event = sum(
        1
        for r in replicas
        for e in r.log_entries()
        if e.get("message") == "provider event processed"
        and e.get("reason", "").endswith("-> EXPIRED")
    )
    print(f"\npayments expired per replica: {moved}, by Stripe's event: {by_event}")
    assert sum(moved) + by_event == N, (moved, by_event)
    assert all(moved), moved

    for replica in replicas:
        code = await trio.to_thread.run_sync(replica.terminate)
        assert code == 0, replica.log_text()[-3000:]
