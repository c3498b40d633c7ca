"""Helpers shared by the storage contract, the MySQL-only storage tests and the
dispatcher tests: rows written the way the service writes them, on either backend."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from payments.lifecycle import change_status
from payments.model import EventKind, OutboxEntry, Payment, PaymentEvent, PaymentStatus, utcnow
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Database
from payments.storage.outbox import CallbackAttempt
from tests.fixtures.db import make_payment

# The outbox lease the tests claim with, in seconds.
LEASE = 60.0


async def insert(db: Database, payment: Payment) -> Payment:
    """``payment`` saved in its own transaction, its new id set on it."""
    async with db.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    return payment


def event_for(payment: Payment, **overrides: Any) -> PaymentEvent:
    """An unsaved event of ``payment``: its CREATED event unless ``overrides`` say more."""
    fields: dict[str, Any] = {
        "payment_id": payment.id,
        "kind": EventKind.CREATED,
        "from_status": PaymentStatus.UNSPECIFIED,
        "to_status": PaymentStatus.CREATED,
        "created_at": payment.created_at,
    }
    fields.update(overrides)
    return PaymentEvent(**fields)


async def queue_callbacks(
    db: Database,
    count: int = 1,
    url: str = "https://orders.internal/payments/callback",
) -> list[OutboxEntry]:
    """``count`` payments moved to PAID the way the service does it (their outbox rows
    written by lifecycle.change_status), calling back ``url``; the rows, oldest first."""
    entries = []
    async with db.transaction() as conn:
        for _ in range(count):
            payment = make_payment(status=PaymentStatus.PENDING, status_callback_url=url)
            payment.id = await repo.insert_payment(conn, payment)
            assert await change_status(conn, payment, PaymentStatus.PAID, reason="test")
            entries.extend(await outbox.entries_for_payment(conn, payment.id))
    return entries


def later(seconds: float = 1.0) -> datetime:
    """A moment just ahead of now, so freshly queued rows are due."""
    return utcnow() + timedelta(seconds=seconds)


async def fetch(db: Database, outbox_id: int) -> OutboxEntry:
    """The outbox row as stored now."""
    async with db.connection() as conn:
        entry = await outbox.get_entry(conn, outbox_id)
    assert entry is not None
    return entry


def attempt_of(entry: OutboxEntry, at: datetime, status_code: int | None = 500) -> CallbackAttempt:
    """The next delivery attempt of ``entry``, failed with HTTP 500 unless told."""
    return CallbackAttempt(entry.id, entry.attempts + 1, at, status_code, "HTTP 500", 12)
