"""Cancel over HTTP and gRPC: PENDING -> CANCELED and the Stripe object closed, a second
cancel answers the payment unchanged, PAID/FAILED/EXPIRED refuse (409 /
FAILED_PRECONDITION), Stripe failing leaves the payment as it was."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from e2e.conftest import Database
from e2e.harness import (
    GrpcClient,
    SandboxProcess,
    create_body,
    create_message,
    headers,
    payment_fields,
)
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus


async def create(http: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await http.post("/payments", json=create_body(**changes), headers=headers())
    assert response.status_code == 201, response.text
    payment = response.json()["payment"]
    assert payment["status"] == PaymentStatus.PENDING
    return payment


async def stripe_object(sandbox: SandboxProcess, payment: dict[str, Any]) -> dict[str, Any]:
    objects = await sandbox.objects()
    kind = "checkout_sessions" if payment["payment_method"] == 1 else "payment_links"
    return objects[kind][payment["provider_payment_id"]]


@pytest.mark.parametrize(
    "changes",
    [
        {"payment_method": 1},
        {"payment_method": 2},
        {"payment_method": 1, "payment_type": 2, "recurring_interval": "month"}
        | {"recurring_interval_count": 1},
    ],
    ids=["hosted-card", "payment-link", "hosted-card-recurring"],
)
async def test_cancel_over_http(
    http: httpx.AsyncClient, sandbox: SandboxProcess, db: Database, changes: dict[str, Any]
) -> None:
    payment = await create(http, **changes)
    pid = payment["id"]
    response = await http.post(
        f"/payments/{pid}/cancel", json={"reason": "order abandoned"}, headers=headers()
    )
    assert response.status_code == 200, response.text
    canceled = response.json()["payment"]
    assert canceled["status"] == PaymentStatus.CANCELED
    assert canceled["id"] == pid
    assert canceled["provider_payment_id"] == payment["provider_payment_id"]
    assert canceled["updated_at"] >= payment["updated_at"]
    assert await db.status(pid) == PaymentStatus.CANCELED

    closed = await stripe_object(sandbox, payment)
    if payment["payment_method"] == 1:
        assert closed["status"] == "expired"
    else:
        assert closed["active"] is False

    again = await http.post(f"/payments/{pid}/cancel", headers=headers())
    assert again.status_code == 200, again.text
    assert again.json()["payment"] == canceled
    got = await http.get(f"/payments/{pid}", headers=headers())
    assert got.json()["payment"] == canceled


async def test_cancel_over_grpc(grpc_client: GrpcClient, sandbox: SandboxProcess) -> None:
    reply, _ = await grpc_client.call("CreatePayment", create_message(payment_method=2))
    payment = payment_fields(reply.payment)
    request = pb.CancelPaymentRequest(id=payment["id"], reason="no longer needed")
    reply, _ = await grpc_client.call("CancelPayment", request)
    canceled = payment_fields(reply.payment)
    assert canceled["status"] == PaymentStatus.CANCELED
    assert (await stripe_object(sandbox, payment))["active"] is False
    reply, _ = await grpc_client.call("CancelPayment", request)
    assert payment_fields(reply.payment) == canceled


@pytest.mark.parametrize(
    "status",
    [PaymentStatus.PAID, PaymentStatus.FAILED, PaymentStatus.EXPIRED],
    ids=lambda s: s.name,
)
async def test_cancel_refused_when_over(
    http: httpx.AsyncClient,
    grpc_client: GrpcClient,
    sandbox: SandboxProcess,
    db: Database,
    status: PaymentStatus,
) -> None:
    payment = await create(http)
    await db.set_status(payment["id"], status)
    response = await http.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert response.status_code == 409, response.text
    assert status.name in response.json()["error"]
    code, details, _ = await grpc_client.error(
        "CancelPayment", pb.CancelPaymentRequest(id=payment["id"])
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert await db.status(payment["id"]) == status
    assert (await stripe_object(sandbox, payment))["status"] == "open"


async def test_cancel_with_stripe_failing_changes_nothing(
    http: httpx.AsyncClient, sandbox: SandboxProcess, db: Database
) -> None:
    payment = await create(http)
    await sandbox.fault("error", "/v1/checkout/sessions/", method="POST", status=500, times=None)
    try:
        response = await http.post(f"/payments/{payment['id']}/cancel", headers=headers())
    finally:
        await sandbox.clear_faults()
    assert response.status_code == 502, response.text
    assert await db.status(payment["id"]) == PaymentStatus.PENDING
    assert (await stripe_object(sandbox, payment))["status"] == "open"
    retry = await http.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert retry.status_code == 200, retry.text
    assert retry.json()["payment"]["status"] == PaymentStatus.CANCELED
    assert (await stripe_object(sandbox, payment))["status"] == "expired"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", ""),
        (b"[]", ""),
        (b'{"reason": 5}', "reason"),
        (b'{"reason": "' + b"x" * 501 + b'"}', "reason"),
    ],
    ids=["not-json", "not-object", "reason-type", "reason-too-long"],
)
async def test_cancel_bad_body(
    http: httpx.AsyncClient, db: Database, content: bytes, field: str
) -> None:
    payment = await create(http)
    response = await http.post(
        f"/payments/{payment['id']}/cancel",
        content=content,
        headers={**headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith(f"{field}:") if field else "JSON" in error, error
    assert await db.status(payment["id"]) == PaymentStatus.PENDING
