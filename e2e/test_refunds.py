"""Refunds against the real process, driven by httpx and the official grpcio client,
with the emulator process as Stripe and its events forwarded as the gateway would.

* N concurrent partial refunds that together exceed the amount: the accepted ones fit,
  the others are 409 naming what is refundable, and Stripe saw exactly the accepted.
* A refund that stays pending at Stripe and then fails: PENDING holds its amount, the
  failure gives it back and the caller is called back with payment and refund.
* ``kill -9`` between Stripe's refund and the commit: the same request sent to a new
  process completes the PENDING claim with the refund Stripe made (one Stripe refund).
* ``refunded_cents`` / ``refundable_cents`` after each step, over both transports.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import trio

from e2e.harness import (
    CallbackReceiver,
    GrpcClient,
    Isolated,
    SandboxProcess,
    ServiceProcess,
    create_body,
    eventually,
    forward_events,
    headers,
    rid,
)
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus, RefundStatus

REFUNDS = "POST /v1/refunds"


async def paid_payment(
    http: httpx.AsyncClient, sandbox: SandboxProcess, amount_cents: int, callback_url: str
) -> dict[str, Any]:
    """A payment created over HTTP, paid at the emulator, PAID through its events."""
    body = create_body(amount_cents=amount_cents, status_callback_url=callback_url)
    created = await http.post("/payments", json=body, headers=headers())
    assert created.status_code == 201, created.text
    payment = created.json()["payment"]
    await sandbox.control("POST", f"checkout/sessions/{payment['provider_payment_id']}/complete")

    async def is_paid() -> dict[str, Any] | None:
        got = await http.get(f"/payments/{payment['id']}", headers=headers())
        document = got.json()["payment"]
        return document if document["status"] == PaymentStatus.PAID else None

    return await eventually(is_paid)


async def amounts(
    http: httpx.AsyncClient, grpc_client: GrpcClient, payment_id: int
) -> tuple[int, int]:
    """(refunded, refundable) as HTTP says it, checked to be what gRPC says."""
    document = (await http.get(f"/payments/{payment_id}", headers=headers())).json()["payment"]
    over_http = (document.get("refunded_cents", 0), document.get("refundable_cents", 0))
    response, _ = await grpc_client.call("GetPayment", pb.GetPaymentRequest(id=payment_id))
    assert (response.payment.refunded_cents, response.payment.refundable_cents) == over_http
    return over_http


async def stripe_refunds_of(
    sandbox: SandboxProcess, payment: dict[str, Any]
) -> list[dict[str, Any]]:
    """The emulator's refunds of the PaymentIntent that paid ``payment``."""
    objects = await sandbox.objects()
    intent = objects["checkout_sessions"][payment["provider_payment_id"]]["payment_intent"]
    return [r for r in objects["refunds"].values() if r["payment_intent"] == intent]


async def test_concurrent_partial_refunds_that_exceed_the_amount(
    service: ServiceProcess,
    sandbox: SandboxProcess,
    grpc_client: GrpcClient,
    webhooks: None,
    receiver: CallbackReceiver,
) -> None:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=30) as http:
        payment = await paid_payment(http, sandbox, 1000, receiver.url("/cb/concurrent"))
        assert await amounts(http, grpc_client, payment["id"]) == (0, 1000)
        accepted: list[dict[str, Any]] = []
        refused: list[str] = []

        async def over_http(n: int) -> None:
            body = {"request_id": rid(f"refund-h{n}"), "amount_cents": 150}
            response = await http.post(
                f"/payments/{payment['id']}/refunds", json=body, headers=headers()
            )
            if response.status_code == 201:
                accepted.append(response.json()["refund"])
            else:
                assert response.status_code == 409, response.text
                refused.append(response.json()["error"])

        async def over_grpc(n: int) -> None:
            message = pb.CreateRefundRequest(
                payment_id=payment["id"], request_id=rid(f"refund-g{n}"), amount_cents=150
            )
            try:
                response, _ = await grpc_client.call("CreateRefund", message)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
                refused.append(exc.details() or "")
            else:
                accepted.append({"id": response.refund.id, "amount_cents": 150})

        async with trio.open_nursery() as nursery:
            for n in range(5):  # 10 x 150 = 1500 asked of 1000: six fit
                nursery.start_soon(over_http, n)
                nursery.start_soon(over_grpc, n)
        assert len(accepted) == 6 and len(refused) == 4, (accepted, refused)
        assert all("refundable amount 100" in e or "nothing left" in e for e in refused), refused
        made = await stripe_refunds_of(sandbox, payment)
        assert sorted(int(r["metadata"]["refund_id"]) for r in made) == sorted(
            r["id"] for r in accepted
        )
        assert all(r["amount"] == 150 and r["status"] == "succeeded" for r in made)
        assert await amounts(http, grpc_client, payment["id"]) == (900, 100)
        listed = await http.get(f"/payments/{payment['id']}/refunds", headers=headers())
        assert sorted(r["id"] for r in listed.json()["refunds"]) == sorted(
            r["id"] for r in accepted
        )


