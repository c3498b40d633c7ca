"""The refund status machine (every pair) and the amount rules (CONTRACT.md, Refunds)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import attrs
import pytest

from payments.gen import payments_pb2
from payments.model import (
    REFUND_TERMINAL_STATUSES,
    REFUND_TRANSITIONS,
    NewRefund,
    PaymentStatus,
    Refund,
    RefundRefused,
    RefundStatus,
    RefundTotals,
    can_refund_transition,
    idempotency_key,
    refund_amount,
    refund_idempotency_key,
    refundable_cents,
    refunded_cents,
)

R = RefundStatus
REAL = [s for s in R if s != R.UNSPECIFIED]
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(list(R), repeat=2)))
def test_refund_transitions_only_move_forward(current: RefundStatus, new: RefundStatus) -> None:
    expected = current == R.PENDING and new in {R.SUCCEEDED, R.FAILED, R.CANCELED}
    assert can_refund_transition(current, new) is expected


def test_every_refund_status_is_in_the_table() -> None:
    assert set(REFUND_TRANSITIONS) == set(REAL)
    assert {R.SUCCEEDED, R.FAILED, R.CANCELED} == REFUND_TERMINAL_STATUSES
    assert [s for s in REAL if s.is_terminal] == [R.SUCCEEDED, R.FAILED, R.CANCELED]
    assert not R.PENDING.is_terminal


def test_refund_status_numbers_match_the_proto() -> None:
    wire = {
        value.name.removeprefix("REFUND_STATUS_"): value.number
        for value in payments_pb2.DESCRIPTOR.enum_types_by_name["RefundStatus"].values
    }
    assert wire == {member.name: member.value for member in R}
    assert [int(s) for s in REAL] == [1, 10, 20, 30]


def test_refund_fields_are_the_proto_fields_plus_the_fingerprint() -> None:
    proto = set(payments_pb2.Refund.DESCRIPTOR.fields_by_name)
    model = {field.name for field in attrs.fields(Refund)}
    assert model == proto | {"request_fingerprint"}


def _refund(status: RefundStatus, amount: int) -> Refund:
    return Refund(
        id=0,
        payment_id=1,
        request_id=f"r-{status.name}-{amount}",
        caller_service="svc-a",
        amount_cents=amount,
        currency="USD",
        status=status,
        request_fingerprint="",
        created_at=T0,
        updated_at=T0,
    )


def test_totals_count_pending_and_succeeded_only() -> None:
    refunds = [
        _refund(R.PENDING, 100),
        _refund(R.PENDING, 20),
        _refund(R.SUCCEEDED, 300),
        _refund(R.FAILED, 4000),
        _refund(R.CANCELED, 50000),
    ]
    totals = RefundTotals.of(refunds)
    assert totals == RefundTotals(pending_cents=120, succeeded_cents=300)
    assert refunded_cents(totals) == 300
    assert RefundTotals.of([]) == RefundTotals()


@pytest.mark.parametrize("status", list(PaymentStatus))
def test_refundable_is_zero_unless_paid(status: PaymentStatus) -> None:
    totals = RefundTotals(pending_cents=100, succeeded_cents=200)
    expected = 700 if status == PaymentStatus.PAID else 0
    assert refundable_cents(status, 1000, totals) == expected


@pytest.mark.parametrize(
    ("pending", "succeeded", "expected"),
    [(0, 0, 1000), (1000, 0, 0), (0, 1000, 0), (250, 250, 500), (999, 0, 1), (0, 1200, 0)],
)
def test_refundable_amount(pending: int, succeeded: int, expected: int) -> None:
    totals = RefundTotals(pending_cents=pending, succeeded_cents=succeeded)
    assert refundable_cents(PaymentStatus.PAID, 1000, totals) == expected


def test_refund_amount_zero_means_everything_refundable() -> None:
    totals = RefundTotals(pending_cents=300, succeeded_cents=200)
    assert refund_amount(PaymentStatus.PAID, 1000, totals, 0) == 500
    assert refund_amount(PaymentStatus.PAID, 1000, totals, 500) == 500
    assert refund_amount(PaymentStatus.PAID, 1000, totals, 1) == 1


def test_refund_amount_over_refundable_is_refused_naming_it() -> None:
    totals = RefundTotals(pending_cents=300, succeeded_cents=200)
    with pytest.raises(RefundRefused, match="refundable amount 500") as caught:
        refund_amount(PaymentStatus.PAID, 1000, totals, 501)
    assert caught.value.refundable_cents == 500


@pytest.mark.parametrize("requested", [0, 1])
def test_refund_amount_of_a_fully_refunded_payment_is_refused(requested: int) -> None:
    totals = RefundTotals(pending_cents=400, succeeded_cents=600)
    with pytest.raises(RefundRefused) as caught:
        refund_amount(PaymentStatus.PAID, 1000, totals, requested)
    assert caught.value.refundable_cents == 0


@pytest.mark.parametrize("status", [s for s in PaymentStatus if s != PaymentStatus.PAID])
def test_refund_amount_needs_a_paid_payment(status: PaymentStatus) -> None:
    with pytest.raises(RefundRefused, match=status.name):
        refund_amount(status, 1000, RefundTotals(), 100)


def test_refund_amount_refuses_a_negative_request() -> None:
    with pytest.raises(ValueError, match="negative"):
        refund_amount(PaymentStatus.PAID, 1000, RefundTotals(), -1)


def test_sequential_partial_refunds_never_exceed_the_amount() -> None:
    refunds: list[Refund] = []
    accepted = 0
    for requested in (300, 300, 300, 300, 0, 50):
        totals = RefundTotals.of(refunds)
        try:
            amount = refund_amount(PaymentStatus.PAID, 1000, totals, requested)
        except RefundRefused:
            continue
        accepted += amount
        refunds.append(_refund(R.PENDING, amount))
    assert accepted == 1000
    assert [r.amount_cents for r in refunds] == [300, 300, 300, 100]
    # A failed refund gives its amount back.
    refunds[0].status = R.FAILED
    assert refund_amount(PaymentStatus.PAID, 1000, RefundTotals.of(refunds), 0) == 300


def _new(**changes: object) -> NewRefund:
    fields: dict[str, object] = {
        "payment_id": 7,
        "request_id": "rf-1",
        "caller_service": "svc-a",
        "amount_cents": 0,
        "reason": "",
        "metadata": {"a": "1", "b": "2"},
    }
    fields.update(changes)
    return NewRefund(**fields)  # type: ignore[arg-type]


def test_fingerprint_is_stable_and_sees_every_parameter() -> None:
    base = _new()
    assert base.fingerprint() == _new(metadata={"b": "2", "a": "1"}).fingerprint()
    assert len(base.fingerprint()) == 64
    for change in (
        {"payment_id": 8},
        {"request_id": "rf-2"},
        {"caller_service": "svc-b"},
        {"amount_cents": 1},
        {"reason": "duplicate"},
        {"metadata": {"a": "1"}},
    ):
        assert _new(**change).fingerprint() != base.fingerprint(), change


def test_refund_idempotency_key() -> None:
    key = refund_idempotency_key("svc-a", "rf-1")
    assert key == refund_idempotency_key("svc-a", "rf-1")
    assert key.startswith("refunds-") and len(key) <= 255
    assert key != refund_idempotency_key("svc-b", "rf-1")
    assert key != refund_idempotency_key("svc-a", "rf-2")
    # Framing: the pair ("a-b", "c") is not ("a", "b-c").
    assert refund_idempotency_key("a-b", "c") != refund_idempotency_key("a", "b-c")
    # Never the key of the caller's payment with the same request_id.
    assert key != idempotency_key("svc-a", "rf-1", _new().fingerprint())
    assert _refund(R.PENDING, 1).idempotency_key == refund_idempotency_key("svc-a", "r-PENDING-1")
