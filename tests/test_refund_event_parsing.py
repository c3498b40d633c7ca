"""How Stripe's refund events are read: the refunds they report (status mapping, our
metadata, Stripe's own fields) and the money ids that route them to a payment."""

from __future__ import annotations

import json
from typing import Any

import pytest

from payments.model import RefundStatus
from payments.providers.base import ProviderRefund
from payments.providers.stripe_events import read_event, read_refund

R = RefundStatus


def refund_object(**changes: Any) -> dict[str, Any]:
    refund = {
        "id": "re_1",
        "object": "refund",
        "amount": 700,
        "charge": "ch_1",
        "currency": "usd",
        "failure_reason": None,
        "metadata": {"refund_id": "42", "request_id": "refund-req-1"},
        "payment_intent": "pi_1",
        "reason": "requested_by_customer",
        "status": "succeeded",
    }
    refund.update(changes)
    return refund


def event_text(type_: str, obj: dict[str, Any]) -> str:
    return json.dumps(
        {"id": "evt_r1", "object": "event", "created": 1, "type": type_, "data": {"object": obj}}
    )


@pytest.mark.parametrize("type_", ["refund.created", "refund.updated", "refund.failed"])
def test_a_refund_event_reports_its_refund_and_names_its_money(type_: str) -> None:
    event = read_event(event_text(type_, refund_object()))
    assert event.refunds == (
        ProviderRefund(
            provider_refund_id="re_1",
            status=R.SUCCEEDED,
            amount_cents=700,
            currency="USD",
            reason="requested_by_customer",
            payment_intent_id="pi_1",
            charge_id="ch_1",
            refund_id=42,
            request_id="refund-req-1",
        ),
    )
    assert (event.payment_intent, event.charge) == ("pi_1", "ch_1")
    assert event.target_status is None  # the payment's own status never moves
    assert event.callback_hash == ""


@pytest.mark.parametrize(
    ("stripe_status", "status"),
    [
        ("pending", R.PENDING),
        ("requires_action", R.PENDING),
        ("succeeded", R.SUCCEEDED),
        ("failed", R.FAILED),
        ("canceled", R.CANCELED),
    ],
)
def test_stripe_refund_statuses(stripe_status: str, status: RefundStatus) -> None:
    found = read_refund(refund_object(status=stripe_status))
    assert found is not None and found.status == status


def test_a_failed_refund_keeps_stripes_failure_reason() -> None:
    found = read_refund(refund_object(status="failed", failure_reason="lost_or_stolen_card"))
    assert found is not None and found.failure_reason == "lost_or_stolen_card"


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "some_new_status"},
        {"id": None},
        {"id": ""},
        {"amount": "700"},
        {"amount": -1},
        {"amount": True},
    ],
)
def test_a_refund_that_cannot_be_read_is_not_reported(changes: dict[str, Any]) -> None:
    assert read_refund(refund_object(**changes)) is None
    assert read_event(event_text("refund.updated", refund_object(**changes))).refunds == ()


@pytest.mark.parametrize(
    "metadata", [{}, None, {"refund_id": "x1"}, {"refund_id": 42}, {"refund_id": "9" * 20}]
)
def test_a_refund_made_elsewhere_carries_no_refund_id(metadata: Any) -> None:
    found = read_refund(refund_object(metadata=metadata))
    assert found is not None and found.refund_id == 0


def test_charge_refunded_reports_every_refund_of_the_charge() -> None:
    charge = {
        "id": "ch_1",
        "object": "charge",
        "payment_intent": "pi_1",
        "metadata": {"callback_hash": "hash-1", "request_id": "payment-req"},
        "refunds": {
            "object": "list",
            "data": [
                refund_object(id="re_2", amount=300, status="pending", metadata={}),
                refund_object(),
                "not a refund",
            ],
        },
    }
    event = read_event(event_text("charge.refunded", charge))
    assert [(r.provider_refund_id, r.status, r.refund_id) for r in event.refunds] == [
        ("re_2", R.PENDING, 0),
        ("re_1", R.SUCCEEDED, 42),
    ]
    assert (event.payment_intent, event.charge, event.callback_hash) == ("pi_1", "ch_1", "hash-1")


def test_charge_refunded_without_its_refunds_list_reports_none() -> None:
    """Stripe's API since 2022-11-15 leaves ``refunds`` out of a charge unless expanded:
    the refund events tell then."""
    charge = {"id": "ch_1", "object": "charge", "payment_intent": "pi_1", "metadata": {}}
    event = read_event(event_text("charge.refunded", charge))
    assert event.refunds == ()
    assert event.payment_intent == "pi_1"


def test_other_events_report_no_refunds() -> None:
    """A refund object under another event type, or a session, reports nothing."""
    assert read_event(event_text("refund.something_else", refund_object())).refunds == ()
    session = {"id": "cs_1", "object": "checkout.session", "payment_intent": "pi_9"}
    event = read_event(event_text("checkout.session.completed", session))
    assert event.refunds == ()
    assert (event.payment_intent, event.charge) == ("pi_9", "")
