"""Inbound provider callbacks (webhooks), every one kept: processed, duplicate or
rejected with its reason (table ``provider_callbacks``, schema step 2).

The record of a processed or duplicate callback is written in the transaction that
applied it; a rejection is written on its own, so it survives the refusal. Values are
cut to their column sizes here (a hostile route or header must not turn a rejection
into a 500); the signature is never stored.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs

from payments.storage.database import Connection
from payments.storage.timestamps import from_db_datetime, to_db_datetime

# Column sizes of schema.sql (SQLite does not enforce them: cutting here keeps both alike).
_LIMITS = {
    "provider": 32,
    "callback_hash": 64,
    "event_id": 255,
    "event_type": 255,
    "reason": 500,
    "request_id": 128,
}
# MEDIUMTEXT holds 16 MiB; 4 MiB characters fit whatever their UTF-8 width.
MAX_PAYLOAD_CHARS = 4 * 1024 * 1024


class CallbackOutcome(enum.StrEnum):
    PROCESSED = "processed"  # applied, or recorded without a status change
    DUPLICATE = "duplicate"  # an event id already recorded: acknowledged, nothing changed
    REJECTED = "rejected"  # refused (reason says why)


@attrs.frozen
class ProviderCallback:
    """One inbound callback as received."""

    provider: str
    callback_hash: str
    outcome: CallbackOutcome
    payload: str
    received_at: datetime
    reason: str = ""
    request_id: str = ""
    event_id: str = ""  # "" (NULL) when the body could not be read as an event
    event_type: str = ""
    payment_id: int | None = None
    id: int = 0


COLUMNS = (
    "id",
    "provider",
    "callback_hash",
    "event_id",
    "event_type",
    "payment_id",
    "outcome",
    "reason",
    "request_id",
    "payload",
    "received_at",
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM provider_callbacks"  # noqa: S608 - fixed names
_INSERT = (
    f"INSERT INTO provider_callbacks ({', '.join(COLUMNS[1:])})"  # noqa: S608
    f" VALUES ({', '.join(['%s'] * (len(COLUMNS) - 1))})"
)


def _cut(value: str, column: str) -> str:
    return value[: _LIMITS[column]]


async def insert(conn: Connection, record: ProviderCallback) -> int:
    """Keep one inbound callback; its id."""
    return await conn.insert(
        _INSERT,
        (
            _cut(record.provider, "provider"),
            _cut(record.callback_hash, "callback_hash"),
            _cut(record.event_id, "event_id") or None,
            _cut(record.event_type, "event_type"),
            record.payment_id,
            str(record.outcome),
            _cut(record.reason, "reason"),
            _cut(record.request_id, "request_id"),
            record.payload[:MAX_PAYLOAD_CHARS],
            to_db_datetime(record.received_at),
        ),
    )


def _from_row(row: Sequence[Any]) -> ProviderCallback:
    values = dict(zip(COLUMNS, row, strict=True))
    return ProviderCallback(
        id=int(values["id"]),
        provider=values["provider"],
        callback_hash=values["callback_hash"],
        event_id=values["event_id"] or "",
        event_type=values["event_type"],
        payment_id=None if values["payment_id"] is None else int(values["payment_id"]),
        outcome=CallbackOutcome(values["outcome"]),
        reason=values["reason"],
        request_id=values["request_id"],
        payload=values["payload"],
        received_at=from_db_datetime(values["received_at"]),
    )


async def for_payment(conn: Connection, payment_id: int) -> list[ProviderCallback]:
    """A payment's inbound callbacks, oldest first."""
    rows = await conn.fetchall(f"{_SELECT} WHERE payment_id = %s ORDER BY id", (payment_id,))
    return [_from_row(row) for row in rows]


async def for_event(conn: Connection, event_id: str) -> list[ProviderCallback]:
    """Every delivery of one provider event, oldest first."""
    rows = await conn.fetchall(f"{_SELECT} WHERE event_id = %s ORDER BY id", (event_id,))
    return [_from_row(row) for row in rows]


async def recent(conn: Connection, limit: int = 100) -> list[ProviderCallback]:
    """The newest inbound callbacks, newest first."""
    rows = await conn.fetchall(f"{_SELECT} ORDER BY id DESC LIMIT %s", (max(0, limit),))
    return [_from_row(row) for row in rows]
