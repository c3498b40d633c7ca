"""The one provider table: a route name finds the provider that reads its events, and
the StripeProvider reads Stripe's with its webhook secret (checked by the stripe
library), so a provider without a secret answers no events at all."""

from __future__ import annotations

import json
import time

import pytest

from payments.errors import BadSignature
from payments.model import PaymentStatus, ProviderType
from payments.providers.base import Provider
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.sandbox import stripe_signature

SECRET = "whsec_registry_dGVzdC1zZWNyZXQ"


def stripe(webhook_secret: str = SECRET) -> StripeProvider:
    # Never called over the network here: only its event side is exercised.
    return StripeProvider("sk_test_registry", "http://127.0.0.1:9", webhook_secret=webhook_secret)


@pytest.mark.parametrize("name", ["stripe", "STRIPE", " Stripe "])
async def test_the_route_name_finds_the_provider_and_its_type(name: str) -> None:
    provider = stripe()
    registry = ProviderRegistry({ProviderType.STRIPE: provider})
    assert isinstance(provider, Provider)
    assert registry.for_events(name) == (ProviderType.STRIPE, provider)
    assert ProviderRegistry.name_of(ProviderType.STRIPE) == "stripe"
    await registry.aclose()


@pytest.mark.parametrize("name", ["", "adyen", "unspecified", "stripe/x"])
async def test_other_names_find_nothing(name: str) -> None:
    registry = ProviderRegistry({ProviderType.STRIPE: stripe()})
    assert registry.for_events(name) is None
    await registry.aclose()


async def test_a_provider_without_a_webhook_secret_takes_no_events() -> None:
    provider = stripe(webhook_secret="")
    registry = ProviderRegistry({ProviderType.STRIPE: provider})
    assert not provider.receives_events and registry.for_events("stripe") is None
    with pytest.raises(BadSignature):
        provider.parse_event(b"{}", "t=1,v1=00")
    assert ProviderRegistry().for_events("stripe") is None
    await registry.aclose()


async def test_the_stripe_provider_checks_and_reads_its_events() -> None:
    provider = stripe()
    body = json.dumps(
        {
            "id": "evt_reg_1",
            "object": "event",
            "created": 1_700_000_000,
            "type": "checkout.session.expired",
            "data": {"object": {"id": "cs_reg_1", "object": "checkout.session"}},
        }
    ).encode()
    now = int(time.time())
    event = provider.parse_event(body, stripe_signature(body, SECRET, now))
    assert (event.event_id, event.target_status, event.refs) == (
        "evt_reg_1",
        PaymentStatus.EXPIRED,
        ("cs_reg_1",),
    )
    with pytest.raises(BadSignature):
        provider.parse_event(body, stripe_signature(body, "whsec_other", now))
    await provider.aclose()
