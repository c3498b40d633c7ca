"""The Stripe provider: hosted Checkout Sessions and Payment Links via the official SDK.

It uses the SDK's async methods (``*_async``) over its HTTPX client, which sleeps and
does I/O through anyio and so runs on trio. What CONTRACT.md ("Provider (Stripe) facts")
asks is built here: one line item with inline ``price_data`` for HOSTED_CARD; Product,
Price and Payment Link for PAYMENT_LINK.

Idempotency: every create carries ``<payment.idempotency_key>:<object>`` as Stripe's
``Idempotency-Key``. The SDK builds the request headers once, before its retry loop, so
its own network retries resend the same key; and a retry of the whole create after a
crash derives the same keys again. Either way Stripe replays the object it made instead
of making a second one. A Payment Link is three calls; each has its own key, and the
replayed Product gives the Price the same parameters, so the chain replays as a whole.

Timeouts and retries: ``stripe.HTTPXClient(timeout=...)`` passes the timeout to every
httpx request (connect, read, write and pool each); ``max_network_retries`` on the
StripeClient makes the SDK retry connection errors (timeouts included), 409 and 5xx
answers with exponential backoff (0.5 s doubling, jittered, at most 5 s). Each operation
(create_checkout, cancel, fetch_state: all its requests and retries together) has one
deadline of the same length, so a Stripe that hangs costs a caller
STRIPE_HTTP_TIMEOUT_SECONDS, not that times the requests and retries:
:class:`ProviderTimeout` (504), naming Stripe.

Reading state (``fetch_state``, for the reconciler and the expirer): a Checkout
Session's ``status`` / ``payment_status``; a payment link's completed sessions; and once
a subscription exists, the subscription, whose status is the truth of a recurring
payment from then on (see ``SUBSCRIPTION_STATUS`` for the mapping and why).

Errors: Stripe refusing the request (invalid request, card, idempotency mismatch) is
:class:`ProviderRejected` with Stripe's message; anything else is
:class:`ProviderUnavailable` with a generic message. Stripe's own messages for auth
failures quote part of the key, so they are never passed on or logged, the SDK
exception is not chained onto ours, and the SDK's own ``stripe`` logger is held at
WARNING (unless configured otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import stripe
import trio
from stripe.params.checkout import SessionListParams

from payments.errors import BadSignature, ProviderRejected, ProviderTimeout, ProviderUnavailable
from payments.model import (
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    Refund,
    RefundStatus,
)
from payments.observability.hooks import stripe_operation
from payments.providers.base import (
    CheckoutResult,
    ExpiredListing,
    ProviderEvent,
    ProviderRefund,
    ProviderState,
)
from payments.providers.stripe_events import StripeEventParser

log = logging.getLogger("payments.providers.stripe")

UNAVAILABLE_MESSAGE = "payment provider unavailable"
_REJECTED = (stripe.InvalidRequestError, stripe.CardError, stripe.IdempotencyError)
_LIST_PAGE = 100  # Stripe's largest page

# Stripe takes a Checkout Session's ``expires_at`` 30 minutes to 24 hours after the
# session is made. The service fixes it from the payment's ``created_at`` (so a retried
# create sends byte-identical parameters), which leaves the create a slack to reach
# Stripe: a pending timeout under 30 min + the slack keeps today's path (the expirer
# closes the session itself).
SESSION_LIFETIME_MIN_S = 30 * 60
SESSION_LIFETIME_MAX_S = 24 * 60 * 60
CREATE_SLACK_S = 5 * 60
# How far a session's ``created`` (Stripe's clock, once the create got there) may lie
# from the payment's ``created_at`` (ours) and still be found by the bulk listing.
_CREATED_WINDOW_S = 10 * 60


def session_lifetime(pending_timeout_minutes: float) -> int | None:
    """Seconds from a payment's creation to its session's ``expires_at``, or None when
    the pending timeout lies outside what Stripe accepts (keep closing it ourselves)."""
    seconds = pending_timeout_minutes * 60
    if SESSION_LIFETIME_MIN_S + CREATE_SLACK_S <= seconds <= SESSION_LIFETIME_MAX_S:
        return int(seconds)
    return None


# What a subscription's status says of the payment that started it. The payment stands
# for the first charge, so every status Stripe only reaches after that charge succeeded
# (past_due and unpaid come only from active: a renewal failed) is PAID; the renewals'
# fate is the subscription's life, told by its own events. ``incomplete`` is a first
# charge still under way; ``paused`` (a trial ended without a payment method) has not
# charged yet and concludes nothing.
SUBSCRIPTION_STATUS: dict[str, PaymentStatus | None] = {
    "active": PaymentStatus.PAID,
    "trialing": PaymentStatus.PAID,
    "past_due": PaymentStatus.PAID,
    "unpaid": PaymentStatus.PAID,
    "canceled": PaymentStatus.CANCELED,
    "incomplete_expired": PaymentStatus.EXPIRED,
    "incomplete": PaymentStatus.PROCESSING,
    "paused": None,
}
_PAID = frozenset({"paid", "no_payment_required"})


def with_state(url: str, state: str) -> str:
    """``url`` with ``state=<state>`` added to its query (kept if it has one)."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("state", state)])
    return urlunsplit(parts._replace(query=query))


