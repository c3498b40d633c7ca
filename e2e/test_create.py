"""Creating payments over HTTP and gRPC, checked against the Stripe emulator's objects.

Both methods (HOSTED_CARD: a Checkout Session; PAYMENT_LINK: Product, Price, Payment
Link) and both types (ONE_TIME, RECURRING); idempotent replay; the same request id with
other parameters (409 / ALREADY_EXISTS); concurrent duplicates over both transports;
Stripe failing (502 / UNAVAILABLE) and the retry that then succeeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
import trio

from e2e.harness import (
    CALLBACK_BASE_URL,
    GATEWAY_KEY,
    ORDERS,
    ORDERS_KEY,
    SHOP,
    SHOP_KEY,
    GrpcClient,
    SandboxProcess,
    ServiceProcess,
    create_body,
    create_message,
    eventually,
    headers,
    payment_fields,
    rid,
)
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus

SESSIONS = "POST /v1/checkout/sessions"
Spawn = Callable[..., ServiceProcess]

CASES = {
    "hosted-card-one-time": {"payment_method": 1, "payment_type": 1},
    "hosted-card-recurring": {
        "payment_method": 1,
        "payment_type": 2,
        "recurring_interval": "month",
        "recurring_interval_count": 3,
    },
    "payment-link-one-time": {"payment_method": 2, "payment_type": 1},
    "payment-link-recurring": {
        "payment_method": 2,
        "payment_type": 2,
        "recurring_interval": "week",
        "recurring_interval_count": 2,
    },
}


async def create_http(http: httpx.AsyncClient, key: str = ORDERS_KEY, **changes: Any) -> Any:
    body = create_body(**changes)
    response = await http.post("/payments", json=body, headers=headers(key))
    assert response.status_code == 201, response.text
    return response.json()["payment"]


async def create_grpc(grpc_client: GrpcClient, key: str = ORDERS_KEY, **changes: Any) -> Any:
    response, _ = await grpc_client.call("CreatePayment", create_message(**changes), key=key)
    return payment_fields(response.payment)


def check_payment(payment: dict[str, Any], request_id: str, changes: dict[str, Any]) -> None:
    assert payment["id"] > 0
    assert payment["request_id"] == request_id
    assert payment["caller_service"] == ORDERS
    assert payment["status"] == PaymentStatus.PENDING
    assert payment["payment_method"] == changes["payment_method"]
    assert payment["payment_type"] == changes["payment_type"]
    assert payment["provider"] == 1  # UNSPECIFIED means STRIPE
    assert payment["amount_cents"] == 2500
    assert payment["currency"] == "EUR"
    assert payment["metadata"] == {"order_ref": "A-1042"}
    callback_hash = payment["provider_callback_hash"]
    assert payment["provider_callback_url"] == f"{CALLBACK_BASE_URL}/{callback_hash}"
    if changes["payment_type"] == 2:
        assert payment["recurring_interval"] == changes["recurring_interval"]
        assert payment["recurring_interval_count"] == changes["recurring_interval_count"]
    else:
        assert "recurring_interval" not in payment
        assert "recurring_interval_count" not in payment


async def check_stripe_objects(
    sandbox: SandboxProcess, payment: dict[str, Any], changes: dict[str, Any]
) -> None:
    request_id = payment["request_id"]
    objects = await sandbox.objects_for(request_id)
    metadata = {
        "order_ref": "A-1042",
        "request_id": request_id,
        "callback_hash": payment["provider_callback_hash"],
    }
    recurring = changes["payment_type"] == 2
    if changes["payment_method"] == 1:
        assert objects["payment_links"] == [] and objects["products"] == []
        [session] = objects["checkout_sessions"]
        assert payment["provider_payment_id"] == session["id"]
        assert payment["checkout_url"] == session["url"]
        assert session["mode"] == ("subscription" if recurring else "payment")
        assert session["client_reference_id"] == request_id
        assert session["metadata"] == metadata
        assert session["currency"] == "eur"
        assert session["amount_total"] == 2500
        assert session["status"] == "open"
        callback = payment["provider_callback_url"]
        assert session["success_url"] == f"{callback}?state=success"
        assert session["cancel_url"] == f"{callback}?state=cancel"
        [sent] = await sandbox.requests_for(request_id, SESSIONS)
        [item] = sent["params"]["line_items"]
        price_data = item["price_data"]
        assert price_data["currency"] == "eur"
        assert int(price_data["unit_amount"]) == 2500
        assert price_data["product_data"]["name"] == "order-1042"
        assert int(item["quantity"]) == 1
        if recurring:
            assert price_data["recurring"]["interval"] == changes["recurring_interval"]
            assert (
                int(price_data["recurring"]["interval_count"])
                == (changes["recurring_interval_count"])
            )
            assert sent["params"]["subscription_data"]["metadata"] == metadata
        else:
            assert "recurring" not in price_data
    else:
        assert objects["checkout_sessions"] == []
        [product] = objects["products"]
        [price] = objects["prices"]
        [link] = objects["payment_links"]
        assert product["name"] == "order-1042"
        assert product["metadata"] == metadata
        assert price["unit_amount"] == 2500
        assert price["currency"] == "eur"
        assert price["type"] == ("recurring" if recurring else "one_time")
        if recurring:
            assert price["recurring"]["interval"] == changes["recurring_interval"]
            assert price["recurring"]["interval_count"] == changes["recurring_interval_count"]
        assert payment["provider_payment_id"] == link["id"]
        assert payment["checkout_url"] == link["url"]
        assert link["active"] is True
        assert link["metadata"] == metadata
        assert link["after_completion"]["type"] == "redirect"
        assert link["after_completion"]["redirect"]["url"] == payment["provider_callback_url"]


@pytest.mark.parametrize("case", list(CASES))
async def test_create_over_http(
    http: httpx.AsyncClient, sandbox: SandboxProcess, case: str
) -> None:
    changes = CASES[case]
    request_id = rid(case)
    payment = await create_http(http, request_id=request_id, **changes)
    check_payment(payment, request_id, changes)
    await check_stripe_objects(sandbox, payment, changes)


@pytest.mark.parametrize("case", list(CASES))
async def test_create_over_grpc(
    grpc_client: GrpcClient, sandbox: SandboxProcess, case: str
) -> None:
    changes = CASES[case]
    request_id = rid(case)
    payment = await create_grpc(grpc_client, request_id=request_id, **changes)
    check_payment(payment, request_id, changes)
    await check_stripe_objects(sandbox, payment, changes)


async def test_enum_names_and_header_request_id_on_http(
    http: httpx.AsyncClient, sandbox: SandboxProcess
) -> None:
    """Enums may be given by name (full or short); a blank body request_id falls back to
    the X-Request-ID header."""
    header_id = rid("hdr-fallback")
    body = create_body(
        request_id="  ",
        payment_method="PAYMENT_METHOD_PAYMENT_LINK",
        payment_type="recurring",
        provider="stripe",
        recurring_interval="year",
        recurring_interval_count=1,
    )
    response = await http.post("/payments", json=body, headers=headers(request_id=header_id))
    assert response.status_code == 201, response.text
    payment = response.json()["payment"]
    assert payment["request_id"] == header_id
    assert (payment["payment_method"], payment["payment_type"], payment["provider"]) == (2, 2, 1)
    assert len((await sandbox.objects_for(header_id))["payment_links"]) == 1


async def test_idempotent_replay_over_both_transports(
    http: httpx.AsyncClient, grpc_client: GrpcClient, sandbox: SandboxProcess
) -> None:
    request_id = rid("replay")
    first = await create_http(http, request_id=request_id)
    again = await create_http(http, request_id=request_id)
    over_grpc = await create_grpc(grpc_client, request_id=request_id)
    assert again == first
    assert over_grpc == first
    assert len((await sandbox.objects_for(request_id))["checkout_sessions"]) == 1
    assert len(await sandbox.requests_for(request_id, SESSIONS)) == 1


async def test_request_ids_are_scoped_by_caller(
    http: httpx.AsyncClient, sandbox: SandboxProcess
) -> None:
    """Another service may use the same request id: that is another payment."""
    request_id = rid("scoped")
    mine = await create_http(http, request_id=request_id)
    theirs = await create_http(http, key=SHOP_KEY, request_id=request_id, caller_service=SHOP)
    assert theirs["id"] != mine["id"]
    assert theirs["caller_service"] == SHOP
    assert len((await sandbox.objects_for(request_id))["checkout_sessions"]) == 2


async def test_trusted_gateway_creates_for_another_service(
    http: httpx.AsyncClient, grpc_client: GrpcClient
) -> None:
    """PAYMENTS_TRUSTED_CALLERS=gateway: it may act for ``orders``, who then sees it."""
    request_id = rid("gateway")
    payment = await create_http(http, key=GATEWAY_KEY, request_id=request_id)
    assert payment["caller_service"] == ORDERS
    response, _ = await grpc_client.call(
        "GetPayment", pb.GetPaymentRequest(id=payment["id"]), key=ORDERS_KEY
    )
    assert response.payment.request_id == request_id


async def test_same_request_id_other_parameters_conflict(
    http: httpx.AsyncClient, grpc_client: GrpcClient, sandbox: SandboxProcess
) -> None:
    request_id = rid("conflict")
    payment = await create_http(http, request_id=request_id)
    for changes in ({"amount_cents": 2600}, {"currency": "usd"}, {"metadata": {}}):
        response = await http.post(
            "/payments", json=create_body(request_id=request_id, **changes), headers=headers()
        )
        assert response.status_code == 409, (changes, response.text)
        assert set(response.json()) == {"error"}
        code, details, _ = await grpc_client.error(
            "CreatePayment", create_message(request_id=request_id, **changes)
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS, (changes, details)
    # the payment is untouched and Stripe was called once
    response = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert response.json()["payment"] == payment
    assert len(await sandbox.requests_for(request_id, SESSIONS)) == 1


@pytest.mark.parametrize("method", [1, 2], ids=["hosted-card", "payment-link"])
async def test_concurrent_duplicates_make_one_payment(
    http: httpx.AsyncClient, grpc_client: GrpcClient, sandbox: SandboxProcess, method: int
) -> None:
    """20 concurrent creates of one request, half over HTTP and half over gRPC, while
    Stripe is slow: one payment, one Stripe object (of each kind), one call each."""
    request_id = rid("concurrent")
    changes = {"request_id": request_id, "payment_method": method}
    await sandbox.fault("delay", "/v1/", method="POST", seconds=0.5, times=None)
    ids: list[int] = []
    errors: list[str] = []

    async def over_http() -> None:
        response = await http.post("/payments", json=create_body(**changes), headers=headers())
        if response.status_code == 201:
            ids.append(response.json()["payment"]["id"])
        else:
            errors.append(f"http {response.status_code} {response.text}")

    async def over_grpc() -> None:
        try:
            payment = await create_grpc(grpc_client, **changes)
        except grpc.RpcError as exc:
            errors.append(f"grpc {exc.code()} {exc.details()}")
        else:
            ids.append(payment["id"])

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(over_http)
                nursery.start_soon(over_grpc)
    finally:
        await sandbox.clear_faults()
    assert errors == []
    assert len(ids) == 20
    assert len(set(ids)) == 1, ids
    objects = await sandbox.objects_for(request_id)
    if method == 1:
        assert len(objects["checkout_sessions"]) == 1
        assert len(await sandbox.requests_for(request_id, SESSIONS)) == 1
    else:
        assert [len(objects[k]) for k in ("products", "prices", "payment_links")] == [1, 1, 1]
        assert len(await sandbox.requests_for(request_id, "POST /v1/payment_links")) == 1


@pytest.mark.parametrize("method", [1, 2], ids=["hosted-card", "payment-link"])
async def test_stripe_failing_then_retry_over_http(
    http: httpx.AsyncClient, sandbox: SandboxProcess, method: int
) -> None:
    request_id = rid("stripe-down")
    body = create_body(request_id=request_id, payment_method=method)
    await sandbox.fault("error", "/v1/", method="POST", status=500, times=None)
    try:
        response = await http.post("/payments", json=body, headers=headers())
    finally:
        await sandbox.clear_faults()
    assert response.status_code == 502, response.text
    assert response.json() == {"error": "payment provider unavailable"}
    objects = await sandbox.objects_for(request_id)
    assert not any(objects.values()), objects

    retry = await http.post("/payments", json=body, headers=headers())
    assert retry.status_code == 201, retry.text
    payment = retry.json()["payment"]
    assert payment["status"] == PaymentStatus.PENDING
    objects = await sandbox.objects_for(request_id)
    kind = "checkout_sessions" if method == 1 else "payment_links"
    assert [o["id"] for o in objects[kind]] == [payment["provider_payment_id"]]


async def test_stripe_failing_then_retry_over_grpc(
    grpc_client: GrpcClient, sandbox: SandboxProcess
) -> None:
    request_id = rid("stripe-down-grpc")
    await sandbox.fault("error", "/v1/checkout/sessions", method="POST", status=503, times=None)
    try:
        code, details, _ = await grpc_client.error(
            "CreatePayment", create_message(request_id=request_id)
        )
    finally:
        await sandbox.clear_faults()
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert details == "payment provider unavailable"
    payment = await create_grpc(grpc_client, request_id=request_id)
    assert payment["status"] == PaymentStatus.PENDING
    [session] = (await sandbox.objects_for(request_id))["checkout_sessions"]
    assert session["id"] == payment["provider_payment_id"]


async def test_stripe_refusing_is_a_bad_request(
    http: httpx.AsyncClient, grpc_client: GrpcClient, sandbox: SandboxProcess
) -> None:
    """Stripe refusing the parameters (here: a currency it does not know) is the
    caller's 400 / INVALID_ARGUMENT, and nothing is left behind: the corrected request
    with the same request id then goes through."""
    request_id = rid("stripe-refuses")
    response = await http.post(
        "/payments", json=create_body(request_id=request_id, currency="zzz"), headers=headers()
    )
    assert response.status_code == 400, response.text
    code, details, _ = await grpc_client.error(
        "CreatePayment", create_message(request_id=request_id, currency="zzz")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    payment = await create_http(http, request_id=request_id)
    assert payment["currency"] == "EUR"
    assert len((await sandbox.objects_for(request_id))["checkout_sessions"]) == 1


@pytest.mark.parametrize("method", [1, 2], ids=["hosted-card", "payment-link"])
async def test_stripe_answer_lost_then_retry_makes_no_second_object(
    spawn: Spawn, sandbox: SandboxProcess, method: int
) -> None:
    """Stripe makes the object but its answer never arrives in time (504, naming
    Stripe: a timeout, not a failure); the retry
    of the same request replays Stripe's idempotent result instead of making another.
    A process of its own with a 0.5 s Stripe timeout."""
    process = await trio.to_thread.run_sync(spawn, {"STRIPE_HTTP_TIMEOUT_SECONDS": "0.5"})
    request_id = rid("lost-answer")
    body = create_body(request_id=request_id, payment_method=method)
    last_call = "/v1/checkout/sessions" if method == 1 else "/v1/payment_links"
    await sandbox.fault("delay", last_call, method="POST", seconds=1.0, after=True)
    try:
        async with httpx.AsyncClient(base_url=process.http_url, timeout=15) as http:
            lost = await http.post("/payments", json=body, headers=headers())
            assert lost.status_code == 504, lost.text
            assert lost.json() == {"error": "stripe did not answer within 0.5s"}
            kind = "checkout_sessions" if method == 1 else "payment_links"
            made = await eventually(lambda: objects_of(sandbox, request_id, kind))
            retry = await http.post("/payments", json=body, headers=headers())
    finally:
        await sandbox.clear_faults()
    assert retry.status_code == 201, retry.text
    payment = retry.json()["payment"]
    objects = await sandbox.objects_for(request_id)
    assert [o["id"] for o in objects[kind]] == [made[0]["id"]] == [payment["provider_payment_id"]]
    if method == 2:
        assert (len(objects["products"]), len(objects["prices"])) == (1, 1)


async def objects_of(sandbox: SandboxProcess, request_id: str, kind: str) -> Any:
    return (await sandbox.objects_for(request_id))[kind]
