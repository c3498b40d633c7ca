"""Entities, enums and the payment status machine.

The enum numbers are the wire numbers of proto/payments.proto. The status machine
(``ALLOWED_TRANSITIONS``) is the one place that says which status may follow which;
every status change asks it through the unit of work (payments/unit_of_work.py).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import attrs

# attrs field metadata key: False on a field that has no database column.
STORED = "stored"


class PaymentStatus(enum.IntEnum):
    UNSPECIFIED = 0
    CREATED = 1
    PENDING = 2
    PROCESSING = 3
    PAID = 10
    FAILED = 20
    CANCELED = 30
    EXPIRED = 40

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


class PaymentMethod(enum.IntEnum):
    UNSPECIFIED = 0
    HOSTED_CARD = 1
    PAYMENT_LINK = 2


class PaymentType(enum.IntEnum):
    UNSPECIFIED = 0
    ONE_TIME = 1
    RECURRING = 2


class ProviderType(enum.IntEnum):
    UNSPECIFIED = 0
    STRIPE = 1


TERMINAL_STATUSES = frozenset(
    {PaymentStatus.PAID, PaymentStatus.FAILED, PaymentStatus.CANCELED, PaymentStatus.EXPIRED}
)
CANCELABLE_STATUSES = frozenset(
    {PaymentStatus.CREATED, PaymentStatus.PENDING, PaymentStatus.PROCESSING}
)
RECURRING_INTERVALS = ("day", "week", "month", "year")

_S = PaymentStatus
# The status machine. Statuses only move forward; a terminal status is final, so a late
# or out-of-order event is recorded but never moves the payment again.
ALLOWED_TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = {
    _S.CREATED: frozenset({_S.PENDING, _S.PROCESSING, _S.PAID, _S.FAILED, _S.CANCELED, _S.EXPIRED}),
    _S.PENDING: frozenset({_S.PROCESSING, _S.PAID, _S.FAILED, _S.CANCELED, _S.EXPIRED}),
    _S.PROCESSING: frozenset({_S.PAID, _S.FAILED, _S.CANCELED, _S.EXPIRED}),
    _S.PAID: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELED: frozenset(),
    _S.EXPIRED: frozenset(),
}


def can_transition(current: PaymentStatus, new: PaymentStatus) -> bool:
    """True when the status machine lets ``current`` move to ``new``."""
    return new in ALLOWED_TRANSITIONS.get(current, frozenset())


def utcnow() -> datetime:
    """Now, in UTC, to the microsecond (what the database keeps)."""
    return datetime.now(UTC)


@attrs.frozen
class Caller:
    """The authenticated calling service."""

    service_name: str
    # A trusted caller (a gateway acting for others) may act for any caller_service.
    trusted: bool = False

    def may_act_for(self, caller_service: str) -> bool:
        return self.trusted or caller_service == self.service_name


@attrs.frozen
class NewPayment:
    """A validated create request (see CONTRACT.md, create-payment validation)."""

    request_id: str
    caller_service: str
    resource_type: str
    resource_id: str
    customer_ref: str
    amount_cents: int
    currency: str  # upper-case ISO code
    payment_method: PaymentMethod
    payment_type: PaymentType
    provider: ProviderType  # never UNSPECIFIED here: defaulted to STRIPE
    recurring_interval: str  # "" for ONE_TIME
    recurring_interval_count: int  # 0 for ONE_TIME
    status_callback_url: str
    success_url: str
    cancel_url: str
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    def fingerprint(self) -> str:
        """A digest of every parameter: the same request_id with another digest is a conflict."""
        fields = attrs.asdict(self, recurse=False)
        fields["metadata"] = dict(sorted(self.metadata.items()))
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=int)
        return hashlib.sha256(canonical.encode()).hexdigest()


def idempotency_key(caller_service: str, request_id: str, fingerprint: str) -> str:
    """The Stripe idempotency key of a payment.

    Derived from (caller_service, request_id) and the request's fingerprint: a retry of
    the same request reuses it, so Stripe replays the object it made instead of making
    a second one; a request refused by Stripe and corrected gets a fresh key instead of
    Stripe's idempotency_error.
    """
    raw = json.dumps([caller_service, request_id, fingerprint])  # unambiguous framing
    return f"payments-{hashlib.sha256(raw.encode()).hexdigest()[:48]}"


@attrs.define
class Payment:
    """A payment as stored. ``id`` is 0 until the row is inserted."""

    id: int
    request_id: str
    caller_service: str
    resource_type: str
    resource_id: str
    customer_ref: str
    amount_cents: int
    currency: str
    status: PaymentStatus
    payment_method: PaymentMethod
    payment_type: PaymentType
    provider: ProviderType
    recurring_interval: str
    recurring_interval_count: int
    status_callback_url: str
    success_url: str
    cancel_url: str
    provider_callback_hash: str
    provider_callback_url: str
    request_fingerprint: str
    created_at: datetime
    updated_at: datetime
    provider_payment_id: str = ""
    provider_subscription_id: str = ""
    checkout_url: str = ""
    refunded_cents: int = 0
    metadata: dict[str, str] = attrs.field(factory=dict)
    # Stripe's money objects behind the paid checkout: refunds are made against the
    # PaymentIntent, and refund events are routed to the payment by these two.
    provider_payment_intent_id: str = ""
    provider_charge_id: str = ""
    # Not a column: the PENDING refunds' sum, read from the refunds table with
    # refunded_cents (see set_refund_totals) so refundable_cents is right on every read.
    pending_refund_cents: int = attrs.field(default=0, metadata={STORED: False})

    @property
    def refund_totals(self) -> RefundTotals:
        return RefundTotals(
            pending_cents=self.pending_refund_cents, succeeded_cents=self.refunded_cents
        )

    def set_refund_totals(self, totals: RefundTotals) -> None:
        """Take ``refunded_cents`` and the pending sum from the refunds table's totals."""
        self.refunded_cents = refunded_cents(totals)
        self.pending_refund_cents = totals.pending_cents

    @property
    def refundable_cents(self) -> int:
        return refundable_cents(self.status, self.amount_cents, self.refund_totals)

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.caller_service, self.request_id, self.request_fingerprint)


