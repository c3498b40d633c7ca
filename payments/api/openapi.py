"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

The JSON shapes are not written twice: the wire mapping (payments.mapping) puts exactly
the fields of a proto message on the wire, by name, with the contract's rules (enums as
numbers, 64-bit integers as JSON numbers, zero values left out, timestamps RFC 3339),
and request bodies are decoded field by field as their proto message declares them
(payments.api.wire). So the schemas here are built from the same proto descriptors,
with the attrs entity saying which strings are timestamps. What the descriptors cannot
say (routes, statuses, headers, which request fields are required) is the table of
:data:`OPERATIONS`, taken from CONTRACT.md. tests/test_openapi.py fails when a route of
the app is missing here or the other way round, and e2e/test_openapi_contract.py runs
schemathesis against the real process with this document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from payments import __version__
from payments.gen import payments_pb2 as pb
from payments.model import Payment, Refund

OPENAPI_VERSION = "3.1.0"
UINT64_MAX = 2**64 - 1
_Schema = dict[str, Any]

_INTEGER_FORMATS = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
}


def _ref(name: str) -> _Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# --- schemas from the proto descriptors --------------------------------------------------


def enum_response_schema(enum: EnumDescriptor) -> _Schema:
    """An enum in a response: its number (the zero value is left out, like any zero)."""
    numbers = [value.number for value in enum.values if value.number]
    names = ", ".join(f"{value.number} = {value.name}" for value in enum.values if value.number)
    return {"type": "integer", "enum": numbers, "description": f"{enum.name}: {names}"}


def enum_request_schema(enum: EnumDescriptor) -> _Schema:
    """An enum in a request: the number, the full name or the short name (any case)."""
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
    full = [value.name for value in enum.values]
    short = [value.name.removeprefix(prefix).lower() for value in enum.values]
    return {
        "anyOf": [
            {"type": "integer", "enum": [value.number for value in enum.values]},
            {"type": "string", "enum": full + short},
        ],
        "description": f"{enum.name} as its number or name, e.g. {full[1]!r} or {short[1]!r}"
        " (names in any case)",
    }


def _timestamps(entity: type | None) -> frozenset[str]:
    """Fields of ``entity`` that hold datetimes (RFC 3339 strings on the wire)."""
    if entity is None:
        return frozenset()
    fields = attrs.fields(attrs.resolve_types(entity))
    return frozenset(f.name for f in fields if f.type in (datetime, datetime | None))


def field_schema(
    field: FieldDescriptor, *, request: bool, timestamps: Iterable[str] = ()
) -> _Schema:
    """The JSON schema of one proto field as the wire carries it."""
    schema: _Schema
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        schema = _ref(field.message_type.name)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        kind = enum_request_schema if request else enum_response_schema
        schema = kind(field.enum_type)
    elif field.type in _INTEGER_FORMATS:
        schema = {"type": "integer", "format": _INTEGER_FORMATS[field.type]}
        if field.type == FieldDescriptor.TYPE_UINT64:
            schema.update(minimum=0, maximum=UINT64_MAX)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        schema = {"type": "boolean"}
    elif field.type == FieldDescriptor.TYPE_STRING:
        schema = {"type": "string"}
        if field.name in timestamps:
            schema.update(format="date-time", description="RFC 3339 UTC, to the second")
    else:
        raise NotImplementedError(f"OpenAPI schema of {field.full_name}")  # at import
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def message_schema(
    message: Descriptor,
    *,
    request: bool = False,
    entity: type | None = None,
    required: Iterable[str] = (),
    leave_out: Iterable[str] = (),
    description: str = "",
) -> _Schema:
    """A proto message as a JSON object. Responses leave zero values out, so only the
    fields named in ``required`` are required; ``leave_out`` drops fields carried
    elsewhere (the path's id)."""
    dropped = set(leave_out)
    timestamps = _timestamps(entity)
    properties = {
        field.name: field_schema(field, request=request, timestamps=timestamps)
        for field in message.fields
        if field.name not in dropped
    }
    schema: _Schema = {"type": "object", "properties": properties}
    wanted = [name for name in required if name in properties]
    if wanted:
        schema["required"] = wanted
    if description:
        schema["description"] = description
    return schema


def _envelope(message: Descriptor) -> _Schema:
    """A response wrapper: every field is always there (an empty list included)."""
    return message_schema(message, required=[field.name for field in message.fields])


