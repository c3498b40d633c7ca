"""StripeEventParser: Stripe's signature scheme (checked with the stripe library, and
agreeing with signatures made by the library and by the emulator), and how events are
read: the payment they are about and what they mean for its status."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import stripe

from payments.errors import BadSignature, InvalidArgument
from payments.model import PaymentStatus
from payments.providers.base import EventParser
from payments.providers.stripe_events import StripeEventParser, read_event
from payments.sandbox import stripe_signature

SECRET = "whsec_unit_dGVzdC1zZWNyZXQ"
S = PaymentStatus


def event(type_: str = "checkout.session.completed", **obj: Any) -> dict[str, Any]:
    session = {
        "id": "cs_test_1",
        "object": "checkout.session",
        "metadata": {"callback_hash": "hash-1", "request_id": "r-1"},
        "payment_link": None,
        "payment_status": "paid",
        "status": "complete",
        "subscription": None,
    }
    session.update(obj)
    return {
        "id": "evt_1",
        "object": "event",
        "created": 1_700_000_000,
        "data": {"object": session},
        "type": type_,
    }


def body_of(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def parser(tolerance: int = 300) -> StripeEventParser:
    return StripeEventParser(SECRET, tolerance)


# --- signatures -------------------------------------------------------------------------


def test_it_is_an_event_parser() -> None:
    assert isinstance(parser(), EventParser)
    assert SECRET not in repr(parser())


def test_a_signature_made_by_the_stripe_library_verifies() -> None:
    body = body_of(event())
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    parsed = parser().parse(body, header)
    assert (parsed.event_id, parsed.event_type) == ("evt_1", "checkout.session.completed")


def test_the_emulator_signs_exactly_as_stripe_does() -> None:
    body = body_of(event())
    now = int(time.time())
    ours = stripe_signature(body, SECRET, now)
    theirs = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, now)
    assert ours == theirs
    # And the library's own verification accepts what the emulator makes.
    assert stripe.WebhookSignature.verify_header(body.decode(), ours, SECRET, 300)
    assert stripe.Webhook.construct_event(body.decode(), ours, SECRET).id == "evt_1"
    assert parser().parse(body, ours).event_id == "evt_1"


def test_several_signatures_and_unknown_schemes_in_the_header() -> None:
    """Stripe sends one v1 per active secret (during rotation) and may add schemes."""
    body = body_of(event())
    now = int(time.time())
    good = stripe_signature(body, SECRET, now).split(",")[1]
    header = f"t={now},v1={'0' * 64},{good},v0=deadbeef"
    assert parser().parse(body, header).event_id == "evt_1"


@pytest.mark.parametrize(
    ("make_header", "message"),
    [
        (lambda body, now: "", "signature: is required"),
        (lambda body, now: "   ", "signature: is required"),
        (
            lambda body, now: "v1=abc",
            "signature: is malformed: expected t=<timestamp>,v1=<signature>",
        ),
        (
            lambda body, now: "t=abc,v1=00",
            "signature: is malformed: expected t=<timestamp>,v1=<signature>",
        ),
        (lambda body, now: f"t={now}", "signature: does not match the payload"),
        (lambda body, now: f"t={now},v1=00", "signature: does not match the payload"),
        (
            lambda body, now: stripe_signature(body, "whsec_other", now),
            "signature: does not match the payload",
        ),
        (
            lambda body, now: stripe_signature(body + b" ", SECRET, now),
            "signature: does not match the payload",
        ),
        (
            lambda body, now: stripe_signature(body, SECRET, now - 330),
            "signature: timestamp is outside the tolerance",
        ),
        (
            lambda body, now: stripe_signature(body, SECRET, now + 330),
            "signature: timestamp is outside the tolerance",
        ),
    ],
)
def test_bad_signatures_are_refused(make_header: Any, message: str) -> None:
    body = body_of(event())
    header = make_header(body, int(time.time()))
    with pytest.raises(BadSignature) as info:
        parser().parse(body, header)
    assert info.value.message == message
    assert isinstance(info.value, InvalidArgument)  # 400 on both transports


def test_timestamps_inside_the_tolerance_pass_both_ways() -> None:
    body = body_of(event())
    now = int(time.time())
    for skew in (-290, 0, 290):
        assert parser().parse(body, stripe_signature(body, SECRET, now + skew)).event_id


def test_the_tolerance_is_configurable() -> None:
    body = body_of(event())
    header = stripe_signature(body, SECRET, int(time.time()) - 60)
    assert parser(120).parse(body, header).event_id == "evt_1"
    with pytest.raises(BadSignature):
        parser(30).parse(body, header)


def test_errors_never_echo_the_signature_or_secret() -> None:
    body = body_of(event())
    header = stripe_signature(body, "whsec_other", int(time.time()))
    with pytest.raises(BadSignature) as info:
        parser().parse(body, header)
    assert header.split("v1=")[1] not in str(info.value)
    assert SECRET not in str(info.value)


def test_a_body_that_is_not_utf8_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="payload: is not UTF-8 text"):
        parser().parse(b"\xff\xfe", "t=1,v1=00")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "payload: is not valid JSON"),
        (b"[]", "payload: is not a Stripe event"),
        (b'{"object": "list", "data": []}', "payload: is not a Stripe event"),
        (b'{"object": "event", "id": "evt_1", "type": "x"}', "payload: is not a Stripe event"),
        (
            b'{"object": "event", "id": 5, "type": "x", "data": {"object": {}}}',
            "payload: is not a Stripe event",
        ),
    ],
)
def test_a_signed_body_that_is_not_an_event_is_invalid(body: bytes, message: str) -> None:
    header = stripe_signature(body, SECRET, int(time.time()))
    with pytest.raises(InvalidArgument) as info:
        parser().parse(body, header)
    assert not isinstance(info.value, BadSignature)
    assert info.value.message.startswith(message)


def test_the_parser_needs_a_secret_and_a_tolerance() -> None:
    with pytest.raises(ValueError, match="secret"):
        StripeEventParser(" ", 300)
    with pytest.raises(ValueError, match="tolerance"):
        StripeEventParser(SECRET, 0)


# --- the mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "changes", "target"),
    [
        ("checkout.session.completed", {"payment_status": "paid"}, S.PAID),
        ("checkout.session.completed", {"payment_status": "no_payment_required"}, S.PAID),
        ("checkout.session.completed", {"payment_status": "unpaid"}, S.PROCESSING),
        ("checkout.session.async_payment_succeeded", {}, S.PAID),
        ("checkout.session.async_payment_failed", {}, S.FAILED),
        ("checkout.session.expired", {"status": "expired"}, S.EXPIRED),
        ("checkout.session.expired", {"payment_link": "plink_1"}, None),
        ("invoice.paid", {"object": "invoice"}, S.PAID),
        ("invoice.payment_failed", {"object": "invoice"}, S.FAILED),
        ("customer.subscription.deleted", {"object": "subscription"}, S.CANCELED),
        ("customer.subscription.created", {"object": "subscription"}, None),
        ("payment_intent.succeeded", {"object": "payment_intent"}, None),
        ("charge.refunded", {"object": "charge"}, None),
    ],
)
def test_the_event_mapping(type_: str, changes: dict[str, Any], target: S | None) -> None:
    assert read_event(json.dumps(event(type_, **changes))).target_status == target


def test_a_session_event_names_the_session_its_link_and_subscription() -> None:
    parsed = read_event(
        json.dumps(
            event(payment_link="plink_9", subscription="sub_9", payment_status="unpaid"),
        )
    )
    assert parsed.refs == ("cs_test_1", "plink_9", "sub_9")
    assert parsed.callback_hash == "hash-1"
    assert parsed.subscription_id == "sub_9"
    assert parsed.created == 1_700_000_000


def test_an_expanded_subscription_counts_by_its_id_and_metadata() -> None:
    parsed = read_event(
        json.dumps(
            event(metadata={}, subscription={"id": "sub_7", "metadata": {"callback_hash": "h7"}})
        )
    )
    assert parsed.subscription_id == "sub_7" and "sub_7" in parsed.refs
    assert parsed.callback_hash == "h7"


def _invoice(**fields: Any) -> dict[str, Any]:
    return {"id": "in_1", "object": "invoice", "metadata": {}, **fields}


@pytest.mark.parametrize(
    "invoice",
    [
        # the current shape (API 2025-03-31 and later)
        _invoice(
            parent={
                "type": "subscription_details",
                "subscription_details": {
                    "subscription": "sub_1",
                    "metadata": {"callback_hash": "hash-1"},
                },
            }
        ),
        # the older shape
        _invoice(
            subscription="sub_1", subscription_details={"metadata": {"callback_hash": "hash-1"}}
        ),
        # only the lines say it
        _invoice(
            lines={
                "data": [
                    {
                        "metadata": {"callback_hash": "hash-1"},
                        "parent": {"subscription_item_details": {"subscription": "sub_1"}},
                    }
                ]
            }
        ),
    ],
)
def test_invoices_name_their_subscription_and_our_metadata(invoice: dict[str, Any]) -> None:
    document = {
        "id": "evt_2",
        "object": "event",
        "type": "invoice.paid",
        "data": {"object": invoice},
    }
    parsed = read_event(json.dumps(document))
    assert parsed.subscription_id == "sub_1"
    assert parsed.refs == ("in_1", "sub_1")
    assert parsed.callback_hash == "hash-1"
    assert parsed.target_status == S.PAID


def test_a_subscription_event_names_the_subscription() -> None:
    document = {
        "id": "evt_3",
        "object": "event",
        "type": "customer.subscription.deleted",
        "data": {"object": {"id": "sub_5", "object": "subscription", "metadata": {}}},
    }
    parsed = read_event(json.dumps(document))
    assert (parsed.refs, parsed.subscription_id, parsed.callback_hash) == (("sub_5",), "sub_5", "")


def test_a_payment_intent_carries_our_metadata() -> None:
    """payment_intent_data.metadata puts the callback hash on the PaymentIntent too."""
    document = {
        "id": "evt_4",
        "object": "event",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {"id": "pi_1", "object": "payment_intent", "metadata": {"callback_hash": "h"}}
        },
    }
    parsed = read_event(json.dumps(document))
    assert (parsed.refs, parsed.callback_hash, parsed.target_status) == (("pi_1",), "h", None)
