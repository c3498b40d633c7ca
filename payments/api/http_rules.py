"""What every HTTP request of the API goes through, whichever path serves it.

Two paths answer HTTP: Quart's routes (payments.api.http) and, for a plain
``GET /payments/{id}``, the direct read (payments.api.http_direct). Both take the
headers' rules, the error answers and the access line from here, so they cannot drift.
"""

from __future__ import annotations

import logging
import time

from payments import logs
from payments.api import wire
from payments.api.transport import domain_error, http_status, request_id
from payments.auth import Authenticator
from payments.errors import InvalidArgument, Unauthenticated
from payments.model import Caller

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-API-Key"
# Set on the app's config once serve_http's shutdown trigger fires: every HTTP/1
# answer from then on says ``Connection: close``.
DRAINING = "PAYMENTS_DRAINING"


def checked_request_id(value: str) -> str:
    """The caller's ``X-Request-ID``, trimmed ("" when absent); too long is refused."""
    return request_id(value, REQUEST_ID_HEADER)


async def authenticate(authenticator: Authenticator, request_id: str, api_key: str) -> Caller:
    """The caller of a request on an authenticated route: the request id must be there
    before the key is even looked at (the order CONTRACT.md fixes)."""
    if not request_id:
        raise InvalidArgument(REQUEST_ID_HEADER, "header is required")
    api_key = api_key.strip()
    if not api_key:
        raise Unauthenticated(f"{API_KEY_HEADER} header is required")
    return await authenticator.authenticate(api_key)


def error_answer(exc: BaseException) -> tuple[int, str] | None:
    """The status and message a domain error answers; None when ``exc`` is unexpected
    (the caller then answers 500 and logs it)."""
    error = domain_error(exc)
    status = http_status(error) if error is not None else None
    if error is None or status is None:
        return None
    return status, error.message


def error_body(message: str) -> bytes:
    """The body of every error answer: ``{"error": "..."}``."""
    return wire.dumps({"error": message})


def write_access_line(
    *,
    method: str,
    rule: str,
    path: str,
    status: int,
    started: float,
    request_id: str,
    caller: Caller | None,
    payment_id: int | None,
    probe: bool = False,
) -> None:
    """The one access line of a request; ``probe``: an orchestrator's, at DEBUG (probes
    every few seconds would drown the log)."""
    extra: dict[str, object] = {"method": method, "path": path}
    if payment_id:
        extra["payment_id"] = payment_id
    logs.access_log(
        transport="http",
        route=f"{method} {rule}",
        status=status,
        latency_ms=(time.perf_counter() - started) * 1000,
        request_id=request_id,
        caller=caller.service_name if caller else "",
        level=logging.DEBUG if probe else logging.INFO,
        **extra,
    )
