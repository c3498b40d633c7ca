"""The gRPC API end to end, driven by the official grpcio client (blocking calls run in
threads; grpc.aio would need asyncio) against purerpc on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import attrs
import grpc
import httpx
import pytest
import trio
from google.protobuf import json_format

from payments.api.grpc import PaymentsServicer
from payments.config import MysqlDsn
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from payments.model import PaymentStatus
from payments.providers.registry import ProviderRegistry
from payments.service import PaymentService
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.fixtures.app import KEY_A, KEY_B, NO_ACCESS_KEY, Stack, closed_port

pytestmark = pytest.mark.timeout(60)

Code = grpc.StatusCode


@attrs.frozen
class Reply:
    """What a call ended with: the status, the response and the initial metadata."""

    code: grpc.StatusCode
    details: str
    response: Any
    initial_metadata: dict[str, str]

    @property
    def payment(self) -> pb.Payment:
        assert self.code == Code.OK, (self.code, self.details)
        return self.response.payment


class Client:
    """A grpcio stub whose calls run in a worker thread and never raise."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)

    async def call(
        self, method: str, request: Any, key: str | None = KEY_A, rid: str | None = "g-1"
    ) -> Reply:
        metadata = []
        if rid is not None:
            metadata.append(("x-request-id", rid))
        if key is not None:
            metadata.append(("x-api-key", key))

        def blocking() -> Reply:
            try:
                response, call = getattr(self.stub, method).with_call(
                    request, metadata=metadata, timeout=10
                )
                return Reply(Code.OK, "", response, dict(call.initial_metadata()))
            except grpc.RpcError as error:
                initial = dict(error.initial_metadata() or ())  # type: ignore[attr-defined]
                return Reply(error.code(), error.details(), None, initial)  # type: ignore[attr-defined]

        return await trio.to_thread.run_sync(blocking)

    async def create(self, key: str = KEY_A, rid: str = "g-create", **changes: Any) -> Reply:
        return await self.call("CreatePayment", create_request(**changes), key, rid)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    grpc_client = Client(stack.grpc_target)
    yield grpc_client
    grpc_client.channel.close()


def create_request(**changes: Any) -> pb.CreatePaymentRequest:
    fields: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "caller_service": "svc-a",
        "resource_type": "order",
        "resource_id": "1042",
        "amount_cents": 2500,
        "currency": "usd",
        "payment_method": pb.PAYMENT_METHOD_HOSTED_CARD,
        "payment_type": pb.PAYMENT_TYPE_ONE_TIME,
        "status_callback_url": "https://svc-a.internal/payments/callback",
        "metadata": {"order": "1042"},
    }
    fields.update(changes)
    return pb.CreatePaymentRequest(**fields)


# --- metadata and auth ------------------------------------------------------------------


async def test_request_id_is_checked_before_the_key(client: Client) -> None:
    # (A value of only spaces is refused by h2 on its own stream: tests/test_h2_streams.py.)
    for rid in (None, ""):
        reply = await client.call("Health", pb.HealthRequest(), key=None, rid=rid)
        assert reply.code == Code.INVALID_ARGUMENT
        assert reply.details == "x-request-id: metadata is required"


@pytest.mark.parametrize(
    ("key", "code", "details"),
    [
        (None, Code.UNAUTHENTICATED, "x-api-key metadata is required"),
        ("", Code.UNAUTHENTICATED, "x-api-key metadata is required"),
        ("no-such-key", Code.UNAUTHENTICATED, "invalid API key"),
        (NO_ACCESS_KEY, Code.PERMISSION_DENIED, "API key has no access to payments-service"),
    ],
)
async def test_api_key_is_checked(
    client: Client, key: str | None, code: Code, details: str
) -> None:
    for method, request in (
        ("Health", pb.HealthRequest()),
        ("CreatePayment", create_request()),
        ("GetPayment", pb.GetPaymentRequest(id=1)),
    ):
        reply = await client.call(method, request, key=key, rid="g-auth")
        assert (reply.code, reply.details) == (code, details)
        assert reply.initial_metadata["x-request-id"] == "g-auth"


async def test_health_echoes_the_request_id(client: Client) -> None:
    reply = await client.call("Health", pb.HealthRequest(), rid="g-health")
    assert reply.code == Code.OK
    assert reply.response.status == "ok"
    assert reply.initial_metadata["x-request-id"] == "g-health"


async def test_unknown_method_is_unimplemented(stack: Stack) -> None:
    def blocking() -> grpc.StatusCode:
        with grpc.insecure_channel(stack.grpc_target) as channel:
            method = channel.unary_unary("/payments.PaymentsService/Refund")
            try:
                method(b"", metadata=[("x-request-id", "r"), ("x-api-key", KEY_A)], timeout=5)
            except grpc.RpcError as error:
                return error.code()  # type: ignore[attr-defined, no-any-return]
        return Code.OK

    assert await trio.to_thread.run_sync(blocking) == Code.UNIMPLEMENTED


