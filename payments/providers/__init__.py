"""Payment providers: the Provider protocol, the Stripe provider and the registry."""

from payments.providers.base import CheckoutResult, Provider

__all__ = ["CheckoutResult", "Provider"]
