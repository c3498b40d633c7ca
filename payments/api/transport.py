"""What both transports share: the two error tables.

Error tables: domain error -> HTTP status, domain error -> gRPC status code. Both
transports answer the same error the same way, so the tables sit side by side.
Anything not listed is unexpected: 500 / INTERNAL with the fixed message
``internal server error`` (the details go to the log, never to the caller).
"""

from __future__ import annotations

from typing import TypeVar

from purerpc import StatusCode

from payments.errors import (
    AlreadyExists,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PaymentsError,
    PermissionDenied,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    Unauthenticated,
)
from payments.validation import MAX_ID_LENGTH

INTERNAL_MESSAGE = "internal server error"
# The answer to an accepted provider event (applied, recorded or replayed alike).
CALLBACK_PROCESSED = "Provider callback processed"


T = TypeVar("T")

HTTP_STATUS: dict[type[PaymentsError], int] = {
    InvalidArgument: 400,
    ProviderRejected: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    AlreadyExists: 409,
    FailedPrecondition: 409,
    ProviderUnavailable: 502,
    ProviderTimeout: 504,
    DependencyUnavailable: 503,
}

GRPC_STATUS: dict[type[PaymentsError], StatusCode] = {
    InvalidArgument: StatusCode.INVALID_ARGUMENT,
    ProviderRejected: StatusCode.INVALID_ARGUMENT,
    Unauthenticated: StatusCode.UNAUTHENTICATED,
    PermissionDenied: StatusCode.PERMISSION_DENIED,
    NotFound: StatusCode.NOT_FOUND,
    AlreadyExists: StatusCode.ALREADY_EXISTS,
    FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    ProviderUnavailable: StatusCode.UNAVAILABLE,
    ProviderTimeout: StatusCode.UNAVAILABLE,
    DependencyUnavailable: StatusCode.UNAVAILABLE,
}


def request_id(value: str, name: str) -> str:
    """The caller's request id (``X-Request-ID`` / ``x-request-id``), trimmed.

    Echoed on the answer and written to every log line, so it is bounded like the
    request_id field of a create, on every route and method; longer is refused.
    """
    value = value.strip()
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(name, f"must be at most {MAX_ID_LENGTH} characters")
    return value


def domain_error(exc: BaseException) -> PaymentsError | None:
    """The domain error ``exc`` stands for, if any.

    An exception group holding exactly one domain error (a nursery inside storage or a
    provider may wrap it) counts as that error; anything else is unexpected.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, PaymentsError) and type(exc) is not PaymentsError:
        return exc
    return None


def _lookup(table: dict[type[PaymentsError], T], exc: PaymentsError) -> T | None:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]  # type: ignore[index]
    return None


def http_status(exc: PaymentsError) -> int | None:
    """The HTTP status of a domain error; None means unexpected (answer 500)."""
    return _lookup(HTTP_STATUS, exc)


def grpc_status(exc: PaymentsError) -> StatusCode | None:
    """The gRPC code of a domain error; None means unexpected (answer INTERNAL)."""
    return _lookup(GRPC_STATUS, exc)
