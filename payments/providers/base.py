"""What the service needs from a payment provider, and what it gets back.

The service layer depends on this protocol only; ``stripe.py`` implements it. Errors
are the domain's: :class:`payments.errors.ProviderRejected` when the provider refused
the request as invalid (the caller's fault, shown to them), and
:class:`payments.errors.ProviderUnavailable` for everything that is not the caller's
fault (auth, rate limits, timeouts, network, 5xx), with a generic message.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

from payments.model import Payment


@attrs.frozen
class CheckoutResult:
    """The provider object made for a payment."""

    provider_payment_id: str  # checkout session id, or payment link id
    checkout_url: str
    provider_subscription_id: str = ""


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

    async def aclose(self) -> None:
        """Release connections."""
        ...
