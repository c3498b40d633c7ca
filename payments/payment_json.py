"""The JSON object of a payment, shared by the HTTP responses and the status-callback
bodies (which must be the same document). Kept as the name the callback writer imports;
the mapping itself lives in payments.mapping."""

from __future__ import annotations

from payments.mapping import format_timestamp, payment_to_json

__all__ = ["format_timestamp", "payment_to_json"]
