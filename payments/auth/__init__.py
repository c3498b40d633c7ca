"""Who the caller is: an API key in, the calling service (a Caller) out.

Three sources, one protocol: the Auth service (client.py, production), local keys
(local_keys.py, for deployments without an Auth service and for the dev key of the
embedded profile), and several of them in turn (chain.py). The transports depend on
:class:`Authenticator` only; the runtime picks the implementation. The refusals every
source shares are here, so a caller cannot tell the sources apart by their answers.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Protocol, Self

from payments.errors import Unauthenticated
from payments.model import Caller

MISSING_KEY_MESSAGE = "missing API key"
INVALID_KEY_MESSAGE = "invalid API key"
# Longer keys are refused without a look-up (no real key is this long; it bounds the
# work a caller can make us do).
MAX_API_KEY_LENGTH = 4096


class Authenticator(Protocol):
    """Turns a caller's API key into the calling service. Raises Unauthenticated,
    PermissionDenied or DependencyUnavailable (the Auth service down is never a 401)."""

    async def authenticate(self, api_key: str) -> Caller: ...


def key_digest(api_key: str) -> bytes:
    """The SHA-256 of a presented key, the only form in which a key is kept or compared.

    A blank key is Unauthenticated(MISSING_KEY_MESSAGE); one that no source could hold
    (not encodable as UTF-8, e.g. lone surrogates, or too long) is
    Unauthenticated(INVALID_KEY_MESSAGE), without a look-up.
    """
    if not api_key or not api_key.strip():
        raise Unauthenticated(MISSING_KEY_MESSAGE)
    try:
        encoded = api_key.encode("utf-8")
    except UnicodeEncodeError:
        raise Unauthenticated(INVALID_KEY_MESSAGE) from None
    if len(encoded) > MAX_API_KEY_LENGTH:
        raise Unauthenticated(INVALID_KEY_MESSAGE)
    return hashlib.sha256(encoded).digest()


class Unmanaged:
    """An async context manager with nothing to open or close, so that the runtime can
    open every authenticator the same way."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
