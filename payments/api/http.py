"""The HTTP (JSON) transport: quart-trio routes of CONTRACT.md served by hypercorn.

Every route but ``/healthz`` and the checkout-return page checks ``X-Request-ID``
first (400; at most 128 characters, like a request_id field), then ``X-API-Key``
(401/403 through the Auth service), then decodes input; unknown paths and methods are
404/405 only after that, and no path is ever redirected. A request carrying both
``Content-Length`` and ``Transfer-Encoding`` is refused (400, connection closed). The
use cases are ``PaymentService``'s. Errors map through one table
(payments.api.transport) and are ``{"error": "..."}``; even Quart's own (404, 405) are
JSON. The request id is echoed on every response, errors included, and each request
writes one access line. (Malformed HTTP/2 header blocks never reach the app:
payments/h2_streams.py answers them 400 on their own stream.)

Body limit: a body over ``PAYMENTS_MAX_BODY_BYTES`` answers **400** ``body: request body too
large``, whether announced by Content-Length or streamed chunked (Quart's body buffer
stops collecting at the limit), with ``Connection: close``: the rest of the body is never
read, so the connection ends after the answer and the client is told.

Provider callbacks (``POST /webhooks/providers/{provider}/{hash}``) keep both headers,
as CONTRACT.md says of every route. Stripe cannot call the route itself: its webhook
endpoints are fixed URLs, while the hash differs per payment, so an upstream gateway
receives Stripe's events and forwards each to its payment's URL, adding
``X-Request-ID`` and its ``X-API-Key`` like on any call (or wrapping the event in the
envelope form). The key says who forwards; the provider's signature, checked by the
service, says the event is genuine; neither stands in for the other. The answer is
``{"message": "Provider callback processed", "payment": {...}}`` (the payment, as
gRPC's MessageResponse carries it, is an addition); a replayed event is answered the
same way and changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from payments.api import wire
from payments.api.http_direct import direct_payment_reads
from payments.api.http_rules import (
    API_KEY_HEADER,
    DRAINING,
    REQUEST_ID_HEADER,
    authenticate,
    checked_request_id,
    error_answer,
    error_body,
    write_access_line,
)
from payments.api.operations import OPEN_ENDPOINTS as OPERATIONS_ENDPOINTS
from payments.api.operations import add_operations_routes
from payments.api.transport import (
    CALLBACK_PROCESSED,
    INTERNAL_MESSAGE,
)
from payments.auth import Authenticator
from payments.callbacks import CallbackOperations
from payments.config import Settings
from payments.errors import Unauthenticated
from payments.inbound import ProviderEvents
from payments.model import Caller
from payments.observability.transports import instrument_http_app
from payments.readiness import Readiness
from payments.service import PaymentService
from payments.validation import validate_create, validate_refund

log = logging.getLogger("payments.api.http")

# Endpoints that need neither header: the orchestrator's probe.
# ``checkout_return``: the customer's browser, sent back by Stripe after checkout.
# ``OPERATIONS_ENDPOINTS``: /readyz and /openapi.json (payments.api.operations).
# ``provider_event``: the provider itself (Stripe's one webhook endpoint), which sends
# neither header; its signature is what authenticates it.
_OPEN_ENDPOINTS = frozenset({"healthz", "checkout_return", "provider_event"}) | OPERATIONS_ENDPOINTS
HEALTHZ_DB_TIMEOUT_SECONDS = 2.0

# Messages for Quart/werkzeug's own errors (unknown route, wrong method, ...).
_HTTP_MESSAGES = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    431: "request headers too large",
}


def _json(document: Mapping[str, Any], status: int = 200) -> Response:
    return Response(wire.dumps(document), status=status, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return Response(error_body(message), status=status, content_type="application/json")


def _caller() -> Caller:
    caller: Caller | None = g.get("caller")
    if caller is None:  # only the open endpoints run without one, and they never ask
        raise Unauthenticated("X-API-Key header is required")
    return caller


async def _body() -> bytes:
    return await request.get_data(cache=False, as_text=False, parse_form_data=False)


def create_http_app(
    service: PaymentService,
    inbound: ProviderEvents,
    authenticator: Authenticator,
    settings: Settings,
    health: Callable[[], Mapping[str, Any]] | None = None,
    readiness: Readiness | None = None,
    callbacks: CallbackOperations | None = None,
    *,
    direct_reads: bool = True,
) -> QuartTrio:
    """The HTTP app. ``health`` adds details (supervisor snapshot, ...) to ``/healthz``;
    ``readiness`` answers ``/readyz`` (default: the service's database only);
    ``callbacks`` defaults to the callback operations over the service's unit of work;
    ``direct_reads``: plain ``GET /payments/{id}`` skips Quart (payments.api.http_direct;
    off only to compare the two paths)."""
    app = QuartTrio(__name__, static_folder=None)  # no /static/ route: not in the contract
    if direct_reads:
        direct_payment_reads(app, service, authenticator)
    instrument_http_app(app)  # first, so its hook sees the route before auth can fail
    max_body = settings.max_body_bytes
    app.config.update(
        MAX_CONTENT_LENGTH=max_body,
        # No unauthenticated OPTIONS answers on the API routes.
        PROVIDE_AUTOMATIC_OPTIONS=False,
        BODY_TIMEOUT=30,
        SHUTDOWN_GRACE_SECONDS=settings.shutdown_grace_seconds,
    )
    app.config[DRAINING] = False
    # ``/payments//1`` would be a 308 to ``Location: http://<caller's Host>/payments/1``.
    app.url_map.merge_slashes = False
    callback_policy = settings.callback_policy()

    @app.before_request
    async def begin() -> Response | None:
        """Framing, then the request id, then the key (the order CONTRACT.md fixes).

        Nothing but the open endpoints answers before authentication: an unknown path or
        method is a 404/405 only for an authenticated caller.
        """
        # The objects behind Quart's proxies, looked up once (each proxied access is a
        # context lookup: ~20 of them per request in these two hooks).
        state, current = g._get_current_object(), request._get_current_object()
        headers = current.headers
        state.started = time.perf_counter()
        state.request_id = ""
        state.caller = None
        if headers.get("Transfer-Encoding") and headers.get("Content-Length"):
            # Request smuggling: two framings, and a proxy in front may have used the other.
            state.close_connection = True
            return _error(400, "Transfer-Encoding: not allowed with Content-Length")
        state.request_id = checked_request_id(headers.get(REQUEST_ID_HEADER, ""))
        if current.endpoint in _OPEN_ENDPOINTS and current.scope.get("path") == current.path:
            # /healthz and the checkout page need no headers; only their canonical
            # spelling (Quart's request.path drops leading slashes: ``//healthz``).
            return None
        state.caller = await authenticate(
            authenticator, state.request_id, headers.get(API_KEY_HEADER, "")
        )
        return None

    @app.after_request
    async def finish(response: Response) -> Response:
        """Echo the request id and write the access line."""
        state, current = g._get_current_object(), request._get_current_object()
        request_id = state.get("request_id", "")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        closing = app.config[DRAINING] or state.get("close_connection", False)
        if closing and current.http_version.startswith("1"):
            # A response finished during shutdown, or one that leaves the request body
            # unread (too large, ambiguous framing): the connection is closed after it,
            # so say so and the client opens a new one for its next request.
            # hypercorn's own close of it gets cancelled by quart-trio's request nursery,
            # so without this a keep-alive client holds the shutdown for the whole grace
            # period. (HTTP/2 forbids the header; h2 connections get GOAWAY instead.)
            response.headers["Connection"] = "close"
        write_access_line(
            method=current.method,
            rule=current.url_rule.rule if current.url_rule is not None else "-",
            path=current.path,
            status=response.status_code,
            started=state.get("started", time.perf_counter()),
            request_id=request_id,
            caller=state.get("caller"),
            payment_id=state.get("payment_id"),
            probe=current.endpoint in _OPEN_ENDPOINTS,
        )
        return response

    @app.errorhandler(HTTPException)
    async def http_exception(exc: HTTPException) -> Response:
        status = exc.code or 500
        if 300 <= status < 400:
            # werkzeug's routing redirects (slashes) build Location from the caller's Host.
            return _error(404, _HTTP_MESSAGES[404])
        if status >= 500:
            return _error(status, INTERNAL_MESSAGE)
        if status == 413:
            # Bad input like any other: 400 naming what is wrong (CONTRACT.md), not 413.
            g.close_connection = True  # the rest of the body is never read
            return _error(400, f"body: request body too large (limit {max_body} bytes)")
        return _error(status, _HTTP_MESSAGES.get(status, (exc.name or "error").lower()))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        answer = error_answer(exc)
        if answer is not None:
            return _error(*answer)
        log.error(
            "unhandled error",
            exc_info=exc,
            extra={"request_id": g.get("request_id", ""), "route": request.path},
        )
        return _error(500, INTERNAL_MESSAGE)

    # --- routes -------------------------------------------------------------------------

    @app.get("/health")
    async def health_route() -> Response:
        return _json({"status": "ok"})

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness/readiness for orchestrators: 503 when the database does not answer."""
        document: dict[str, Any] = {}
        if health is not None:
            try:
                document.update(health())
            except Exception:
                log.exception("health details failed")
                document["details"] = "unavailable"
        database = "ok"
        try:
            with trio.fail_after(HEALTHZ_DB_TIMEOUT_SECONDS):
                await service.ping_database()
        except Exception as exc:  # TooSlowError, DependencyUnavailable, anything
            log.warning("database ping failed", extra={"error": type(exc).__name__})
            database = "unavailable"
        document["database"] = database
        document["status"] = "ok" if database == "ok" else "unavailable"
        return _json(document, 200 if database == "ok" else 503)

    @app.post("/payments")
    async def create_payment() -> Response:
        raw = wire.create_input_from_json(wire.parse_json_object(await _body()))
        if not raw.request_id.strip():
            raw = attrs.evolve(raw, request_id=g.request_id)
        payment = await service.create(_caller(), validate_create(raw, callback_policy))
        g.payment_id = payment.id
        return _json({"payment": wire.payment_to_json(payment)}, 201)

    @app.get("/payments/<payment_id>")
    async def get_payment(payment_id: str) -> Response:
        payment = await service.get(_caller(), wire.parse_payment_id(payment_id))
        g.payment_id = payment.id
        return _json({"payment": wire.payment_to_json(payment)})

    @app.get("/payments")
    async def list_payments() -> Response:
        filters = wire.list_filter_from_query(request.args)
        payments = await service.list(_caller(), filters)
        return _json({"payments": [wire.payment_to_json(p) for p in payments]})

    @app.post("/payments/<payment_id>/cancel")
    async def cancel_payment(payment_id: str) -> Response:
        number = wire.parse_payment_id(payment_id)
        reason = wire.cancel_reason_from_json(wire.parse_json_object(await _body(), empty_ok=True))
        payment = await service.cancel(_caller(), number, reason)
        g.payment_id = payment.id
        return _json({"payment": wire.payment_to_json(payment)})

    @app.post("/webhooks/providers/<provider>/<callback_hash>")
    async def provider_callback(provider: str, callback_hash: str) -> Response:
        """A provider event, forwarded by the gateway (see the module docstring)."""
        received = wire.provider_callback_from_http(await _body(), request.headers)
        result = await inbound.receive(
            provider, callback_hash, received.payload, received.signature, g.request_id
        )
        g.payment_id = result.payment.id
        return _json(
            {"message": CALLBACK_PROCESSED, "payment": wire.payment_to_json(result.payment)}
        )

    @app.post("/webhooks/providers/<provider>")
    async def provider_event(provider: str) -> Response:
        """A provider event at the provider's one endpoint (Stripe posts every event of
        the account there): no callback hash, the payment is the one the event names.
        Open like a Stripe endpoint must be (the signature authenticates the event); an
        event naming no known payment is recorded and answered 200 without a payment."""
        g.request_id = g.request_id or f"evt-{uuid.uuid4().hex}"
        received = wire.provider_callback_from_http(await _body(), request.headers)
        result = await inbound.receive_unrouted(
            provider, received.payload, received.signature, g.request_id
        )
        document: dict[str, Any] = {"message": CALLBACK_PROCESSED}
        if result.payment is not None:
            g.payment_id = result.payment.id
            document["payment"] = wire.payment_to_json(result.payment)
        return _json(document)

    @app.get("/webhooks/providers/<provider>/<callback_hash>")
    async def checkout_return(provider: str, callback_hash: str) -> Response:
        """Where Stripe sends the customer's browser after checkout when the caller gave
        no success/cancel URL (``?state=success`` / ``?state=cancel``). A plain page that
        reveals nothing about the payment: the status travels by events, not here."""
        canceled = request.args.get("state") == "cancel"
        title = "Payment canceled" if canceled else "Thank you"
        text = (
            "The payment was not completed. You can close this window."
            if canceled
            else "Your payment is being processed. You can close this window."
        )
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title></head><body><h1>{title}</h1><p>{text}</p></body></html>"
        )
        return Response(
            page,
            status=200,
            content_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": "default-src 'none'", "Cache-Control": "no-store"},
        )

    add_operations_routes(app, readiness or Readiness(service.database))
    _callback_routes(app, callbacks or CallbackOperations(service.unit_of_work))
    _add_refund_routes(app, service)
    _shield_sends(app)
    return app


