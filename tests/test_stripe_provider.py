"""StripeProvider against the emulator over HTTP: the objects it makes, idempotency,
error mapping under injected faults, and cancel for each kind of payment."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from payments.config import Settings
from payments.errors import ProviderRejected, ProviderTimeout, ProviderUnavailable
from payments.model import Payment, PaymentMethod, PaymentType, ProviderType
from payments.providers.base import CheckoutResult, Provider
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider, with_state
from payments.sandbox import Sandbox
from payments.sandbox.params import SessionStateError
from tests.fixtures.sandbox import make_payment

pytestmark = [
    pytest.mark.timeout(30),
    # the stripe SDK hands httpx its form body as data=<str>
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

SESSION = "POST /v1/checkout/sessions"


@pytest.fixture
async def make_provider(
    stripe_sandbox: Sandbox,
) -> AsyncIterator[Callable[..., StripeProvider]]:
    """StripeProviders on the emulator with the given timeout / retries / key."""
    made: list[StripeProvider] = []

    def make(
        timeout_seconds: float = 1.0, max_network_retries: int = 0, secret_key: str = ""
    ) -> StripeProvider:
        provider = StripeProvider(
            secret_key=secret_key or stripe_sandbox.secret_key,
            api_base=stripe_sandbox.url,
            timeout_seconds=timeout_seconds,
            max_network_retries=max_network_retries,
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


def _hosted(**overrides: Any) -> Payment:
    return make_payment(payment_method=PaymentMethod.HOSTED_CARD, **overrides)


def _link(**overrides: Any) -> Payment:
    return make_payment(payment_method=PaymentMethod.PAYMENT_LINK, **overrides)


def test_stripe_provider_is_a_provider() -> None:
    provider = StripeProvider("sk_test_x", "http://127.0.0.1:9", 1, 0)
    assert isinstance(provider, Provider)
    assert "sk_test_x" not in repr(provider)


def test_with_state_keeps_an_existing_query() -> None:
    assert with_state("https://a.test/cb/h", "success") == "https://a.test/cb/h?state=success"
    assert with_state("https://a.test/cb?x=1", "cancel") == "https://a.test/cb?x=1&state=cancel"


# --- create: the objects and their parameters -----------------------------------------


async def test_hosted_card_one_time_creates_a_payment_mode_session(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = _hosted(amount_cents=2500, currency="EUR", metadata={"order_ref": "A-1"})
    result = await stripe_provider.create_checkout(payment)

    state = stripe_sandbox.state
    session = state.sessions[result.provider_payment_id]
    assert result == CheckoutResult(session["id"], f"{stripe_sandbox.url}/pay/{session['id']}")
    assert session["mode"] == "payment"
    assert session["client_reference_id"] == payment.request_id
    assert session["metadata"] == {
        "order_ref": "A-1",
        "request_id": payment.request_id,
        "callback_hash": payment.provider_callback_hash,
    }
    assert session["success_url"] == f"{payment.provider_callback_url}?state=success"
    assert session["cancel_url"] == f"{payment.provider_callback_url}?state=cancel"
    [request] = state.requests_to(SESSION)
    assert request.idempotency_key == f"{payment.idempotency_key}:session"
    assert request.params["line_items"] == [
        {
            "price_data": {
                "currency": "eur",
                "unit_amount": "2500",
                "product_data": {"name": "order-1042"},
            },
            "quantity": "1",
        }
    ]
    assert request.params["payment_intent_data"] == {"metadata": session["metadata"]}
    [item] = state.line_items[session["id"]]
    assert item["price"]["type"] == "one_time" and item["amount_total"] == 2500


async def test_hosted_card_recurring_creates_a_subscription_mode_session(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = _hosted(
        payment_type=PaymentType.RECURRING,
        recurring_interval="week",
        recurring_interval_count=2,
        success_url="https://shop.test/thanks",
        cancel_url="https://shop.test/back",
    )
    result = await stripe_provider.create_checkout(payment)
    session = stripe_sandbox.state.sessions[result.provider_payment_id]
    assert session["mode"] == "subscription"
    assert session["success_url"] == "https://shop.test/thanks"
    assert session["cancel_url"] == "https://shop.test/back"
    [request] = stripe_sandbox.state.requests_to(SESSION)
    price_data = request.params["line_items"][0]["price_data"]
    assert price_data["recurring"] == {"interval": "week", "interval_count": "2"}
    assert request.params["subscription_data"] == {"metadata": session["metadata"]}
    [item] = stripe_sandbox.state.line_items[session["id"]]
    assert item["price"]["recurring"]["interval_count"] == 2


@pytest.mark.parametrize("payment_type", [PaymentType.ONE_TIME, PaymentType.RECURRING])
async def test_payment_link_creates_product_price_and_link(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider, payment_type: PaymentType
) -> None:
    payment = _link(payment_type=payment_type, amount_cents=1200, currency="USD")
    result = await stripe_provider.create_checkout(payment)

    state = stripe_sandbox.state
    [product] = state.products.values()
    [price] = state.prices.values()
    [link] = state.payment_links.values()
    assert result == CheckoutResult(link["id"], link["url"])
    assert link["url"] == f"{stripe_sandbox.url}/pay/{link['id']}"
    assert product["name"] == "order-1042"
    assert price["product"] == product["id"]
    assert (price["currency"], price["unit_amount"]) == ("usd", 1200)
    if payment_type == PaymentType.RECURRING:
        assert price["type"] == "recurring"
        assert price["recurring"]["interval"] == "month"
        assert price["recurring"]["interval_count"] == 1
    else:
        assert price["type"] == "one_time" and price["recurring"] is None
    assert [i["price"]["id"] for i in state.line_items[link["id"]]] == [price["id"]]
    assert link["after_completion"] == {
        "type": "redirect",
        "redirect": {"url": payment.provider_callback_url},
        "hosted_confirmation": None,
    }
    assert link["metadata"]["callback_hash"] == payment.provider_callback_hash
    assert link["metadata"]["request_id"] == payment.request_id
    keys = [r.idempotency_key for r in state.requests]
    assert keys == [f"{payment.idempotency_key}:{s}" for s in ("product", "price", "link")]


# --- idempotency ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [PaymentMethod.HOSTED_CARD, PaymentMethod.PAYMENT_LINK])
async def test_repeated_create_returns_the_same_object(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider], method: PaymentMethod
) -> None:
    payment = make_payment(payment_method=method)
    first = await make_provider().create_checkout(payment)
    # a retry after a crash: a new process, a new client, the same payment
    second = await make_provider().create_checkout(payment)
    assert first == second
    state = stripe_sandbox.state
    objects = len(state.sessions) + len(state.payment_links)
    assert objects == 1
    assert len(state.products) == len(state.prices) == (method == PaymentMethod.PAYMENT_LINK)
    replayed = [r.replayed for r in state.requests]
    half = len(replayed) // 2
    assert replayed == [False] * half + [True] * half


async def test_retry_with_metadata_in_another_order_still_replays(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = _hosted(metadata={"a": "1", "b": "2", "c": "3"})
    first = await stripe_provider.create_checkout(payment)
    payment.metadata = {"c": "3", "b": "2", "a": "1"}  # as read back from storage
    assert await stripe_provider.create_checkout(payment) == first
    first_body, second_body = (r.params for r in stripe_sandbox.state.requests)
    assert list(first_body["metadata"]) == list(second_body["metadata"])
    assert len(stripe_sandbox.state.sessions) == 1


async def test_lost_answer_is_retried_with_the_same_key(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider]
) -> None:
    # Stripe makes the session but the answer is late: the operation's deadline (the
    # timeout, retries included) ends it as a timeout naming Stripe; the retry (a
    # retried create) carries the same key, and Stripe hands back the same session.
    stripe_sandbox.faults.delay(2, after=True, times=1)
    payment = _hosted()
    provider = make_provider(timeout_seconds=0.3, max_network_retries=1)
    started = trio.current_time()
    with pytest.raises(ProviderTimeout, match=r"^stripe did not answer within 0.3s$"):
        await provider.create_checkout(payment)
    assert trio.current_time() - started < 1.0  # the deadline, not a retry after it
    # The retry (a retried create, unhurried: the test machine may be busy) replays it.
    result = await make_provider(timeout_seconds=5).create_checkout(payment)
    log = stripe_sandbox.state.requests_to(SESSION)
    assert [(r.idempotency_key, r.replayed) for r in log] == [
        (f"{payment.idempotency_key}:session", False),
        (f"{payment.idempotency_key}:session", True),
    ]
    assert list(stripe_sandbox.state.sessions) == [result.provider_payment_id]


@pytest.mark.parametrize("operation", ["create_checkout", "cancel", "fetch_state"])
async def test_a_hung_stripe_costs_one_timeout_whatever_the_retries(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider], operation: str
) -> None:
    provider = make_provider(timeout_seconds=0.5, max_network_retries=2)
    payment = _hosted()
    if operation != "create_checkout":
        payment.provider_payment_id = (await provider.create_checkout(payment)).provider_payment_id
    hang = stripe_sandbox.faults.hang()
    started = trio.current_time()
    with pytest.raises(ProviderTimeout, match=r"^stripe did not answer within 0.5s$"):
        await getattr(provider, operation)(payment)
    # One deadline, not three timeouts of 0.5 s and 1.5 s of backoff between them.
    assert 0.5 <= trio.current_time() - started < 1.5
    assert hang.hits >= 1
    stripe_sandbox.faults.clear()  # released: the emulator answers again
    await provider.fetch_state(payment)


async def test_transient_5xx_is_retried_with_the_same_key(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider]
) -> None:
    stripe_sandbox.faults.fail(503, times=1)
    payment = _hosted()
    result = await make_provider(max_network_retries=1).create_checkout(payment)
    log = stripe_sandbox.state.requests_to(SESSION)
    assert [(r.status, r.idempotency_key) for r in log] == [
        (503, f"{payment.idempotency_key}:session"),
        (200, f"{payment.idempotency_key}:session"),
    ]
    assert list(stripe_sandbox.state.sessions) == [result.provider_payment_id]


# --- error mapping ----------------------------------------------------------------------


async def test_timeout_is_unavailable(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider]
) -> None:
    stripe_sandbox.faults.delay(3, times=None)
    with pytest.raises(ProviderUnavailable) as info:
        await make_provider(timeout_seconds=0.2).create_checkout(_hosted())
    assert isinstance(info.value, ProviderTimeout)  # 504, not 502
    assert info.value.message == "stripe did not answer within 0.2s"
    assert stripe_sandbox.state.sessions == {}


async def test_5xx_is_unavailable_after_the_retries(
    stripe_sandbox: Sandbox, make_provider: Callable[..., StripeProvider]
) -> None:
    stripe_sandbox.faults.fail(500, times=None)
    payment = _hosted()
    with pytest.raises(ProviderUnavailable, match=r"^payment provider unavailable$"):
        # The two backoffs (0.5 s, 1 s) fit in the operation's deadline.
        await make_provider(timeout_seconds=5, max_network_retries=2).create_checkout(payment)
    log = stripe_sandbox.state.requests_to(SESSION)
    assert len(log) == 3  # the first attempt and two retries
    assert {r.idempotency_key for r in log} == {f"{payment.idempotency_key}:session"}


async def test_dropped_connection_is_unavailable(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    stripe_sandbox.faults.drop(times=None)
    with pytest.raises(ProviderUnavailable):
        await stripe_provider.create_checkout(_link())
    assert [r.fault for r in stripe_sandbox.state.requests] == ["drop"]


async def test_rate_limit_is_unavailable(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    stripe_sandbox.faults.fail(429)
    with pytest.raises(ProviderUnavailable):
        await stripe_provider.create_checkout(_hosted())


async def test_unreachable_stripe_is_unavailable() -> None:
    provider = StripeProvider("sk_test_x", "http://127.0.0.1:9", 0.5, 0)  # nothing listens
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.create_checkout(_hosted())
    finally:
        await provider.aclose()


async def test_invalid_request_is_rejected_with_stripes_message(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    with pytest.raises(ProviderRejected) as info:
        await stripe_provider.create_checkout(_hosted(amount_cents=10, currency="USD"))
    assert info.value.message == (
        "The Checkout Session's total amount due must add up to at least 0.50 usd"
    )
    with pytest.raises(ProviderRejected, match=r"^Invalid currency: zzz"):
        await stripe_provider.create_checkout(_link(currency="ZZZ"))
    assert stripe_sandbox.state.sessions == {} and stripe_sandbox.state.prices == {}


async def test_wrong_key_is_unavailable_and_never_shown_or_logged(
    stripe_sandbox: Sandbox,
    make_provider: Callable[..., StripeProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "sk_test_wrongKeyThatMustNotLeak42"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProviderUnavailable) as info:
        await make_provider(secret_key=wrong).create_checkout(_hosted())
    assert info.value.message == "payment provider unavailable"
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert stripe_sandbox.state.requests[0].status == 401
    for secret in (wrong, wrong[-4:], stripe_sandbox.secret_key):
        assert secret not in caplog.text
        assert secret not in str(info.value)


# --- cancel -----------------------------------------------------------------------------


async def _opened(provider: StripeProvider, payment: Payment) -> Payment:
    result = await provider.create_checkout(payment)
    payment.provider_payment_id = result.provider_payment_id
    payment.checkout_url = result.checkout_url
    return payment


async def test_cancel_expires_an_open_session(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _hosted())
    await stripe_provider.cancel(payment)
    session = stripe_sandbox.state.sessions[payment.provider_payment_id]
    assert session["status"] == "expired"
    [expire] = stripe_sandbox.state.requests_to("POST /v1/checkout/sessions/{id}/expire")
    assert expire.idempotency_key == f"{payment.idempotency_key}:expire"
    await stripe_provider.cancel(payment)  # again: already closed is fine


async def test_cancel_of_an_already_expired_session_succeeds(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _hosted())
    stripe_sandbox.state.expire_session(payment.provider_payment_id)
    await stripe_provider.cancel(payment)
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "expired"


async def test_cancel_of_a_completed_session_is_rejected(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _hosted())
    stripe_sandbox.state.complete_session(payment.provider_payment_id)
    with pytest.raises(ProviderRejected, match="already complete"):
        await stripe_provider.cancel(payment)


async def test_cancel_of_an_unknown_session_is_rejected(stripe_provider: StripeProvider) -> None:
    payment = _hosted(provider_payment_id="cs_test_unknown")
    with pytest.raises(ProviderRejected, match=r"No such checkout\.session"):
        await stripe_provider.cancel(payment)


async def test_cancel_ends_the_subscription_of_a_hosted_card_payment(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _hosted(payment_type=PaymentType.RECURRING))
    session = stripe_sandbox.state.complete_session(payment.provider_payment_id)
    payment.provider_subscription_id = session["subscription"]
    await stripe_provider.cancel(payment)
    assert stripe_sandbox.state.subscriptions[session["subscription"]]["status"] == "canceled"
    await stripe_provider.cancel(payment)  # Stripe says "No such subscription": still fine
    assert len(stripe_sandbox.state.events_of("customer.subscription.deleted")) == 1


async def test_cancel_deactivates_a_payment_link(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _link())
    await stripe_provider.cancel(payment)
    link = stripe_sandbox.state.payment_links[payment.provider_payment_id]
    assert link["active"] is False
    [update] = stripe_sandbox.state.requests_to("POST /v1/payment_links/{id}")
    assert update.params == {"active": "false"}
    await stripe_provider.cancel(payment)


async def test_cancel_of_a_recurring_link_also_ends_its_subscription(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _link(payment_type=PaymentType.RECURRING))
    session = stripe_sandbox.state.pay_payment_link(payment.provider_payment_id)
    payment.provider_subscription_id = session["subscription"]
    subscription = stripe_sandbox.state.subscriptions[session["subscription"]]
    assert subscription["metadata"]["callback_hash"] == payment.provider_callback_hash
    await stripe_provider.cancel(payment)
    assert stripe_sandbox.state.payment_links[payment.provider_payment_id]["active"] is False
    assert subscription["status"] == "canceled"


async def test_cancel_during_an_outage_is_unavailable(
    stripe_sandbox: Sandbox, stripe_provider: StripeProvider
) -> None:
    payment = await _opened(stripe_provider, _hosted())
    stripe_sandbox.faults.fail(502, times=None)
    with pytest.raises(ProviderUnavailable):
        await stripe_provider.cancel(payment)
    assert stripe_sandbox.state.sessions[payment.provider_payment_id]["status"] == "open"


# --- registry ---------------------------------------------------------------------------


async def test_registry_maps_provider_types() -> None:
    settings = Settings(
        stripe_secret_key="sk_test_reg",
        stripe_api_base="http://127.0.0.1:9",
        stripe_http_timeout_seconds=3,
        stripe_max_network_retries=1,
    )
    registry = ProviderRegistry.from_settings(settings)
    stripe_provider = registry.get(ProviderType.STRIPE)
    assert isinstance(stripe_provider, StripeProvider)
    assert registry.get(ProviderType.UNSPECIFIED) is stripe_provider
    with pytest.raises(ProviderUnavailable):
        ProviderRegistry().get(ProviderType.STRIPE)
    await registry.aclose()


@pytest.mark.parametrize("payment_type", [PaymentType.ONE_TIME, PaymentType.RECURRING])
async def test_a_payment_link_can_be_paid_only_once(
    stripe_provider: StripeProvider, stripe_sandbox: Sandbox, payment_type: PaymentType
) -> None:
    recurring = (
        {"recurring_interval": "month", "recurring_interval_count": 1}
        if payment_type == PaymentType.RECURRING
        else {}
    )
    payment = _link(payment_type=payment_type, **recurring)
    result = await stripe_provider.create_checkout(payment)
    link = stripe_sandbox.state.payment_links[result.provider_payment_id]
    assert link["restrictions"] == {"completed_sessions": {"limit": 1}}
    stripe_sandbox.state.pay_payment_link(link["id"])
    assert link["active"] is False
    with pytest.raises(SessionStateError):
        stripe_sandbox.state.open_payment_link(link["id"])
