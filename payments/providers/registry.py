"""Which Provider serves which ProviderType, and under which name its events arrive.

The one table of providers: a ProviderType's route name (``/webhooks/providers/stripe``)
is its enum name in lower case. Built once at start, shared by the use cases and jobs.
"""

from __future__ import annotations

from collections.abc import Mapping

from payments.config import Settings
from payments.errors import ProviderUnavailable
from payments.model import ProviderType
from payments.providers.base import Provider


class ProviderRegistry:
    """Maps a payment's ProviderType (UNSPECIFIED means STRIPE), and its route name, to
    its Provider."""

    def __init__(self, providers: Mapping[ProviderType, Provider] | None = None) -> None:
        self._providers: dict[ProviderType, Provider] = dict(providers or {})

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        """The registry ``serve`` uses: Stripe with the configured key, base and limits."""
        from payments.providers.stripe import StripeProvider, session_lifetime

        return cls(
            {
                ProviderType.STRIPE: StripeProvider(
                    secret_key=settings.stripe_secret_key,
                    api_base=settings.stripe_api_base,
                    timeout_seconds=settings.stripe_http_timeout_seconds,
                    max_network_retries=settings.stripe_max_network_retries,
                    webhook_secret=settings.stripe_webhook_secret,
                    signature_tolerance_seconds=settings.stripe_signature_tolerance_seconds,
                    session_lifetime_seconds=session_lifetime(settings.pending_timeout_minutes),
                )
            }
        )

    def register(self, provider_type: ProviderType, provider: Provider) -> None:
        self._providers[provider_type] = provider

    def get(self, provider_type: ProviderType) -> Provider:
        if provider_type == ProviderType.UNSPECIFIED:
            provider_type = ProviderType.STRIPE
        try:
            return self._providers[provider_type]
        except KeyError:
            # A deployment without this provider: not the caller's fault.
            raise ProviderUnavailable("payment provider not configured") from None

    def for_events(self, name: str) -> tuple[ProviderType, Provider] | None:
        """The provider whose events arrive under route name ``name`` (any case), or None
        when there is none or it cannot check events."""
        try:
            provider_type = ProviderType[name.strip().upper()]
        except KeyError:
            return None
        provider = self._providers.get(provider_type)
        if provider_type == ProviderType.UNSPECIFIED or provider is None:
            return None
        return (provider_type, provider) if provider.receives_events else None

    @staticmethod
    def name_of(provider_type: ProviderType) -> str:
        """The route name of ``provider_type`` (``stripe``)."""
        return provider_type.name.lower()

    async def aclose(self) -> None:
        """Close every provider (each once, even if registered under two types)."""
        seen: set[int] = set()
        for provider in self._providers.values():
            if id(provider) not in seen:
                seen.add(id(provider))
                await provider.aclose()
