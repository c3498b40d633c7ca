"""The JSON/proto mapping: response shape of CONTRACT.md and strict request decoding."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import attrs
import pytest
from google.protobuf import json_format

from payments.api import wire
from payments.errors import InvalidArgument, NotFound
from payments.gen import payments_pb2 as pb
from payments.model import (
    CreatePaymentInput,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)

CREATED = datetime(2026, 11, 26, 8, 18, 56, 123456, tzinfo=UTC)


def make_payment(**changes: object) -> Payment:
    payment = Payment(
        id=42,
        request_id="req-1",
        caller_service="svc-a",
        resource_type="order",
        resource_id="1042",
        customer_ref="",
        amount_cents=2500,
        currency="EUR",
        status=PaymentStatus.PENDING,
        payment_method=PaymentMethod.HOSTED_CARD,
        payment_type=PaymentType.ONE_TIME,
        provider=ProviderType.STRIPE,
        recurring_interval="",
        recurring_interval_count=0,
        status_callback_url="https://svc-a.internal/cb",
        success_url="",
        cancel_url="",
        provider_callback_hash="hash-1",
        provider_callback_url="https://pay.example/webhooks/providers/stripe/hash-1",
        request_fingerprint="f" * 64,
        created_at=CREATED,
        updated_at=CREATED + timedelta(seconds=1),
        provider_payment_id="cs_test_1",
        checkout_url="https://checkout.example/cs_test_1",
        metadata={"order": "1042"},
    )
    return attrs.evolve(payment, **changes)


VALID_BODY: dict[str, object] = {
    "request_id": "req-1",
    "caller_service": "svc-a",
    "resource_type": "order",
    "resource_id": "1042",
    "amount_cents": 2500,
    "currency": "eur",
    "payment_method": 1,
    "payment_type": 1,
    "status_callback_url": "https://svc-a.internal/cb",
}


# --- responses --------------------------------------------------------------------------


def test_payment_json_uses_proto_names_numbers_and_omits_zero_values() -> None:
    out = wire.payment_to_json(make_payment())
    assert out == {
        "id": 42,
        "request_id": "req-1",
        "caller_service": "svc-a",
        "resource_type": "order",
        "resource_id": "1042",
        "amount_cents": 2500,
        "currency": "EUR",
        "status": 2,
        "payment_method": 1,
        "payment_type": 1,
        "provider": 1,
        "provider_payment_id": "cs_test_1",
        "checkout_url": "https://checkout.example/cs_test_1",
        "provider_callback_hash": "hash-1",
        "provider_callback_url": "https://pay.example/webhooks/providers/stripe/hash-1",
        "status_callback_url": "https://svc-a.internal/cb",
        "metadata": {"order": "1042"},
        "created_at": "2026-11-26T08:18:56Z",
        "updated_at": "2026-11-26T08:18:57Z",
    }
    # Internal fields never leave the service.
    assert "request_fingerprint" not in out and "success_url" not in out


def test_refundable_cents_comes_from_the_entity() -> None:
    paid = wire.payment_to_json(make_payment(status=PaymentStatus.PAID, refunded_cents=500))
    assert paid["refunded_cents"] == 500
    assert paid["refundable_cents"] == 2000
    assert "refundable_cents" not in wire.payment_to_json(make_payment())


def test_json_matches_protojson_of_the_proto_message() -> None:
    """The HTTP shape is what protojson would print for the gRPC message."""
    payment = make_payment(
        payment_type=PaymentType.RECURRING,
        recurring_interval="month",
        recurring_interval_count=1,
        customer_ref="cus-1",
        status=PaymentStatus.PAID,
        refunded_cents=100,
    )
    proto_json = json_format.MessageToDict(
        wire.payment_to_proto(payment),
        preserving_proto_field_name=True,
        use_integers_for_enums=True,
    )
    # protojson prints 64-bit integers as strings; the contract says JSON numbers.
    for key in ("id", "amount_cents", "refunded_cents", "refundable_cents"):
        proto_json[key] = int(proto_json[key])
    assert wire.payment_to_json(payment) == proto_json


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 7), "2026-01-02T03:04:05Z"),  # naive = UTC
        # Fractions are cut, never rounded up into the next second (Go's time.RFC3339).
        (datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "2026-12-31T23:59:59Z"),
        (
            datetime(2026, 1, 2, 5, 4, 5, 500000, tzinfo=timezone(timedelta(hours=2))),
            "2026-01-02T03:04:05Z",
        ),
    ],
)
def test_timestamps_are_rfc3339_utc_to_the_second(moment: datetime, expected: str) -> None:
    """The Go service's format, byte for byte (CONTRACT.md; issue 14)."""
    assert wire.format_timestamp(moment) == expected


