"""The JSON object of a payment (CONTRACT.md's shape), shared by the HTTP responses
and the status-callback bodies, which must be the same document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from payments.model import Payment


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-26T08:18:56.123456Z``.

    A naive datetime is taken as UTC (that is what the database keeps).
    """
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def payment_to_json(payment: Payment) -> dict[str, Any]:
    """The JSON object of a payment, zero values left out (protojson's default)."""
    fields: tuple[tuple[str, Any], ...] = (
        ("id", payment.id),
        ("request_id", payment.request_id),
        ("caller_service", payment.caller_service),
        ("resource_type", payment.resource_type),
        ("resource_id", payment.resource_id),
        ("customer_ref", payment.customer_ref),
        ("amount_cents", payment.amount_cents),
        ("currency", payment.currency),
        ("status", int(payment.status)),
        ("payment_method", int(payment.payment_method)),
        ("payment_type", int(payment.payment_type)),
        ("provider", int(payment.provider)),
        ("recurring_interval", payment.recurring_interval),
        ("recurring_interval_count", payment.recurring_interval_count),
        ("provider_payment_id", payment.provider_payment_id),
        ("provider_subscription_id", payment.provider_subscription_id),
        ("checkout_url", payment.checkout_url),
        ("provider_callback_hash", payment.provider_callback_hash),
        ("provider_callback_url", payment.provider_callback_url),
        ("status_callback_url", payment.status_callback_url),
        ("refunded_cents", payment.refunded_cents),
        ("refundable_cents", payment.refundable_cents),
        ("metadata", dict(payment.metadata)),
    )
    out = {name: value for name, value in fields if value}
    out["created_at"] = format_timestamp(payment.created_at)
    out["updated_at"] = format_timestamp(payment.updated_at)
    return out
