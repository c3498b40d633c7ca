"""The service's log (its stderr, captured to a file): one JSON object per line, an access
line per request with its request id and caller, and never a secret."""

from __future__ import annotations

import contextlib

import grpc
import httpx
import trio

from e2e.harness import (
    APP_API_KEY,
    CALLBACK_SIGNING_SECRET,
    GATEWAY_KEY,
    NO_ACCESS_KEY,
    ORDERS_KEY,
    SHOP_KEY,
    STRIPE_KEY,
    STRIPE_WEBHOOK_SECRET,
    GrpcClient,
    SandboxProcess,
    ServiceProcess,
    create_body,
    create_message,
    headers,
    rid,
)
from payments.gen import payments_pb2 as pb

UNKNOWN_KEY = "e2e-unknown-key-3b9f2c71d0a8"


async def until_logged(service: ServiceProcess, text: str) -> None:
    with trio.fail_after(5):
        while text not in service.log_text():  # noqa: ASYNC110  (another process writes it)
            await trio.sleep(0.02)


async def test_access_lines_and_no_secrets(
    service: ServiceProcess,
    http: httpx.AsyncClient,
    grpc_client: GrpcClient,
    sandbox: SandboxProcess,
) -> None:
    # every kind of key, over both transports, and Stripe failing once
    http_id, grpc_id = rid("log-http"), rid("log-grpc")
    created = await http.post("/payments", json=create_body(), headers=headers(request_id=http_id))
    assert created.status_code == 201
    for key in (SHOP_KEY, GATEWAY_KEY, NO_ACCESS_KEY, UNKNOWN_KEY):
        await http.get("/payments", headers=headers(key))
        with contextlib.suppress(grpc.RpcError):  # refusals: only the log matters here
            await grpc_client.call("ListPayments", pb.ListPaymentsRequest(), key=key)
    await grpc_client.call("CreatePayment", create_message(), request_id=grpc_id)
    await sandbox.fault("error", "/v1/", method="POST", status=500, times=None)
    try:
        failed = await http.post(
            "/payments",
            json=create_body(),
            headers={**headers(), "Stripe-Signature": f"t=1,v1={'ab' * 32}"},
        )
    finally:
        await sandbox.clear_faults()
    assert failed.status_code == 502
    await until_logged(service, grpc_id)

    entries = service.log_entries()  # each line must be one JSON object
    assert entries, "nothing was logged"
    access = [e for e in entries if e.get("logger") == "payments.access"]
    [line] = [e for e in access if e.get("request_id") == http_id]
    assert line["transport"] == "http"
    assert line["route"] == "POST /payments"
    assert line["status"] == 201
    assert line["caller"] == "orders"
    assert line["payment_id"] == created.json()["payment"]["id"]
    [line] = [e for e in access if e.get("request_id") == grpc_id]
    assert line["transport"] == "grpc"
    assert line["status"] == "OK"
    assert line["caller"] == "orders"
    assert any(e["level"] == "warning" and "stripe" in e["logger"] for e in entries)

    text = service.log_text()
    for secret in (
        ORDERS_KEY,
        SHOP_KEY,
        GATEWAY_KEY,
        NO_ACCESS_KEY,
        UNKNOWN_KEY,
        APP_API_KEY,
        STRIPE_KEY,
        STRIPE_WEBHOOK_SECRET,
        CALLBACK_SIGNING_SECRET,
        CALLBACK_SIGNING_SECRET.removeprefix("whsec_"),
        "sk_test_",
        "whsec_",
        "ab" * 32,
    ):
        assert secret not in text, f"{secret!r} reached the log"
