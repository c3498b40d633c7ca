"""The JSON and protobuf shapes of CONTRACT.md, in both directions.

Responses come from payments.mapping (the attrs entities, mapped by cattrs). Requests:
types are checked here, strictly and field by field as the proto message declares them,
so a wrong type is a 400 naming the field and never a 500 further in; the business
rules stay in payments.validation.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from payments import model
from payments.errors import InvalidArgument, NotFound
from payments.gen import payments_pb2 as pb
from payments.mapping import WireMapping, wire_mapping
from payments.mapping import format_timestamp as format_timestamp  # re-exported
from payments.mapping import payment_to_json as payment_to_json  # re-exported
from payments.mapping import payment_to_proto as payment_to_proto  # re-exported
from payments.mapping import refund_to_json as refund_to_json  # re-exported
from payments.mapping import refund_to_proto as refund_to_proto  # re-exported
from payments.model import (
    CallbackDelivery,
    CreatePaymentInput,
    CreateRefundInput,
    DeliveryAttempt,
    ListFilter,
    PaymentStatus,
    ProviderType,
)
from payments.validation import validate_list

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_UNSIGNED = re.compile(r"[0-9]{1,20}")

# --- responses --------------------------------------------------------------------------


def dumps(document: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON for a response body (odd values, say in health details, as str)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# --- request bodies ---------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    ``empty_ok`` lets an empty body mean ``{}`` (the cancel body is optional).
    NaN/Infinity, invalid UTF-8 and absurd nesting are all a 400, never a 500.
    """
    if not raw.strip():
        if empty_ok:
            return {}
        raise InvalidArgument("", "request body must be a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument("", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("", "request body must be a JSON object")
    return data


def _string(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a string")
    return _valid_text(value, field)


def _valid_text(value: str, field: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``) that no database or encoder takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not UTF-8 text") from None
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int:
    """A JSON integer, an integral float (``100.0``) or a decimal string, like protojson."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidArgument(field, "must be an integer")
    integral_float = isinstance(value, float) and value.is_integer()
    decimal_string = isinstance(value, str) and _INTEGER.fullmatch(value) is not None
    if not (isinstance(value, int) or integral_float or decimal_string):
        raise InvalidArgument(field, "must be an integer")
    number = int(value)
    if not low <= number <= high:
        raise InvalidArgument(field, "is out of range")
    return number


def _enum_prefix(kind: type[enum.IntEnum]) -> str:
    """``PAYMENT_METHOD_`` for PaymentMethod: the proto enum's zero name less UNSPECIFIED."""
    zero = pb.DESCRIPTOR.enum_types_by_name[kind.__name__].values_by_number[0].name
    return zero.removesuffix("UNSPECIFIED")


def enum_number(value: Any, field: str, kind: type[enum.IntEnum]) -> int:
    """The wire number of an enum given as its number, full name or short name.

    ``1``, ``"PAYMENT_METHOD_HOSTED_CARD"`` and ``"hosted_card"`` are the same. An
    unknown number is passed on (validation names it); an unknown name is refused here.
    """
    if isinstance(value, str):
        text = value.strip()
        if _INTEGER.fullmatch(text):
            return _integer(text, field, INT32_MIN, INT32_MAX)
        name = text.upper()
        prefix = _enum_prefix(kind)
        if name.startswith(prefix):
            name = name[len(prefix) :]
        member = kind.__members__.get(name)
        if member is None or not name:
            raise InvalidArgument(field, f"unknown value {value!r}")
        return int(member)
    return _integer(value, field, INT32_MIN, INT32_MAX)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument("metadata", "must be an object of string values")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidArgument("metadata", f"value of {key!r} must be a string")
        _valid_text(key, "metadata")
        _valid_text(item, "metadata")
    return value


_Decode = Callable[[Any, str], Any]
_INTEGER_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.TYPE_INT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, UINT64_MAX),
}


def _field_decoder(field: FieldDescriptor) -> _Decode:
    """How a JSON value of this proto field is type-checked (null is the zero value)."""
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map and field.name == "metadata":  # the one map field; _metadata names it
        return lambda value, _: _metadata(value)
    if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
        return _string
    if field.type == FieldDescriptor.TYPE_ENUM and not field.is_repeated:
        kind: type[enum.IntEnum] = getattr(model, field.enum_type.name)
        return lambda value, name: 0 if value is None else enum_number(value, name, kind)
    if field.type in _INTEGER_RANGES and not field.is_repeated:
        low, high = _INTEGER_RANGES[field.type]
        return lambda value, name: _integer(value, name, low, high)
    raise NotImplementedError(f"JSON decoding of {field.full_name}")  # at import, not per call


