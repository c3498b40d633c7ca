"""Refunds settled by Stripe's events, against the real process: the emulator process
holds a refund pending and fails it later, or refunds "in its dashboard"; its signed
events reach the service's webhook route as the gateway forwards them, and the caller
hears of each refund through a signed status callback ``{"payment", "refund"}``.
"""

from __future__ import annotations

from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from e2e.harness import (
    APP_API_KEY,
    CALLBACK_SIGNING_SECRET,
    CallbackReceiver,
    Received,
    SandboxProcess,
    eventually,
    headers,
    rid,
)
from e2e.test_lifecycle import create, until_callback, until_status
from payments.model import PaymentStatus, RefundStatus


async def paid_payment(
    http: httpx.AsyncClient, sandbox: SandboxProcess, receiver: CallbackReceiver
) -> dict[str, Any]:
    payment = await create(http, receiver, amount_cents=3000)
    session_id = payment["provider_payment_id"]
    await sandbox.control("POST", f"checkout/sessions/{session_id}/complete")
    paid = await until_status(http, payment["id"], PaymentStatus.PAID)
    await until_callback(receiver, payment["_callback_path"])  # the PAID callback
    paid["_callback_path"] = payment["_callback_path"]
    return paid


async def refund_callback(receiver: CallbackReceiver, path: str, refund_id: int) -> Received:
    """The signed callback announcing refund ``refund_id``."""

    async def check() -> Any:
        for callback in receiver.requests_to(path):
            document = callback.json()
            if document.get("refund", {}).get("id") == refund_id:
                return callback
        return None

    callback: Received = await eventually(check)
    Webhook(CALLBACK_SIGNING_SECRET).verify(callback.body, callback.headers)
    assert callback.headers["x-api-key"] == APP_API_KEY
    return callback


async def refunds_of(http: httpx.AsyncClient, payment_id: int) -> list[dict[str, Any]]:
    response = await http.get(f"/payments/{payment_id}/refunds", headers=headers())
    assert response.status_code == 200, response.text
    refunds: list[dict[str, Any]] = response.json()["refunds"]
    return refunds


async def test_a_refund_pending_at_stripe_that_fails_later_reaches_the_caller(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await paid_payment(http, sandbox, receiver)
    await sandbox.control("POST", "refunds/hold", {"hold": True})
    response = await http.post(
        f"/payments/{payment['id']}/refunds",
        json={"request_id": rid("refund"), "amount_cents": 1200},
        headers=headers(),
    )
    assert response.status_code == 201, response.text
    refund = response.json()["refund"]
    assert refund["status"] == RefundStatus.PENDING
    current = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert current.json()["payment"]["refundable_cents"] == 1800  # pending holds its amount

    failure = {"failure_reason": "insufficient_funds"}
    await sandbox.control("POST", f"refunds/{refund['provider_refund_id']}/fail", failure)

    callback = await refund_callback(receiver, payment["_callback_path"], refund["id"])
    document = callback.json()
    assert document["refund"]["status"] == RefundStatus.FAILED
    assert document["refund"]["failure_reason"] == "insufficient_funds"
    assert document["payment"]["status"] == PaymentStatus.PAID
    assert document["payment"]["refundable_cents"] == 3000  # given back
    assert "refunded_cents" not in document["payment"]  # 0 is left out
    [stored] = await refunds_of(http, payment["id"])
    assert (stored["id"], stored["status"]) == (refund["id"], RefundStatus.FAILED)


async def test_a_dashboard_refund_is_recorded_and_called_back(
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    webhooks: None,
) -> None:
    payment = await paid_payment(http, sandbox, receiver)
    session = (await sandbox.objects())["checkout_sessions"][payment["provider_payment_id"]]
    made = await sandbox.control(
        "POST", "refunds", {"payment_intent": session["payment_intent"], "amount": 700}
    )

    async def recorded() -> Any:
        found = await refunds_of(http, payment["id"])
        return found if found and found[0]["status"] == RefundStatus.SUCCEEDED else None

    [refund] = await eventually(recorded)
    assert refund["request_id"] == f"stripe:{made['id']}"
    assert refund["provider_refund_id"] == made["id"]
    assert refund["amount_cents"] == 700
    callback = await refund_callback(receiver, payment["_callback_path"], refund["id"])
    document = callback.json()
    assert document["refund"]["request_id"] == f"stripe:{made['id']}"
    assert document["payment"]["refunded_cents"] == 700
    assert document["payment"]["refundable_cents"] == 2300
    webhook_ids = {c.headers["webhook-id"] for c in receiver.requests_to(payment["_callback_path"])}
    assert len(webhook_ids) == 2  # the PAID callback and the refund's, each its own id
