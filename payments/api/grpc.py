"""The gRPC transport: purerpc servicer of ``payments.PaymentsService`` (CONTRACT.md).

Same semantics as HTTP: ``x-request-id`` metadata is checked first (INVALID_ARGUMENT),
then ``x-api-key`` (UNAUTHENTICATED / PERMISSION_DENIED through the Auth service);
domain errors map through one table (payments.api.transport); anything else answers
INTERNAL ``internal server error`` and is logged with the request id. Each call writes
one access line.

Echoing ``x-request-id`` in the *initial* response metadata needs more than a servicer:
purerpc's ``ConnectionHandler.request_received`` sends the response headers before it
has even read the request's. :class:`PaymentsConnectionHandler` is that method with the
order swapped (read the request headers, then start the response with the echo) and
with INTERNAL, not purerpc's CANCELLED-with-a-repr, for anything that escapes a handler.
Serve it with::

    await serve_purerpc([PaymentsServicer(service, inbound, authenticator)], host, port,
                        handler_class=PaymentsConnectionHandler, task_status=...)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
from google.protobuf.message import DecodeError
from purerpc import Cardinality, RpcFailedError, Status, StatusCode
from purerpc.grpc_proto import GRPCProtoStream
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.server import ConnectionHandler, Service
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

from payments import logs
from payments.api import wire
from payments.api.transport import (
    CALLBACK_PROCESSED,
    INTERNAL_MESSAGE,
    domain_error,
    grpc_status,
    request_id,
)
from payments.auth import Authenticator
from payments.callback_urls import CallbackPolicy
from payments.callbacks import CallbackOperations
from payments.errors import InvalidArgument, Unauthenticated
from payments.gen import payments_pb2 as pb
from payments.gen.payments_grpc import PaymentsServiceServicer
from payments.inbound import ProviderEvents
from payments.model import Caller
from payments.observability.transports import observed_method
from payments.service import PaymentService
from payments.validation import (
    DEFAULT_CALLBACK_POLICY,
    MAX_ID_LENGTH,
    validate_create,
    validate_refund,
)

log = logging.getLogger("payments.api.grpc")

REQUEST_ID_KEY = "x-request-id"
API_KEY_KEY = "x-api-key"
SERVICE_NAME = "payments.PaymentsService"
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024  # PAYMENTS_MAX_BODY_BYTES's default

T = TypeVar("T")


def metadata_value(request: RequestReceived, key: str) -> str:
    """The first value of a custom metadata key ("" when absent)."""
    for name, value in request.custom_metadata:
        if name == key:
            return value if isinstance(value, str) else ""
    return ""


@attrs.define
class CallContext:
    """What one call learnt, for its access line."""

    request_id: str
    caller: Caller | None = None
    payment_id: int = 0


class PaymentsServicer(PaymentsServiceServicer):
    """``payments.PaymentsService`` over the transport-free PaymentService.

    Handlers take ``(message, request)`` so purerpc hands them the request event and its
    ``custom_metadata``.
    """

    def __init__(
        self,
        service: PaymentService,
        inbound: ProviderEvents,
        authenticator: Authenticator,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        callback_policy: CallbackPolicy = DEFAULT_CALLBACK_POLICY,
        callbacks: CallbackOperations | None = None,
    ) -> None:
        self._service = service
        self._callbacks = callbacks or CallbackOperations(service.unit_of_work)
        self._inbound = inbound
        self._callback_policy = callback_policy  # Settings.callback_policy()
        self._authenticator = authenticator
        # HandleProviderCallback's payload bound (give it PAYMENTS_MAX_BODY_BYTES).
        self._max_payload_bytes = max_payload_bytes

    @property
    def service(self) -> Service:
        """The generated service minus the methods this class does not override: a
        contract method not built yet then answers UNIMPLEMENTED, not INTERNAL (the
        generated placeholder raises NotImplementedError)."""
        full = super().service
        built = Service(full.name)
        built.methods = {
            name: bound
            for name, bound in full.methods.items()
            if getattr(type(self), name) is not getattr(PaymentsServiceServicer, name)
        }
        return built

    async def _call(
        self,
        request: RequestReceived,
        method: str,
        handler: Callable[[Caller, CallContext], Awaitable[T]],
    ) -> T:
        """Check metadata, run ``handler``, map errors, write the access line."""
        started = time.perf_counter()
        ctx = CallContext(request_id="")
        code = StatusCode.OK
        try:
            ctx.request_id = request_id(metadata_value(request, REQUEST_ID_KEY), REQUEST_ID_KEY)
            if not ctx.request_id:
                raise InvalidArgument(REQUEST_ID_KEY, "metadata is required")
            api_key = metadata_value(request, API_KEY_KEY).strip()
            if not api_key:
                raise Unauthenticated(f"{API_KEY_KEY} metadata is required")
            ctx.caller = await self._authenticator.authenticate(api_key)
            return await handler(ctx.caller, ctx)
        except RpcFailedError as exc:
            code = exc.status.status_code
            raise
        except Exception as exc:
            error = domain_error(exc)
            mapped = grpc_status(error) if error is not None else None
            if error is not None and mapped is not None:
                code = mapped
                raise RpcFailedError(Status(mapped, error.message)) from None
            code = StatusCode.INTERNAL
            log.error(
                "unhandled error",
                exc_info=exc,
                extra={"request_id": ctx.request_id, "route": f"/{SERVICE_NAME}/{method}"},
            )
            raise RpcFailedError(Status(StatusCode.INTERNAL, INTERNAL_MESSAGE)) from None
        except BaseException:  # cancelled: the peer left, or the server is stopping
            code = StatusCode.CANCELLED
            raise
        finally:
            extra: dict[str, Any] = {"payment_id": ctx.payment_id} if ctx.payment_id else {}
            logs.access_log(
                transport="grpc",
                route=f"/{SERVICE_NAME}/{method}",
                status=code.name,
                latency_ms=(time.perf_counter() - started) * 1000,
                request_id=ctx.request_id,
                caller=ctx.caller.service_name if ctx.caller else "",
                **extra,
            )

    async def Health(
        self, message: pb.HealthRequest, request: RequestReceived
    ) -> pb.HealthResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.HealthResponse:
            return pb.HealthResponse(status="ok")

        return await self._call(request, "Health", run)

    async def CreatePayment(
        self, message: pb.CreatePaymentRequest, request: RequestReceived
    ) -> pb.PaymentEnvelopeResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.PaymentEnvelopeResponse:
            new = validate_create(wire.create_input_from_proto(message), self._callback_policy)
            payment = await self._service.create(caller, new)
            ctx.payment_id = payment.id
            return pb.PaymentEnvelopeResponse(payment=wire.payment_to_proto(payment))

        return await self._call(request, "CreatePayment", run)

    async def GetPayment(
        self, message: pb.GetPaymentRequest, request: RequestReceived
    ) -> pb.PaymentEnvelopeResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.PaymentEnvelopeResponse:
            payment = await self._service.get(caller, wire.check_payment_id(message.id))
            ctx.payment_id = payment.id
            return pb.PaymentEnvelopeResponse(payment=wire.payment_to_proto(payment))

        return await self._call(request, "GetPayment", run)

    async def ListPayments(
        self, message: pb.ListPaymentsRequest, request: RequestReceived
    ) -> pb.ListPaymentsResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.ListPaymentsResponse:
            payments = await self._service.list(caller, wire.list_filter_from_proto(message))
            return pb.ListPaymentsResponse(payments=[wire.payment_to_proto(p) for p in payments])

        return await self._call(request, "ListPayments", run)

    async def CancelPayment(
        self, message: pb.CancelPaymentRequest, request: RequestReceived
    ) -> pb.PaymentEnvelopeResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.PaymentEnvelopeResponse:
            number = wire.check_payment_id(message.id)
            payment = await self._service.cancel(caller, number, message.reason)
            ctx.payment_id = payment.id
            return pb.PaymentEnvelopeResponse(payment=wire.payment_to_proto(payment))

        return await self._call(request, "CancelPayment", run)

    async def HandleProviderCallback(
        self, message: pb.HandleProviderCallbackRequest, request: RequestReceived
    ) -> pb.MessageResponse:
        """A provider event forwarded by the gateway: the HTTP routes' semantics (an
        empty ``callback_hash`` is the hashless route's). The record keeps the
        message's ``request_id``, or the metadata's when it is blank."""

        async def run(caller: Caller, ctx: CallContext) -> pb.MessageResponse:
            received = wire.provider_callback_from_proto(message, self._max_payload_bytes)
            request_id = message.request_id.strip() or ctx.request_id
            if message.callback_hash:
                result = await self._inbound.receive(
                    message.provider,
                    message.callback_hash,
                    received.payload,
                    received.signature,
                    request_id,
                )
            else:  # the hashless form: routed by the ids the event names
                result = await self._inbound.receive_unrouted(
                    message.provider, received.payload, received.signature, request_id
                )
            if result.payment is None:
                return pb.MessageResponse(message=CALLBACK_PROCESSED)
            ctx.payment_id = result.payment.id
            return pb.MessageResponse(
                message=CALLBACK_PROCESSED, payment=wire.payment_to_proto(result.payment)
            )

        return await self._call(request, "HandleProviderCallback", run)

    async def ListCallbackDeliveries(
        self, message: pb.ListCallbackDeliveriesRequest, request: RequestReceived
    ) -> pb.ListCallbackDeliveriesResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.ListCallbackDeliveriesResponse:
            ctx.payment_id = wire.check_message_payment_id(message.payment_id)
            found = await self._callbacks.deliveries(caller, ctx.payment_id)
            return pb.ListCallbackDeliveriesResponse(
                deliveries=[wire.delivery_to_proto(d) for d in found]
            )

        return await self._call(request, "ListCallbackDeliveries", run)

    async def ResendCallback(
        self, message: pb.ResendCallbackRequest, request: RequestReceived
    ) -> pb.CallbackDeliveryEnvelope:
        async def run(caller: Caller, ctx: CallContext) -> pb.CallbackDeliveryEnvelope:
            ctx.payment_id = wire.check_message_payment_id(message.payment_id)
            delivery = await self._callbacks.resend(caller, ctx.payment_id)
            return pb.CallbackDeliveryEnvelope(delivery=wire.delivery_to_proto(delivery))

        return await self._call(request, "ResendCallback", run)

    # --- refunds (CONTRACT.md "Refunds"; the HTTP routes' semantics) ----------------

    async def CreateRefund(
        self, message: pb.CreateRefundRequest, request: RequestReceived
    ) -> pb.RefundEnvelopeResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.RefundEnvelopeResponse:
            new = validate_refund(wire.refund_input_from_proto(message), caller.service_name)
            refund = await self._service.refunds.create(caller, new)
            ctx.payment_id = refund.payment_id
            return pb.RefundEnvelopeResponse(refund=wire.refund_to_proto(refund))

        return await self._call(request, "CreateRefund", run)

    async def GetRefund(
        self, message: pb.GetRefundRequest, request: RequestReceived
    ) -> pb.RefundEnvelopeResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.RefundEnvelopeResponse:
            refund = await self._service.refunds.get(caller, wire.check_payment_id(message.id))
            ctx.payment_id = refund.payment_id
            return pb.RefundEnvelopeResponse(refund=wire.refund_to_proto(refund))

        return await self._call(request, "GetRefund", run)

    async def ListRefunds(
        self, message: pb.ListRefundsRequest, request: RequestReceived
    ) -> pb.ListRefundsResponse:
        async def run(caller: Caller, ctx: CallContext) -> pb.ListRefundsResponse:
            payment_id = wire.check_payment_id(message.payment_id, "payment_id")
            refunds = await self._service.refunds.list(caller, payment_id)
            ctx.payment_id = payment_id
            return pb.ListRefundsResponse(refunds=[wire.refund_to_proto(r) for r in refunds])

        return await self._call(request, "ListRefunds", run)


class PaymentsConnectionHandler(ConnectionHandler):
    """purerpc's per-connection handler, with the response started after the request
    headers are read (so ``x-request-id`` goes back in the initial metadata) and with
    INTERNAL for any exception a handler lets out (purerpc answers CANCELLED with the
    exception's repr, which would leak internals).

    Mirrors purerpc 0.8's ``ConnectionHandler.request_received``; the rest of the class
    (the h2 socket and the per-connection task group) is purerpc's own.
    """

    async def request_received(self, stream: GRPCProtoStream) -> None:
        try:
            event = await stream.receive_event()
            if not isinstance(event, RequestReceived):
                await stream.close(Status(StatusCode.INTERNAL, status_message="Expected headers"))
                return
            started = time.perf_counter()
            rid = metadata_value(event, REQUEST_ID_KEY)
            if len(rid.strip()) > MAX_ID_LENGTH:
                rid = ""  # refused by the servicer; never echoed or logged
            echo = ((REQUEST_ID_KEY, rid),) if rid else ()
            await stream.start_response(custom_metadata=echo)
            service = self.services.get(event.service_name)
            bound = service.methods.get(event.method_name) if service is not None else None
            if bound is None:
                await stream.close(
                    Status(
                        StatusCode.UNIMPLEMENTED,
                        status_message=f"Method {event.service_name}/{event.method_name} "
                        "is not implemented",
                    )
                )
                return
            try:
                method_fn = observed_method(bound, event)
                stream.expect_message_type(bound.signature.request_type)
                cardinality = bound.signature.cardinality
                if cardinality == Cardinality.STREAM_STREAM:
                    await call_server_stream_stream(method_fn, stream)
                elif cardinality == Cardinality.UNARY_STREAM:
                    await call_server_unary_stream(method_fn, stream)
                elif cardinality == Cardinality.STREAM_UNARY:
                    await call_server_stream_unary(method_fn, stream)
                else:
                    await call_server_unary_unary(method_fn, stream)
            except RpcFailedError as error:
                await stream.close(error.status)
            except (DecodeError, ProtocolError) as exc:
                # The caller's bytes are not one request message: its fault, not ours.
                problem = (
                    "does not parse" if isinstance(exc, DecodeError) else "must be exactly one"
                )
                status = Status(StatusCode.INVALID_ARGUMENT, f"request message {problem}")
                logs.access_log(
                    transport="grpc",
                    route=f"/{event.service_name}/{event.method_name}",
                    status=status.status_code.name,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    request_id=rid,
                )
                await stream.close(status)
            except Exception:
                log.exception(
                    "unhandled error in grpc call",
                    extra={"request_id": rid, "route": event.method_name},
                )
                await stream.close(Status(StatusCode.INTERNAL, status_message=INTERNAL_MESSAGE))
        except Exception:
            # The peer went away mid-call, or the stream broke: nothing left to answer.
            log.warning("grpc stream failed", exc_info=True)
