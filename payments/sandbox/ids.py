"""Stripe-looking object ids (shared by the state and the money modules)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """A Stripe-looking id: ``prefix`` + random base62."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))