_Input = TypeVar("_Input")


@attrs.frozen
class JsonRequest(Generic[_Input]):
    """A request message's JSON form decoded into its attrs input class, by field name."""

    target: type[_Input]
    decoders: tuple[tuple[str, _Decode], ...]

    @classmethod
    def of(cls, message: Descriptor, target: type[_Input]) -> JsonRequest[_Input]:
        wanted = {attribute.name for attribute in attrs.fields(target)}  # type: ignore[arg-type]
        return cls(
            target, tuple((f.name, _field_decoder(f)) for f in message.fields if f.name in wanted)
        )

    def decode(self, body: Mapping[str, Any]) -> _Input:
        """Unknown members are ignored (as protojson can be told), absent ones are zero."""
        return self.target(**{name: decode(body.get(name), name) for name, decode in self.decoders})


_CREATE_REQUEST = JsonRequest.of(pb.CreatePaymentRequest.DESCRIPTOR, CreatePaymentInput)
_ATTEMPT = wire_mapping(DeliveryAttempt, pb.CallbackAttempt)  # first: nested in a delivery
_DELIVERY: WireMapping[CallbackDelivery, pb.CallbackDelivery] = wire_mapping(
    CallbackDelivery, pb.CallbackDelivery
)


def delivery_to_json(delivery: CallbackDelivery) -> dict[str, Any]:
    """A callback delivery and its attempts as JSON (CONTRACT.md "Callback deliveries")."""
    return _DELIVERY.to_json(delivery)


def delivery_to_proto(delivery: CallbackDelivery) -> pb.CallbackDelivery:
    """The same delivery as its protobuf message."""
    return _DELIVERY.to_proto(delivery)


def check_message_payment_id(number: int) -> int:
    """A request message's ``payment_id``: 0 is the unset value, hence not an id."""
    if number <= 0:
        raise InvalidArgument("payment_id", "must be a positive integer")
    return number


_CREATE_INPUT: WireMapping[CreatePaymentInput, pb.CreatePaymentRequest] = wire_mapping(
    CreatePaymentInput, pb.CreatePaymentRequest
)


def create_input_from_json(body: Mapping[str, Any]) -> CreatePaymentInput:
    """Type-check a create body field by field as CreatePaymentRequest declares them."""
    return _CREATE_REQUEST.decode(body)


def create_input_from_proto(message: pb.CreatePaymentRequest) -> CreatePaymentInput:
    """The proto request, already typed by protobuf, as the service's input."""
    return _CREATE_INPUT.from_proto(message)


_REFUND_REQUEST = JsonRequest.of(pb.CreateRefundRequest.DESCRIPTOR, CreateRefundInput)
_REFUND_INPUT: WireMapping[CreateRefundInput, pb.CreateRefundRequest] = wire_mapping(
    CreateRefundInput, pb.CreateRefundRequest
)


def refund_input_from_json(body: Mapping[str, Any], payment_id: int) -> CreateRefundInput:
    """Type-check a create-refund body as CreateRefundRequest declares it; the payment
    is the path's (a ``payment_id`` in the body is ignored)."""
    return attrs.evolve(_REFUND_REQUEST.decode(body), payment_id=payment_id)


def refund_input_from_proto(message: pb.CreateRefundRequest) -> CreateRefundInput:
    """The proto request, already typed by protobuf, as the service's input."""
    return _REFUND_INPUT.from_proto(message)


def cancel_reason_from_json(body: Mapping[str, Any]) -> str:
    """The optional ``reason`` of a cancel body."""
    return _string(body.get("reason"), "reason")


# --- ids and list filters ---------------------------------------------------------------


def parse_payment_id(text: str) -> int:
    """A path id: a positive decimal integer that fits in uint64 (proto's id type)."""
    if not _UNSIGNED.fullmatch(text) or not 0 < int(text) <= UINT64_MAX:
        raise InvalidArgument("id", "must be a positive integer")
    return check_payment_id(int(text))


