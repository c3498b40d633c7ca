"""gRPC server reflection on the purerpc server, asked by grpcio's own reflection
client (v1alpha) and by a plain grpcio stream (v1), as grpcurl and Postman ask."""

from __future__ import annotations

from functools import partial

import grpc
import pytest
import trio
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as standard_v1alpha
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from payments.api.grpc import SERVICE_NAME, PaymentsConnectionHandler, PaymentsServicer
from payments.api.grpc_reflection import NOT_FOUND, Reflection
from payments.api.grpc_server import serve_purerpc
from payments.gen import payments_pb2 as pb
from payments.gen.grpc.reflection.v1 import reflection_pb2 as v1
from payments.gen.grpc_reflection.v1alpha import reflection_pb2 as v1alpha
from tests.fixtures.app import KEY_A, Stack

pytestmark = pytest.mark.timeout(60)

REFLECTION_SERVICES = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]


@pytest.fixture
async def target(stack: Stack) -> str:
    """A purerpc server with PaymentsService and reflection, as ``payments serve`` runs it."""
    servicer = PaymentsServicer(stack.service, stack.inbound, stack.authenticator)
    services = [servicer, *Reflection([SERVICE_NAME]).services()]
    serve = partial(
        serve_purerpc, services, "127.0.0.1", 0, handler_class=PaymentsConnectionHandler
    )
    port = await stack.nursery.start(serve)
    return f"127.0.0.1:{port}"


def test_the_v1alpha_proto_is_the_standard_one() -> None:
    assert v1alpha.DESCRIPTOR.serialized_pb == standard_v1alpha.DESCRIPTOR.serialized_pb


def _reflect_and_call(target: str) -> dict[str, object]:
    """What a tool without the proto does: list, fetch descriptors, build, call."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE_NAME)
        payment = pool.FindMessageTypeByName("payments.Payment")
        get = service.methods_by_name["GetPayment"]
        return {
            "services": services,
            "methods": [method.name for method in service.methods],
            "payment_fields": [field.name for field in payment.fields],
            # a class built from the reflected descriptor only
            "request_class": message_factory.GetMessageClass(get.input_type),
        }


async def test_grpcio_reflection_client_lists_describes_and_calls(
    stack: Stack, target: str
) -> None:
    created = await stack.create_payment()

    def run() -> tuple[dict[str, object], object]:
        found = _reflect_and_call(target)
        with grpc.insecure_channel(target) as channel:
            request_class = found["request_class"]
            call = channel.unary_unary(
                f"/{SERVICE_NAME}/GetPayment",
                request_serializer=request_class.SerializeToString,  # type: ignore[attr-defined]
                response_deserializer=lambda raw: raw,
            )
            raw = call(
                request_class(id=created.id),  # type: ignore[operator]
                metadata=(("x-request-id", "rid-reflect"), ("x-api-key", KEY_A)),
                timeout=10,
            )
        return found, raw

    found, raw = await trio.to_thread.run_sync(run)
    assert found["services"] == sorted([SERVICE_NAME, *REFLECTION_SERVICES])
    assert {"CreatePayment", "GetPayment", "CreateRefund", "ResendCallback"} <= set(
        found["methods"]  # type: ignore[arg-type]
    )
    assert found["payment_fields"][:3] == ["id", "request_id", "caller_service"]  # type: ignore[index]
    answer = pb.PaymentEnvelopeResponse.FromString(raw)  # type: ignore[arg-type]
    assert answer.payment.id == created.id and answer.payment.caller_service == "svc-a"


def _v1_stream(
    target: str, requests: list[v1.ServerReflectionRequest]
) -> list[v1.ServerReflectionResponse]:
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=v1.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=10))


async def test_v1_answers_each_request_of_the_stream(target: str) -> None:
    requests = [
        v1.ServerReflectionRequest(list_services="*"),
        v1.ServerReflectionRequest(file_containing_symbol="payments.PaymentsService.CreateRefund"),
        v1.ServerReflectionRequest(file_containing_symbol="payments.PaymentsService.Nope"),
        v1.ServerReflectionRequest(file_containing_symbol="auth.AuthService"),  # not served
        v1.ServerReflectionRequest(file_by_filename="payments.proto"),
    ]
    answers = await trio.to_thread.run_sync(_v1_stream, target, requests)
    assert [a.WhichOneof("message_response") for a in answers] == [
        "list_services_response",
        "file_descriptor_response",
        "error_response",
        "error_response",
        "file_descriptor_response",
    ]
    assert [s.name for s in answers[0].list_services_response.service] == sorted(
        [SERVICE_NAME, *REFLECTION_SERVICES]
    )
    assert list(answers[1].file_descriptor_response.file_descriptor_proto) == [
        pb.DESCRIPTOR.serialized_pb
    ]
    assert answers[2].error_response.error_code == NOT_FOUND
    assert answers[3].error_response.error_code == NOT_FOUND
    assert answers[4].original_request.file_by_filename == "payments.proto"
