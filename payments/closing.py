"""Closing a payment's checkout at the provider without ever closing over money.

Cancel (the caller's) and expiry (the clock's) both end a payment that may have been
paid a moment ago, its event not yet arrived. The order is chosen for money:

* Money possibly under way is asked about before anything is closed: a PROCESSING
  payment (its checkout completed, the money not yet in) or one with a subscription
  (cancelling an active subscription would undo a sale).
* Close, then conclude. Expiring a Checkout Session is atomic at Stripe and fails
  for one that completed: that refusal means the customer got there first.
* A payment link is deactivated, then its sessions are read: one paid before the close
  (its event missed) decides.
* A CREATED payment (its create crashed) has its create replayed with the same
  idempotency key, so any object Stripe made is found and closed too.

ProviderUnavailable propagates: the caller writes nothing and may try again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs

from payments.errors import ProviderRejected
from payments.model import Payment, PaymentMethod, PaymentStatus
from payments.opening import apply_checkout
from payments.providers.base import Provider, ProviderState

T = TypeVar("T")
# The most provider operations one closing makes: replayed create, state, close, state.
CLOSING_CALLS = 4
Call = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]


async def _direct(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


@attrs.frozen
class Closing:
    """How closing went: ``closed`` when no one can pay the checkout any more;
    ``provider_status`` when the provider says money moved (PAID, PROCESSING, ...)."""

    closed: bool
    provider_status: PaymentStatus | None = None


async def close_at_provider(
    provider: Provider, payment: Payment, call: Call[object] = _direct
) -> Closing:
    """Close ``payment``'s checkout unless it was paid; updates the provider ids it
    learns on ``payment`` (the caller persists them). ``call`` wraps each provider call
    (the jobs pass their rate limiter)."""
    if payment.status == PaymentStatus.CREATED:
        try:
            result = await call(lambda: provider.create_checkout(payment))
        except ProviderRejected:
            result = None  # no object was ever made
        if result is not None:
            apply_checkout(payment, result)
    if payment.status == PaymentStatus.PROCESSING or payment.provider_subscription_id:
        state = await _fetch(provider, payment, call)
        if state.status is not None:
            return Closing(closed=False, provider_status=state.status)
    if not payment.provider_payment_id:
        return Closing(closed=True)
    try:
        await call(lambda: provider.cancel(payment))
    except ProviderRejected:
        # The provider would not close it: it completed. Its money decides.
        state = await _fetch(provider, payment, call)
        return Closing(closed=False, provider_status=state.status)
    if payment.payment_method == PaymentMethod.PAYMENT_LINK:
        state = await _fetch(provider, payment, call)
        if state.status is not None:
            return Closing(closed=True, provider_status=state.status)
    return Closing(closed=True)


async def _fetch(provider: Provider, payment: Payment, call: Call[object]) -> ProviderState:
    state = await call(lambda: provider.fetch_state(payment))
    assert isinstance(state, ProviderState)
    if state.subscription_id:
        payment.provider_subscription_id = state.subscription_id
    return state
