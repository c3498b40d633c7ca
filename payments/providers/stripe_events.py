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
from payments.model import PaymentStatus
from payments.providers.base import ProviderEvent

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
    """A verified event body -> ProviderEvent; InvalidArgument when it is not an event."""
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
    created = event.get("created")
    subscription_id = _subscription_of(obj)
    refs = _unique(
        [_id_of(obj.get("id")), _id_of(obj.get("payment_link")), subscription_id],
    )
    return ProviderEvent(
        event_id=event_id,
        event_type=event_type,
        created=created if isinstance(created, int) and not isinstance(created, bool) else 0,
        refs=refs,
        callback_hash=_callback_hash(obj),
        target_status=target_status(event_type, obj),
        subscription_id=subscription_id,
    )


def target_status(event_type: str, obj: Mapping[str, Any]) -> PaymentStatus | None:
    """What an event means for its payment (CONTRACT.md's mapping); None: record only."""
    if event_type == "checkout.session.completed":
        return (
            PaymentStatus.PAID
            if obj.get("payment_status") in _PAID_SESSION
            else PaymentStatus.PROCESSING
        )
    if event_type == "checkout.session.expired" and obj.get("payment_link"):
        return None  # the link is still payable: only the link's deactivation ends it
    return _FIXED_TARGETS.get(event_type)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def _id_of(value: Any) -> str:
    """An object reference: an id string, or an expanded object's id."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if _is_id(value) else ""


def _unique(ids: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in ids if i))


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _lines(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    data = _dig(obj, "lines", "data")
    if isinstance(data, list):
        yield from (line for line in data if isinstance(line, dict))


def _subscription_of(obj: Mapping[str, Any]) -> str:
    """The subscription an object is, or belongs to."""
    if obj.get("object") == "subscription":
        return _id_of(obj.get("id"))
    for candidate in (
        obj.get("subscription"),  # sessions; invoices before the 2025 API
        _dig(obj, "parent", "subscription_details", "subscription"),  # invoices now
        *(
            _dig(line, "parent", "subscription_item_details", "subscription")
            or line.get("subscription")
            for line in _lines(obj)
        ),
    ):
        found = _id_of(candidate)
        if found:
            return found
    return ""


def _callback_hash(obj: Mapping[str, Any]) -> str:
    """``metadata.callback_hash`` wherever the object carries our metadata."""
    candidates = [
        obj.get("metadata"),
        _dig(obj, "parent", "subscription_details", "metadata"),
        _dig(obj, "subscription_details", "metadata"),
        _dig(obj, "subscription", "metadata"),  # expanded
        *(line.get("metadata") for line in _lines(obj)),
    ]
    for metadata in candidates:
        value = metadata.get("callback_hash") if isinstance(metadata, dict) else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
