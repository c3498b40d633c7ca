"""A Stripe emulator for tests, e2e runs, benchmarks and (later) an embedded dev mode.

It speaks the part of Stripe's v1 API this service uses, well enough that the official
``stripe`` SDK works against it unmodified::

    async with open_sandbox(secret_key="sk_test_x") as sandbox:
        client = stripe.StripeClient(
            sandbox.secret_key,
            base_addresses={"api": sandbox.url},
            http_client=stripe.HTTPXClient(),
        )
        session = await client.v1.checkout.sessions.create_async(params={...})
        sandbox.state.complete_session(session.id)      # drive it
        sandbox.state.count("POST /v1/checkout/sessions")  # inspect it
        sandbox.faults.fail(500, times=2)                # break it
        sandbox.configure_webhook(url, secret)           # post its events, signed
        await sandbox.webhooks.wait_idle()               # ... until all are answered

A browser pays, declines or cancels at each object's ``url`` (``/pay/{id}``, the hosted
checkout page), and ``/_sandbox/dashboard`` lists sessions and the events sent.

Layers: ``forms`` (bracket encoding), ``params`` (schemas, Stripe errors), ``ids``,
``state`` (objects, log, events, faults), ``money`` (PaymentIntents, Charges, Refunds),
``store`` (write-through SQLite persistence), ``api`` (routes, auth, idempotency),
``pages`` (hosted checkout and dashboard HTML, with ``refund_panel`` and
``callback_sink``), ``server`` (trio + h11), ``webhooks`` (signed event delivery),
``control`` (HTTP control routes for a separate process), ``child`` (a supervised child
of ``payments serve``), ``__main__`` (CLI).
"""

from payments.sandbox.api import ApiRequest, ApiResponse, StripeApi
from payments.sandbox.child import sandbox_child
from payments.sandbox.forms import encode_form, parse_form
from payments.sandbox.pages import CheckoutPages
from payments.sandbox.server import DEFAULT_SECRET_KEY, Sandbox, open_sandbox, serve_sandbox
from payments.sandbox.state import (
    DeliveryRecord,
    Fault,
    FaultKind,
    Faults,
    RequestRecord,
    SessionStateError,
    StripeState,
    WebhookEndpoint,
)
from payments.sandbox.webhooks import WebhookSender, stripe_signature

__all__ = [
    "DEFAULT_SECRET_KEY",
    "ApiRequest",
    "ApiResponse",
    "CheckoutPages",
    "DeliveryRecord",
    "Fault",
    "FaultKind",
    "Faults",
    "RequestRecord",
    "Sandbox",
    "SessionStateError",
    "StripeApi",
    "StripeState",
    "WebhookEndpoint",
    "WebhookSender",
    "encode_form",
    "open_sandbox",
    "parse_form",
    "sandbox_child",
    "serve_sandbox",
    "stripe_signature",
]
