"""Refunds over both transports against the in-process stack (real sockets, the
emulator as Stripe, the purerpc Auth server): routes, status codes, JSON shape, the
owner-only rule, replays and conflicts, Stripe down, and the payment's totals on every
read."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from payments.gen import payments_pb2 as pb
from payments.model import Payment, PaymentStatus
from tests.fixtures.app import KEY_A, KEY_B, Stack
from tests.test_grpc_api import Client, Code

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
        yield client


@pytest.fixture
def grpc_client(stack: Stack) -> Iterator[Client]:
    client = Client(stack.grpc_target)
    yield client
    client.channel.close()


def headers(key: str = KEY_A, request_id: str = "rid-refund") -> dict[str, str]:
    return {"X-Request-ID": request_id, "X-API-Key": key}


def new_id() -> str:
    return f"ref-{uuid.uuid4().hex[:12]}"


async def paid(stack: Stack, amount_cents: int = 1000) -> Payment:
    """A payment of svc-a paid at the emulator; PAID through Stripe's own events."""
    payment = await stack.create_payment(amount_cents=amount_cents)
    stack.sandbox.state.complete_session(payment.provider_payment_id)
    await stack.events_delivered()
    stored = await stack.payment(payment.id)
    assert stored.status == PaymentStatus.PAID
    return stored


async def post_refund(
    http: httpx.AsyncClient, payment_id: int, body: Any, key: str = KEY_A, rid: str = "rid-refund"
) -> httpx.Response:
    return await http.post(f"/payments/{payment_id}/refunds", json=body, headers=headers(key, rid))


async def totals(http: httpx.AsyncClient, payment_id: int) -> tuple[int, int]:
    response = await http.get(f"/payments/{payment_id}", headers=headers())
    assert response.status_code == 200, response.text
    document = response.json()["payment"]
    return document.get("refunded_cents", 0), document.get("refundable_cents", 0)


