"""The status machine: every pair of statuses, against the written rules."""

from __future__ import annotations

import itertools

import pytest

from payments.model import (
    ALLOWED_TRANSITIONS,
    CANCELABLE_STATUSES,
    TERMINAL_STATUSES,
    NewPayment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
    can_transition,
    idempotency_key,
)

S = PaymentStatus
REAL_STATUSES = [s for s in S if s != S.UNSPECIFIED]
# Rank of each status: a move is allowed only forward, and never out of a terminal one.
RANK = {S.CREATED: 0, S.PENDING: 1, S.PROCESSING: 2}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(REAL_STATUSES, repeat=2)))
def test_transitions_only_move_forward(current: PaymentStatus, new: PaymentStatus) -> None:
    if current.is_terminal:
        expected = False
    elif new.is_terminal:
        expected = True
    else:
        expected = RANK[new] > RANK[current]
    # What the unit of work does with a refusal: tests/test_unit_of_work.py.
    assert can_transition(current, new) is expected


def test_every_status_is_in_the_table() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(REAL_STATUSES)
    assert {S.PAID, S.FAILED, S.CANCELED, S.EXPIRED} == TERMINAL_STATUSES
    assert {S.CREATED, S.PENDING, S.PROCESSING} == CANCELABLE_STATUSES
    assert not can_transition(S.UNSPECIFIED, S.PAID)


def test_wire_numbers_match_the_contract() -> None:
    assert [int(s) for s in REAL_STATUSES] == [1, 2, 3, 10, 20, 30, 40]
    assert (PaymentMethod.HOSTED_CARD, PaymentMethod.PAYMENT_LINK) == (1, 2)
    assert (PaymentType.ONE_TIME, PaymentType.RECURRING) == (1, 2)
    assert ProviderType.STRIPE == 1


def _new(**overrides: object) -> NewPayment:
    fields: dict[str, object] = {
        "request_id": "r1",
        "caller_service": "orders",
        "resource_type": "order",
        "resource_id": "1",
        "customer_ref": "",
        "amount_cents": 100,
        "currency": "EUR",
        "payment_method": PaymentMethod.HOSTED_CARD,
        "payment_type": PaymentType.ONE_TIME,
        "provider": ProviderType.STRIPE,
        "recurring_interval": "",
        "recurring_interval_count": 0,
        "status_callback_url": "https://cb.example/x",
        "success_url": "",
        "cancel_url": "",
        "metadata": {"a": "1", "b": "2"},
    }
    fields.update(overrides)
    return NewPayment(**fields)  # type: ignore[arg-type]


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert _new().fingerprint() == _new(metadata={"b": "2", "a": "1"}).fingerprint()
    assert _new().fingerprint() != _new(amount_cents=101).fingerprint()
    assert _new().fingerprint() != _new(metadata={"a": "1"}).fingerprint()
    assert _new().fingerprint() != _new(status_callback_url="https://cb.example/y").fingerprint()


def test_idempotency_key_is_per_caller_request_and_parameters() -> None:
    key = idempotency_key("orders", "r1", "f")
    assert key == idempotency_key("orders", "r1", "f")
    assert key != idempotency_key("billing", "r1", "f")
    assert key != idempotency_key("orders", "r2", "f")
    assert key != idempotency_key("orders", "r1", "g")
    # No separator confusion: ("a", "b\x00c") and ("a\x00b", "c") differ.
    assert idempotency_key("a", "b\x00c", "f") != idempotency_key("a\x00b", "c", "f")
    assert len(key) <= 255  # Stripe's limit