async def test_every_contract_method_is_served(stack: Stack) -> None:
    # A proto method without a handler would answer UNIMPLEMENTED (the servicer leaves
    # the generated placeholders out); every method of the contract has one now.
    servicer = PaymentsServicer(stack.service, stack.inbound, stack.authenticator)
    contract = {m.name for m in pb.DESCRIPTOR.services_by_name["PaymentsService"].methods}
    assert contract <= set(servicer.service.methods)


# --- create -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [pb.PAYMENT_METHOD_HOSTED_CARD, pb.PAYMENT_METHOD_PAYMENT_LINK])
@pytest.mark.parametrize("payment_type", [pb.PAYMENT_TYPE_ONE_TIME, pb.PAYMENT_TYPE_RECURRING])
async def test_create_each_method_and_type(
    client: Client, stack: Stack, method: int, payment_type: int
) -> None:
    recurring = payment_type == pb.PAYMENT_TYPE_RECURRING
    extra = {"recurring_interval": "week", "recurring_interval_count": 2} if recurring else {}
    reply = await client.create(
        rid="g-c", payment_method=method, payment_type=payment_type, **extra
    )
    assert reply.initial_metadata["x-request-id"] == "g-c"
    payment = reply.payment
    assert payment.id > 0
    assert payment.status == pb.PAYMENT_STATUS_PENDING
    assert payment.checkout_url.startswith("http")
    assert payment.currency == "USD" and payment.provider == pb.PROVIDER_TYPE_STRIPE
    assert payment.metadata == {"order": "1042"}
    if method == pb.PAYMENT_METHOD_PAYMENT_LINK:
        assert payment.provider_payment_id in stack.sandbox.state.payment_links
    else:
        session = stack.sandbox.state.sessions[payment.provider_payment_id]
        assert session["mode"] == ("subscription" if recurring else "payment")
    if recurring:
        assert (payment.recurring_interval, payment.recurring_interval_count) == ("week", 2)


async def test_grpc_and_http_show_the_same_payment(client: Client, stack: Stack) -> None:
    """One wire shape: protojson of the gRPC message is the HTTP JSON (int64 as numbers)."""
    payment = (await client.create()).payment
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.get(f"/payments/{payment.id}", headers=stack.headers())
    via_grpc = json_format.MessageToDict(
        payment, preserving_proto_field_name=True, use_integers_for_enums=True
    )
    for key in ("id", "amount_cents"):
        via_grpc[key] = int(via_grpc[key])
    assert response.json()["payment"] == via_grpc


async def test_timestamps_are_rfc3339_utc_to_the_second_on_both_transports(
    client: Client, stack: Stack
) -> None:
    """The Go service's format, byte for byte, while storage keeps the microseconds."""
    payment = (await client.create()).payment
    created = datetime(2026, 11, 29, 18, 45, 15, 999999)  # naive UTC, as the column holds
    updated = datetime(2026, 11, 29, 18, 46, 0, 1)
    async with stack.pool.connection() as conn:
        await conn.execute(
            "UPDATE payments SET created_at = %s, updated_at = %s WHERE id = %s",
            [created, updated, payment.id],
        )
    stored = await stack.payment(payment.id)
    assert (stored.created_at.microsecond, stored.updated_at.microsecond) == (999999, 1)

    got = (await client.call("GetPayment", pb.GetPaymentRequest(id=payment.id))).payment
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        response = await http.get(f"/payments/{payment.id}", headers=stack.headers())
    expected = ("2026-11-29T18:45:15Z", "2026-11-29T18:46:00Z")
    assert (got.created_at, got.updated_at) == expected
    assert '"created_at":"2026-11-29T18:45:15Z","updated_at":"2026-11-29T18:46:00Z"' in (
        response.text
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount_cents": -1}, "amount_cents"),
        ({"currency": "dollars"}, "currency"),
        ({"payment_method": 9}, "payment_method"),
        ({"payment_method": 0}, "payment_method"),
        ({"payment_type": 0}, "payment_type"),
        ({"payment_type": pb.PAYMENT_TYPE_RECURRING}, "recurring_interval"),
        ({"provider": 3}, "provider"),
        ({"caller_service": " "}, "caller_service"),
        ({"request_id": ""}, "request_id"),
        ({"status_callback_url": "nope"}, "status_callback_url"),
        ({"metadata": {"callback_hash": "x"}}, "metadata"),
    ],
)
async def test_validation_errors_name_the_field(
    client: Client, stack: Stack, changes: dict[str, Any], field: str
) -> None:
    reply = await client.create(rid="g-bad", **changes)
    assert reply.code == Code.INVALID_ARGUMENT
    assert reply.details.startswith(f"{field}: ")
    assert reply.initial_metadata["x-request-id"] == "g-bad"
    assert stack.provider_objects() == 0