def component_schemas() -> dict[str, _Schema]:
    """Every schema the operations refer to, by name."""
    zero_note = 'Fields at their zero value (0, "", false, {}) are left out.'
    return {
        "Payment": message_schema(pb.Payment.DESCRIPTOR, entity=Payment, description=zero_note),
        "Refund": message_schema(pb.Refund.DESCRIPTOR, entity=Refund, description=zero_note),
        "CallbackAttempt": message_schema(pb.CallbackAttempt.DESCRIPTOR, description=zero_note),
        "CallbackDelivery": message_schema(pb.CallbackDelivery.DESCRIPTOR, description=zero_note),
        **{
            message.name: _envelope(message)
            for message in (
                pb.HealthResponse.DESCRIPTOR,
                pb.PaymentEnvelopeResponse.DESCRIPTOR,
                pb.ListPaymentsResponse.DESCRIPTOR,
                pb.MessageResponse.DESCRIPTOR,
                pb.ErrorResponse.DESCRIPTOR,
                pb.RefundEnvelopeResponse.DESCRIPTOR,
                pb.ListRefundsResponse.DESCRIPTOR,
                pb.ListCallbackDeliveriesResponse.DESCRIPTOR,
                pb.CallbackDeliveryEnvelope.DESCRIPTOR,
            )
        },
        "CreatePaymentRequest": message_schema(
            pb.CreatePaymentRequest.DESCRIPTOR,
            request=True,
            required=(
                "caller_service",
                "resource_type",
                "resource_id",
                "amount_cents",
                "currency",
                "payment_method",
                "payment_type",
                "status_callback_url",
            ),
            description="A blank request_id falls back to the X-Request-ID header. "
            "caller_service must be the caller's own (403 otherwise).",
        ),
        "CancelPaymentRequest": message_schema(
            pb.CancelPaymentRequest.DESCRIPTOR, request=True, leave_out=("id",)
        ),
        "CreateRefundRequest": message_schema(
            pb.CreateRefundRequest.DESCRIPTOR,
            request=True,
            leave_out=("payment_id",),
            description="amount_cents omitted or 0: everything still refundable. reason: "
            "empty, duplicate, fraudulent or requested_by_customer. A blank request_id "
            "falls back to the X-Request-ID header.",
        ),
        "ProviderCallbackEnvelope": message_schema(
            pb.HandleProviderCallbackRequest.DESCRIPTOR,
            request=True,
            required=("payload",),
            leave_out=("request_id", "provider", "callback_hash"),
            description="The forwarding envelope: the raw event text and its signature "
            "header (else Stripe-Signature / X-Provider-Signature).",
        ),
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string"}, "database": {"type": "string"}},
            "required": ["status"],
            "description": "Liveness, with the supervisor's children and the pool's use.",
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ready", "not ready"]},
                "not_ready": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "part": {"type": "string", "enum": ["auth", "database", "schema"]},
                            "reason": {"type": "string"},
                        },
                        "required": ["part", "reason"],
                    },
                },
            },
            "required": ["status"],
        },
    }


# --- operations ---------------------------------------------------------------------------

_ERRORS = {
    400: "Bad input; the message names the field or header",
    401: "X-API-Key missing or unknown",
    403: "The key has no access to this service, or caller_service is another's",
    404: "Not found, or another caller's",
    409: "Conflict: the request_id names another request, or the state forbids it",
    500: "internal server error (details only in the log)",
    502: "Stripe failed",
    503: "The database or the Auth service is unavailable",
}
# Every keyed route can answer these (headers, Auth, database, the unexpected).
_KEYED_ERRORS = (400, 401, 403, 500, 503)


@attrs.frozen
class Param:
    """A path or query parameter."""

    name: str
    where: str  # "path" or "query"
    schema: _Schema
    description: str = ""


@attrs.frozen
class Operation:
    """One route and method of CONTRACT.md."""

    method: str
    path: str
    operation_id: str
    summary: str
    status: int  # success
    response: str  # component schema name, or "" for the HTML page
    body: str = ""  # request body schema name
    body_required: bool = True
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    keyed: bool = True  # needs X-Request-ID and X-API-Key
    key_optional: bool = False


def _id_param(description: str) -> Param:
    return Param(
        "id", "path", {"type": "integer", "minimum": 1, "maximum": UINT64_MAX}, description
    )


