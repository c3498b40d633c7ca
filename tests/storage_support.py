"""Helpers shared by the storage contract, the MySQL-only storage tests and the
dispatcher tests: rows written the way the service writes them, on either backend."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from payments.model import (
    EventKind,
    ListFilter,
    OutboxEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
    utcnow,
)
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection, Database
from payments.storage.outbox import CallbackAttempt
from payments.unit_of_work import Work
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
    written by the unit of work), calling back ``url``; the rows, oldest first."""
    entries = []
    async with db.transaction() as conn:
        for _ in range(count):
            payment = make_payment(status=PaymentStatus.PENDING, status_callback_url=url)
            payment.id = await repo.insert_payment(conn, payment)
            assert await Work(conn).change_status(payment, PaymentStatus.PAID, reason="test")
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


# --- query plans --------------------------------------------------------------------------


def varied_payment(n: int) -> Payment:
    """The ``n``-th of a spread of payments (20 callers, 3 resource types, 150 resource
    ids, mixed statuses and provider ids), for plans that must not scan whole tables."""
    statuses = [PaymentStatus.PENDING, PaymentStatus.PAID, PaymentStatus.EXPIRED]
    return make_payment(
        caller_service=f"svc-{n % 20}",
        resource_type=("order", "invoice", "plan")[n % 3],
        resource_id=str(n % 150),
        status=PaymentStatus.FAILED if n % 50 == 0 else statuses[n % 3],
        provider_payment_id=f"cs_{n}" if n % 2 else "",
        provider_subscription_id=f"sub_{n}" if n % 4 == 1 else "",
    )


class RecordingConnection:
    """Passes statements to a real connection and keeps them, to EXPLAIN afterwards."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        self.statements: list[tuple[str, Sequence[Any] | None]] = []

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetchone(sql, args)

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetchall(sql, args)


async def record_payment_reads(conn: Connection, sample: Payment) -> RecordingConnection:
    """The service's payment lookups and list filters, aimed at ``sample`` and run on
    ``conn``; what they sent, one statement each."""
    recorder = RecordingConnection(conn)
    rec = cast(Connection, recorder)
    filters = [
        ListFilter(caller_service="svc-3"),
        ListFilter(caller_service="svc-3", status=PaymentStatus.PAID),
        ListFilter(caller_service=sample.caller_service, request_id=sample.request_id),
        ListFilter(request_id=sample.request_id),
        ListFilter(resource_type="invoice", resource_id="7"),
        ListFilter(caller_service="svc-7", resource_type="invoice", resource_id="7"),
        ListFilter(status=PaymentStatus.FAILED),
    ]
    await repo.get_payment(rec, sample.id, for_update=True)
    await repo.get_payment_by_request(rec, sample.caller_service, sample.request_id)
    await repo.get_payment_by_callback_hash(rec, sample.provider_callback_hash)
    await repo.get_payment_by_provider_ref(rec, "sub_201")
    await repo.list_events(rec, sample.id)
    for f in filters:
        await repo.list_payments(rec, f)
    assert len(recorder.statements) == 5 + len(filters)  # none went around the recorder
    return recorder
