"""The headers of a status callback, signed the Standard Webhooks way when a secret is set.

Always (CONTRACT.md): ``Content-Type: application/json``, ``X-Request-ID`` (the
payment's request_id) and ``X-API-Key`` (APP_API_KEY, so the caller can tell the
callback comes from us). With ``PAYMENTS_CALLBACK_SIGNING_SECRET`` set, also the
Standard Webhooks trio: ``webhook-id`` (the outbox row's delivery_id, the same on every
retry so the receiver can deduplicate), ``webhook-timestamp`` (unix seconds of this
attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``),
made by the ``standardwebhooks`` library so any Standard Webhooks verifier accepts it.

Rotation: the variable may hold several secrets separated by spaces; the signature
header then carries one ``v1,`` signature per secret, space-separated (the Standard
Webhooks form), and a receiver holding any one of the secrets verifies the callback.
So an operator adds the new secret, lets receivers switch, then drops the old one.

The secret's rule is a setting's, so it lives in :func:`payments.config.parse_signing_secrets`,
which refuses a bad secret at start.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from payments.config import parse_signing_secrets
from payments.model import OutboxEntry


class CallbackSigner:
    """Builds each attempt's headers; signs them when a secret is configured."""

    def __init__(self, api_key: str, signing_secret: str = "") -> None:
        self._api_key = api_key
        self._webhooks = [Webhook(key) for key in parse_signing_secrets(signing_secret)]

    @property
    def signs(self) -> bool:
        return bool(self._webhooks)

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
        if self._webhooks:
            # The library formats the time itself from a naive-or-UTC datetime: give it
            # whole UTC seconds so the header and the signed text agree.
            stamp = datetime.fromtimestamp(seconds, UTC)
            headers["webhook-signature"] = " ".join(
                webhook.sign(entry.delivery_id, stamp, entry.payload) for webhook in self._webhooks
            )
        return headers