_PAYMENT_ID = _id_param("The payment's id")
_STATUS = enum_request_schema(pb.PaymentStatus.DESCRIPTOR)
_PROVIDER = enum_request_schema(pb.ProviderType.DESCRIPTOR)
_LIST_QUERY = (
    *(
        Param(name, "query", {"type": "string"})
        for name in ("request_id", "caller_service", "resource_type", "resource_id")
    ),
    Param("status", "query", _STATUS),
    Param("provider", "query", _PROVIDER),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}),
    Param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}),
)

OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/health", "health", "Service answers (keyed)", 200, "HealthResponse"),
    Operation(
        "get", "/healthz", "healthz", "Liveness probe (no headers)", 200, "Health",
        errors=(503,), keyed=False,
    ),
    Operation(
        "get", "/readyz", "readyz", "Readiness probe: database, schema version, Auth",
        200, "Readiness", errors=(503,), keyed=False,
    ),
    Operation(
        "get", "/openapi.json", "openapi", "This document", 200, "", keyed=False,
    ),
    Operation(
        "post", "/payments", "createPayment", "Create a payment (idempotent per request_id)",
        201, "PaymentEnvelopeResponse", body="CreatePaymentRequest", errors=(409, 502),
    ),
    Operation(
        "get", "/payments", "listPayments", "List the caller's payments", 200,
        "ListPaymentsResponse", params=_LIST_QUERY,
    ),
    Operation(
        "get", "/payments/{id}", "getPayment", "One payment", 200, "PaymentEnvelopeResponse",
        params=(_PAYMENT_ID,), errors=(404,),
    ),
    Operation(
        "post", "/payments/{id}/cancel", "cancelPayment", "Cancel a payment", 200,
        "PaymentEnvelopeResponse", body="CancelPaymentRequest", body_required=False,
        params=(_PAYMENT_ID,), errors=(404, 409, 502),
    ),
    Operation(
        "post", "/payments/{id}/refunds", "createRefund",
        "Refund a PAID payment, in full or in part (idempotent per request_id)", 201,
        "RefundEnvelopeResponse", body="CreateRefundRequest", body_required=False,
        params=(_PAYMENT_ID,), errors=(404, 409, 502),
    ),
    Operation(
        "get", "/payments/{id}/refunds", "listRefunds", "A payment's refunds, oldest first",
        200, "ListRefundsResponse", params=(_PAYMENT_ID,), errors=(404,),
    ),
    Operation(
        "get", "/refunds/{id}", "getRefund", "One refund", 200, "RefundEnvelopeResponse",
        params=(_id_param("The refund's id"),), errors=(404,),
    ),
    Operation(
        "get", "/payments/{id}/callbacks", "listCallbackDeliveries",
        "A payment's status-callback deliveries and their attempts, oldest first", 200,
        "ListCallbackDeliveriesResponse", params=(_PAYMENT_ID,), errors=(404,),
    ),
    Operation(
        "post", "/payments/{id}/callbacks/resend", "resendCallback",
        "Send the payment's current state to its status_callback_url again, at once", 202,
        "CallbackDeliveryEnvelope", params=(_PAYMENT_ID,), errors=(404, 409),
    ),
    Operation(
        "post", "/webhooks/providers/{provider}/{callback_hash}", "providerCallback",
        "A provider event for one payment (raw, signed; or the gateway's envelope)", 200,
        "MessageResponse", body="ProviderEvent",
        params=(
            Param("provider", "path", {"type": "string"}, "stripe"),
            Param("callback_hash", "path", {"type": "string"}, "The payment's callback hash"),
        ),
        errors=(404, 409),
    ),
    Operation(
        "post", "/webhooks/providers/{provider}", "stripeEvents",
        "Any event of the provider, one endpoint for all (e.g. /webhooks/providers/stripe; "
        "signature checked; an event naming no known payment is recorded and answered "
        "200)", 200, "MessageResponse", body="ProviderEvent",
        params=(Param("provider", "path", {"type": "string", "enum": ["stripe"]}, "stripe"),),
        errors=(404, 409), key_optional=True,
    ),
    Operation(
        "get", "/webhooks/providers/{provider}/{callback_hash}", "checkoutReturn",
        "Where the customer's browser lands after checkout (an HTML page)", 200, "",
        params=(
            Param("provider", "path", {"type": "string"}),
            Param("callback_hash", "path", {"type": "string"}),
            Param("state", "query", {"type": "string", "enum": ["success", "cancel"]}),
        ),
        keyed=False,
    ),
)  # fmt: skip


