"""Who the caller is: an API key in, the calling service (a Caller) out.

Three sources, one protocol: the Auth service (client.py, production), local keys
(local_keys.py, for deployments without an Auth service and for the dev key of the
embedded profile), and several of them in turn (chain.py). The transports depend on
:class:`Authenticator` only; the runtime picks the implementation.
"""

from __future__ import annotations

from typing import Protocol

from payments.model import Caller


class Authenticator(Protocol):
    """Turns a caller's API key into the calling service. Raises Unauthenticated,
    PermissionDenied or DependencyUnavailable (the Auth service down is never a 401)."""

    async def authenticate(self, api_key: str) -> Caller: ...
