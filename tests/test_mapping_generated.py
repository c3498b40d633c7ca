"""The generated ``to_json`` / ``to_proto`` of every wire mapping against the generic
cattrs mapping they replaced (kept here as the oracle): the same JSON object, key order
included, and the same proto message, for generated entities with zero values, metadata
maps, every enum member, and naive or aware datetimes in any offset.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from payments import mapping
from payments.api import wire
from payments.model import (
    CallbackDelivery,
    CreatePaymentInput,
    CreateRefundInput,
    DeliveryAttempt,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
    Refund,
    RefundStatus,
)

# --- the oracle: the mapping as it was before the generated functions ------------------


def _old_format_timestamp(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return f"{moment.isoformat(timespec='seconds')[:19]}Z"


def _is_int_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.IntEnum)


_oracle = cattrs.Converter()
_oracle.register_unstructure_hook_func(_is_int_enum, int)
_oracle.register_unstructure_hook(datetime, _old_format_timestamp)


def _oracle_to_json(entity: type[Any], message: type[Message]) -> Callable[[Any], dict[str, Any]]:
    names = tuple(field.name for field in message.DESCRIPTOR.fields)
    attributes = {a.name for a in attrs.fields(attrs.resolve_types(entity))}
    properties = tuple(name for name in names if name not in attributes)
    omitted = {name: override(omit=True) for name in attributes if name not in names}
    unstructure = make_dict_unstructure_fn(entity, _oracle, **omitted)

    def to_json(value: Any) -> dict[str, Any]:
        values = unstructure(value)
        for name in properties:
            values[name] = _oracle.unstructure(getattr(value, name))
        return {name: item for name in names if (item := values[name])}

    _oracle.register_unstructure_hook(entity, to_json)
    return to_json


MAPPINGS: dict[type[Any], mapping.WireMapping[Any, Any]] = {
    DeliveryAttempt: wire._ATTEMPT,  # first: nested in a delivery
    CallbackDelivery: wire._DELIVERY,
    Payment: mapping.PAYMENT,
    Refund: mapping.REFUND,
    CreatePaymentInput: wire._CREATE_INPUT,
    CreateRefundInput: wire._REFUND_INPUT,
}
ORACLES = {kind: _oracle_to_json(kind, m.message) for kind, m in MAPPINGS.items()}

# --- generated entities -----------------------------------------------------------------

_zones = st.one_of(
    st.none(),
    st.just(UTC),
    st.builds(
        timezone,
        st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23)),
    ),
)
# Years away from the edges, so a shift to UTC cannot leave datetime's range.
_moments = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_zones
)
_text = st.text(max_size=12)
_metadata = st.dictionaries(_text, _text, max_size=4)
_uint64 = st.one_of(st.just(0), st.integers(0, 2**64 - 1))
_int64 = st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1))
_int32 = st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1))
_counts = st.integers(0, 2**31 - 1)

payments = st.builds(
    Payment,
    id=_uint64,
    request_id=_text,
    caller_service=_text,
    resource_type=_text,
    resource_id=_text,
    customer_ref=_text,
    amount_cents=_int64,
    currency=_text,
    status=st.sampled_from(PaymentStatus),
    payment_method=st.sampled_from(PaymentMethod),
    payment_type=st.sampled_from(PaymentType),
    provider=st.sampled_from(ProviderType),
    recurring_interval=_text,
    recurring_interval_count=_int32,
    status_callback_url=_text,
    success_url=_text,
    cancel_url=_text,
    provider_callback_hash=_text,
    provider_callback_url=_text,
    request_fingerprint=_text,
    created_at=_moments,
    updated_at=_moments,
    provider_payment_id=_text,
    provider_subscription_id=_text,
    checkout_url=_text,
    refunded_cents=st.one_of(st.just(0), st.integers(0, 2**62)),
    metadata=_metadata,
    provider_payment_intent_id=_text,
    provider_charge_id=_text,
    pending_refund_cents=st.one_of(st.just(0), st.integers(0, 2**62)),
)
refunds = st.builds(
    Refund,
    id=_uint64,
    payment_id=_uint64,
    request_id=_text,
    caller_service=_text,
    amount_cents=_int64,
    currency=_text,
    status=st.sampled_from(RefundStatus),
    request_fingerprint=_text,
    created_at=_moments,
    updated_at=_moments,
    reason=_text,
    failure_reason=_text,
    provider_refund_id=_text,
    metadata=_metadata,
)
attempts = st.builds(
    DeliveryAttempt, at=_moments, status_code=_int32, duration_ms=_int32, error=_text
)
deliveries = st.builds(
    CallbackDelivery,
    id=_uint64,
    webhook_id=_text,
    kind=_text,
    refund_id=_uint64,
    state=_text,
    next_attempt_at=_moments,
    created_at=_moments,
    attempts=st.lists(attempts, max_size=3),
)
create_inputs = st.builds(
    CreatePaymentInput,
    amount_cents=_int64,
    payment_method=_counts,
    payment_type=_counts,
    provider=_counts,
    recurring_interval_count=_int32,
    metadata=_metadata,
)
refund_inputs = st.builds(
    CreateRefundInput, payment_id=_uint64, amount_cents=_int64, metadata=_metadata
)
entities = st.one_of(payments, refunds, attempts, deliveries, create_inputs, refund_inputs)


def _check(entity: Any) -> None:
    wire_mapping = MAPPINGS[type(entity)]
    expected = ORACLES[type(entity)](entity)

    document = wire_mapping.to_json(entity)
    message = wire_mapping.to_proto(entity)

    assert list(document.items()) == list(expected.items())  # key order too
    assert message == wire_mapping.message(**expected)
    assert message.SerializeToString(deterministic=True) == wire_mapping.message(
        **expected
    ).SerializeToString(deterministic=True)


@settings(max_examples=400)
@given(payments)
def test_payment_json_and_proto_match_the_generic_mapping(payment: Payment) -> None:
    _check(payment)


@settings(max_examples=300)
@given(entities)
def test_every_wire_mapping_matches_the_generic_mapping(entity: Any) -> None:
    _check(entity)


def test_zero_payment_and_each_status_match() -> None:
    zero = Payment(
        id=0,
        request_id="",
        caller_service="",
        resource_type="",
        resource_id="",
        customer_ref="",
        amount_cents=0,
        currency="",
        status=PaymentStatus.UNSPECIFIED,
        payment_method=PaymentMethod.UNSPECIFIED,
        payment_type=PaymentType.UNSPECIFIED,
        provider=ProviderType.UNSPECIFIED,
        recurring_interval="",
        recurring_interval_count=0,
        status_callback_url="",
        success_url="",
        cancel_url="",
        provider_callback_hash="",
        provider_callback_url="",
        request_fingerprint="",
        created_at=datetime(2026, 11, 29, 18, 45, 15, 999999),
        updated_at=datetime(2026, 11, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
    )
    assert mapping.payment_to_json(zero) == {
        "created_at": "2026-11-29T18:45:15Z",
        "updated_at": "2026-11-30T04:59:59Z",
    }
    for status in PaymentStatus:
        _check(attrs.evolve(zero, status=status, amount_cents=500, refunded_cents=100))


@settings(max_examples=20)
@given(payments)
def test_the_json_object_is_a_copy(payment: Payment) -> None:
    """Changing the JSON object (a callback body, say) leaves the payment alone."""
    payment.metadata = {"k": "v"}
    document = mapping.payment_to_json(payment)
    document["metadata"]["k"] = "changed"
    assert payment.metadata == {"k": "v"}
