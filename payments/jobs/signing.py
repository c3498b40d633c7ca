"""The headers of a status callback, signed the Standard Webhooks way when a secret is set.

Always (CONTRACT.md): ``Content-Type: application/json``, ``X-Request-ID`` (the
payment's request_id) and ``X-API-Key`` (APP_API_KEY, so the caller can tell the
callback comes from us). With ``PAYMENTS_CALLBACK_SIGNING_SECRET`` set, also the
Standard Webhooks trio: ``webhook-id`` (the outbox row's delivery_id, the same on every
retry so the receiver can deduplicate), ``webhook-timestamp`` (unix seconds of this
attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``),
made by the ``standardwebhooks`` library so any Standard Webhooks verifier accepts it.

The secret rule (checked at start by :func:`parse_signing_secret`): the value is
``whsec_`` followed by standard base64, or the bare base64 alone (padding optional),
and it must decode to at least 24 bytes (the Standard Webhooks minimum). Anything else
is a configuration error. The library itself would quietly decode a non-base64 string
into some other key (its base64 decoding drops characters it does not know), signing
with a key the receiver does not have; refusing it at start is the only safe choice.
Generate one with::

    python -c "import os, base64; print('whsec_' + base64.b64encode(os.urandom(32)).decode())"
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from payments.config import ConfigError
from payments.model import OutboxEntry

SECRET_VARIABLE = "PAYMENTS_CALLBACK_SIGNING_SECRET"  # noqa: S105  (a name, not a secret)
SECRET_PREFIX = "whsec_"  # noqa: S105
MIN_SECRET_BYTES = 24


def parse_signing_secret(value: str) -> bytes:
    """The HMAC key a configured secret stands for (see the rule in the module doc).

    Raises ConfigError naming the variable; the message never repeats the value.
    """
    text = value.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{SECRET_VARIABLE}: not base64; expected whsec_<base64 of at least "
            f"{MIN_SECRET_BYTES} random bytes>"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{SECRET_VARIABLE}: decodes to {len(key)} bytes; at least {MIN_SECRET_BYTES} "
            "are required"
        )
    return key


class CallbackSigner:
    """Builds each attempt's headers; signs them when a secret is configured."""

    def __init__(self, api_key: str, signing_secret: str = "") -> None:
        self._api_key = api_key
        self._webhook = Webhook(parse_signing_secret(signing_secret)) if signing_secret else None

    @property
    def signs(self) -> bool:
        return self._webhook is not None

    def headers(self, entry: OutboxEntry, at: datetime) -> dict[str, str]:
        """The headers of one attempt to deliver ``entry``, made at ``at`` (aware)."""
        headers = {
            "Content-Type": "application/json",
            "X-Request-ID": entry.request_id,
        }
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        # Always: the id stays the same on every retry, so a receiver can deduplicate
        # an at-least-once delivery whether or not callbacks are signed.
        seconds = math.floor(at.timestamp())
        headers["webhook-id"] = entry.delivery_id
        headers["webhook-timestamp"] = str(seconds)
        if self._webhook is not None:
            # The library formats the time itself from a naive-or-UTC datetime: give it
            # whole UTC seconds so the header and the signed text agree.
            stamp = datetime.fromtimestamp(seconds, UTC)
            headers["webhook-signature"] = self._webhook.sign(
                entry.delivery_id, stamp, entry.payload
            )
        return headers
