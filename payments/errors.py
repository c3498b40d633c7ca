"""Domain errors. The transports map them to HTTP and gRPC status codes in one table
(payments/api/transport.py); the messages are safe to show callers."""

from __future__ import annotations


class PaymentsError(Exception):
    """Base of every error the service answers on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PaymentsError):
    """Bad input: 400 / INVALID_ARGUMENT. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class BadSignature(InvalidArgument):
    """A provider callback whose signature is missing, wrong or stale: 400."""

    def __init__(self, problem: str) -> None:
        super().__init__("signature", problem)


class Unauthenticated(PaymentsError):
    """Missing or unknown API key: 401 / UNAUTHENTICATED."""


class PermissionDenied(PaymentsError):
    """The key is valid but may not do this: 403 / PERMISSION_DENIED."""


class NotFound(PaymentsError):
    """No such payment, or another caller's: 404 / NOT_FOUND."""


class AlreadyExists(PaymentsError):
    """The request_id names a payment with other parameters: 409 / ALREADY_EXISTS."""


class FailedPrecondition(PaymentsError):
    """The payment's status does not allow this: 409 / FAILED_PRECONDITION."""


class ProviderRejected(PaymentsError):
    """The provider refused the request as invalid: 400 / INVALID_ARGUMENT, its message."""


class ProviderUnavailable(PaymentsError):
    """The provider failed (auth, 5xx, timeout, network): 502 / UNAVAILABLE."""


class ProviderTimeout(ProviderUnavailable):
    """The provider did not answer within its timeout (STRIPE_HTTP_TIMEOUT_SECONDS):
    504 / UNAVAILABLE. Nothing is lost: a retry repeats the call with the same
    idempotency key."""


class DependencyUnavailable(PaymentsError):
    """The database or the Auth service is unreachable: 503 / UNAVAILABLE."""