class EventKind(enum.StrEnum):
    """What a payment_events row records."""

    CREATED = "created"  # the row was written (status CREATED)
    PROVIDER_CREATED = "provider_created"  # the provider object exists (-> PENDING)
    STATUS_CHANGED = "status_changed"  # a status moved (cancel, event, reconcile, expiry)
    PROVIDER_EVENT = "provider_event"  # a provider event that moved nothing (recorded)


@attrs.frozen
class PaymentEvent:
    """One row of a payment's history, written in the same transaction as the change."""

    payment_id: int
    kind: EventKind
    from_status: PaymentStatus
    to_status: PaymentStatus
    created_at: datetime
    reason: str = ""
    provider_event_id: str = ""
    provider_event_type: str = ""
    id: int = 0


@attrs.frozen
class ListFilter:
    """Filters of ListPayments. ``caller_service`` is forced to the caller unless trusted."""

    request_id: str = ""
    caller_service: str = ""
    resource_type: str = ""
    resource_id: str = ""
    status: PaymentStatus | None = None
    provider: ProviderType | None = None
    limit: int = 100
    offset: int = 0


DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 500


@attrs.frozen
class CreatePaymentInput:
    """A create request as the transport decoded it: types checked, rules not yet.

    Enum fields hold the wire number (an unknown number is refused by validation).
    ``payments.validation.validate_create`` turns it into a :class:`NewPayment`.
    """

    request_id: str = ""
    caller_service: str = ""
    resource_type: str = ""
    resource_id: str = ""
    customer_ref: str = ""
    amount_cents: int = 0
    currency: str = ""
    payment_method: int = 0
    payment_type: int = 0
    provider: int = 0
    recurring_interval: str = ""
    recurring_interval_count: int = 0
    status_callback_url: str = ""
    success_url: str = ""
    cancel_url: str = ""
    metadata: Mapping[str, str] = attrs.field(factory=dict)


class OutboxState(enum.StrEnum):
    """Where a status callback stands."""

    PENDING = "pending"  # due at next_attempt_at
    DELIVERED = "delivered"  # the caller answered 2xx
    FAILED = "failed"  # PAYMENTS_CALLBACK_MAX_ATTEMPTS used up
    GONE = "gone"  # the receiver answered 410 Gone: never tried again by itself


class CallbackKind(enum.StrEnum):
    """What a status callback announces."""

    PAYMENT = "payment"
    REFUND = "refund"


