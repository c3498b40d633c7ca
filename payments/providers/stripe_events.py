"""Stripe webhook events: the signature checked with the stripe library, then the event
read into a :class:`ProviderEvent` (CONTRACT.md, "Provider (Stripe) facts").

Signature: ``Stripe-Signature: t=<unix>,v1=<hex hmac-sha256 of "<t>.<raw body>">`` with
``STRIPE_WEBHOOK_SECRET``. ``stripe.WebhookSignature.verify_header`` checks the HMAC and
refuses timestamps older than the tolerance; it lets any future timestamp through, so
the "newer than the tolerance" half of the contract is checked here. Nothing of the
header or the body ever goes into an error message (they reach callers and logs).

Reading: which payment an event is about is told by the ids of the object it carries
(Checkout Session, its Payment Link, the subscription) and by ``metadata.callback_hash``,
which the provider copies onto every object it makes for us (session or link metadata;
``subscription_data.metadata`` onto the subscription and so onto its invoices;
``payment_intent_data.metadata`` onto the PaymentIntent). Both the current invoice
shape (``parent.subscription_details``) and the older one (``subscription``,
``subscription_details``) are read.

Mapping (CONTRACT.md): ``checkout.session.completed`` and ``..async_payment_succeeded``
-> PAID (completed with ``payment_status`` ``unpaid`` means a delayed method is still
on its way: PROCESSING); ``..async_payment_failed`` -> FAILED; ``..expired`` -> EXPIRED;
``invoice.paid`` -> PAID; ``invoice.payment_failed`` -> FAILED;
``customer.subscription.deleted`` -> CANCELED; anything else is recorded only.
One refinement: the expiry of a session opened from a Payment Link is recorded only,
since the link itself stays payable (a customer who abandoned the page must not end a
payment that the next visit of the link would still collect).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import stripe

from payments.errors import BadSignature, InvalidArgument
from payments.model import PaymentStatus, RefundStatus
from payments.providers.base import ProviderEvent, ProviderRefund

_PAID_SESSION = frozenset({"paid", "no_payment_required"})
_FIXED_TARGETS: Mapping[str, PaymentStatus] = {
    "checkout.session.async_payment_succeeded": PaymentStatus.PAID,
    "checkout.session.async_payment_failed": PaymentStatus.FAILED,
    "checkout.session.expired": PaymentStatus.EXPIRED,
    "invoice.paid": PaymentStatus.PAID,
    "invoice.payment_failed": PaymentStatus.FAILED,
    "customer.subscription.deleted": PaymentStatus.CANCELED,
}
MAX_ID_LENGTH = 255
# Stripe's refund statuses; requires_action waits on the customer, so it is still PENDING.
REFUND_STATUS: Mapping[str, RefundStatus] = {
    "pending": RefundStatus.PENDING,
    "requires_action": RefundStatus.PENDING,
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.CANCELED,
}
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})


class StripeEventParser:
    """EventParser for Stripe; StripeProvider.parse_event delegates to it."""

    def __init__(
        self,
        webhook_secret: str,
        tolerance_seconds: int = 300,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not webhook_secret.strip():
            raise ValueError("StripeEventParser needs a webhook secret")
        if tolerance_seconds <= 0:
            raise ValueError("tolerance_seconds must be > 0")
        self._secret = webhook_secret
        self._tolerance = tolerance_seconds
        self._clock = clock  # for the future-timestamp check (the stripe library uses time.time)

    def __repr__(self) -> str:  # never the secret
        return f"StripeEventParser(tolerance_seconds={self._tolerance})"

    def parse(self, payload: bytes, signature: str) -> ProviderEvent:
        header = signature.strip()
        if not header:
            raise BadSignature("is required")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("payload", "is not UTF-8 text") from None
        timestamp = _timestamp(header)
        try:
            stripe.WebhookSignature.verify_header(text, header, self._secret, self._tolerance)
        except stripe.SignatureVerificationError as exc:
            # Only the library's wording tells a stale timestamp from a wrong HMAC.
            stale = "tolerance" in str(exc)
            raise BadSignature(
                "timestamp is outside the tolerance" if stale else "does not match the payload"
            ) from None
        if timestamp > self._clock() + self._tolerance:
            raise BadSignature("timestamp is outside the tolerance")
        return read_event(text)


def _timestamp(header: str) -> int:
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            value = value.strip()
            if value.isascii() and value.isdigit():
                return int(value)
            break
    raise BadSignature("is malformed: expected t=<timestamp>,v1=<signature>")


def read_event(text: str) -> ProviderEvent:
    """A verified event body -> ProviderEvent; InvalidArgument when it is not an event.

    A signature proves who sent the bytes, not that they have the shape we read: every
    field read here is type-checked, so an odd event is refused (and recorded by the
    service) rather than crashing the request.
    """
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument("payload", "is not valid JSON") from None
    if not isinstance(event, dict) or event.get("object", "event") != "event":
        raise InvalidArgument("payload", "is not a Stripe event")
    event_id, event_type = event.get("id"), event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not _is_id(event_id) or not _is_id(event_type) or not isinstance(obj, dict):
        raise InvalidArgument("payload", "is not a Stripe event (id, type, data.object)")
    created = _optional(event, "created", int, "created")
    subscription_id = _subscription_of(obj)
    refs = _unique(
        [
            _id_of(obj.get("id"), "data.object.id"),
            _id_of(obj.get("payment_link"), "data.object.payment_link"),
            subscription_id,
        ],
    )
    payment_intent, charge = _money_of(obj)
    return ProviderEvent(
        event_id=event_id,
        event_type=event_type,
        created=created or 0,
        refs=refs,
        callback_hash=_callback_hash(obj),
        target_status=target_status(event_type, obj),
        subscription_id=subscription_id,
        payment_intent=payment_intent,
        charge=charge,
        refunds=_refunds_of(event_type, obj),
    )


def _ids(obj: Mapping[str, Any], intent: str, charge: str) -> tuple[str, str]:
    return _id_of(obj.get(intent), f"data.object.{intent}"), _id_of(
        obj.get(charge), f"data.object.{charge}"
    )


def _money_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(PaymentIntent, charge) an object names: a paid session's intent, a charge's
    intent and itself, a refund's intent and charge."""
    kind = obj.get("object")
    if kind == "charge":
        return _ids(obj, "payment_intent", "id")
    if kind == "refund":
        return _ids(obj, "payment_intent", "charge")
    if kind == "payment_intent":
        return _ids(obj, "id", "latest_charge")
    return _id_of(obj.get("payment_intent"), "data.object.payment_intent"), ""