def test_proto_and_json_timestamps_agree_and_drop_only_the_fraction() -> None:
    payment = make_payment()
    message, document = wire.payment_to_proto(payment), wire.payment_to_json(payment)
    assert (message.created_at, message.updated_at) == (
        "2026-11-26T08:18:56Z",
        "2026-11-26T08:18:57Z",
    )
    assert (document["created_at"], document["updated_at"]) == (
        message.created_at,
        message.updated_at,
    )
    assert payment.created_at.microsecond == 123456  # the entity (and storage) keep it


def test_every_proto_field_of_payment_is_mapped() -> None:
    """A Payment with every wire field non-zero sets every field of the proto message."""
    payment = make_payment(
        customer_ref="cus-1",
        payment_type=PaymentType.RECURRING,
        recurring_interval="month",
        recurring_interval_count=2,
        provider_subscription_id="sub_1",
        status=PaymentStatus.PAID,
        refunded_cents=1,
    )
    message = wire.payment_to_proto(payment)
    every = {field.name for field in pb.Payment.DESCRIPTOR.fields}
    assert {field.name for field, _ in message.ListFields()} == every
    assert set(wire.payment_to_json(payment)) == every
    for field in attrs.fields(Payment):
        if field.name in every and field.name not in ("created_at", "updated_at"):
            assert getattr(message, field.name) == getattr(payment, field.name), field.name


def test_dumps_is_compact_utf8_and_64_bit_numbers_stay_numbers() -> None:
    body = wire.dumps({"payment": {"amount_cents": 2**62, "currency": "€"}})
    assert body == '{"payment":{"amount_cents":4611686018427387904,"currency":"€"}}'.encode()


# --- create bodies ----------------------------------------------------------------------