async def test_pending_holds_its_amount_and_a_refused_refund_is_called_back(
    service: ServiceProcess,
    sandbox: SandboxProcess,
    grpc_client: GrpcClient,
    webhooks: None,
    receiver: CallbackReceiver,
) -> None:
    path = f"/cb/{rid('refused')}"
    async with httpx.AsyncClient(base_url=service.http_url, timeout=30) as http:
        payment = await paid_payment(http, sandbox, 800, receiver.url(path))
        refunds_url = f"/payments/{payment['id']}/refunds"
        # Stripe keeps this one pending: it holds its 500 until Stripe settles it (the
        # event side and the reconciler move it on; not this request).
        await sandbox.control("POST", "refunds/hold", {"hold": True})
        body = {"request_id": rid("held"), "amount_cents": 500}
        response = await http.post(refunds_url, json=body, headers=headers())
        assert response.status_code == 201, response.text
        held = response.json()["refund"]
        assert held["status"] == RefundStatus.PENDING and held["provider_refund_id"]
        assert await amounts(http, grpc_client, payment["id"]) == (0, 300)
        replay = await http.post(refunds_url, json=body, headers=headers())
        assert replay.json() == response.json()
        assert len(await stripe_refunds_of(sandbox, payment)) == 1  # not asked again
        # Stripe refuses the next one (as it does a charge refunded meanwhile).
        await sandbox.fault(
            "error",
            "/v1/refunds",
            method="POST",
            status=400,
            error_type="invalid_request_error",
        )
        refused = await http.post(
            refunds_url, json={"request_id": rid("refused"), "amount_cents": 300}, headers=headers()
        )
        assert refused.status_code == 201, refused.text
        failed = refused.json()["refund"]
        assert failed["status"] == RefundStatus.FAILED and failed["failure_reason"]
        assert "provider_refund_id" not in failed
        assert await amounts(http, grpc_client, payment["id"]) == (0, 300)  # given back

        async def called_back() -> list[Any]:
            return [r for r in receiver.requests_to(path) if "refund" in r.json()]

        [callback] = await eventually(called_back, within=20)
        document = callback.json()
        assert document["refund"] == failed
        assert document["payment"]["id"] == payment["id"]
        assert document["payment"]["refundable_cents"] == 300
        payment_callbacks = [r for r in receiver.requests_to(path) if "refund" not in r.json()]
        assert payment_callbacks, "the PAID callback came first"
        assert callback.headers["webhook-id"] not in {
            r.headers["webhook-id"] for r in payment_callbacks
        }


async def test_kill_9_between_the_stripe_refund_and_the_commit(
    isolated: Isolated, isolated_db: Any, own_receiver: CallbackReceiver
) -> None:
    sandbox = isolated.sandbox
    first = await isolated.aspawn()
    await forward_events(sandbox, first)
    request_id = rid("crash-refund")
    async with httpx.AsyncClient(base_url=first.http_url, timeout=30) as http:
        payment = await paid_payment(http, sandbox, 1200, own_receiver.url("/cb/crash"))
    body = {"request_id": request_id, "amount_cents": 700, "metadata": {"case": "crash"}}
    # Stripe's refund events would settle the claim on their own (inbound refunds): no
    # events from here on, so only the retry can complete it.
    await sandbox.control("DELETE", "webhook")
    # Stripe makes the refund, then holds its answer well beyond the kill.
    await sandbox.fault("delay", "/v1/refunds", method="POST", seconds=4, after=True)
    outcome: dict[str, Any] = {}

    async def refund() -> None:
        try:
            async with httpx.AsyncClient(base_url=first.http_url, timeout=15) as http:
                outcome["response"] = await http.post(
                    f"/payments/{payment['id']}/refunds", json=body, headers=headers()
                )
        except httpx.TransportError as exc:
            outcome["error"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refund)
        [made] = await eventually(lambda: stripe_refunds_of(sandbox, payment))
        first.proc.kill()  # SIGKILL: Stripe has the refund, the service never heard
        await trio.to_thread.run_sync(first.proc.wait)
    assert "error" in outcome, f"answered before the kill: {outcome}"
    [(refund_id, status, provider_id)] = await isolated_db.rows(
        "SELECT id, status, provider_refund_id FROM refunds WHERE request_id = %s", request_id
    )
    assert (status, provider_id) == (RefundStatus.PENDING, None)

    second = await isolated.aspawn()
    await forward_events(sandbox, second)
    grpc_client = GrpcClient(second.grpc_target)
    try:
        async with httpx.AsyncClient(base_url=second.http_url, timeout=30) as http:
            # The claim holds its amount across the crash.
            assert await amounts(http, grpc_client, payment["id"]) in ((0, 500), (700, 500))
            retry = await http.post(
                f"/payments/{payment['id']}/refunds", json=body, headers=headers()
            )
            assert retry.status_code == 201, retry.text
            done = retry.json()["refund"]
            assert done["id"] == refund_id and done["provider_refund_id"] == made["id"]
            assert done["status"] == RefundStatus.SUCCEEDED
            again = await http.post(
                f"/payments/{payment['id']}/refunds", json=body, headers=headers()
            )
            assert again.json() == retry.json()
            assert await amounts(http, grpc_client, payment["id"]) == (700, 500)
    finally:
        grpc_client.close()
    assert [r["id"] for r in await stripe_refunds_of(sandbox, payment)] == [made["id"]]
    calls = [c for c in await sandbox.requests() if c["endpoint"] == REFUNDS]
    assert len(calls) == 2 and calls[0]["idempotency_key"] == calls[1]["idempotency_key"]
    assert [c["replayed"] for c in calls] == [False, True]
    assert await isolated_db.count("SELECT COUNT(*) FROM refunds") == 1
    code = await trio.to_thread.run_sync(second.terminate)
    assert code == 0, second.log_text()[-3000:]