def _refunds_of(event_type: str, obj: Mapping[str, Any]) -> tuple[ProviderRefund, ...]:
    """The refunds an event reports: a refund event's object; for ``charge.refunded``
    the charge's ``refunds`` list when the payload includes it (Stripe's API versions
    since 2022-11-15 leave it out unless expanded: the refund events then tell)."""
    if event_type in REFUND_EVENTS and obj.get("object") == "refund":
        found = read_refund(obj, "data.object")
        return (found,) if found is not None else ()
    if event_type == "charge.refunded" and obj.get("object") == "charge":
        listed = _dig(obj, "refunds", "data")
        if isinstance(listed, list):
            refunds = (
                read_refund(item, f"data.object.refunds.data[{i}]")
                for i, item in enumerate(listed)
                if isinstance(item, dict)
            )
            return tuple(refund for refund in refunds if refund is not None)
    return ()


def read_refund(obj: Mapping[str, Any], path: str = "data.object") -> ProviderRefund | None:
    """A Stripe Refund object -> ProviderRefund; None when it lacks an id or amount, or
    its status is one the service does not know (the event is then recorded only); an id
    of the wrong type at ``path`` refuses the event, like every other field."""
    refund_id, amount = _id_of(obj.get("id"), f"{path}.id"), obj.get("amount")
    status = REFUND_STATUS.get(str(obj.get("status")))
    if not refund_id or status is None or not _is_amount(amount):
        return None
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    currency = obj.get("currency")
    return ProviderRefund(
        provider_refund_id=refund_id,
        status=status,
        amount_cents=amount,
        currency=currency.upper() if isinstance(currency, str) else "",
        failure_reason=_text(obj.get("failure_reason")),
        reason=_text(obj.get("reason")),
        payment_intent_id=_id_of(obj.get("payment_intent"), f"{path}.payment_intent"),
        charge_id=_id_of(obj.get("charge"), f"{path}.charge"),
        refund_id=_number(metadata.get("refund_id")),
        request_id=_text(metadata.get("request_id")),
    )