def test_create_body_decodes() -> None:
    raw = wire.create_input_from_json({**VALID_BODY, "metadata": {"k": "v"}, "unknown": [1]})
    assert raw == CreatePaymentInput(
        request_id="req-1",
        caller_service="svc-a",
        resource_type="order",
        resource_id="1042",
        amount_cents=2500,
        currency="eur",
        payment_method=1,
        payment_type=1,
        status_callback_url="https://svc-a.internal/cb",
        metadata={"k": "v"},
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        ("PAYMENT_METHOD_PAYMENT_LINK", 2),
        ("payment_link", 2),
        ("HOSTED_CARD", 1),
        ("2", 2),
        (7, 7),  # unknown numbers pass; validation names them
        (None, 0),
    ],
)
def test_enum_fields_accept_number_full_name_and_short_name(value: object, expected: int) -> None:
    raw = wire.create_input_from_json({**VALID_BODY, "payment_method": value})
    assert raw.payment_method == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2500, 2500), ("2500", 2500), (2500.0, 2500), ("-3", -3), (2**63 - 1, 2**63 - 1)],
)
def test_int64_accepts_integers_integral_floats_and_decimal_strings(
    value: object, expected: int
) -> None:
    assert (
        wire.create_input_from_json({**VALID_BODY, "amount_cents": value}).amount_cents == expected
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount_cents", True),
        ("amount_cents", 12.5),
        ("amount_cents", "12.5"),
        ("amount_cents", "1e3"),
        ("amount_cents", "twelve"),
        ("amount_cents", [1]),
        ("amount_cents", {"v": 1}),
        ("amount_cents", 2**63),
        ("amount_cents", "99999999999999999999"),
        ("recurring_interval_count", 2**31),
        ("recurring_interval_count", False),
        ("request_id", 12),
        ("currency", ["EUR"]),
        ("caller_service", True),
        ("status_callback_url", {"url": "x"}),
        ("payment_method", "BITCOIN"),
        ("payment_method", "PAYMENT_METHOD_"),
        ("payment_method", True),
        ("payment_method", 1.5),
        ("payment_type", [1]),
        ("provider", "paypal"),
        ("provider", 2**40),
        ("metadata", ["a"]),
        ("metadata", "a=b"),
        ("metadata", {"a": 1}),
        ("metadata", {"a": None}),
    ],
)
def test_wrong_types_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        wire.create_input_from_json({**VALID_BODY, field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_null_means_the_zero_value() -> None:
    raw = wire.create_input_from_json({**VALID_BODY, "customer_ref": None, "metadata": None})
    assert raw.customer_ref == "" and raw.metadata == {}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"not json",
        b"[1,2]",
        b'"text"',
        b"42",
        b"null",
        b"{",
        b'{"a": NaN}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_bodies_that_are_not_json_objects_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        wire.parse_json_object(body)


def test_an_empty_body_may_mean_an_empty_object() -> None:
    assert wire.parse_json_object(b"", empty_ok=True) == {}
    assert wire.parse_json_object(b'{"reason": "x"}', empty_ok=True) == {"reason": "x"}


def test_cancel_reason_must_be_a_string() -> None:
    assert wire.cancel_reason_from_json({}) == ""
    assert wire.cancel_reason_from_json({"reason": "late"}) == "late"
    with pytest.raises(InvalidArgument, match=r"^reason: "):
        wire.cancel_reason_from_json({"reason": 5})


def test_proto_create_request_maps_every_field() -> None:
    message = pb.CreatePaymentRequest(
        request_id="r",
        caller_service="c",
        resource_type="t",
        resource_id="i",
        customer_ref="cu",
        amount_cents=5,
        currency="usd",
        payment_method=2,
        payment_type=2,
        provider=1,
        recurring_interval="week",
        recurring_interval_count=3,
        status_callback_url="https://c/cb",
        success_url="https://c/s",
        cancel_url="https://c/x",
        metadata={"a": "b"},
    )
    raw = wire.create_input_from_proto(message)
    assert attrs.asdict(raw) == {
        "request_id": "r",
        "caller_service": "c",
        "resource_type": "t",
        "resource_id": "i",
        "customer_ref": "cu",
        "amount_cents": 5,
        "currency": "usd",
        "payment_method": 2,
        "payment_type": 2,
        "provider": 1,
        "recurring_interval": "week",
        "recurring_interval_count": 3,
        "status_callback_url": "https://c/cb",
        "success_url": "https://c/s",
        "cancel_url": "https://c/x",
        "metadata": {"a": "b"},
    }
    assert {f.name for f in pb.CreatePaymentRequest.DESCRIPTOR.fields} == set(attrs.asdict(raw))
    # The JSON decoder follows the same message: protojson of it (enum names, int64 as
    # strings) and the plain JSON shape (numbers) decode to the same input.
    for options in ({}, {"use_integers_for_enums": True}):
        body = json_format.MessageToDict(message, preserving_proto_field_name=True, **options)
        assert wire.create_input_from_json(body) == raw


# --- ids and lists ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "42", str(2**63 - 1), "007"])
def test_payment_ids(text: str) -> None:
    assert wire.parse_payment_id(text) == int(text)


@pytest.mark.parametrize("number", [2**63, 2**64 - 1])
def test_ids_beyond_int64_name_no_payment(number: int) -> None:
    """Stored ids are signed 64-bit: a larger uint64 is not found, on both transports."""
    with pytest.raises(NotFound):
        wire.parse_payment_id(str(number))
    with pytest.raises(NotFound):
        wire.check_payment_id(number)


@pytest.mark.parametrize(
    "text", ["0", "-1", "abc", "1.5", "", " 1", str(2**64), "9" * 40, "\u0661"]
)
def test_bad_payment_ids_name_id(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^id: "):
        wire.parse_payment_id(text)


def test_proto_id_zero_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"^id: "):
        wire.check_payment_id(0)


def test_list_query_defaults() -> None:
    filters = wire.list_filter_from_query({})
    assert (filters.limit, filters.offset, filters.status, filters.provider) == (100, 0, None, None)


def test_list_query_values() -> None:
    filters = wire.list_filter_from_query(
        {
            "request_id": "r",
            "caller_service": "svc-a",
            "resource_type": "order",
            "resource_id": "1",
            "status": "10",
            "provider": "stripe",
            "limit": "5",
            "offset": "10",
        }
    )
    assert filters.status == PaymentStatus.PAID
    assert filters.provider == ProviderType.STRIPE
    assert (filters.limit, filters.offset, filters.resource_type) == (5, 10, "order")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"status": "PAYMENT_STATUS_PENDING"}, PaymentStatus.PENDING),
        ({"status": "pending"}, PaymentStatus.PENDING),
        ({"provider": "1"}, ProviderType.STRIPE),
        ({"provider": "PROVIDER_TYPE_STRIPE"}, ProviderType.STRIPE),
    ],
)
def test_list_query_enum_names(args: dict[str, str], expected: object) -> None:
    filters = wire.list_filter_from_query(args)
    assert expected in (filters.status, filters.provider)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("limit", "0"),
        ("limit", "501"),
        ("limit", "-1"),
        ("limit", "ten"),
        ("limit", "1.5"),
        ("limit", str(2**40)),
        ("offset", "-1"),
        ("offset", "x"),
        ("offset", str(2**40)),
        ("status", "0"),
        ("status", "7"),
        ("status", "bogus"),
        ("provider", "2"),
        ("provider", "paypal"),
        ("resource_id", "x" * 200),
    ],
)
def test_bad_list_parameters_name_the_parameter(name: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        wire.list_filter_from_query({name: value})
    assert caught.value.field == name


def test_empty_list_parameters_are_not_given() -> None:
    filters = wire.list_filter_from_query({"limit": "", "status": "", "offset": ""})
    assert (filters.limit, filters.status) == (100, None)


def test_proto_list_request() -> None:
    assert wire.list_filter_from_proto(pb.ListPaymentsRequest()).limit == 100
    assert wire.list_filter_from_proto(pb.ListPaymentsRequest()).status is None
    with_status = pb.ListPaymentsRequest(has_status=True, status=pb.PAYMENT_STATUS_PAID, limit=3)
    filters = wire.list_filter_from_proto(with_status)
    assert (filters.status, filters.limit) == (PaymentStatus.PAID, 3)
    # A status without has_status still filters: the caller obviously meant it.
    assert wire.list_filter_from_proto(pb.ListPaymentsRequest(status=2)).status == 2
    with pytest.raises(InvalidArgument, match=r"^status: "):
        wire.list_filter_from_proto(pb.ListPaymentsRequest(has_status=True))
    with pytest.raises(InvalidArgument, match=r"^limit: "):
        wire.list_filter_from_proto(pb.ListPaymentsRequest(limit=501))
    with pytest.raises(InvalidArgument, match=r"^offset: "):
        wire.list_filter_from_proto(pb.ListPaymentsRequest(offset=-1))


def test_request_json_round_trip_through_dumps() -> None:
    body = wire.dumps(VALID_BODY)
    assert wire.create_input_from_json(wire.parse_json_object(body)).amount_cents == 2500
    assert json.loads(body) == VALID_BODY
