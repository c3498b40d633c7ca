"""The create-payment rules of CONTRACT.md, in one place for both transports.

Each failure is an InvalidArgument naming the field; nothing is written before this
passes.
"""

from __future__ import annotations

import re
from typing import TypeVar

from payments.callback_urls import CallbackPolicy, UrlRefused, check_url, split_url
from payments.errors import InvalidArgument
from payments.model import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    RECURRING_INTERVALS,
    REFUND_REASONS,
    CreatePaymentInput,
    CreateRefundInput,
    ListFilter,
    NewPayment,
    NewRefund,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)

# Column sizes in schema.sql; longer values are refused here, not truncated there.
MAX_ID_LENGTH = 128
MAX_URL_LENGTH = 2048
MAX_METADATA_ENTRIES = 50  # Stripe's own limit
MAX_METADATA_KEY = 40
MAX_METADATA_VALUE = 500
MAX_AMOUNT_CENTS = 99_999_999  # Stripe's maximum unit amount
MAX_OFFSET = 2**31 - 1  # gRPC's int32; beyond it SQLite's integers overflow

# Identifiers end up in logs, dashboards and Stripe: no C0/C1 controls, DEL, line or
# paragraph separators, or bidi controls that make "abc" display as "cba".
_UNSAFE_IDENTIFIER = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# Metadata values are free text: the same minus tab and the bidi marks real text needs.
_UNSAFE_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
DEFAULT_CALLBACK_POLICY = CallbackPolicy()


def check_free_text(value: str, field: str) -> str:
    """A caller's free text (a cancel reason): no control characters, line breaks or
    bidi overrides, which would forge or garble the log lines and events it lands in."""
    if _UNSAFE_TEXT.search(value):
        raise InvalidArgument(field, "must not contain control characters or newlines")
    return value