@attrs.define
class OutboxEntry:
    """A status callback owed to a caller (a row of callback_outbox)."""

    payment_id: int
    status: PaymentStatus
    delivery_id: str  # webhook-id: stable across retries
    url: str
    request_id: str
    payload: str  # the JSON body, fixed when the status changed
    state: OutboxState
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    attempts: int = 0
    claimed_by: str = ""
    claimed_until: datetime | None = None
    last_error: str = ""
    delivered_at: datetime | None = None
    # W3C traceparent of what caused the callback ('' when none): its trace continues.
    traceparent: str = ""
    id: int = 0
    kind: CallbackKind = CallbackKind.PAYMENT
    refund_id: int = 0  # the refund a REFUND callback announces
    resend: int = 0  # 0: the status change's own delivery; n: the n-th resend of it


@attrs.frozen
class DeliveryAttempt:
    """One attempt of a delivery as the delivery log shows it (status_code 0: no
    answer came)."""

    at: datetime
    status_code: int
    duration_ms: int
    error: str


@attrs.frozen
class CallbackDelivery:
    """A status callback and its attempts, as the owner reads them (CONTRACT.md,
    "Callback deliveries")."""

    id: int
    webhook_id: str
    kind: str
    refund_id: int
    state: str
    next_attempt_at: datetime
    created_at: datetime
    attempts: list[DeliveryAttempt] = attrs.field(factory=list)

    @property
    def attempt_count(self) -> int:
        """Every attempt made, across bulk retries (the outbox row's counter restarts)."""
        return len(self.attempts)


# --- refunds ------------------------------------------------------------------------


class RefundStatus(enum.IntEnum):
    """A refund's status; the numbers are proto/payments.proto's RefundStatus."""

    UNSPECIFIED = 0
    PENDING = 1
    SUCCEEDED = 10
    FAILED = 20
    CANCELED = 30

    @property
    def is_terminal(self) -> bool:
        return self in REFUND_TERMINAL_STATUSES


REFUND_TERMINAL_STATUSES = frozenset(
    {RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED}
)
# Statuses whose amount is no longer refundable: a PENDING refund may still succeed, so
# it holds its amount; FAILED and CANCELED ones give it back.
REFUND_HOLDING_STATUSES = frozenset({RefundStatus.PENDING, RefundStatus.SUCCEEDED})
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")  # Stripe's, or ""

_R = RefundStatus
# The refund status machine, written like the payment one: forward only, terminal final.
REFUND_TRANSITIONS: Mapping[RefundStatus, frozenset[RefundStatus]] = {
    _R.PENDING: frozenset({_R.SUCCEEDED, _R.FAILED, _R.CANCELED}),
    _R.SUCCEEDED: frozenset(),
    _R.FAILED: frozenset(),
    _R.CANCELED: frozenset(),
}


def can_refund_transition(current: RefundStatus, new: RefundStatus) -> bool:
    """True when the refund status machine lets ``current`` move to ``new``."""
    return new in REFUND_TRANSITIONS.get(current, frozenset())


def refund_idempotency_key(caller_service: str, request_id: str) -> str:
    """The Stripe idempotency key of a refund, derived from (caller_service, request_id).

    Its own namespace: a caller may use one request_id for a payment and for a refund,
    and Stripe would refuse one key reused for another request. A retry of the same
    refund reuses the key (the 409 rule forbids other parameters under one request_id),
    so a crash between Stripe's answer and the commit never makes a second refund.
    """
    raw = json.dumps(["refund", caller_service, request_id])  # unambiguous framing
    return f"refunds-{hashlib.sha256(raw.encode()).hexdigest()[:48]}"


@attrs.frozen
class NewRefund:
    """A validated create-refund request, as the caller sent it.

    ``amount_cents`` 0 means "everything still refundable" and stays 0 here: the
    fingerprint is of the request, so a replay of an omitted amount matches although
    the resolved amount (on :class:`Refund`) is a number.
    """

    payment_id: int
    request_id: str
    caller_service: str
    amount_cents: int
    reason: str = ""
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    def fingerprint(self) -> str:
        """A digest of every parameter: the same request_id with another digest is a 409."""
        fields = attrs.asdict(self, recurse=False)
        fields["metadata"] = dict(sorted(self.metadata.items()))
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@attrs.frozen
class CreateRefundInput:
    """A create-refund request as the transport decoded it: types checked, rules not
    yet (``payments.validation.validate_refund`` makes a :class:`NewRefund` of it)."""

    payment_id: int = 0
    request_id: str = ""
    amount_cents: int = 0
    reason: str = ""
    metadata: Mapping[str, str] = attrs.field(factory=dict)


