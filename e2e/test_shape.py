"""What goes over the wire: the JSON shape, x-request-id echoed on both transports."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest

from e2e.harness import GrpcClient, create_body, create_message, headers, payment_fields, rid
from payments.gen import payments_pb2 as pb

# The Go service's format: RFC 3339 UTC to the second, e.g. 2026-11-29T18:45:15Z.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
ZERO_FIELDS = (
    "customer_ref",
    "recurring_interval",
    "recurring_interval_count",
    "provider_subscription_id",
    "success_url",
    "cancel_url",
    "refunded_cents",
    "refundable_cents",
    "metadata",
)


def parse_time(text: str) -> datetime:
    assert RFC3339.fullmatch(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_json_shape(http: httpx.AsyncClient, grpc_client: GrpcClient) -> None:
    """snake_case names, enums as numbers, 64-bit integers as JSON numbers, zero values
    left out, RFC 3339 UTC timestamps to the second; the same values as over gRPC."""
    body = create_body(customer_ref=..., metadata=..., amount_cents=99_999_999)
    response = await http.post("/payments", json=body, headers=headers())
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = json.loads(response.content)
    assert list(document) == ["payment"]
    payment = document["payment"]

    for name in ZERO_FIELDS:
        assert name not in payment, f"{name} holds its zero value and must be left out"
    for name in ("id", "amount_cents", "status", "payment_method", "payment_type", "provider"):
        assert type(payment[name]) is int, (name, payment[name])
    raw = response.text
    assert f'"id":{payment["id"]}' in raw.replace(" ", "")
    assert '"amount_cents":99999999' in raw.replace(" ", "")
    assert (payment["status"], payment["payment_method"], payment["payment_type"]) == (2, 1, 1)
    assert payment["provider"] == 1
    expected = {
        "id", "request_id", "caller_service", "resource_type", "resource_id", "amount_cents",
        "currency", "status", "payment_method", "payment_type", "provider",
        "provider_payment_id", "checkout_url", "provider_callback_hash",
        "provider_callback_url", "status_callback_url", "created_at", "updated_at",
    }  # fmt: skip
    assert set(payment) == expected

    now = datetime.now(UTC)
    created, updated = parse_time(payment["created_at"]), parse_time(payment["updated_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs(now - created) < timedelta(minutes=5)
    assert created <= updated

    reply, _ = await grpc_client.call("GetPayment", pb.GetPaymentRequest(id=payment["id"]))
    assert payment_fields(reply.payment) == payment


async def test_list_and_errors_shape(http: httpx.AsyncClient) -> None:
    listed = await http.get("/payments", params={"limit": 1}, headers=headers())
    assert listed.status_code == 200
    assert list(listed.json()) == ["payments"]
    assert len(listed.json()["payments"]) == 1
    empty = await http.get("/payments", params={"resource_type": rid("none")}, headers=headers())
    assert empty.json() == {"payments": []}

    for method, path, status in (
        ("GET", "/nowhere", 404),
        ("DELETE", "/payments/1", 405),
        ("PUT", "/payments", 405),
    ):
        response = await http.request(method, path, headers=headers())
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert list(response.json()) == ["error"]


async def test_http_echoes_the_request_id(http: httpx.AsyncClient) -> None:
    created = await http.post("/payments", json=create_body(), headers=headers(request_id="e-1"))
    assert created.headers["X-Request-ID"] == "e-1"
    pid = created.json()["payment"]["id"]
    for method, path, expected in (
        ("GET", "/health", 200),
        ("GET", f"/payments/{pid}", 200),
        ("GET", "/payments", 200),
        ("POST", f"/payments/{pid}/cancel", 200),
        ("GET", "/payments/999999999999", 404),
        ("GET", "/payments/abc", 400),
        ("GET", "/payments?limit=0", 400),
    ):
        request_id = rid("echo")
        response = await http.request(method, path, headers=headers(request_id=request_id))
        assert response.status_code == expected, (path, response.text)
        assert response.headers["X-Request-ID"] == request_id, path


@pytest.mark.parametrize(
    ("method", "message", "code"),
    [
        ("Health", pb.HealthRequest(), grpc.StatusCode.OK),
        ("ListPayments", pb.ListPaymentsRequest(limit=1), grpc.StatusCode.OK),
        ("GetPayment", pb.GetPaymentRequest(id=999999999999), grpc.StatusCode.NOT_FOUND),
        ("GetPayment", pb.GetPaymentRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ("CreatePayment", create_message(amount_cents=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["health", "list", "not-found", "invalid", "create-invalid"],
)
async def test_grpc_echoes_the_request_id(
    grpc_client: GrpcClient, method: str, message: object, code: grpc.StatusCode
) -> None:
    request_id = rid("echo")
    if code == grpc.StatusCode.OK:
        _, initial = await grpc_client.call(method, message, request_id=request_id)
    else:
        got, details, initial = await grpc_client.error(method, message, request_id=request_id)
        assert got == code, details
    assert initial.get("x-request-id") == request_id


async def test_grpc_create_echoes_the_request_id(grpc_client: GrpcClient) -> None:
    request_id = rid("echo")
    reply, initial = await grpc_client.call(
        "CreatePayment", create_message(), request_id=request_id
    )
    assert initial["x-request-id"] == request_id
    assert reply.payment.id > 0
