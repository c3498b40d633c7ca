"""HTTP and gRPC middleware: a server span continuing the caller's ``traceparent``, and
the request counter and latency histogram, for every request.

Label values are bounded: the HTTP route is Quart's rule template
(``/payments/<payment_id>``, ``unmatched`` for a path no route knows), the method one of
the standard verbs (``OTHER`` otherwise), the gRPC method a name the service defines.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

import attrs
from opentelemetry.trace import SpanKind
from purerpc import Cardinality, RpcFailedError
from purerpc.grpclib.events import RequestReceived
from quart import request
from quart_trio import QuartTrio

from payments.observability import metrics, tracing

UNMATCHED = "unmatched"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@attrs.define
class _Exchange:
    """What the middleware learns of one HTTP request from inside the app."""

    route: str = UNMATCHED
    status: int = 500  # until the response starts: an app that died answered nothing


# Set by the ASGI wrapper; the request task quart-trio spawns inherits a copy of the
# context, so it sees the same _Exchange object and fills in the route.
_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("payments_http_exchange", default=None)


def note_http_route(rule: str) -> None:
    """Name the route of the request being observed (for an answer made outside Quart's
    routing: payments.api.http_direct)."""
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.route = rule


def instrument_http_app(app: QuartTrio) -> None:
    """Observe every request of ``app``. Call it before the app's own ``before_request``
    hooks are registered, so the route is known even when authentication fails."""

    @app.before_request
    async def note_route() -> None:
        exchange = _EXCHANGE.get()
        if exchange is not None and request.url_rule is not None:
            exchange.route = request.url_rule.rule

    inner = app.asgi_app

    async def observed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
        exchange = _Exchange()
        token = _EXCHANGE.set(exchange)
        started = time.perf_counter()

        async def send_observed(message: Any) -> None:
            if message["type"] == "http.response.start":
                exchange.status = int(message["status"])
            await send(message)

        parent = tracing.extract(tracing.carrier_from_pairs(scope["headers"]))
        try:
            with tracing.span(method, kind=SpanKind.SERVER, parent=parent) as span:
                try:
                    await inner(scope, receive, send_observed)
                finally:
                    span.update_name(f"{method} {exchange.route}")
                    span.set_attribute("http.request.method", method)
                    span.set_attribute("http.route", exchange.route)
                    span.set_attribute("http.response.status_code", exchange.status)
                    if exchange.status >= 500:
                        tracing.mark_error(span, f"HTTP {exchange.status}")
        finally:
            _EXCHANGE.reset(token)
            duration, requests = metrics.http_series(exchange.route, method, str(exchange.status))
            duration.observe(time.perf_counter() - started)
            requests.inc()

    app.asgi_app = observed  # type: ignore[method-assign]


def observed_method(bound: Any, event: RequestReceived) -> Callable[[Any], Awaitable[Any]]:
    """purerpc's handler for ``event`` (``bound`` from its Service), observed when it is
    unary (the service's methods all are): a server span continuing the metadata's
    ``traceparent``, the call counter by status code, the latency histogram."""
    method_fn = partial(bound.method_fn, request=event)
    if bound.signature.cardinality != Cardinality.UNARY_UNARY:
        return method_fn
    name = event.method_name
    parent = tracing.extract(tracing.carrier_from_pairs(event.custom_metadata))

    async def observed(message: Any) -> Any:
        started = time.perf_counter()
        code = "OK"
        with tracing.span(
            f"{event.service_name}/{name}",
            kind=SpanKind.SERVER,
            parent=parent,
            attributes={"rpc.system": "grpc", "rpc.method": name},
            errors_from_exceptions=False,
        ) as span:
            try:
                return await method_fn(message)
            except RpcFailedError as exc:
                code = exc.status.status_code.name
                raise
            except Exception:
                code = "INTERNAL"
                raise
            except BaseException:
                code = "CANCELLED"
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code)
                if code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"):
                    tracing.mark_error(span, code)
                duration, calls = metrics.grpc_series(name, code)
                duration.observe(time.perf_counter() - started)
                calls.inc()

    return observed