def _callback_routes(app: QuartTrio, callbacks: CallbackOperations) -> None:
    """A payment's delivery log and resend (CONTRACT.md "Callback deliveries")."""

    @app.get("/payments/<payment_id>/callbacks")
    async def list_callback_deliveries(payment_id: str) -> Response:
        number = wire.parse_payment_id(payment_id)
        found = await callbacks.deliveries(_caller(), number)
        g.payment_id = number
        return _json({"deliveries": [wire.delivery_to_json(d) for d in found]})

    @app.post("/payments/<payment_id>/callbacks/resend")
    async def resend_callback(payment_id: str) -> Response:
        number = wire.parse_payment_id(payment_id)
        delivery = await callbacks.resend(_caller(), number)
        g.payment_id = number
        return _json({"delivery": wire.delivery_to_json(delivery)}, 202)


def _add_refund_routes(app: QuartTrio, service: PaymentService) -> None:
    """CONTRACT.md "Refunds": create (201, replays too), list a payment's, get one."""

    @app.post("/payments/<payment_id>/refunds")
    async def create_refund(payment_id: str) -> Response:
        number = wire.parse_payment_id(payment_id)
        body = wire.parse_json_object(await _body(), empty_ok=True)  # every field optional
        raw = wire.refund_input_from_json(body, number)
        if not raw.request_id.strip():
            raw = attrs.evolve(raw, request_id=g.request_id)
        caller = _caller()
        refund = await service.refunds.create(caller, validate_refund(raw, caller.service_name))
        g.payment_id = refund.payment_id
        return _json({"refund": wire.refund_to_json(refund)}, 201)

    @app.get("/payments/<payment_id>/refunds")
    async def list_refunds(payment_id: str) -> Response:
        number = wire.parse_payment_id(payment_id)
        refunds = await service.refunds.list(_caller(), number)
        g.payment_id = number
        return _json({"refunds": [wire.refund_to_json(refund) for refund in refunds]})

    @app.get("/refunds/<refund_id>")
    async def get_refund(refund_id: str) -> Response:
        refund = await service.refunds.get(_caller(), wire.parse_payment_id(refund_id))
        g.payment_id = refund.payment_id
        return _json({"refund": wire.refund_to_json(refund)})