def product_name(payment: Payment) -> str:
    return f"{payment.resource_type}-{payment.resource_id}"


def payment_metadata(payment: Payment) -> dict[str, str]:
    """The caller's metadata plus ``request_id`` and ``callback_hash`` (ours win).

    Sorted, so a retry encodes byte-identical parameters whatever order the metadata
    came back from storage in (Stripe refuses a reused key with other parameters).
    """
    return {
        **dict(sorted(payment.metadata.items())),
        "request_id": payment.request_id,
        "callback_hash": payment.provider_callback_hash,
    }


class StripeProvider:
    """Provider for ProviderType.STRIPE."""

    def __init__(
        self,
        secret_key: str,
        api_base: str = "https://api.stripe.com",
        timeout_seconds: float = 10.0,
        max_network_retries: int = 2,
        *,
        webhook_secret: str = "",
        signature_tolerance_seconds: int = 300,
        session_lifetime_seconds: int | None = None,
    ) -> None:
        if not secret_key:
            raise ValueError("StripeProvider needs a secret key")
        _quiet_sdk_logger()
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base.rstrip("/")},
            http_client=self._http,
            max_network_retries=max_network_retries,
        )
        self._api_base = api_base
        self._timeout = timeout_seconds
        self._retries = max_network_retries
        # Set: sessions carry expires_at = created_at + this, and Stripe closes them.
        self._session_lifetime = session_lifetime_seconds
        # Without a webhook secret no event can be checked: the route answers 404.
        self._events = (
            StripeEventParser(webhook_secret, signature_tolerance_seconds)
            if webhook_secret.strip()
            else None
        )

    def __repr__(self) -> str:  # never the key
        return (
            f"StripeProvider(api_base={self._api_base!r}, timeout_seconds={self._timeout}, "
            f"max_network_retries={self._retries})"
        )

    # --- events -----------------------------------------------------------------------

    @property
    def receives_events(self) -> bool:
        return self._events is not None

    def parse_event(self, payload: bytes, signature: str) -> ProviderEvent:
        if self._events is None:
            raise BadSignature("no webhook secret is configured")
        return self._events.parse(payload, signature)

    # --- create -----------------------------------------------------------------------

    @contextmanager
    def _deadline(self, operation: str, payment: Payment | None) -> Iterator[None]:
        """One deadline for a whole operation, its requests and retries included."""
        with trio.move_on_after(self._timeout) as scope:
            yield
        if scope.cancelled_caught:
            log.warning(
                "stripe did not answer in time",
                extra={"operation": operation, "payment_id": payment.id if payment else 0},
            )
            raise ProviderTimeout(f"stripe did not answer within {self._timeout:g}s")

    @stripe_operation("create_checkout")
    async def create_checkout(self, payment: Payment) -> CheckoutResult:
        with self._deadline("create_checkout", payment):
            return await self._create_checkout(payment)

    async def _create_checkout(self, payment: Payment) -> CheckoutResult:
        try:
            if payment.payment_method == PaymentMethod.HOSTED_CARD:
                return await self._create_session(payment)
            if payment.payment_method == PaymentMethod.PAYMENT_LINK:
                return await self._create_payment_link(payment)
        except stripe.StripeError as exc:
            _raise_mapped(exc, "create_checkout", payment)
        raise ProviderRejected(
            f"payment method {payment.payment_method.name} is not supported by Stripe"
        )

    def _price_data(self, payment: Payment) -> dict[str, Any]:
        data: dict[str, Any] = {
            "currency": payment.currency.lower(),
            "unit_amount": payment.amount_cents,
        }
        if payment.payment_type == PaymentType.RECURRING:
            data["recurring"] = {
                "interval": payment.recurring_interval,
                "interval_count": payment.recurring_interval_count,
            }
        return data

    def _follow_up_metadata(self, payment: Payment, metadata: dict[str, str]) -> dict[str, Any]:
        """The same metadata on the PaymentIntent or Subscription Stripe makes later, so
        their events (invoice.paid, customer.subscription.deleted) name the payment too."""
        if payment.payment_type == PaymentType.RECURRING:
            return {"subscription_data": {"metadata": metadata}}
        return {"payment_intent_data": {"metadata": metadata}}

    async def _create_session(self, payment: Payment) -> CheckoutResult:
        metadata = payment_metadata(payment)
        recurring = payment.payment_type == PaymentType.RECURRING
        params: dict[str, Any] = {
            "mode": "subscription" if recurring else "payment",
            "line_items": [
                {
                    "price_data": {
                        **self._price_data(payment),
                        "product_data": {"name": product_name(payment)},
                    },
                    "quantity": 1,
                }
            ],
            "client_reference_id": payment.request_id,
            "metadata": metadata,
            "success_url": payment.success_url
            or with_state(payment.provider_callback_url, "success"),
            "cancel_url": payment.cancel_url or with_state(payment.provider_callback_url, "cancel"),
            **self._follow_up_metadata(payment, metadata),
        }
        if self._session_lifetime is not None:
            params["expires_at"] = int(payment.created_at.timestamp()) + self._session_lifetime
        session = await self._client.v1.checkout.sessions.create_async(
            params=params,
            options={"idempotency_key": f"{payment.idempotency_key}:session"},
        )
        return CheckoutResult(provider_payment_id=session.id, checkout_url=session.url or "")

    async def _create_payment_link(self, payment: Payment) -> CheckoutResult:
        key = payment.idempotency_key
        metadata = payment_metadata(payment)
        v1 = self._client.v1
        product = await v1.products.create_async(
            params={"name": product_name(payment), "metadata": metadata},
            options={"idempotency_key": f"{key}:product"},
        )
        price = await v1.prices.create_async(
            params={**self._price_data(payment), "product": product.id},
            options={"idempotency_key": f"{key}:price"},
        )
        link = await v1.payment_links.create_async(
            params={
                "line_items": [{"price": price.id, "quantity": 1}],
                "after_completion": {
                    "type": "redirect",
                    "redirect": {"url": payment.provider_callback_url},
                },
                "metadata": metadata,
                # One payment, one charge: Stripe deactivates the link after its first
                # completed checkout, so it cannot be paid twice.
                "restrictions": {"completed_sessions": {"limit": 1}},
                **self._follow_up_metadata(payment, metadata),
            },
            options={"idempotency_key": f"{key}:link"},
        )
        return CheckoutResult(provider_payment_id=link.id, checkout_url=link.url)

    # --- cancel -----------------------------------------------------------------------

    @stripe_operation("cancel")
    async def cancel(self, payment: Payment) -> None:
        with self._deadline("cancel", payment):
            await self._cancel(payment)

    async def _cancel(self, payment: Payment) -> None:
        try:
            if payment.payment_method == PaymentMethod.PAYMENT_LINK:
                if payment.provider_payment_id:
                    await self._deactivate_link(payment)
                if payment.provider_subscription_id:
                    await self._cancel_subscription(payment.provider_subscription_id)
            elif payment.provider_subscription_id:
                # The session completed into a subscription: ending that is the cancel.
                await self._cancel_subscription(payment.provider_subscription_id)
            elif payment.provider_payment_id:
                await self._expire_session(payment)
        except stripe.StripeError as exc:
            _raise_mapped(exc, "cancel", payment)

    async def _expire_session(self, payment: Payment) -> None:
        sessions = self._client.v1.checkout.sessions
        try:
            await sessions.expire_async(
                payment.provider_payment_id,
                options={"idempotency_key": f"{payment.idempotency_key}:expire"},
            )
        except stripe.InvalidRequestError:
            # Refused: find out why rather than parse the message.
            session = await sessions.retrieve_async(payment.provider_payment_id)
            if session.status == "expired":
                return  # already closed: that is what cancel wants
            if session.status == "complete":
                raise ProviderRejected(
                    "the checkout session is already complete and can no longer be canceled"
                ) from None
            raise

    async def _deactivate_link(self, payment: Payment) -> None:
        await self._client.v1.payment_links.update_async(
            payment.provider_payment_id,
            params={"active": False},
            options={"idempotency_key": f"{payment.idempotency_key}:deactivate"},
        )
        # Deactivating stops new sessions; one a customer opened before may still be on
        # screen. Expire those too, so closing the link leaves nothing payable.
        sessions = self._client.v1.checkout.sessions
        for session in await self._link_sessions(payment.provider_payment_id, "open"):
            try:
                await sessions.expire_async(
                    session.id,
                    options={"idempotency_key": f"{payment.idempotency_key}:expire:{session.id}"},
                )
            except stripe.InvalidRequestError:
                # Completed or expired meanwhile: not open any more, which is the aim.
                # (A completed one is found by fetch_state, which the expirer asks next.)
                current = await sessions.retrieve_async(session.id)
                if current.status == "open":
                    raise

    async def _cancel_subscription(self, subscription_id: str) -> None:
        subscriptions = self._client.v1.subscriptions
        try:
            await subscriptions.cancel_async(subscription_id)
        except stripe.InvalidRequestError:
            # Stripe answers a second cancel "No such subscription": look before failing.
            subscription = await subscriptions.retrieve_async(subscription_id)
            if subscription.status == "canceled":
                return
            raise

    # --- state ------------------------------------------------------------------------

    @stripe_operation("fetch_state")
    async def fetch_state(self, payment: Payment) -> ProviderState:
        """Where the payment stands at Stripe; ``status`` None means nothing to conclude
        yet (the checkout is still open, or there is no provider object to ask about)."""
        with self._deadline("fetch_state", payment):
            return await self._fetch_state(payment)

    async def _fetch_state(self, payment: Payment) -> ProviderState:
        try:
            if payment.provider_subscription_id:
                # Known subscription: its status is the payment's truth from now on.
                state = await self._subscription_state(payment.provider_subscription_id)
                if state.status != PaymentStatus.PAID or payment.provider_charge_id:
                    return state
                return await self._with_money(await self._paid_session(payment), state)
            if not payment.provider_payment_id:
                return ProviderState(None)
            if payment.payment_method == PaymentMethod.HOSTED_CARD:
                return await self._session_state(payment.provider_payment_id)
            if payment.payment_method == PaymentMethod.PAYMENT_LINK:
                return await self._link_state(payment.provider_payment_id)
        except stripe.StripeError as exc:
            _raise_mapped(exc, "fetch_state", payment)
        raise ProviderRejected(
            f"payment method {payment.payment_method.name} is not supported by Stripe"
        )

    async def _session_state(self, session_id: str) -> ProviderState:
        session = await self._client.v1.checkout.sessions.retrieve_async(session_id)
        if session.status == "expired":
            return ProviderState(PaymentStatus.EXPIRED)
        return await self._completed_state(session)

    async def _link_state(self, link_id: str) -> ProviderState:
        """A link is paid when one of its sessions is: a paid one wins over one whose
        money is still on its way; none completed concludes nothing (a deactivated link
        included: whoever deactivated it also moved the payment)."""
        under_way: ProviderState | None = None
        for session in await self._link_sessions(link_id, "complete"):
            state = await self._completed_state(session)
            if state.status == PaymentStatus.PAID:
                return state
            if under_way is None and state.status is not None:
                under_way = state
        return under_way or ProviderState(None)

    async def _completed_state(self, session: Any) -> ProviderState:
        """The state of a (possibly) completed session: its subscription's once it has one,
        else its payment_status (complete but unpaid: a delayed method, money on its way)."""
        subscription_id = _object_id(session.subscription)
        if subscription_id:
            state = await self._subscription_state(subscription_id)
        elif session.payment_status in _PAID:
            state = ProviderState(PaymentStatus.PAID)
        elif session.status == "complete":
            return ProviderState(PaymentStatus.PROCESSING)
        else:
            return ProviderState(None)
        if state.status != PaymentStatus.PAID:
            return state
        return await self._with_money(session, state)

    async def _with_money(self, session: Any | None, state: ProviderState) -> ProviderState:
        """``state`` (PAID) with the PaymentIntent and charge that paid the ``session``:
        a payment made PAID by the reconciler (its checkout event lost) is then still
        found by the refund events of its money. Unchanged when no money moved (a
        checkout that needed no payment)."""
        intent_id = await self._intent_of_session(session)
        if not intent_id:
            return state
        intent = await self._client.v1.payment_intents.retrieve_async(intent_id)
        return ProviderState(
            state.status,
            state.subscription_id,
            payment_intent=intent_id,
            charge=_object_id(intent.latest_charge),
        )

    async def _subscription_state(self, subscription_id: str) -> ProviderState:
        subscription = await self._client.v1.subscriptions.retrieve_async(subscription_id)
        return ProviderState(
            SUBSCRIPTION_STATUS.get(subscription.status), subscription_id=subscription.id
        )

    async def expired_checkouts(
        self, payments: Sequence[Payment], listing: ExpiredListing
    ) -> set[str]:
        """The ids among ``payments``' Checkout Sessions that Stripe lists as expired.

        Listings (100 sessions a page) of the expired sessions created around the
        payments' creation, instead of one retrieve per payment; only the part of that
        span ``listing`` has not listed yet this pass. Only hosted-card payments without
        a subscription are looked for; an expired session was never paid (Stripe
        expires only open sessions), so each one found may be concluded EXPIRED.
        """
        wanted = {
            p.provider_payment_id
            for p in payments
            if p.payment_method == PaymentMethod.HOSTED_CARD
            and p.provider_payment_id
            and not p.provider_subscription_id
        }
        if not wanted:
            return set()
        created = [int(p.created_at.timestamp()) for p in payments]
        low, high = min(created) - _CREATED_WINDOW_S, max(created) + _CREATED_WINDOW_S
        try:
            if listing.span is None:
                listing.ids |= await self._expired_between(low, high)
                listing.span = (low, high)
            else:
                done_low, done_high = listing.span
                if low < done_low:
                    listing.ids |= await self._expired_between(low, done_low - 1)
                if high > done_high:
                    listing.ids |= await self._expired_between(done_high + 1, high)
                listing.span = (min(low, done_low), max(high, done_high))
        except stripe.StripeError as exc:
            _raise_mapped(exc, "expired_checkouts", payments[0])
        return wanted & listing.ids

    async def _expired_between(self, low: int, high: int) -> set[str]:
        """Every expired session created in [low, high] (unix seconds), all pages.

        Through the SDK's raw request (its auth, retries and errors) without its object
        layer: only the ids are wanted, and building 100 StripeObjects a page was most of
        the expirer's CPU (py-spy, bench expiry)."""
        params: dict[str, Any] = {
            "status": "expired",
            "created": {"gte": low, "lte": high},
            "limit": _LIST_PAGE,
        }
        found: set[str] = set()
        while True:
            response = await self._client.raw_request_async(
                "get", "/v1/checkout/sessions", **params
            )
            page = response.data
            sessions = page.get("data") or []
            found.update(str(session["id"]) for session in sessions)
            if not page.get("has_more") or not sessions:
                return found
            params = {**params, "starting_after": sessions[-1]["id"]}

    async def _link_sessions(self, link_id: str, status: str) -> list[Any]:
        """Every session of a payment link in ``status``, newest first (all pages)."""
        params = SessionListParams(payment_link=link_id, status=status, limit=_LIST_PAGE)
        found: list[Any] = []
        while True:
            page = await self._client.v1.checkout.sessions.list_async(params=params)
            found.extend(page.data)
            if not page.has_more or not page.data:
                return found
            params = SessionListParams(
                payment_link=link_id,
                status=status,
                limit=_LIST_PAGE,
                starting_after=page.data[-1].id,
            )

    # --- refunds ----------------------------------------------------------------------

    async def create_refund(self, payment: Payment, refund: Refund) -> ProviderRefund:
        """``refunds.create`` against the PaymentIntent that paid (see
        :meth:`_payment_intent`), with the refund's idempotency key. Every parameter is
        derived from stored values, so a retry sends the same request."""
        try:
            intent_id = await self._payment_intent(payment)
            params: dict[str, Any] = {
                "payment_intent": intent_id,
                "amount": refund.amount_cents,
                "metadata": refund_metadata(refund),
            }
            if refund.reason:
                params["reason"] = refund.reason
            made = await self._client.v1.refunds.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": refund.idempotency_key},
            )
        except stripe.StripeError as exc:
            _raise_mapped(exc, "create_refund", payment)
        return provider_refund(made)

    async def retrieve_refund(self, provider_refund_id: str) -> ProviderRefund:
        try:
            found = await self._client.v1.refunds.retrieve_async(provider_refund_id)
        except stripe.StripeError as exc:
            _raise_mapped(exc, "retrieve_refund", None)
        return provider_refund(found)

    async def find_refund(self, payment: Payment, refund: Refund) -> ProviderRefund | None:
        """The Stripe refund whose metadata names ``refund.id``, among the refunds of the
        payment's PaymentIntent (every page); None when Stripe has none."""
        try:
            intent_id = await self._payment_intent(payment)
            params: dict[str, Any] = {"payment_intent": intent_id, "limit": _LIST_PAGE}
            while True:
                page = await self._client.v1.refunds.list_async(params=params)  # type: ignore[arg-type]
                for item in page.data:
                    found = provider_refund(item)
                    if found.refund_id == refund.id:
                        return found
                if not page.has_more or not page.data:
                    return None
                params = {**params, "starting_after": page.data[-1].id}
        except stripe.StripeError as exc:
            _raise_mapped(exc, "find_refund", payment)

    async def payment_intent_of(self, payment: Payment) -> str:
        """:meth:`_payment_intent` for the event side ("" when the payment has none)."""
        try:
            return await self._payment_intent(payment)
        except ProviderRejected:
            return ""
        except stripe.StripeError as exc:
            _raise_mapped(exc, "payment_intent_of", payment)

    @stripe_operation("callback_hash_of_intent")
    async def callback_hash_of_intent(self, payment_intent: str) -> str:
        """The ``metadata.callback_hash`` of the Checkout Session ``payment_intent``
        paid; "" when Stripe ties it to none of ours."""
        with self._deadline("callback_hash_of_intent", None):
            try:
                return await self._callback_hash_of_intent(payment_intent)
            except stripe.StripeError as exc:
                _raise_mapped(exc, "callback_hash_of_intent", None)

    async def _callback_hash_of_intent(self, intent_id: str) -> str:
        """Stripe lists sessions by the PaymentIntent they made. A subscription's
        session made none (its first invoice did): then the intent's customer's
        completed sessions (the first page) are searched for the one whose first
        invoice that intent paid."""
        sessions = self._client.v1.checkout.sessions
        page = await sessions.list_async(
            params=SessionListParams(payment_intent=intent_id, limit=1)
        )
        for session in page.data:
            return _callback_hash(session)
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(intent_id)
        except stripe.InvalidRequestError:
            return ""  # no such PaymentIntent in this account
        customer = _object_id(intent.customer)
        if not customer:
            return ""
        page = await sessions.list_async(
            params=SessionListParams(customer=customer, status="complete", limit=_LIST_PAGE)
        )
        for session in page.data:
            if _object_id(session.invoice) and await self._intent_of_session(session) == intent_id:
                return _callback_hash(session)
        return ""

    async def _payment_intent(self, payment: Payment) -> str:
        """The PaymentIntent that paid ``payment``: stored once known; else the paid
        Checkout Session's (for a Payment Link, its completed session's; see
        :meth:`_intent_of_session`)."""
        if payment.provider_payment_intent_id:
            return payment.provider_payment_intent_id
        intent_id = await self._intent_of_session(await self._paid_session(payment))
        if not intent_id:
            raise ProviderRejected("the payment has no PaymentIntent at Stripe to refund")
        return intent_id

    async def _intent_of_session(self, session: Any | None) -> str:
        """The PaymentIntent that paid ``session`` ("" when none did): its own, or for a
        subscription the one that paid its first invoice (Stripe's current API names
        it through ``invoice_payments``, no longer on the invoice)."""
        if session is None:
            return ""
        intent_id = _object_id(session.payment_intent)
        invoice_id = _object_id(session.invoice)
        if intent_id or not invoice_id:
            return intent_id
        page = await self._client.v1.invoice_payments.list_async(
            params={"invoice": invoice_id, "limit": _LIST_PAGE}
        )
        return next(
            (
                _object_id(item.payment.payment_intent)
                for item in page.data
                if item.payment is not None and item.payment.payment_intent
            ),
            "",
        )

    async def _paid_session(self, payment: Payment) -> Any | None:
        if not payment.provider_payment_id:
            return None
        sessions = self._client.v1.checkout.sessions
        if payment.payment_method == PaymentMethod.PAYMENT_LINK:
            completed = await self._link_sessions(payment.provider_payment_id, "complete")
            paid = [s for s in completed if s.payment_status in _PAID]
            return (paid or completed or [None])[0]
        return await sessions.retrieve_async(payment.provider_payment_id)

    async def aclose(self) -> None:
        await self._http.close_async()