# Where an operation's answer names what later operations take (OpenAPI links): client
# generators and schemathesis's stateful phase follow them.
_LINKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "createPayment": (
        "$response.body#/payment/id",
        (
            "getPayment",
            "cancelPayment",
            "createRefund",
            "listRefunds",
            "listCallbackDeliveries",
            "resendCallback",
        ),
    ),
    "createRefund": ("$response.body#/refund/id", ("getRefund",)),
}

# Request bodies as the README shows them (the examples phase of schemathesis sends them).
_EXAMPLES: dict[str, dict[str, Any]] = {
    "CreatePaymentRequest": {
        "request_id": "order-1042",
        "caller_service": "orders",
        "resource_type": "order",
        "resource_id": "1042",
        "amount_cents": 2500,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": "one_time",
        "status_callback_url": "https://orders.internal/payments/callback",
        "metadata": {"order": "1042"},
    },
    "CancelPaymentRequest": {"reason": "customer changed their mind"},
    "CreateRefundRequest": {
        "request_id": "refund-1042-1",
        "amount_cents": 1000,
        "reason": "requested_by_customer",
    },
}


def _request_id_header(required: bool) -> _Schema:
    return {
        "name": "X-Request-ID",
        "in": "header",
        "required": required,
        "description": "The request's id; checked first (400 when missing); echoed back",
        "schema": {"type": "string", "minLength": 1, "pattern": "[!-~]"},
        "example": "req-7f3a9c21",
    }


_ECHO = {
    "X-Request-ID": {"description": "The request's X-Request-ID", "schema": {"type": "string"}}
}


def _json_content(schema: _Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(op: Operation) -> dict[str, Any]:
    if op.response:
        success: dict[str, Any] = {"content": _json_content(_ref(op.response))}
    elif op.operation_id == "openapi":
        success = {"content": _json_content({"type": "object"})}
    else:
        success = {"content": {"text/html": {"schema": {"type": "string"}}}}
    responses: dict[str, Any] = {str(op.status): {"description": op.summary, **success}}
    if op.operation_id in _LINKS:
        expression, targets = _LINKS[op.operation_id]
        responses[str(op.status)]["links"] = {
            target: {"operationId": target, "parameters": {"id": expression}} for target in targets
        }
    codes = sorted(set(op.errors) | (set(_KEYED_ERRORS) if op.keyed else set()))
    for code in codes:
        schema = (
            _ref(op.response) if op.response in ("Health", "Readiness") else _ref("ErrorResponse")
        )
        responses[str(code)] = {
            "description": _ERRORS[code] if op.keyed else "Not ready",
            "content": _json_content(schema),
        }
    if op.keyed:
        for answer in responses.values():
            answer["headers"] = _ECHO
    return responses


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params = [
        {
            "name": p.name,
            "in": p.where,
            "required": p.where == "path",
            "schema": p.schema,
            **({"description": p.description} if p.description else {}),
        }
        for p in op.params
    ]
    if op.keyed:
        params.insert(0, _request_id_header(required=not op.key_optional))
    return params


def _operation(op: Operation) -> dict[str, Any]:
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "parameters": _parameters(op),
        "responses": _responses(op),
    }
    if not op.keyed:
        document["security"] = []
    elif op.key_optional:
        document["security"] = [{"ApiKey": []}, {}]
    if op.body:
        content = _json_content(_ref(op.body))
        if op.body in _EXAMPLES:
            content["application/json"]["example"] = _EXAMPLES[op.body]
        document["requestBody"] = {"required": op.body_required, "content": content}
    return document


def build_document(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    schemas = component_schemas()
    schemas["ProviderEvent"] = {
        "anyOf": [_ref("ProviderCallbackEnvelope"), {"type": "object"}],
        "description": "The raw Stripe event (signature in Stripe-Signature or "
        "X-Provider-Signature), or the gateway's envelope",
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "payments",
            "version": __version__,
            "description": "Internal payments service. JSON uses the proto field names; "
            "enums are numbers in responses (numbers or names in requests); 64-bit "
            "integers are JSON numbers; fields at their zero value are left out of "
            'responses. Errors are {"error": "..."}.',
        },
        "security": [{"ApiKey": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }


def document_bytes(document: Mapping[str, Any] | None = None) -> bytes:
    """The document as served (built once per app)."""
    return json.dumps(document or build_document(), separators=(",", ":")).encode()