async def test_http_create_get_list_and_the_payment_totals(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    payment = await paid(stack)
    assert await totals(http, payment.id) == (0, 1000)
    body = {"request_id": "r-1", "amount_cents": 300, "reason": "duplicate", "metadata": {"a": "b"}}
    created = await post_refund(http, payment.id, body, rid="echo-me")
    assert created.status_code == 201, created.text
    assert created.headers["X-Request-ID"] == "echo-me"
    refund = created.json()["refund"]
    assert refund["payment_id"] == payment.id and refund["status"] == 10
    assert refund["amount_cents"] == 300 and refund["currency"] == "USD"
    assert refund["reason"] == "duplicate" and refund["metadata"] == {"a": "b"}
    assert refund["request_id"] == "r-1" and refund["caller_service"] == "svc-a"
    assert refund["provider_refund_id"].startswith("re_")
    assert refund["created_at"].endswith("Z") and "failure_reason" not in refund
    assert await totals(http, payment.id) == (300, 700)
    # The request id falls back to X-Request-ID; amount 0 means all that is left.
    rest = await http.post(  # no body at all: everything is optional
        f"/payments/{payment.id}/refunds", headers=headers(request_id="r-header")
    )
    assert rest.status_code == 201 and rest.json()["refund"]["request_id"] == "r-header"
    assert rest.json()["refund"]["amount_cents"] == 700
    listed = await http.get(f"/payments/{payment.id}/refunds", headers=headers())
    assert listed.status_code == 200
    assert [r["id"] for r in listed.json()["refunds"]] == [
        refund["id"],
        rest.json()["refund"]["id"],
    ]
    got = await http.get(f"/refunds/{refund['id']}", headers=headers())
    assert got.status_code == 200 and got.json()["refund"] == refund
    page = await http.get("/payments", params={"request_id": payment.request_id}, headers=headers())
    [listed_payment] = page.json()["payments"]
    assert listed_payment["refunded_cents"] == 1000 and "refundable_cents" not in listed_payment
    assert await totals(http, payment.id) == (1000, 0)


async def test_http_replay_conflict_and_precondition(http: httpx.AsyncClient, stack: Stack) -> None:
    payment = await paid(stack)
    body = {"request_id": new_id(), "amount_cents": 400}
    first = await post_refund(http, payment.id, body)
    again = await post_refund(http, payment.id, body)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and len(stack.sandbox.state.refunds) == 1
    conflict = await post_refund(http, payment.id, {**body, "amount_cents": 401})
    assert conflict.status_code == 409 and "different parameters" in conflict.json()["error"]
    too_much = await post_refund(http, payment.id, {"request_id": new_id(), "amount_cents": 601})
    assert too_much.status_code == 409
    assert too_much.json() == {"error": "amount_cents 601 exceeds the refundable amount 600"}
    unpaid = await stack.create_payment()
    pending = await post_refund(http, unpaid.id, {"request_id": new_id()})
    assert pending.status_code == 409 and "PENDING" in pending.json()["error"]
    assert len(stack.sandbox.state.refunds) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount_cents": -1}, "amount_cents"),
        ({"amount_cents": "ten"}, "amount_cents"),
        ({"amount_cents": 1.5}, "amount_cents"),
        ({"reason": "changed_mind"}, "reason"),
        ({"reason": 3}, "reason"),
        ({"metadata": {"refund_id": "x"}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": "k=v"}, "metadata"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"request_id": 7}, "request_id"),
        ({"request_id": "stripe:re_123"}, "request_id"),
    ],
)
async def test_http_bad_input_is_400_naming_the_field(
    http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], field: str
) -> None:
    payment = await paid(stack)
    response = await post_refund(http, payment.id, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")
    assert stack.sandbox.state.refunds == {}
    assert await totals(http, payment.id) == (0, 1000)


async def test_http_bodies_and_ids_that_are_not_valid(http: httpx.AsyncClient) -> None:
    for raw in (b"not json", b"[1]", b'"x"'):
        response = await http.post("/payments/1/refunds", content=raw, headers=headers())
        assert response.status_code == 400, raw
    for path in ("/payments/0/refunds", "/payments/abc/refunds", "/refunds/-1", "/refunds/x"):
        method = http.post if path.startswith("/payments") else http.get
        kwargs: dict[str, Any] = {"json": {}} if method == http.post else {}
        response = await method(path, headers=headers(), **kwargs)
        assert response.status_code == 400 and response.json()["error"].startswith("id:"), path
    missing_key = await http.get("/refunds/1", headers={"X-Request-ID": "r"})
    assert missing_key.status_code == 401


async def test_another_callers_refunds_are_404(http: httpx.AsyncClient, stack: Stack) -> None:
    payment = await paid(stack)
    made = await post_refund(http, payment.id, {"request_id": new_id(), "amount_cents": 100})
    refund_id = made.json()["refund"]["id"]
    for response in (
        await post_refund(http, payment.id, {"request_id": new_id()}, key=KEY_B),
        await http.get(f"/payments/{payment.id}/refunds", headers=headers(KEY_B)),
        await http.get(f"/refunds/{refund_id}", headers=headers(KEY_B)),
        await http.get("/refunds/987654321", headers=headers()),
        await http.get("/payments/987654321/refunds", headers=headers()),
    ):
        assert response.status_code == 404, response.text
    assert len(stack.sandbox.state.refunds) == 1


async def test_stripe_down_is_503_and_the_retry_completes(
    http: httpx.AsyncClient, stack: Stack
) -> None:
    payment = await paid(stack)
    body = {"request_id": new_id(), "amount_cents": 250}
    stack.sandbox.faults.fail(500, path="/v1/refunds", times=None)
    down = await post_refund(http, payment.id, body)
    assert down.status_code == 503 and "retry" in down.json()["error"]
    assert await totals(http, payment.id) == (0, 750)  # the claim holds its amount
    stack.sandbox.faults.clear()
    done = await post_refund(http, payment.id, body)
    assert done.status_code == 201 and done.json()["refund"]["status"] == 10
    assert len(stack.sandbox.state.refunds) == 1
    assert await totals(http, payment.id) == (250, 750)


async def test_grpc_create_get_list(grpc_client: Client, stack: Stack) -> None:
    payment = await paid(stack)
    request = pb.CreateRefundRequest(
        payment_id=payment.id, request_id=new_id(), amount_cents=600, metadata={"k": "v"}
    )
    reply = await grpc_client.call("CreateRefund", request, rid="g-refund")
    assert reply.code == Code.OK, reply.details
    assert reply.initial_metadata["x-request-id"] == "g-refund"
    refund = reply.response.refund
    assert (refund.status, refund.amount_cents) == (pb.REFUND_STATUS_SUCCEEDED, 600)
    assert refund.metadata == {"k": "v"} and refund.provider_refund_id.startswith("re_")
    again = await grpc_client.call("CreateRefund", request)
    assert again.response.refund == refund
    got = await grpc_client.call("GetRefund", pb.GetRefundRequest(id=refund.id))
    assert got.response.refund == refund
    listed = await grpc_client.call("ListRefunds", pb.ListRefundsRequest(payment_id=payment.id))
    assert list(listed.response.refunds) == [refund]
    read = await grpc_client.call("GetPayment", pb.GetPaymentRequest(id=payment.id))
    assert (read.payment.refunded_cents, read.payment.refundable_cents) == (600, 400)


async def test_grpc_errors(grpc_client: Client, stack: Stack) -> None:
    payment = await paid(stack)
    request_id = new_id()
    cases: list[tuple[str, Any, str, Code, str]] = [
        (
            "CreateRefund",
            pb.CreateRefundRequest(payment_id=payment.id),
            KEY_A,
            Code.INVALID_ARGUMENT,
            "request_id: is required",
        ),
        (
            "CreateRefund",
            pb.CreateRefundRequest(payment_id=payment.id, request_id="x", amount_cents=-5),
            KEY_A,
            Code.INVALID_ARGUMENT,
            "amount_cents: must not be negative",
        ),
        (
            "CreateRefund",
            pb.CreateRefundRequest(request_id="x"),
            KEY_A,
            Code.INVALID_ARGUMENT,
            "payment_id: must be a positive integer",
        ),
        (
            "CreateRefund",
            pb.CreateRefundRequest(payment_id=payment.id, request_id="x"),
            KEY_B,
            Code.NOT_FOUND,
            "payment not found",
        ),
        (
            "CreateRefund",
            pb.CreateRefundRequest(payment_id=payment.id, request_id=request_id, amount_cents=1001),
            KEY_A,
            Code.FAILED_PRECONDITION,
            "amount_cents 1001 exceeds the refundable amount 1000",
        ),
        (
            "GetRefund",
            pb.GetRefundRequest(),
            KEY_A,
            Code.INVALID_ARGUMENT,
            "id: must be a positive integer",
        ),
        ("GetRefund", pb.GetRefundRequest(id=987654321), KEY_A, Code.NOT_FOUND, "refund not found"),
        (
            "ListRefunds",
            pb.ListRefundsRequest(),
            KEY_A,
            Code.INVALID_ARGUMENT,
            "payment_id: must be a positive integer",
        ),
        (
            "ListRefunds",
            pb.ListRefundsRequest(payment_id=payment.id),
            KEY_B,
            Code.NOT_FOUND,
            "payment not found",
        ),
    ]
    for method, message, key, code, details in cases:
        reply = await grpc_client.call(method, message, key=key)
        assert (reply.code, reply.details) == (code, details), method
    made = await grpc_client.call(
        "CreateRefund",
        pb.CreateRefundRequest(payment_id=payment.id, request_id=request_id, amount_cents=10),
    )
    assert made.code == Code.OK
    conflict = await grpc_client.call(
        "CreateRefund",
        pb.CreateRefundRequest(payment_id=payment.id, request_id=request_id, amount_cents=11),
    )
    assert conflict.code == Code.ALREADY_EXISTS
    stack.sandbox.faults.fail(503, path="/v1/refunds", times=None)
    down = await grpc_client.call(
        "CreateRefund",
        pb.CreateRefundRequest(payment_id=payment.id, request_id=new_id(), amount_cents=10),
    )
    assert down.code == Code.UNAVAILABLE
    assert len(stack.sandbox.state.refunds) == 1
