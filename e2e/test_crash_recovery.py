"""``kill -9`` of ``payments serve`` at the worst moments, then a new one on the same
database (the ``isolated`` fixture's database and emulator).

* In the middle of dispatching: 40 payments are paid at once, the caller answers each
  callback after 0.5 s, and the process is SIGKILLed while a batch of callbacks is in
  flight. A new process delivers every callback anyway (at least once: each payment is
  called back, and one whose delivery the kill interrupted may be called back twice,
  with the same webhook-id so the caller can deduplicate; one recorded as delivered
  before the kill never again). "In flight" is what the caller received and the
  database had not recorded as delivered at the kill: exactly those are called back
  twice. (Rows the process had claimed but not yet sent are not in flight: they are
  sent once, by the second process.) The kill lands while the caller holds a request
  open (it answers after 0.5 s), so something is in flight. The rows the dead process
  had claimed wait for its lease to run out: the actor's lease is
  ``(ceil(HOST_BACKLOG / HOST_CONCURRENCY) + 1) * (callback timeout + 2 s) + 30 s``
  (payments/jobs/dispatcher.py), so a 1 s callback timeout makes it 39 s.
* In the middle of a create: Stripe makes the session but holds its answer; the
  process is SIGKILLed meanwhile. The payment row stays CREATED; the same request sent
  to a new process completes it with the session Stripe made (the idempotency key
  replays it): one payment, one Stripe object.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio

from e2e.harness import (
    CallbackReceiver,
    Isolated,
    ServiceProcess,
    create_body,
    eventually,
    forward_events,
    headers,
    received_by_payment,
    rid,
)
from payments.model import PaymentStatus

PAYMENTS = 40
RECEIVER_DELAY = 0.5
DISPATCH = {
    # above the receiver's 0.5 s, and short: the lease is (2 + 1) * (1 + 2) + 30 = 39 s
    "PAYMENTS_CALLBACK_HTTP_TIMEOUT_SECONDS": "1",
    # two callbacks held at once, 0.5 s each: 4/s, so 40 take 10 s, well beyond the
    # time it takes to pay them all (about 4 s), and the kill finds work left
    "PAYMENTS_JOB_BATCH_SIZE": "2",
    # no sweep within the test: the new process must find the dead lease's end itself
    "PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES": "10",
}
LEASE_SECONDS = 39
SESSIONS = "POST /v1/checkout/sessions"
DUPLICATES = (
    "SELECT caller_service, request_id, COUNT(*) FROM payments"
    " GROUP BY caller_service, request_id HAVING COUNT(*) > 1"
)


async def create_all(
    service: ServiceProcess, receiver: CallbackReceiver, count: int
) -> list[dict[str, Any]]:
    created: list[dict[str, Any]] = []
    limiter = trio.CapacityLimiter(8)
    async with (
        httpx.AsyncClient(base_url=service.http_url, timeout=15) as http,
        trio.open_nursery() as nursery,
    ):

        async def create(index: int) -> None:
            request_id = rid(f"crash{index}")
            body = create_body(
                request_id=request_id, status_callback_url=receiver.url(f"/cb/{request_id}")
            )
            async with limiter:
                response = await http.post("/payments", json=body, headers=headers())
            assert response.status_code == 201, response.text
            created.append(response.json()["payment"])

        for index in range(count):
            nursery.start_soon(create, index)
    return created


async def test_kill_9_while_dispatching_then_restart_delivers_every_callback(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    first = await isolated.aspawn(DISPATCH)
    payments = await create_all(first, own_receiver, PAYMENTS)
    ids = {p["id"] for p in payments}
    assert len(ids) == PAYMENTS

    own_receiver.delay = RECEIVER_DELAY
    await forward_events(isolated.sandbox, first)
    for payment in payments:
        session_id = payment["provider_payment_id"]
        await isolated.sandbox.control("POST", f"checkout/sessions/{session_id}/complete")

    async def all_paid() -> bool:
        return (
            await isolated_db.count("SELECT COUNT(*) FROM payments WHERE status = %s", 10)
            == PAYMENTS
        )

    await eventually(all_paid)
    # At most 2 callbacks are held at once, each answered after 0.5 s and only then
    # recorded: the 7th has just arrived and is in the caller's hands. Kill.
    await eventually(lambda: _at_least(own_receiver, 7), within=10)
    first.proc.kill()  # SIGKILL
    killed_at = time.time()
    await trio.to_thread.run_sync(first.proc.wait)
    assert first.proc.returncode == -9
    # Requests the process wrote before it died may still sit in the socket buffer:
    # let the caller read them before counting what it received.
    await trio.sleep(0.3)
    received_before = len(own_receiver.received)

    states = dict(
        await isolated_db.rows("SELECT state, COUNT(*) FROM callback_outbox GROUP BY state")
    )
    assert sum(states.values()) == PAYMENTS, states
    assert states.get("pending", 0) > 0, f"killed after dispatching ended: {states}"
    delivered_before = {
        row[0]
        for row in await isolated_db.rows(
            "SELECT payment_id FROM callback_outbox WHERE state = 'delivered'"
        )
    }
    received = set(received_by_payment(list(own_receiver.received)[:received_before]))
    in_flight = received - delivered_before
    assert in_flight, "no callback was in the caller's hands at the kill"
    print(
        f"\nat the kill: {received_before} callbacks received, {len(delivered_before)} recorded"
        f" delivered, {len(in_flight)} in flight, {states.get('pending', 0)} pending"
    )

    second = await isolated.aspawn(DISPATCH)

    # Those never sent go out at once; those the kill interrupted once the dead
    # process's lease runs out.
    async def all_delivered() -> bool:
        return (
            await isolated_db.count(
                "SELECT COUNT(*) FROM callback_outbox WHERE state = 'delivered'"
            )
            == PAYMENTS
        )

    await eventually(all_delivered, within=LEASE_SECONDS + 15)
    print(f"every callback recorded delivered {time.time() - killed_at:.1f}s after the kill")
    await trio.sleep(1.0)  # anything more would be a duplicate beyond the crash's own

    by_payment = received_by_payment(list(own_receiver.received))
    assert set(by_payment) == ids
    webhook_ids = {}
    for payment_id, callbacks in by_payment.items():
        seen = {c.headers["webhook-id"] for c in callbacks}
        assert len(seen) == 1, f"payment {payment_id} called back under {seen}"
        webhook_ids[payment_id] = seen.pop()
        assert all(c.json()["payment"]["status"] == PaymentStatus.PAID for c in callbacks)
    assert len(set(webhook_ids.values())) == PAYMENTS
    repeated = {pid for pid, callbacks in by_payment.items() if len(callbacks) > 1}
    print(f"called back twice (interrupted by the kill): {len(repeated)}")
    # only deliveries the kill interrupted repeat, each at most once more
    assert repeated == in_flight, (repeated, in_flight)
    assert max(len(c) for c in by_payment.values()) == 2
    assert not repeated & delivered_before

    outbox = await isolated_db.rows(
        "SELECT payment_id, delivery_id, state FROM callback_outbox ORDER BY payment_id"
    )
    assert outbox == [(pid, webhook_ids[pid], "delivered") for pid in sorted(ids)]
    assert await isolated_db.rows(DUPLICATES) == []
    assert await isolated_db.count("SELECT COUNT(*) FROM payments") == PAYMENTS
    code = await trio.to_thread.run_sync(second.terminate)
    assert code == 0, second.log_text()[-3000:]


async def _at_least(receiver: CallbackReceiver, count: int) -> bool:
    return len(receiver.received) >= count


async def test_kill_9_during_create_then_retry_makes_one_payment(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    sandbox = isolated.sandbox
    first = await isolated.aspawn()
    request_id = rid("crash-create")
    body = create_body(request_id=request_id, status_callback_url=own_receiver.url("/cb/x"))
    # Stripe makes the session, then holds its answer (well beyond the kill)
    await sandbox.fault("delay", "/v1/checkout/sessions", method="POST", seconds=4, after=True)

    outcome: dict[str, Any] = {}

    async def create() -> None:
        try:
            async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
                outcome["response"] = await http.post("/payments", json=body, headers=headers())
        except httpx.TransportError as exc:
            outcome["error"] = exc

    async def session_made() -> list[dict[str, Any]]:
        return (await sandbox.objects_for(request_id))["checkout_sessions"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        [session] = await eventually(session_made)
        first.proc.kill()  # SIGKILL, the answer still held by Stripe
        await trio.to_thread.run_sync(first.proc.wait)
    assert "error" in outcome, f"the create was answered before the kill: {outcome}"

    [(payment_id, status, provider_id)] = await isolated_db.rows(
        "SELECT id, status, provider_payment_id FROM payments"
        " WHERE caller_service = 'orders' AND request_id = %s",
        request_id,
    )
    assert (status, provider_id) == (PaymentStatus.CREATED, "")

    second = await isolated.aspawn()
    async with httpx.AsyncClient(base_url=second.http_url, timeout=15) as http:
        retry = await http.post("/payments", json=body, headers=headers())
        assert retry.status_code == 201, retry.text
        payment = retry.json()["payment"]
        assert payment["id"] == payment_id
        assert payment["status"] == PaymentStatus.PENDING
        assert payment["provider_payment_id"] == session["id"]
        again = await http.post("/payments", json=body, headers=headers())
        assert again.status_code == 201, again.text
        assert again.json()["payment"] == payment

    objects = await sandbox.objects_for(request_id)
    assert [s["id"] for s in objects["checkout_sessions"]] == [session["id"]]
    calls = await sandbox.requests_for(request_id, SESSIONS)
    assert len(calls) == 2, calls
    assert calls[0]["idempotency_key"] == calls[1]["idempotency_key"]
    assert [c["replayed"] for c in calls] == [False, True]
    assert len((await sandbox.objects())["checkout_sessions"]) == 1
    assert await isolated_db.rows(DUPLICATES) == []
    assert await isolated_db.count("SELECT COUNT(*) FROM payments") == 1
    code = await trio.to_thread.run_sync(second.terminate)
    assert code == 0, second.log_text()[-3000:]
