"""Bad input answers 400 / INVALID_ARGUMENT naming the field, and nothing is created."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from e2e.harness import (
    MAX_BODY_BYTES,
    GrpcClient,
    SandboxProcess,
    create_body,
    create_message,
    headers,
    rid,
)
from payments.gen import payments_pb2 as pb

RECURRING = {"payment_type": 2, "recurring_interval": "month", "recurring_interval_count": 1}

# (changes to a valid create body, field the error names); both transports.
COMMON_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "request-id-blank": ({"request_id": " "}, "request_id"),
    "caller-service-missing": ({"caller_service": ""}, "caller_service"),
    "resource-type-blank": ({"resource_type": "   "}, "resource_type"),
    "resource-id-missing": ({"resource_id": ""}, "resource_id"),
    "resource-id-too-long": ({"resource_id": "x" * 129}, "resource_id"),
    "amount-zero": ({"amount_cents": 0}, "amount_cents"),
    "amount-negative": ({"amount_cents": -100}, "amount_cents"),
    "currency-long": ({"currency": "EURO"}, "currency"),
    "currency-digits": ({"currency": "E1R"}, "currency"),
    "currency-missing": ({"currency": ""}, "currency"),
    "method-unspecified": ({"payment_method": 0}, "payment_method"),
    "method-unknown": ({"payment_method": 7}, "payment_method"),
    "type-unspecified": ({"payment_type": 0}, "payment_type"),
    "type-unknown": ({"payment_type": 9}, "payment_type"),
    "provider-unknown": ({"provider": 5}, "provider"),
    "callback-missing": ({"status_callback_url": ""}, "status_callback_url"),
    "callback-not-http": ({"status_callback_url": "ftp://x/cb"}, "status_callback_url"),
    "success-url-relative": ({"success_url": "/done"}, "success_url"),
    "recurring-without-interval": (
        {"payment_type": 2, "recurring_interval_count": 1},
        "recurring_interval",
    ),
    "recurring-bad-interval": (
        {**RECURRING, "recurring_interval": "fortnight"},
        "recurring_interval",
    ),
    "recurring-without-count": (
        {**RECURRING, "recurring_interval_count": 0},
        "recurring_interval_count",
    ),
    "metadata-reserved-key": ({"metadata": {"request_id": "x"}}, "metadata"),
}

# JSON-only: wrong types and the like (protobuf types the gRPC fields itself).
JSON_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "amount-string": ({"amount_cents": "12x"}, "amount_cents"),
    "amount-bool": ({"amount_cents": True}, "amount_cents"),
    "amount-fraction": ({"amount_cents": 12.5}, "amount_cents"),
    "amount-out-of-int64": ({"amount_cents": 2**64}, "amount_cents"),
    "currency-number": ({"currency": 978}, "currency"),
    "request-id-number": ({"request_id": 5}, "request_id"),
    "method-bool": ({"payment_method": True}, "payment_method"),
    "method-unknown-name": ({"payment_method": "bitcoin"}, "payment_method"),
    "type-object": ({"payment_type": {}}, "payment_type"),
    "type-unknown-name": ({"payment_type": "PAYMENT_TYPE_FOREVER"}, "payment_type"),
    "provider-unknown-name": ({"provider": "paypal"}, "provider"),
    "count-string": ({**RECURRING, "recurring_interval_count": "one"}, "recurring_interval_count"),
    "metadata-list": ({"metadata": ["a"]}, "metadata"),
    "metadata-value-number": ({"metadata": {"a": 1}}, "metadata"),
}


@pytest.fixture
async def nothing_created(
    http: httpx.AsyncClient, sandbox: SandboxProcess
) -> AsyncIterator[list[str]]:
    """Request ids a test used; afterwards none may name a payment or a Stripe call."""
    used: list[str] = []
    yield used
    requests = await sandbox.requests()
    for request_id in used:
        response = await http.get("/payments", params={"request_id": request_id}, headers=headers())
        assert response.json() == {"payments": []}, request_id
        assert not [
            r
            for r in requests
            if (r["params"].get("metadata") or {}).get("request_id") == request_id
        ]


# On HTTP a blank body request_id falls back to the X-Request-ID header (test_create.py).
HTTP_CASES = {k: v for k, v in (COMMON_CASES | JSON_CASES).items() if k != "request-id-blank"}


@pytest.mark.parametrize("case", list(HTTP_CASES))
async def test_create_validation_over_http(
    http: httpx.AsyncClient, nothing_created: list[str], case: str
) -> None:
    changes, field = HTTP_CASES[case]
    request_id = rid("invalid")
    nothing_created.append(request_id)
    body = create_body(**{"request_id": request_id, **changes})
    response = await http.post("/payments", json=body, headers=headers(request_id=request_id))
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:"), response.text


@pytest.mark.parametrize("case", list(COMMON_CASES))
async def test_create_validation_over_grpc(
    grpc_client: GrpcClient, nothing_created: list[str], case: str
) -> None:
    changes, field = COMMON_CASES[case]
    request_id = rid("invalid")
    nothing_created.append(request_id)
    message = create_message(**{"request_id": request_id, **changes})
    code, details, _ = await grpc_client.error("CreatePayment", message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"amount_cents": NaN}'],
    ids=["empty", "not-json", "array", "string", "not-utf8", "nan"],
)
async def test_body_not_a_json_object(http: httpx.AsyncClient, content: bytes) -> None:
    response = await http.post(
        "/payments", content=content, headers={**headers(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "JSON" in response.json()["error"], response.text


async def test_oversized_body(http: httpx.AsyncClient, nothing_created: list[str]) -> None:
    """Over PAYMENTS_MAX_BODY_BYTES: 400 naming the body, by Content-Length or streamed."""
    request_id = rid("huge")
    nothing_created.append(request_id)
    body = create_body(request_id=request_id, customer_ref="x" * MAX_BODY_BYTES)
    raw = json.dumps(body).encode()
    response = await http.post(
        "/payments", content=raw, headers={**headers(), "Connection": "close"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("body: request body too large")

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 1024):
            yield raw[start : start + 1024]

    streamed = await http.post(
        "/payments", content=chunks(), headers={**headers(), "Connection": "close"}
    )
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert streamed.status_code == 400, streamed.text


@pytest.mark.parametrize(
    "path_id", ["abc", "0", "-1", "1.5", "1e3", "99999999999999999999999", "%20"]
)
async def test_id_not_a_number(http: httpx.AsyncClient, path_id: str) -> None:
    for method, path in (("GET", f"/payments/{path_id}"), ("POST", f"/payments/{path_id}/cancel")):
        response = await http.request(method, path, headers=headers())
        assert response.status_code == 400, (method, path, response.text)
        assert response.json()["error"].startswith("id:"), response.text


async def test_id_zero_over_grpc(grpc_client: GrpcClient) -> None:
    for method, message in (
        ("GetPayment", pb.GetPaymentRequest()),
        ("CancelPayment", pb.CancelPaymentRequest()),
    ):
        code, details, _ = await grpc_client.error(method, message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith("id:"), details
