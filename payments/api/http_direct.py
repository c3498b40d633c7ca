"""``GET /payments/{id}`` answered straight from ASGI, ahead of Quart.

It is the read every caller polls. Quart's per-request machinery (a request context,
werkzeug's routing, a Response object, a nursery per request, a cancel scope per send)
cost more CPU than the database read itself (bench/README.md, "This round: reads"), so a plain read
skips it. Plain means: method ``GET``, a path that is exactly ``/payments/<one
segment>``, no ``Content-Length`` and no ``Transfer-Encoding``. Everything else is
Quart's, as is every rule this path shares: the headers' order and checks, the error
answers and the access line come from payments.api.http_rules, the body from
payments.api.wire. Answers and access lines are the same on both paths:
tests/test_http_direct.py sends the same requests to an app with and without this path
and compares them.

Install it before ``instrument_http_app`` so the request is still counted and traced.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from quart_trio import QuartTrio

from payments.api import wire
from payments.api.http_rules import (
    DRAINING,
    authenticate,
    checked_request_id,
    error_answer,
    error_body,
    write_access_line,
)
from payments.api.transport import INTERNAL_MESSAGE
from payments.auth import Authenticator
from payments.model import Caller
from payments.observability.transports import note_http_route
from payments.service import PaymentService

log = logging.getLogger("payments.api.http")

RULE = "/payments/<payment_id>"
# werkzeug's default converter: one non-empty segment.
_PATH = re.compile(r"/payments/([^/]+)")
_BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_JSON = (b"content-type", b"application/json")


def direct_payment_reads(
    app: QuartTrio, service: PaymentService, authenticator: Authenticator
) -> None:
    """Answer plain ``GET /payments/{id}`` requests of ``app`` without Quart."""
    inner = app.asgi_app

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            match = _PATH.fullmatch(scope["path"])
            if match is not None:
                headers = _headers_of_plain_request(scope["headers"])
                if headers is not None:
                    await _get_payment(app, service, authenticator, scope, send, match, headers)
                    return
        await inner(scope, receive, send)

    app.asgi_app = asgi_app  # type: ignore[method-assign]


def _headers_of_plain_request(raw: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """The first ``X-Request-ID`` and ``X-API-Key`` values ("" when absent), as werkzeug
    reads them; None when the request frames a body (Quart then decides)."""
    request_id = api_key = None
    for name, value in raw:
        if name == b"x-request-id":
            if request_id is None:
                request_id = value.decode("latin-1")
        elif name == b"x-api-key":
            if api_key is None:
                api_key = value.decode("latin-1")
        elif name in _BODY_FRAMING:
            return None
    return request_id or "", api_key or ""


async def _get_payment(
    app: QuartTrio,
    service: PaymentService,
    authenticator: Authenticator,
    scope: Any,
    send: Any,
    match: re.Match[str],
    headers: tuple[str, str],
) -> None:
    started = time.perf_counter()
    note_http_route(RULE)
    request_id = ""
    caller: Caller | None = None
    payment_id: int | None = None
    try:
        request_id = checked_request_id(headers[0])
        caller = await authenticate(authenticator, request_id, headers[1])
        payment = await service.get(caller, wire.parse_payment_id(match.group(1)))
        payment_id = payment.id
        status, body = 200, wire.dumps({"payment": wire.payment_to_json(payment)})
    except Exception as exc:
        answer = error_answer(exc)
        if answer is None:
            log.error(
                "unhandled error",
                exc_info=exc,
                extra={"request_id": request_id, "route": scope["path"]},
            )
            answer = 500, INTERNAL_MESSAGE
        status, body = answer[0], error_body(answer[1])
    response_headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if request_id:
        # UTF-8, as Quart encodes header values: a non-ASCII id, read as latin-1, comes
        # back UTF-8 encoded on both paths.
        response_headers.append((b"x-request-id", request_id.encode()))
    if app.config[DRAINING] and scope["http_version"].startswith("1"):
        response_headers.append((b"connection", b"close"))  # see http.py's finish()
    # Written before the answer goes out, as Quart's after_request hook writes it.
    write_access_line(
        method="GET",
        rule=RULE,
        path=scope["path"],
        status=status,
        started=started,
        request_id=request_id,
        caller=caller,
        payment_id=payment_id,
    )
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