# --- get and list -----------------------------------------------------------------------


async def test_get(client: Client) -> None:
    payment = (await client.create()).payment
    reply = await client.call("GetPayment", pb.GetPaymentRequest(id=payment.id), rid="g-get")
    assert reply.payment == payment
    assert reply.initial_metadata["x-request-id"] == "g-get"
    missing = await client.call("GetPayment", pb.GetPaymentRequest(id=2**64 - 1))
    assert (missing.code, missing.details) == (Code.NOT_FOUND, "payment not found")
    zero = await client.call("GetPayment", pb.GetPaymentRequest(id=0))
    assert (zero.code, zero.details) == (Code.INVALID_ARGUMENT, "id: must be a positive integer")


async def test_list_filters_and_pages(client: Client, stack: Stack) -> None:
    first = (await client.create(resource_id="1")).payment
    second = (await client.create(resource_id="2")).payment
    await stack.set_status(first.id, PaymentStatus.PAID)
    await client.create(KEY_B, caller_service="svc-b")

    async def ids(**fields: Any) -> list[int]:
        reply = await client.call("ListPayments", pb.ListPaymentsRequest(**fields))
        assert reply.code == Code.OK, reply.details
        return [p.id for p in reply.response.payments]

    assert await ids() == [second.id, first.id]
    assert await ids(has_status=True, status=pb.PAYMENT_STATUS_PAID) == [first.id]
    assert await ids(status=pb.PAYMENT_STATUS_PENDING) == [second.id]
    assert await ids(resource_id="2", provider=pb.PROVIDER_TYPE_STRIPE) == [second.id]
    assert await ids(request_id=first.request_id) == [first.id]
    assert await ids(limit=1, offset=1) == [first.id]
    assert await ids(caller_service="svc-a", resource_type="order") == [second.id, first.id]
    for fields, name in (
        ({"limit": 501}, "limit"),
        ({"limit": -1}, "limit"),
        ({"offset": -1}, "offset"),
        ({"has_status": True}, "status"),
        ({"status": 7}, "status"),
        ({"provider": 4}, "provider"),
    ):
        reply = await client.call("ListPayments", pb.ListPaymentsRequest(**fields))
        assert reply.code == Code.INVALID_ARGUMENT
        assert reply.details.startswith(f"{name}: ")
    other = await client.call("ListPayments", pb.ListPaymentsRequest(caller_service="svc-b"))
    assert other.code == Code.PERMISSION_DENIED


# --- idempotency and isolation ----------------------------------------------------------


async def test_replay_and_conflict(client: Client, stack: Stack) -> None:
    request = create_request()
    first = await client.call("CreatePayment", request)
    again = await client.call("CreatePayment", request, rid="other")
    assert again.payment == first.payment
    assert stack.provider_objects() == 1
    changed = pb.CreatePaymentRequest()
    changed.CopyFrom(request)
    changed.amount_cents = 100
    conflict = await client.call("CreatePayment", changed, rid="g-409")
    assert conflict.code == Code.ALREADY_EXISTS
    assert conflict.initial_metadata["x-request-id"] == "g-409"
    assert stack.provider_objects() == 1


async def test_concurrent_duplicates_make_one_payment(client: Client, stack: Stack) -> None:
    request = create_request(payment_method=pb.PAYMENT_METHOD_PAYMENT_LINK)
    replies: list[Reply] = []

    async def create() -> None:
        replies.append(await client.call("CreatePayment", request))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(create)
    assert [r.code for r in replies] == [Code.OK] * 10
    assert len({r.payment.id for r in replies}) == 1
    assert stack.provider_objects() == 1
    assert stack.sandbox.state.count("POST /v1/payment_links") == 1


async def test_caller_service_of_another_service_is_permission_denied(
    client: Client, stack: Stack
) -> None:
    reply = await client.create(KEY_A, caller_service="svc-b")
    assert reply.code == Code.PERMISSION_DENIED
    assert stack.provider_objects() == 0


async def test_another_callers_payment_is_not_found(client: Client, stack: Stack) -> None:
    payment = (await client.create(KEY_A)).payment
    get = await client.call("GetPayment", pb.GetPaymentRequest(id=payment.id), key=KEY_B)
    cancel = await client.call("CancelPayment", pb.CancelPaymentRequest(id=payment.id), key=KEY_B)
    assert get.code == cancel.code == Code.NOT_FOUND
    assert (await stack.payment(payment.id)).status == PaymentStatus.PENDING


