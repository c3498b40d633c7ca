"""``HandleProviderCallback`` over gRPC (the official grpcio client against purerpc on
loopback): the HTTP route's semantics, with payload and signature as fields."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import grpc
import pytest
import trio

from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from payments.model import EventKind, Payment, PaymentStatus
from payments.sandbox.state import API_VERSION
from payments.sandbox.webhooks import event_body
from payments.storage.provider_callbacks import CallbackOutcome
from tests.fixtures.app import GATEWAY_KEY, Stack
from tests.fixtures.sandbox import sign

pytestmark = pytest.mark.timeout(60)

Code = grpc.StatusCode


@attrs.frozen
class Reply:
    code: grpc.StatusCode
    details: str
    response: pb.MessageResponse | None


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)

    async def callback(
        self, request: pb.HandleProviderCallbackRequest, key: str | None = GATEWAY_KEY
    ) -> Reply:
        metadata = [("x-request-id", "grpc-gw-1")]
        if key is not None:
            metadata.append(("x-api-key", key))

        def blocking() -> Reply:
            try:
                response = self.stub.HandleProviderCallback(request, metadata=metadata, timeout=10)
                return Reply(Code.OK, "", response)
            except grpc.RpcError as error:
                return Reply(error.code(), error.details(), None)  # type: ignore[attr-defined]

        return await trio.to_thread.run_sync(blocking)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    grpc_client = Client(stack.grpc_target)
    yield grpc_client
    grpc_client.channel.close()


def completed_event(stack: Stack, payment: Payment, **changes: Any) -> str:
    session = copy.deepcopy(stack.sandbox.state.sessions[payment.provider_payment_id])
    session.update(status="complete", payment_status="paid", **changes)
    return event_body(
        {
            "id": f"evt_test_{uuid.uuid4().hex}",
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": session},
            "type": "checkout.session.completed",
        }
    )


def request(
    payment: Payment, body: str, *, signature: str | None = None, **changes: Any
) -> pb.HandleProviderCallbackRequest:
    fields: dict[str, Any] = {
        "request_id": "grpc-body-rid",
        "provider": "stripe",
        "callback_hash": payment.provider_callback_hash,
        "signature": sign(body, int(time.time())) if signature is None else signature,
        "payload": body,
    }
    fields.update(changes)
    return pb.HandleProviderCallbackRequest(**fields)


async def test_a_forwarded_event_pays_the_payment(stack: Stack, client: Client) -> None:
    payment = await stack.create_payment()
    reply = await client.callback(request(payment, completed_event(stack, payment)))
    assert reply.code == Code.OK, reply.details
    assert reply.response is not None
    assert reply.response.message == "Provider callback processed"
    assert reply.response.payment.id == payment.id
    assert reply.response.payment.status == pb.PAYMENT_STATUS_PAID
    history = await stack.history(payment.id)
    assert history.events[-1].kind == EventKind.STATUS_CHANGED
    assert [e.status for e in history.outbox] == [PaymentStatus.PAID]
    [record] = history.callbacks
    assert (record.outcome, record.request_id) == (CallbackOutcome.PROCESSED, "grpc-body-rid")
    assert [p.id for p in stack.terminal] == [payment.id]


async def test_a_replay_is_ok_and_changes_nothing(stack: Stack, client: Client) -> None:
    payment = await stack.create_payment()
    body = completed_event(stack, payment)
    first = await client.callback(request(payment, body))
    again = await client.callback(request(payment, body, request_id=""))
    assert first.code == again.code == Code.OK
    assert again.response is not None and again.response.payment == first.response.payment  # type: ignore[union-attr]
    history = await stack.history(payment.id)
    assert [c.outcome for c in history.callbacks] == [
        CallbackOutcome.PROCESSED,
        CallbackOutcome.DUPLICATE,
    ]
    assert history.callbacks[1].request_id == "grpc-gw-1"  # blank in the body: the metadata's
    assert len(history.outbox) == 1 and len(stack.terminal) == 1


@pytest.mark.parametrize(
    ("changes", "code", "details", "reason"),
    [
        (
            {"signature": "t=1,v1=00"},
            Code.INVALID_ARGUMENT,
            "signature: does not match the payload",
            "",
        ),
        ({"signature": ""}, Code.INVALID_ARGUMENT, "signature: is required", ""),
        ({"payload": ""}, Code.INVALID_ARGUMENT, "payload: is required", ""),
        ({"callback_hash": "nope"}, Code.NOT_FOUND, "payment not found", "unknown callback hash"),
        ({"callback_hash": "  "}, Code.INVALID_ARGUMENT, "callback_hash: is required", ""),
        ({"provider": ""}, Code.NOT_FOUND, "unknown provider", ""),
        ({"provider": "adyen"}, Code.NOT_FOUND, "unknown provider", ""),
    ],
)
async def test_refusals_map_to_grpc_codes_and_are_recorded(
    stack: Stack, client: Client, changes: dict[str, Any], code: Code, details: str, reason: str
) -> None:
    payment = await stack.create_payment()
    body = completed_event(stack, payment)
    signature = changes.pop("signature", None)
    reply = await client.callback(request(payment, body, signature=signature, **changes))
    assert (reply.code, reply.details) == (code, details)
    assert (await stack.payment(payment.id)).status == PaymentStatus.PENDING
    async with stack.pool.connection() as conn:
        rows = await conn.fetchall("SELECT outcome, reason FROM provider_callbacks")
    assert rows == [("rejected", reason or details)]


async def test_an_empty_callback_hash_is_the_hashless_route(stack: Stack, client: Client) -> None:
    """Routed by the event (here its metadata.callback_hash); one naming no known payment
    is recorded and answered without a payment."""
    payment = await stack.create_payment()
    reply = await client.callback(
        request(payment, completed_event(stack, payment), callback_hash="")
    )
    assert reply.code == Code.OK, reply.details
    assert reply.response is not None and reply.response.payment.id == payment.id
    assert reply.response.payment.status == pb.PAYMENT_STATUS_PAID
    stranger = completed_event(stack, payment, id="cs_unknown", metadata={})
    reply = await client.callback(request(payment, stranger, callback_hash=""))
    assert reply.code == Code.OK, reply.details
    assert reply.response is not None and not reply.response.HasField("payment")
    async with stack.pool.connection() as conn:
        rows = await conn.fetchall("SELECT outcome, payment_id FROM provider_callbacks ORDER BY id")
    assert rows == [("processed", payment.id), ("processed", None)]


async def test_an_event_about_another_payment_is_invalid(stack: Stack, client: Client) -> None:
    a = await stack.create_payment()
    b = await stack.create_payment()
    reply = await client.callback(
        request(a, completed_event(stack, a), callback_hash=b.provider_callback_hash)
    )
    assert (reply.code, reply.details) == (
        Code.INVALID_ARGUMENT,
        "payload: event is not about this payment",
    )
    assert (await stack.payment(a.id)).status == PaymentStatus.PENDING
    assert (await stack.payment(b.id)).status == PaymentStatus.PENDING


async def test_the_call_needs_an_api_key(stack: Stack, client: Client) -> None:
    payment = await stack.create_payment()
    reply = await client.callback(request(payment, completed_event(stack, payment)), key=None)
    assert reply.code == Code.UNAUTHENTICATED
    assert (await stack.payment(payment.id)).status == PaymentStatus.PENDING


async def test_the_payload_is_bounded(stack: Stack, client: Client) -> None:
    payment = await stack.create_payment()
    body = completed_event(stack, payment, description="x" * (300 * 1024))
    reply = await client.callback(request(payment, body))
    assert (reply.code, reply.details) == (
        Code.INVALID_ARGUMENT,
        f"payload: must be at most {256 * 1024} bytes",
    )
