"""Request id and API key on every route and method, over HTTP and gRPC.

Order (CONTRACT.md): the request id is checked first (400 / INVALID_ARGUMENT), even
before the key, so the Auth service is not even asked; then the key: missing or unknown
401 / UNAUTHENTICATED, valid without access to payments 403 / PERMISSION_DENIED.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from e2e.harness import (
    GATEWAY_KEY,
    NO_ACCESS_KEY,
    ORDERS_KEY,
    SHOP_KEY,
    AuthThread,
    GrpcClient,
    create_body,
    create_message,
    rid,
)
from payments.gen import payments_pb2 as pb

HTTP_ROUTES = [
    ("GET", "/health"),
    ("POST", "/payments"),
    ("GET", "/payments/1"),
    ("GET", "/payments"),
    ("POST", "/payments/1/cancel"),
    ("POST", "/webhooks/providers/stripe/00000000-0000-4000-8000-000000000000"),
]

GRPC_METHODS = [
    ("Health", pb.HealthRequest()),
    ("CreatePayment", pb.CreatePaymentRequest()),
    ("GetPayment", pb.GetPaymentRequest(id=1)),
    ("ListPayments", pb.ListPaymentsRequest()),
    ("CancelPayment", pb.CancelPaymentRequest(id=1)),
    (
        "HandleProviderCallback",
        pb.HandleProviderCallbackRequest(provider="stripe", callback_hash="h", payload="{}"),
    ),
]


def unknown_key() -> str:
    return f"e2e-unknown-{rid('key')}"


async def send(
    http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> httpx.Response:
    """One request that the header checks answer before the body is read. With a body,
    the connection is not reused afterwards: see test_keepalive.py for why."""
    body: Any = None
    if method == "POST" and (path == "/payments" or path.startswith("/webhooks/")):
        body = create_body()
        headers = {**headers, "Connection": "close"}
    return await http.request(method, path, headers=headers, json=body)


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    document = response.json()
    assert list(document) == ["error"], document
    return document["error"]


# --- HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), HTTP_ROUTES)
async def test_http_request_id_is_checked_first(
    http: httpx.AsyncClient, auth: AuthThread, method: str, path: str
) -> None:
    key = unknown_key()
    for sent in ({}, {"X-API-Key": key}, {"X-Request-ID": "", "X-API-Key": key}):
        response = await send(http, method, path, sent)
        assert response.status_code == 400, (sent, response.text)
        assert "X-Request-ID" in error_of(response)
    assert key not in auth.keys_asked(), "Auth was asked before the request id was checked"


@pytest.mark.parametrize(("method", "path"), HTTP_ROUTES)
async def test_http_key_checks(http: httpx.AsyncClient, method: str, path: str) -> None:
    request_id = rid("keys")
    missing = await send(http, method, path, {"X-Request-ID": request_id})
    assert missing.status_code == 401, missing.text
    assert "X-API-Key" in error_of(missing)
    assert missing.headers["X-Request-ID"] == request_id

    blank = await send(http, method, path, {"X-Request-ID": request_id, "X-API-Key": ""})
    assert blank.status_code == 401, blank.text

    unknown = await send(http, method, path, {"X-Request-ID": request_id, "X-API-Key": "nope-1"})
    assert unknown.status_code == 401, unknown.text
    assert error_of(unknown) == "invalid API key"
    assert unknown.headers["X-Request-ID"] == request_id

    denied = await send(
        http, method, path, {"X-Request-ID": request_id, "X-API-Key": NO_ACCESS_KEY}
    )
    assert denied.status_code == 403, denied.text
    error_of(denied)
    assert denied.headers["X-Request-ID"] == request_id


async def test_http_health_with_valid_keys(http: httpx.AsyncClient) -> None:
    for key in (ORDERS_KEY, SHOP_KEY, GATEWAY_KEY):
        response = await http.get("/health", headers={"X-Request-ID": "h-1", "X-API-Key": key})
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok"}
        assert response.headers["X-Request-ID"] == "h-1"


async def test_http_healthz_needs_no_headers(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["status"] == "ok"
    assert document["database"] == "ok"
    assert document["children"]["http"]["state"] == "running"
    assert document["children"]["grpc"]["state"] == "running"


# --- gRPC -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "message"), GRPC_METHODS, ids=[m for m, _ in GRPC_METHODS])
async def test_grpc_request_id_is_checked_first(
    grpc_client: GrpcClient, auth: AuthThread, method: str, message: Any
) -> None:
    key = unknown_key()
    for request_id, sent_key in ((None, None), (None, key), ("", key)):
        code, details, _ = await grpc_client.error(
            method, message, key=sent_key, request_id=request_id
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request_id, sent_key, details)
        assert "x-request-id" in details
    assert key not in auth.keys_asked(), "Auth was asked before the request id was checked"


@pytest.mark.parametrize(("method", "message"), GRPC_METHODS, ids=[m for m, _ in GRPC_METHODS])
async def test_grpc_key_checks(grpc_client: GrpcClient, method: str, message: Any) -> None:
    request_id = rid("keys")
    code, details, initial = await grpc_client.error(
        method, message, key=None, request_id=request_id
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert "x-api-key" in details
    assert initial.get("x-request-id") == request_id

    code, details, initial = await grpc_client.error(
        method, message, key="nope-1", request_id=request_id
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert details == "invalid API key"
    assert initial.get("x-request-id") == request_id

    code, details, initial = await grpc_client.error(
        method, message, key=NO_ACCESS_KEY, request_id=request_id
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert initial.get("x-request-id") == request_id


async def test_grpc_malformed_metadata_does_not_hurt_the_server(grpc_client: GrpcClient) -> None:
    """A whitespace-padded metadata value is malformed HTTP/2 (RFC 9113 8.2.1): that call
    answers INVALID_ARGUMENT naming the key, and the next call works (tests/test_h2_streams.py
    shows the connection itself survives)."""
    with pytest.raises(grpc.RpcError) as error:
        await grpc_client.call("Health", pb.HealthRequest(), request_id="  ")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.value.details().startswith("x-request-id: ")  # type: ignore[attr-defined]
    response, _ = await grpc_client.call("Health", pb.HealthRequest())
    assert response.status == "ok"


async def test_grpc_health(grpc_client: GrpcClient) -> None:
    response, initial = await grpc_client.call("Health", pb.HealthRequest(), request_id="h-2")
    assert response.status == "ok"
    assert initial["x-request-id"] == "h-2"


async def test_create_for_another_service_is_forbidden(
    http: httpx.AsyncClient, grpc_client: GrpcClient
) -> None:
    """A caller creates only with its own caller_service (403 / PERMISSION_DENIED)."""
    response = await http.post(
        "/payments",
        json=create_body(caller_service="shop"),
        headers={"X-Request-ID": rid(), "X-API-Key": ORDERS_KEY},
    )
    assert response.status_code == 403, response.text
    code, details, _ = await grpc_client.error(
        "CreatePayment", create_message(caller_service="shop")
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
