"""What the service needs from a payment provider, and what it gets back.

The use cases depend on this protocol only; ``stripe.py`` implements it. Each provider
reads its own events (its signature scheme and event shapes are its own). Errors
are the domain's: :class:`payments.errors.ProviderRejected` when the provider refused
the request as invalid (the caller's fault, shown to them), and
:class:`payments.errors.ProviderUnavailable` for everything that is not the caller's
fault (auth, rate limits, timeouts, network, 5xx), with a generic message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from payments.model import Payment, PaymentStatus, Refund, RefundStatus


@attrs.frozen
class CheckoutResult:
    """The provider object made for a payment."""

    provider_payment_id: str  # checkout session id, or payment link id
    checkout_url: str
    provider_subscription_id: str = ""


@attrs.frozen
class ProviderEvent:
    """A provider event (webhook) after its signature was checked."""

    event_id: str
    event_type: str
    created: int  # the provider's unix time of the event
    # Provider object ids the event is about (session, payment link, subscription):
    # the payment is found by these or by ``callback_hash``.
    refs: tuple[str, ...]
    callback_hash: str  # metadata.callback_hash, when the object carries it
    # What the event means for the payment (CONTRACT.md's mapping); None: record only.
    target_status: PaymentStatus | None
    subscription_id: str = ""  # a subscription the event reveals (recurring checkout)
    # Money the event names (a paid session's PaymentIntent; a charge or refund's intent
    # and charge): how a refund event, which carries no callback hash, finds its payment.
    payment_intent: str = ""
    charge: str = ""
    refunds: tuple[ProviderRefund, ...] = ()  # the refunds a refund/charge event reports


@attrs.frozen
class ProviderState:
    """What the provider says of a payment now (the reconciler's question)."""

    status: PaymentStatus | None  # None: nothing to conclude yet
    subscription_id: str = ""
    # The money that paid it (status PAID), stored so that refund events, which carry
    # no callback hash, find the payment: its PaymentIntent and that intent's charge.
    payment_intent: str = ""
    charge: str = ""


@attrs.frozen
class ProviderRefund:
    """A refund as the provider holds it (made by the service or in its dashboard)."""

    provider_refund_id: str  # re_...
    status: RefundStatus
    amount_cents: int
    currency: str  # upper-case ISO code
    failure_reason: str = ""
    reason: str = ""  # Stripe's reason, "" when none
    payment_intent_id: str = ""
    charge_id: str = ""
    # From the refund's metadata when the service made it (refund_id, request_id); 0/""
    # for a refund made elsewhere.
    refund_id: int = 0
    request_id: str = ""


@attrs.define
class ExpiredListing:
    """What one expiry pass learned from the provider's listings of expired checkouts:
    their ids, and the creation-time span (unix seconds, inclusive) listed in full.

    Expired is final, so an id here never goes stale; a checkout that expired after its
    span was listed is simply not here (it takes the per-payment path). Kept for one
    pass, so consecutive batches, whose creation times overlap, list each checkout once.
    """

    ids: set[str] = attrs.field(factory=set)
    span: tuple[int, int] | None = None


@runtime_checkable
class EventParser(Protocol):
    def parse(self, payload: bytes, signature: str) -> ProviderEvent:
        """Check the signature of a raw event body and read it.

        Raises payments.errors.BadSignature for a missing, wrong or stale signature,
        and payments.errors.InvalidArgument for a body that is not an event.
        """
        ...


@runtime_checkable
class Provider(Protocol):
    async def create_checkout(self, payment: Payment) -> CheckoutResult:
        """Make (or, on a retry, find again) the hosted checkout for ``payment``.

        Idempotent: called again for the same payment (same ``idempotency_key``) it
        returns the object it made the first time, never a second one.
        """
        ...

    async def cancel(self, payment: Payment) -> None:
        """Close the payment at the provider (expire the session, deactivate the link,
        cancel the subscription). Already closed counts as success."""
        ...

    async def fetch_state(self, payment: Payment) -> ProviderState:
        """Ask the provider where the payment stands (Checkout Session; a payment link's
        sessions; a subscription), for the reconciler."""
        ...

    async def create_refund(self, payment: Payment, refund: Refund) -> ProviderRefund:
        """Refund ``refund.amount_cents`` of the paid ``payment`` at the provider.

        Idempotent: the key is ``refund.idempotency_key`` and the parameters are the
        same on every call for one refund, so a retry after a crash gets the refund the
        first call made. ProviderRejected when the provider refuses (the refund then
        FAILED with that reason); ProviderUnavailable when it cannot be asked.
        """
        ...

    async def retrieve_refund(self, provider_refund_id: str) -> ProviderRefund:
        """The provider's refund as it stands now (the reconciler's question)."""
        ...

    async def find_refund(self, payment: Payment, refund: Refund) -> ProviderRefund | None:
        """The provider's refund made for ``refund`` (found by the refund_id in its
        metadata among the payment's refunds), or None when the provider has none."""
        ...

    async def payment_intent_of(self, payment: Payment) -> str:
        """The provider's PaymentIntent that paid ``payment`` ("" when it has none): a
        refund event names it, and a recurring payment's events do not tell it."""
        ...

    async def callback_hash_of_intent(self, payment_intent: str) -> str:
        """The ``metadata.callback_hash`` of the checkout that ``payment_intent`` paid
        ("" when the provider ties it to none of ours): how a refund event naming a
        PaymentIntent the service never stored still finds its payment.
        ProviderUnavailable when the provider cannot be asked."""
        ...

    async def expired_checkouts(
        self, payments: Sequence[Payment], listing: ExpiredListing
    ) -> set[str]:
        """The provider payment ids among ``payments`` whose checkout the provider itself
        closed unpaid (it expired), asked in bulk and added to ``listing``; a payment not
        named is undecided."""
        ...

    @property
    def receives_events(self) -> bool:
        """True when the provider can check its events (its webhook secret is set)."""
        ...

    def parse_event(self, payload: bytes, signature: str) -> ProviderEvent:
        """Check the signature of a raw event body and read it (see EventParser)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