# --- cancel -----------------------------------------------------------------------------


async def test_cancel_pending_then_again(client: Client, stack: Stack) -> None:
    payment = (await client.create()).payment
    request = pb.CancelPaymentRequest(id=payment.id, reason="order abandoned")
    canceled = (await client.call("CancelPayment", request)).payment
    assert canceled.status == pb.PAYMENT_STATUS_CANCELED
    assert stack.sandbox.state.sessions[payment.provider_payment_id]["status"] == "expired"
    again = await client.call("CancelPayment", pb.CancelPaymentRequest(id=payment.id))
    assert again.payment == canceled


@pytest.mark.parametrize(
    "status", [PaymentStatus.PAID, PaymentStatus.FAILED, PaymentStatus.EXPIRED]
)
async def test_cancel_of_a_finished_payment_is_failed_precondition(
    client: Client, stack: Stack, status: PaymentStatus
) -> None:
    payment = (await client.create()).payment
    await stack.set_status(payment.id, status)
    reply = await client.call("CancelPayment", pb.CancelPaymentRequest(id=payment.id))
    assert reply.code == Code.FAILED_PRECONDITION
    assert (await stack.payment(payment.id)).status == status


# --- dependencies failing ---------------------------------------------------------------


async def test_stripe_down_is_unavailable_and_a_retry_makes_one_object(
    client: Client, stack: Stack
) -> None:
    request = create_request()
    stack.sandbox.faults.fail(503, times=None)
    down = await client.call("CreatePayment", request, rid="g-502")
    assert (down.code, down.details) == (Code.UNAVAILABLE, "payment provider unavailable")
    assert down.initial_metadata["x-request-id"] == "g-502"
    stack.sandbox.faults.clear()
    retry = await client.call("CreatePayment", request)
    assert retry.payment.status == pb.PAYMENT_STATUS_PENDING
    assert stack.provider_objects() == 1


async def test_stripe_hanging_is_unavailable_within_its_timeout_naming_stripe(
    client: Client, stack: Stack
) -> None:
    request = create_request()
    stack.sandbox.faults.hang()
    started = trio.current_time()
    hung = await client.call("CreatePayment", request)
    assert (hung.code, hung.details) == (Code.UNAVAILABLE, "stripe did not answer within 1s")
    assert trio.current_time() - started < 2.5  # the stack's Stripe timeout is 1 s
    stack.sandbox.faults.clear()  # the held request completes at Stripe now
    retry = await client.call("CreatePayment", request)
    assert retry.payment.status == pb.PAYMENT_STATUS_PENDING
    assert stack.provider_objects() == 1


async def test_auth_down_is_unavailable(client: Client, stack: Stack) -> None:
    await stack.auth.stop()
    stack.auth.grant("fresh-key", "svc-a")
    reply = await client.call("Health", pb.HealthRequest(), key="fresh-key")
    assert (reply.code, reply.details) == (Code.UNAVAILABLE, "auth service unavailable")


async def test_database_down_is_unavailable(stack: Stack, test_db_dsn: MysqlDsn) -> None:
    dead = Pool(attrs.evolve(test_db_dsn, port=closed_port()), 2, 1, 0, connect_timeout=1)
    service = PaymentService(
        UnitOfWork(dead), ProviderRegistry({}), stack.settings.provider_callback_base_url
    )
    other = Client(f"127.0.0.1:{await stack.start_grpc(service=service)}")
    try:
        for method, request in (
            ("CreatePayment", create_request()),
            ("GetPayment", pb.GetPaymentRequest(id=1)),
            ("ListPayments", pb.ListPaymentsRequest()),
            ("CancelPayment", pb.CancelPaymentRequest(id=1)),
        ):
            reply = await other.call(method, request, rid="g-db")
            assert (reply.code, reply.details) == (Code.UNAVAILABLE, "database unavailable")
            assert reply.initial_metadata["x-request-id"] == "g-db"
    finally:
        other.channel.close()
        await dead.aclose()


async def test_unexpected_error_is_internal_without_details(
    stack: Stack, empty_db_dsn: MysqlDsn
) -> None:
    """A database without the schema: SQL errors must not reach the caller."""
    pool = Pool(empty_db_dsn, 2, 1, 0)
    service = PaymentService(
        UnitOfWork(pool), ProviderRegistry({}), stack.settings.provider_callback_base_url
    )
    other = Client(f"127.0.0.1:{await stack.start_grpc(service=service)}")
    try:
        reply = await other.call("GetPayment", pb.GetPaymentRequest(id=1), rid="g-500")
        assert (reply.code, reply.details) == (Code.INTERNAL, "internal server error")
        assert reply.initial_metadata["x-request-id"] == "g-500"
    finally:
        other.channel.close()
        await pool.aclose()
