"""Several authenticators in turn: the next is asked only when a key is unknown.

Used when the Stripe sandbox plays Stripe: its forwarded events carry a per-run gateway
key that only this process knows, beside whatever checks callers' keys (the Auth
service, local keys or the dev key).
"""

from __future__ import annotations

from collections.abc import Sequence

from payments.auth import Authenticator, Unmanaged
from payments.errors import Unauthenticated
from payments.model import Caller


class FirstKnown(Unmanaged):
    """Answers with the first authenticator that knows the key."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        if not authenticators:
            raise ValueError("FirstKnown needs at least one authenticator")
        self._authenticators = list(authenticators)

    async def authenticate(self, api_key: str) -> Caller:
        for authenticator in self._authenticators[:-1]:
            try:
                return await authenticator.authenticate(api_key)
            except Unauthenticated:
                continue
        return await self._authenticators[-1].authenticate(api_key)
