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

Layers: ``forms`` (bracket encoding), ``params`` (schemas, Stripe errors), ``state``
(objects, log, events, faults), ``api`` (routes, auth, idempotency), ``server`` (trio +
h11), ``webhooks`` (signed event delivery), ``control`` (HTTP control routes for a
separate process), ``__main__`` (CLI).
"""

from payments.sandbox.api import ApiRequest, ApiResponse, StripeApi
from payments.sandbox.forms import encode_form, parse_form
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
    "serve_sandbox",
    "stripe_signature",
]
