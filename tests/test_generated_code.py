"""payments/gen/ is checked in; these tests fail when it is stale or drifts from the
wire contract (CONTRACT.md), so a proto edit without `make proto` cannot pass CI."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from payments.gen import auth_pb2, payments_pb2
from payments.model import PaymentMethod, PaymentStatus, PaymentType, ProviderType

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "payments" / "gen"


def _sources(directory: Path) -> set[str]:
    """Generated files, subdirectories included (the reflection protos keep their paths)."""
    return {
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_checked_in_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(  # our own script with fixed arguments
        ["sh", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    fresh, checked_in = _sources(tmp_path), _sources(GEN)
    assert fresh, "gen-proto.sh produced nothing"
    assert fresh == checked_in, "run `make proto`: the set of generated files differs"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, GEN, sorted(fresh), shallow=False)
    assert not mismatch and not errors, f"run `make proto`: stale {mismatch + errors}"


@pytest.mark.parametrize(
    ("enum", "prefix", "model"),
    [
        ("PaymentStatus", "PAYMENT_STATUS_", PaymentStatus),
        ("PaymentMethod", "PAYMENT_METHOD_", PaymentMethod),
        ("PaymentType", "PAYMENT_TYPE_", PaymentType),
        ("ProviderType", "PROVIDER_TYPE_", ProviderType),
    ],
)
def test_enum_numbers_match_the_model(enum: str, prefix: str, model: type) -> None:
    wire = {
        value.name.removeprefix(prefix): value.number
        for value in payments_pb2.DESCRIPTOR.enum_types_by_name[enum].values
    }
    assert wire == {member.name: member.value for member in model}  # type: ignore[attr-defined]


def test_contract_enum_numbers() -> None:
    assert payments_pb2.PAYMENT_STATUS_PAID == 10
    assert payments_pb2.PAYMENT_STATUS_FAILED == 20
    assert payments_pb2.PAYMENT_STATUS_CANCELED == 30
    assert payments_pb2.PAYMENT_STATUS_EXPIRED == 40
    assert payments_pb2.PAYMENT_METHOD_PAYMENT_LINK == 2
    assert payments_pb2.PROVIDER_TYPE_STRIPE == 1


def _field(message: type, name: str) -> FieldDescriptor:
    return message.DESCRIPTOR.fields_by_name[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "name", "number"),
    [
        (payments_pb2.Payment, "id", 1),
        (payments_pb2.Payment, "status", 9),
        (payments_pb2.Payment, "checkout_url", 17),
        (payments_pb2.Payment, "metadata", 23),
        (payments_pb2.Payment, "updated_at", 25),
        (payments_pb2.CreatePaymentRequest, "amount_cents", 6),
        (payments_pb2.CreatePaymentRequest, "metadata", 16),
        (payments_pb2.ListPaymentsRequest, "has_status", 5),
        (payments_pb2.ListPaymentsRequest, "offset", 9),
        (payments_pb2.MessageResponse, "payment", 2),
        (auth_pb2.ValidateInternalAccessRequest, "api_key", 1),
        (auth_pb2.ValidateInternalAccessResponse, "allowed_access", 2),
    ],
)
def test_contract_field_numbers(message: type, name: str, number: int) -> None:
    assert _field(message, name).number == number


def test_contract_field_types() -> None:
    payment = payments_pb2.Payment
    assert _field(payment, "id").type == FieldDescriptor.TYPE_UINT64
    assert _field(payment, "amount_cents").type == FieldDescriptor.TYPE_INT64
    assert _field(payment, "recurring_interval_count").type == FieldDescriptor.TYPE_INT32
    metadata = _field(payment, "metadata").message_type
    assert metadata.GetOptions().map_entry
    assert [f.type for f in metadata.fields] == [FieldDescriptor.TYPE_STRING] * 2
    allowed = _field(auth_pb2.ValidateInternalAccessResponse, "allowed_access")
    assert allowed.is_repeated


def test_service_names_and_methods() -> None:
    payments_service = payments_pb2.DESCRIPTOR.services_by_name["PaymentsService"]
    assert payments_service.full_name == "payments.PaymentsService"
    assert {m.name for m in payments_service.methods} == {
        "Health",
        "CreatePayment",
        "GetPayment",
        "ListPayments",
        "CancelPayment",
        "HandleProviderCallback",
        "CreateRefund",
        "GetRefund",
        "ListRefunds",
        "ListCallbackDeliveries",
        "ResendCallback",
    }
    io = {m.name: (m.input_type.name, m.output_type.name) for m in payments_service.methods}
    assert io["CreateRefund"] == ("CreateRefundRequest", "RefundEnvelopeResponse")
    assert io["GetRefund"] == ("GetRefundRequest", "RefundEnvelopeResponse")
    assert io["ListRefunds"] == ("ListRefundsRequest", "ListRefundsResponse")
    assert io["ListCallbackDeliveries"] == (
        "ListCallbackDeliveriesRequest",
        "ListCallbackDeliveriesResponse",
    )
    assert io["ResendCallback"] == ("ResendCallbackRequest", "CallbackDeliveryEnvelope")
    auth_service = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
    assert auth_service.full_name == "auth.AuthService"
    assert [m.name for m in auth_service.methods] == ["ValidateInternalAccess"]


_U64, _I64, _I32 = (
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_INT32,
)
_STR, _ENUM, _MSG = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_MESSAGE,
)

# CONTRACT.md, sections "Refunds" and "Callback deliveries": name -> (number, type).
NEW_MESSAGES: dict[str, dict[str, tuple[int, int]]] = {
    "Refund": {
        "id": (1, _U64),
        "payment_id": (2, _U64),
        "request_id": (3, _STR),
        "caller_service": (4, _STR),
        "amount_cents": (5, _I64),
        "currency": (6, _STR),
        "status": (7, _ENUM),
        "reason": (8, _STR),
        "failure_reason": (9, _STR),
        "provider_refund_id": (10, _STR),
        "metadata": (11, _MSG),
        "created_at": (12, _STR),
        "updated_at": (13, _STR),
    },
    "CreateRefundRequest": {
        "payment_id": (1, _U64),
        "request_id": (2, _STR),
        "amount_cents": (3, _I64),
        "reason": (4, _STR),
        "metadata": (5, _MSG),
    },
    "GetRefundRequest": {"id": (1, _U64)},
    "ListRefundsRequest": {"payment_id": (1, _U64)},
    "RefundEnvelopeResponse": {"refund": (1, _MSG)},
    "ListRefundsResponse": {"refunds": (1, _MSG)},
    "CallbackDelivery": {
        "id": (1, _U64),
        "webhook_id": (2, _STR),
        "kind": (3, _STR),
        "refund_id": (4, _U64),
        "state": (5, _STR),
        "attempt_count": (6, _I32),
        "next_attempt_at": (7, _STR),
        "created_at": (8, _STR),
        "attempts": (9, _MSG),
    },
    "CallbackAttempt": {
        "at": (1, _STR),
        "status_code": (2, _I32),
        "duration_ms": (3, _I64),
        "error": (4, _STR),
    },
    "ListCallbackDeliveriesRequest": {"payment_id": (1, _U64)},
    "ListCallbackDeliveriesResponse": {"deliveries": (1, _MSG)},
    "ResendCallbackRequest": {"payment_id": (1, _U64)},
    "CallbackDeliveryEnvelope": {"delivery": (1, _MSG)},
}


@pytest.mark.parametrize("name", sorted(NEW_MESSAGES))
def test_new_messages_match_the_contract(name: str) -> None:
    descriptor = payments_pb2.DESCRIPTOR.message_types_by_name[name]
    fields = {f.name: (f.number, f.type) for f in descriptor.fields}
    assert fields == NEW_MESSAGES[name]


def test_new_repeated_and_map_fields() -> None:
    by_name = payments_pb2.DESCRIPTOR.message_types_by_name
    assert by_name["ListRefundsResponse"].fields_by_name["refunds"].message_type.name == "Refund"
    assert by_name["ListRefundsResponse"].fields_by_name["refunds"].is_repeated
    deliveries = by_name["ListCallbackDeliveriesResponse"].fields_by_name["deliveries"]
    assert deliveries.is_repeated and deliveries.message_type.name == "CallbackDelivery"
    attempts = by_name["CallbackDelivery"].fields_by_name["attempts"]
    assert attempts.is_repeated and attempts.message_type.name == "CallbackAttempt"
    for message in ("Refund", "CreateRefundRequest"):
        metadata = by_name[message].fields_by_name["metadata"].message_type
        assert metadata.GetOptions().map_entry
    status = by_name["Refund"].fields_by_name["status"].enum_type
    assert status.name == "RefundStatus"