def check_payment_id(number: int, field: str = "id") -> int:
    """A proto id: 0 is the unset value, hence not an id. Ids are stored as signed
    64-bit integers (SQLite has no other), so a larger uint64 names nothing."""
    if number <= 0:
        raise InvalidArgument(field, "must be a positive integer")
    if number > INT64_MAX:
        raise NotFound("payment not found")
    return number


def _query_int(args: Mapping[str, str], name: str) -> int | None:
    text = args.get(name, "").strip()
    if not text:
        return None
    if not _INTEGER.fullmatch(text):
        raise InvalidArgument(name, "must be an integer")
    return int(text)


def list_filter_from_query(args: Mapping[str, str]) -> ListFilter:
    """HTTP list query parameters; an empty parameter counts as not given.

    Unlike the proto request, ``limit=0`` is refused here: the HTTP range is 1..500.
    """
    status_text = args.get("status", "").strip()
    provider_text = args.get("provider", "").strip()
    limit = _query_int(args, "limit")
    if limit is not None and limit < 1:
        raise InvalidArgument("limit", "must be between 1 and 500")
    offset = _query_int(args, "offset")
    if offset is not None and offset > INT32_MAX:
        raise InvalidArgument("offset", "is out of range")
    if limit is not None and limit > INT32_MAX:
        raise InvalidArgument("limit", "must be between 1 and 500")
    return validate_list(
        request_id=args.get("request_id", ""),
        caller_service=args.get("caller_service", ""),
        resource_type=args.get("resource_type", ""),
        resource_id=args.get("resource_id", ""),
        status=enum_number(status_text, "status", PaymentStatus) if status_text else None,
        provider=enum_number(provider_text, "provider", ProviderType) if provider_text else None,
        limit=limit,
        offset=offset,
    )


def list_filter_from_proto(message: pb.ListPaymentsRequest) -> ListFilter:
    """A proto list request. The status filter applies when ``has_status`` is set, or
    when ``status`` is non-zero (a caller who sets status but forgets has_status means
    it); ``limit`` 0 is the default."""
    status = message.status if message.has_status or message.status else None
    return validate_list(
        request_id=message.request_id,
        caller_service=message.caller_service,
        resource_type=message.resource_type,
        resource_id=message.resource_id,
        status=status,
        provider=message.provider or None,
        limit=message.limit,
        offset=message.offset,
    )


# --- provider callbacks -----------------------------------------------------------------

# Where the raw form carries the provider's signature header (first non-blank wins).
SIGNATURE_HEADERS = ("Stripe-Signature", "X-Provider-Signature")


@attrs.frozen
class ProviderCallbackInput:
    """A provider callback as the transport received it, in either body form."""

    payload: bytes  # the raw event text, exactly as signed
    signature: str  # "" when none came: the service refuses (and records) it


def provider_callback_from_http(body: bytes, headers: Mapping[str, str]) -> ProviderCallbackInput:
    """The two body forms of CONTRACT.md: the raw event with its signature in a header,
    or the gateway's envelope ``{"payload": "<raw event>", "signature": "<header>"}``.

    A body is an envelope when it is a JSON object with a ``payload`` member and no
    ``object`` member (a Stripe event always has ``"object": "event"`` and never a
    ``payload``). The envelope's signature wins; a header fills in when it has none.
    """
    header = next(
        (value for name in SIGNATURE_HEADERS if (value := headers.get(name, "").strip())), ""
    )
    envelope = _envelope(body)
    if envelope is None:
        return ProviderCallbackInput(body, header)
    payload = _string(envelope.get("payload"), "payload")
    signature = _string(envelope.get("signature"), "signature").strip() or header
    return ProviderCallbackInput(_utf8(payload), signature)


def _envelope(body: bytes) -> dict[str, Any] | None:
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the raw form, which the signature check then refuses
    if isinstance(document, dict) and "payload" in document and "object" not in document:
        return document
    return None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in JSON
        raise InvalidArgument("payload", "is not UTF-8 text") from None


def provider_callback_from_proto(
    message: pb.HandleProviderCallbackRequest, max_payload_bytes: int
) -> ProviderCallbackInput:
    """The gRPC form: payload and signature are fields. The payload is bounded like an
    HTTP body (purerpc itself would take 32 MiB)."""
    payload = message.payload.encode("utf-8")
    if len(payload) > max_payload_bytes:
        raise InvalidArgument("payload", f"must be at most {max_payload_bytes} bytes")
    return ProviderCallbackInput(payload, message.signature.strip())