@attrs.define
class Refund:
    """A refund as stored. ``id`` is 0 until the row is inserted.

    Fields named as proto ``Refund``'s (the wire maps them by name), plus storage's
    ``request_fingerprint`` (NewRefund.fingerprint; "" for a refund made outside the
    service, e.g. in Stripe's dashboard).
    """

    id: int
    payment_id: int
    request_id: str
    caller_service: str
    amount_cents: int
    currency: str
    status: RefundStatus
    request_fingerprint: str
    created_at: datetime
    updated_at: datetime
    reason: str = ""
    failure_reason: str = ""
    provider_refund_id: str = ""
    metadata: dict[str, str] = attrs.field(factory=dict)

    @property
    def idempotency_key(self) -> str:
        return refund_idempotency_key(self.caller_service, self.request_id)


@attrs.frozen
class RefundEvent:
    """One row of a refund's history (refund_events), written in the same transaction
    as the change. ``from_status`` is UNSPECIFIED on the row recording the creation.
    """

    refund_id: int
    payment_id: int
    kind: EventKind  # CREATED, PROVIDER_CREATED, STATUS_CHANGED or PROVIDER_EVENT
    from_status: RefundStatus
    to_status: RefundStatus
    created_at: datetime
    reason: str = ""
    provider_event_id: str = ""
    provider_event_type: str = ""
    id: int = 0


@attrs.frozen
class RefundTotals:
    """A payment's refunds summed by what the amount rules need."""

    pending_cents: int = 0
    succeeded_cents: int = 0

    @classmethod
    def of(cls, refunds: Iterable[Refund]) -> RefundTotals:
        """The totals of these refunds (storage sums the same in one query)."""
        pending = succeeded = 0
        for refund in refunds:
            if refund.status == RefundStatus.PENDING:
                pending += refund.amount_cents
            elif refund.status == RefundStatus.SUCCEEDED:
                succeeded += refund.amount_cents
        return cls(pending_cents=pending, succeeded_cents=succeeded)


def refunded_cents(totals: RefundTotals) -> int:
    """The payment's ``refunded_cents``: money that has gone back (SUCCEEDED only)."""
    return totals.succeeded_cents


def refundable_cents(status: PaymentStatus, amount_cents: int, totals: RefundTotals) -> int:
    """What may still be refunded: the amount less PENDING and SUCCEEDED refunds, 0
    unless the payment is PAID (never below 0, should a dashboard refund overshoot)."""
    if status != PaymentStatus.PAID:
        return 0
    return max(0, amount_cents - totals.pending_cents - totals.succeeded_cents)


class RefundRefused(Exception):
    """A refund the amount rules do not allow; the service answers FAILED_PRECONDITION.

    ``refundable_cents`` is what was refundable, for the message the contract asks for.
    """

    def __init__(self, message: str, refundable_cents: int) -> None:
        super().__init__(message)
        self.message = message
        self.refundable_cents = refundable_cents


def refund_amount(
    status: PaymentStatus, amount_cents: int, totals: RefundTotals, requested_cents: int
) -> int:
    """The amount a refund request gets: ``requested_cents``, or all that is refundable
    when it is 0. Raises RefundRefused when the payment is not PAID, nothing is left,
    or the request exceeds what is refundable. Call it under the payment's row lock,
    with totals read in the same transaction, so concurrent refunds cannot overshoot.
    """
    if requested_cents < 0:
        raise ValueError("requested_cents must not be negative (validation refuses it)")
    if status != PaymentStatus.PAID:
        raise RefundRefused(f"payment is {status.name}, only a PAID payment is refunded", 0)
    available = refundable_cents(status, amount_cents, totals)
    if available == 0:
        raise RefundRefused("payment has nothing left to refund (refundable_cents 0)", 0)
    if requested_cents > available:
        raise RefundRefused(
            f"amount_cents {requested_cents} exceeds the refundable amount {available}",
            available,
        )
    return requested_cents or available