def _required(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(field, "is required")
    return _bounded(value, field, MAX_ID_LENGTH)


def _bounded(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters")
    if _UNSAFE_IDENTIFIER.search(value):
        raise InvalidArgument(field, "must not contain control or bidi characters")
    return value


def _url(value: str, field: str, *, required: bool, policy: CallbackPolicy | None = None) -> str:
    """An absolute http(s) URL; with ``policy``, one a callback may be sent to."""
    value = value.strip()
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return ""
    _bounded(value, field, MAX_URL_LENGTH)
    try:
        if policy is None:
            split_url(value)
        else:
            check_url(value, policy)
    except UrlRefused as exc:
        raise InvalidArgument(field, str(exc)) from None
    return value


E = TypeVar("E", PaymentMethod, PaymentType, ProviderType, PaymentStatus)


def _enum(kind: type[E], number: int, field: str) -> E:
    try:
        return kind(number)
    except ValueError:
        raise InvalidArgument(field, f"unknown value {number}") from None


def validate_create(
    raw: CreatePaymentInput, callback_policy: CallbackPolicy = DEFAULT_CALLBACK_POLICY
) -> NewPayment:
    """Check a decoded create request against CONTRACT.md and normalize it.

    ``callback_policy``: where status callbacks may go (payments.callback_urls; the
    default refuses loopback and private hosts)."""
    request_id = _required(raw.request_id, "request_id")
    caller_service = _required(raw.caller_service, "caller_service")
    resource_type = _required(raw.resource_type, "resource_type")
    resource_id = _required(raw.resource_id, "resource_id")
    customer_ref = _bounded(raw.customer_ref.strip(), "customer_ref", MAX_ID_LENGTH)
    if raw.amount_cents <= 0:
        raise InvalidArgument("amount_cents", "must be greater than 0")
    if raw.amount_cents > MAX_AMOUNT_CENTS:
        raise InvalidArgument("amount_cents", f"must be at most {MAX_AMOUNT_CENTS}")
    currency = raw.currency.strip()
    if len(currency) != 3 or not currency.isascii() or not currency.isalpha():
        raise InvalidArgument("currency", "must be exactly 3 letters")
    method = _enum(PaymentMethod, raw.payment_method, "payment_method")
    if method == PaymentMethod.UNSPECIFIED:
        raise InvalidArgument("payment_method", "must be HOSTED_CARD or PAYMENT_LINK")
    payment_type = _enum(PaymentType, raw.payment_type, "payment_type")
    if payment_type == PaymentType.UNSPECIFIED:
        raise InvalidArgument("payment_type", "must be ONE_TIME or RECURRING")
    provider = _enum(ProviderType, raw.provider, "provider")
    if provider == ProviderType.UNSPECIFIED:
        provider = ProviderType.STRIPE
    status_callback_url = _url(
        raw.status_callback_url, "status_callback_url", required=True, policy=callback_policy
    )
    success_url = _url(raw.success_url, "success_url", required=False)
    cancel_url = _url(raw.cancel_url, "cancel_url", required=False)
    interval, interval_count = "", 0
    if payment_type == PaymentType.RECURRING:
        interval = raw.recurring_interval.strip().lower()
        if interval not in RECURRING_INTERVALS:
            raise InvalidArgument("recurring_interval", "must be one of day, week, month, year")
        if raw.recurring_interval_count <= 0:
            raise InvalidArgument("recurring_interval_count", "must be greater than 0")
        interval_count = raw.recurring_interval_count
    metadata = _metadata(raw.metadata)
    return NewPayment(
        request_id=request_id,
        caller_service=caller_service,
        resource_type=resource_type,
        resource_id=resource_id,
        customer_ref=customer_ref,
        amount_cents=raw.amount_cents,
        currency=currency.upper(),
        payment_method=method,
        payment_type=payment_type,
        provider=provider,
        recurring_interval=interval,
        recurring_interval_count=interval_count,
        status_callback_url=status_callback_url,
        success_url=success_url,
        cancel_url=cancel_url,
        metadata=metadata,
    )


# Metadata keys the service adds to the provider object itself.
RESERVED_METADATA_KEYS = frozenset({"request_id", "callback_hash"})


def _metadata(
    metadata: object, reserved: frozenset[str] = RESERVED_METADATA_KEYS
) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise InvalidArgument("metadata", "must be an object of strings")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument("metadata", f"must have at most {MAX_METADATA_ENTRIES} entries")
    clean: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("metadata", "keys and values must be strings")
        if not key.strip() or len(key) > MAX_METADATA_KEY:
            raise InvalidArgument("metadata", f"keys must be 1..{MAX_METADATA_KEY} characters")
        if _UNSAFE_IDENTIFIER.search(key):
            raise InvalidArgument("metadata", "keys must not contain control or bidi characters")
        if key in reserved:
            raise InvalidArgument("metadata", f"key {key!r} is reserved")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                "metadata", f"values must be at most {MAX_METADATA_VALUE} characters"
            )
        if _UNSAFE_TEXT.search(value):
            raise InvalidArgument(
                "metadata", f"value of {key!r} must not contain control characters or newlines"
            )
        clean[key] = value
    return clean


def validate_list(
    *,
    request_id: str = "",
    caller_service: str = "",
    resource_type: str = "",
    resource_id: str = "",
    status: int | None = None,
    provider: int | None = None,
    limit: int | None = None,
    offset: int | None = None,
) -> ListFilter:
    """Check list filters. ``None`` means not given; limit 0 (proto default) means default."""
    status_value = None if status is None else _enum(PaymentStatus, status, "status")
    if status_value == PaymentStatus.UNSPECIFIED:
        raise InvalidArgument("status", "unknown value 0")
    provider_value = None
    if provider is not None and provider != 0:
        provider_value = _enum(ProviderType, provider, "provider")
    if limit is None or limit == 0:
        limit = DEFAULT_LIST_LIMIT
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument("limit", f"must be between 1 and {MAX_LIST_LIMIT}")
    offset = offset or 0
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidArgument("offset", f"must be between 0 and {MAX_OFFSET}")
    return ListFilter(
        request_id=_bounded(request_id.strip(), "request_id", MAX_ID_LENGTH),
        caller_service=_bounded(caller_service.strip(), "caller_service", MAX_ID_LENGTH),
        resource_type=_bounded(resource_type.strip(), "resource_type", MAX_ID_LENGTH),
        resource_id=_bounded(resource_id.strip(), "resource_id", MAX_ID_LENGTH),
        status=status_value,
        provider=provider_value,
        limit=limit,
        offset=offset,
    )


# Metadata keys the service adds to the Stripe refund itself.
OUTSIDE_REFUND_PREFIX = "stripe:"
RESERVED_REFUND_METADATA_KEYS = frozenset({"request_id", "refund_id"})


def validate_refund(raw: CreateRefundInput, caller_service: str) -> NewRefund:
    """Check a decoded create-refund request (CONTRACT.md "Refunds"): the refund is the
    authenticated caller's; ``amount_cents`` 0 means all that is still refundable."""
    if raw.payment_id <= 0:
        raise InvalidArgument("payment_id", "must be a positive integer")
    request_id = _required(raw.request_id, "request_id")
    if request_id.startswith(OUTSIDE_REFUND_PREFIX):
        # The request id of refunds made in Stripe's dashboard (recorded by their events).
        raise InvalidArgument("request_id", f"must not start with {OUTSIDE_REFUND_PREFIX!r}")
    if raw.amount_cents < 0:
        raise InvalidArgument("amount_cents", "must not be negative")
    if raw.amount_cents > MAX_AMOUNT_CENTS:
        raise InvalidArgument("amount_cents", f"must be at most {MAX_AMOUNT_CENTS}")
    reason = raw.reason.strip()
    if reason and reason not in REFUND_REASONS:
        raise InvalidArgument("reason", f"must be empty or one of {', '.join(REFUND_REASONS)}")
    return NewRefund(
        payment_id=raw.payment_id,
        request_id=request_id,
        caller_service=caller_service,
        amount_cents=raw.amount_cents,
        reason=reason,
        metadata=_metadata(raw.metadata, RESERVED_REFUND_METADATA_KEYS),
    )