def _is_amount(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def target_status(event_type: str, obj: Mapping[str, Any]) -> PaymentStatus | None:
    """What an event means for its payment (CONTRACT.md's mapping); None: record only."""
    if event_type == "checkout.session.completed":
        paid = _optional(obj, "payment_status", str, "data.object.payment_status")
        return PaymentStatus.PAID if paid in _PAID_SESSION else PaymentStatus.PROCESSING
    if event_type == "checkout.session.expired" and _id_of(
        obj.get("payment_link"), "data.object.payment_link"
    ):
        return None  # the link is still payable: only the link's deactivation ends it
    return _FIXED_TARGETS.get(event_type)


def _unexpected(path: str) -> InvalidArgument:
    return InvalidArgument("payload", f"{path} has an unexpected type")


def _optional(obj: Mapping[str, Any], key: str, kind: type, path: str) -> Any:
    """``obj[key]`` when it is a ``kind`` (bool is no int), None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _unexpected(path)
    if isinstance(value, str):
        _utf8(value, path)
    return value


def _utf8(value: str, path: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``), which no database takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("payload", f"{path} is not UTF-8 text") from None
    return value


def _is_id(value: Any) -> bool:
    if not (isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH):
        return False
    _utf8(value, "id")
    return True


def _id_of(value: Any, path: str) -> str:
    """An object reference: an id string, an expanded object's id, or absent ("");
    anything else (a number, a list, an over-long string) is refused."""
    if isinstance(value, dict):
        value, path = value.get("id"), f"{path}.id"
    if value is None or value == "":
        return ""
    if not _is_id(value):
        raise _unexpected(path)
    return str(value)


def _unique(ids: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in ids if i))


def _dig(obj: Any, *path: str, expandable: bool = False) -> Any:
    """The value at ``path`` (None when absent or null, or, for an ``expandable``
    reference, an unexpanded id string); any other non-object on the way is refused."""
    for depth, key in enumerate(path):
        if obj is None or (expandable and depth > 0 and isinstance(obj, str)):
            return None
        if not isinstance(obj, dict):
            raise _unexpected(".".join(path[:depth]) or "object")
        obj = obj.get(key)
    return obj


def _lines(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    data = _dig(obj, "lines", "data")
    if data is None:
        return
    if not isinstance(data, list) or not all(isinstance(line, dict) for line in data):
        raise _unexpected("data.object.lines.data")
    yield from data


def _subscription_of(obj: Mapping[str, Any]) -> str:
    """The subscription an object is, or belongs to."""
    if obj.get("object") == "subscription":
        return _id_of(obj.get("id"), "data.object.id")
    candidates = [
        ("subscription", obj.get("subscription")),  # sessions; invoices before the 2025 API
        (  # invoices now
            "parent.subscription_details.subscription",
            _dig(obj, "parent", "subscription_details", "subscription"),
        ),
    ]
    for line in _lines(obj):
        candidates.append(
            (
                "lines.data.parent.subscription_item_details.subscription",
                _dig(line, "parent", "subscription_item_details", "subscription"),
            )
        )
        candidates.append(("lines.data.subscription", line.get("subscription")))
    found = [_id_of(value, f"data.object.{path}") for path, value in candidates]
    return next((ref for ref in found if ref), "")


def _callback_hash(obj: Mapping[str, Any]) -> str:
    """``metadata.callback_hash`` wherever the object carries our metadata."""
    candidates = [
        ("metadata", obj.get("metadata")),
        (
            "parent.subscription_details.metadata",
            _dig(obj, "parent", "subscription_details", "metadata"),
        ),
        ("subscription_details.metadata", _dig(obj, "subscription_details", "metadata")),
        (
            "subscription.metadata",
            _dig(obj, "subscription", "metadata", expandable=True),
        ),  # expanded
        *(("lines.data.metadata", line.get("metadata")) for line in _lines(obj)),
    ]
    for path, metadata in candidates:
        if metadata is None:
            continue
        if not isinstance(metadata, dict):
            raise _unexpected(f"data.object.{path}")
        value = _optional(metadata, "callback_hash", str, f"data.object.{path}.callback_hash")
        if value is not None and value.strip():
            if len(value) > MAX_ID_LENGTH:
                raise _unexpected(f"data.object.{path}.callback_hash")
            return value.strip()
    return ""


def _number(value: Any) -> int:
    """A positive id written as decimal text (our metadata), else 0."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    return 0
