"""The callback outbox: status callbacks owed to callers, and their delivery attempts.

Rows are written by payments.lifecycle in the status-change transaction and worked by
the dispatcher (payments/jobs/dispatcher.py), which claims due rows with a lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from payments.model import OutboxEntry, OutboxState, PaymentStatus
from payments.storage.pool import Connection, DuplicateKey
from payments.storage.repository import from_db_datetime, to_db_datetime

OUTBOX_COLUMNS = (
    "id",
    "payment_id",
    "status",
    "delivery_id",
    "url",
    "request_id",
    "payload",
    "state",
    "attempts",
    "next_attempt_at",
    "claimed_by",
    "claimed_until",
    "last_error",
    "created_at",
    "updated_at",
    "delivered_at",
)
SELECT_OUTBOX = f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM callback_outbox"  # noqa: S608


def _optional_time(value: Any) -> Any:
    return None if value is None else from_db_datetime(value)


def entry_from_row(row: Sequence[Any]) -> OutboxEntry:
    values = dict(zip(OUTBOX_COLUMNS, row, strict=True))
    return OutboxEntry(
        id=int(values["id"]),
        payment_id=int(values["payment_id"]),
        status=PaymentStatus(values["status"]),
        delivery_id=values["delivery_id"],
        url=values["url"],
        request_id=values["request_id"],
        payload=values["payload"],
        state=OutboxState(values["state"]),
        attempts=int(values["attempts"]),
        next_attempt_at=from_db_datetime(values["next_attempt_at"]),
        claimed_by=values["claimed_by"],
        claimed_until=_optional_time(values["claimed_until"]),
        last_error=values["last_error"],
        created_at=from_db_datetime(values["created_at"]),
        updated_at=from_db_datetime(values["updated_at"]),
        delivered_at=_optional_time(values["delivered_at"]),
    )


async def insert_entry(conn: Connection, entry: OutboxEntry) -> int:
    """Queue a callback; returns its id. A payment announces each status once, so a
    second entry for the same (payment, status) is ignored (0 is returned)."""
    try:
        return await conn.insert(
            "INSERT INTO callback_outbox (payment_id, status, delivery_id, url, request_id,"
            " payload, state, attempts, next_attempt_at, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                entry.payment_id,
                int(entry.status),
                entry.delivery_id,
                entry.url,
                entry.request_id,
                entry.payload,
                str(entry.state),
                entry.attempts,
                to_db_datetime(entry.next_attempt_at),
                to_db_datetime(entry.created_at),
                to_db_datetime(entry.updated_at),
            ),
        )
    except DuplicateKey as exc:
        if exc.key != "uq_callback_outbox_payment_status":
            raise
        return 0


async def entries_for_payment(conn: Connection, payment_id: int) -> list[OutboxEntry]:
    """A payment's callbacks, oldest first."""
    rows = await conn.fetchall(f"{SELECT_OUTBOX} WHERE payment_id = %s ORDER BY id", (payment_id,))
    return [entry_from_row(row) for row in rows]