# Stripe's refund statuses; ``requires_action`` waits on the customer: still pending.
REFUND_STATUS: dict[str, RefundStatus] = {
    "pending": RefundStatus.PENDING,
    "requires_action": RefundStatus.PENDING,
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.CANCELED,
}


def refund_metadata(refund: Refund) -> dict[str, str]:
    """The caller's metadata plus ``request_id`` and ``refund_id`` (ours win), sorted so
    a retry sends byte-identical parameters."""
    return {
        **dict(sorted(refund.metadata.items())),
        "request_id": refund.request_id,
        "refund_id": str(refund.id),
    }


def provider_refund(obj: Any) -> ProviderRefund:
    """A Stripe refund (SDK object or the event's plain dict) as a ProviderRefund."""
    data: dict[str, Any] = obj if isinstance(obj, dict) else obj.to_dict()
    get = data.get
    metadata = get("metadata") or {}
    refund_id = str(metadata.get("refund_id") or "")
    return ProviderRefund(
        provider_refund_id=str(get("id") or ""),
        status=REFUND_STATUS.get(str(get("status") or ""), RefundStatus.PENDING),
        amount_cents=int(get("amount") or 0),
        currency=str(get("currency") or "").upper(),
        failure_reason=str(get("failure_reason") or ""),
        reason=str(get("reason") or ""),
        payment_intent_id=_object_id(get("payment_intent")),
        charge_id=_object_id(get("charge")),
        refund_id=int(refund_id) if refund_id.isdigit() else 0,
        request_id=str(metadata.get("request_id") or ""),
    )