def _shield_sends(app: QuartTrio) -> None:
    """Let every ASGI ``send`` finish even when quart-trio cancels the request.

    hypercorn does its end-of-request bookkeeping (recycling or closing the connection,
    starting the keep-alive idle timer) inside the app's final ``send``; quart-trio
    cancels the request nursery when hypercorn signals ``http.disconnect`` just before,
    cutting that bookkeeping in half. Then a connection answered early (400/401/413
    before the body arrived) hangs its next request, and an idle keep-alive connection
    holds a graceful shutdown for the whole grace period (e2e/test_keepalive.py).
    """
    inner = app.asgi_app

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await inner(scope, receive, shielded_send)

    app.asgi_app = asgi_app  # type: ignore[method-assign]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


async def serve_http(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    grace_seconds: float | None = None,
) -> None:
    """Serve ``app`` with hypercorn on host:port until ``shutdown_trigger`` returns.

    Reports the bound port through ``task_status`` (so port 0 works). When the trigger
    returns, the listener closes and requests in flight get ``grace_seconds`` (default:
    the app's ``PAYMENTS_SHUTDOWN_GRACE_SECONDS``) to finish. hypercorn's access log is
    off: the app writes its own, with request id and caller.
    """
    config = HypercornConfig()
    config.bind = [_bind(host, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = (
        grace_seconds
        if grace_seconds is not None
        else float(app.config.get("SHUTDOWN_GRACE_SECONDS", 10.0))
    )
    trigger = None
    if shutdown_trigger is not None:
        stop = shutdown_trigger

        async def trigger() -> None:
            await stop()
            app.config[DRAINING] = True

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=trigger)
        )
        task_status.started(_port_of(binds[0]))