def _callback_hash(session: Any) -> str:
    """Our ``metadata.callback_hash`` on a Checkout Session ("" when it has none)."""
    metadata = session.to_dict().get("metadata") or {}
    return str(metadata.get("callback_hash") or "")


def _object_id(value: Any) -> str:
    """The id of a reference Stripe sends as an id string or, when expanded, an object."""
    if not value:
        return ""
    if isinstance(value, str):
        return value
    return str(value.get("id") or "") if isinstance(value, dict) else str(value.id)


def _quiet_sdk_logger() -> None:
    """The SDK logs every request at INFO on the ``stripe`` logger, and its error
    messages, which for a wrong key end with the key's last characters. Keep that out
    of the service's logs unless someone chose a level for ``stripe`` on purpose."""
    sdk_logger = logging.getLogger("stripe")
    if sdk_logger.level == logging.NOTSET:
        sdk_logger.setLevel(logging.WARNING)


def _raise_mapped(exc: stripe.StripeError, operation: str, payment: Payment | None) -> NoReturn:
    """Raise the domain error for a Stripe error, logging what is safe to log."""
    extra = {
        "operation": operation,
        "payment_id": payment.id if payment is not None else 0,
        "stripe_error": type(exc).__name__,
        "http_status": exc.http_status,
        "stripe_code": exc.code,
        "stripe_request_id": exc.request_id,
    }
    if isinstance(exc, _REJECTED):
        message = exc.user_message or "the payment provider rejected the request"
        log.info("stripe rejected the request: %s", message, extra=extra)
        raise ProviderRejected(message) from None
    # No message here: for auth errors Stripe's quotes part of the key.
    log.warning("stripe unavailable", extra=extra)
    raise ProviderUnavailable(UNAVAILABLE_MESSAGE) from None
