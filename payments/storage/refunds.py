"""Refunds and their events: plain functions over a connection of either backend.

Written like repository.py: the caller owns the transaction, so the refund use case
locks the payment (``repository.get_payment(..., for_update=True)``), reads
:func:`refund_totals`, checks the amount rules (model.refund_amount) and inserts the
PENDING refund with its event in one transaction, before Stripe is called. Every
statement is parameterized; only fixed column names are put into SQL text.

Mapping: column names are the :class:`~payments.model.Refund` field names; enums are
their proto numbers, datetimes naive UTC, metadata compact JSON text, and an unset
``provider_refund_id`` is NULL (not ''), so its UNIQUE key allows any number of refunds
Stripe does not know yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import attrs

from payments.errors import NotFound
from payments.model import EventKind, Refund, RefundEvent, RefundStatus, RefundTotals
from payments.storage.database import Connection
from payments.storage.repository import _metadata_from_db, _metadata_to_db
from payments.storage.timestamps import from_db_datetime, to_db_datetime

# The longest failure_reason kept (schema.sql's VARCHAR(500); SQLite does not enforce it).
MAX_FAILURE_REASON = 500

REFUND_COLUMNS: tuple[str, ...] = tuple(field.name for field in attrs.fields(Refund))
_INSERT_COLUMNS = tuple(column for column in REFUND_COLUMNS if column != "id")
# What update_refund writes, in its SQL's order; the rest is fixed at creation.
_UPDATE_COLUMNS = ("status", "failure_reason", "provider_refund_id", "updated_at")
EVENT_COLUMNS: tuple[str, ...] = tuple(field.name for field in attrs.fields(RefundEvent))
_INSERT_EVENT_COLUMNS = tuple(column for column in EVENT_COLUMNS if column != "id")


def _empty_as_null(value: str) -> str | None:
    # NULL, not '': a UNIQUE key then allows any number of rows without a value.
    return value or None


def _null_as_empty(value: str | None) -> str:
    return value or ""


# Column -> conversion, one table each way for both entities (columns are field names;
# a column absent here is stored as the entity holds it).
_TO_DB: dict[str, Callable[[Any], Any]] = {
    "status": int,
    "from_status": int,
    "to_status": int,
    "kind": str,
    "created_at": to_db_datetime,
    "updated_at": to_db_datetime,
    "metadata": _metadata_to_db,
    "provider_refund_id": _empty_as_null,
    "provider_event_id": _empty_as_null,
    "failure_reason": lambda text: text[:MAX_FAILURE_REASON],
}
_FROM_DB: dict[str, Callable[[Any], Any]] = {
    "id": int,
    "payment_id": int,
    "refund_id": int,
    "amount_cents": int,
    "status": RefundStatus,
    "from_status": RefundStatus,
    "to_status": RefundStatus,
    "kind": EventKind,
    "created_at": from_db_datetime,
    "updated_at": from_db_datetime,
    "metadata": _metadata_from_db,
    "provider_refund_id": _null_as_empty,
    "provider_event_id": _null_as_empty,
}

_Entity = TypeVar("_Entity", Refund, RefundEvent)


def _to_row(entity: Refund | RefundEvent, columns: Sequence[str]) -> list[Any]:
    row = []
    for column in columns:
        value = getattr(entity, column)
        convert = _TO_DB.get(column)
        row.append(convert(value) if convert else value)
    return row


def _from_row(cls: type[_Entity], columns: Sequence[str], row: Sequence[Any]) -> _Entity:
    fields: dict[str, Any] = {}
    for column, value in zip(columns, row, strict=True):
        convert = _FROM_DB.get(column)
        fields[column] = convert(value) if convert else value
    return cls(**fields)


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    placeholders = ", ".join(["%s"] * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608


_SELECT_REFUND = f"SELECT {', '.join(REFUND_COLUMNS)} FROM refunds"  # noqa: S608 - fixed names
_SELECT_EVENT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM refund_events"  # noqa: S608
_INSERT_REFUND = _insert_sql("refunds", _INSERT_COLUMNS)
_INSERT_EVENT = _insert_sql("refund_events", _INSERT_EVENT_COLUMNS)
# PENDING and SUCCEEDED sums in one indexed read (ix_refunds_payment).
_TOTALS = (
    "SELECT payment_id,"
    " COALESCE(SUM(CASE WHEN status = %s THEN amount_cents ELSE 0 END), 0),"
    " COALESCE(SUM(CASE WHEN status = %s THEN amount_cents ELSE 0 END), 0)"
    " FROM refunds WHERE payment_id {match} GROUP BY payment_id"
)
_TOTALS_ARGS = (int(RefundStatus.PENDING), int(RefundStatus.SUCCEEDED))


async def _one(
    conn: Connection, where: str, args: Sequence[Any], for_update: bool
) -> Refund | None:
    lock = conn.dialect.for_update if for_update else ""
    row = await conn.fetchone(f"{_SELECT_REFUND} WHERE {where}{lock}", args)
    return None if row is None else _from_row(Refund, REFUND_COLUMNS, row)


# --- refunds ------------------------------------------------------------------------


async def insert_refund(conn: Connection, refund: Refund) -> int:
    """Insert a new refund (``refund.id`` is ignored); return its id.

    Raises DuplicateKey ``uq_refunds_caller_request`` when (caller_service, request_id)
    already names a refund (the idempotency check of create), or
    ``uq_refunds_provider_refund_id`` when the Stripe refund is recorded already.
    """
    return await conn.insert(_INSERT_REFUND, _to_row(refund, _INSERT_COLUMNS))


async def get_refund(
    conn: Connection, refund_id: int, *, for_update: bool = False
) -> Refund | None:
    """The refund with this id, or None. ``for_update`` locks the row until the
    transaction ends (lock the payment first: one lock order everywhere)."""
    if refund_id <= 0:
        return None
    return await _one(conn, "id = %s", (refund_id,), for_update)


async def get_refund_by_request(
    conn: Connection, caller_service: str, request_id: str, *, for_update: bool = False
) -> Refund | None:
    """The refund (caller_service, request_id) names, or None."""
    return await _one(
        conn, "caller_service = %s AND request_id = %s", (caller_service, request_id), for_update
    )


async def get_refund_by_provider_id(
    conn: Connection, provider_refund_id: str, *, for_update: bool = False
) -> Refund | None:
    """The refund Stripe knows as ``provider_refund_id`` (``re_...``), or None."""
    if not provider_refund_id:
        return None
    return await _one(conn, "provider_refund_id = %s", (provider_refund_id,), for_update)


async def refunds_by_provider_ids(
    conn: Connection, payment_id: int, provider_refund_ids: Sequence[str]
) -> list[Refund]:
    """``payment_id``'s refunds stored under any of these Stripe ids, in one indexed read
    (``uq_refunds_provider_refund_id``)."""
    wanted = sorted({refund_id for refund_id in provider_refund_ids if refund_id})
    if not wanted:
        return []
    marks = ", ".join(["%s"] * len(wanted))
    rows = await conn.fetchall(
        f"{_SELECT_REFUND} WHERE provider_refund_id IN ({marks}) AND payment_id = %s",
        (*wanted, payment_id),
    )
    return [_from_row(Refund, REFUND_COLUMNS, row) for row in rows]


async def list_refunds(conn: Connection, payment_id: int) -> list[Refund]:
    """A payment's refunds, oldest first."""
    rows = await conn.fetchall(f"{_SELECT_REFUND} WHERE payment_id = %s ORDER BY id", (payment_id,))
    return [_from_row(Refund, REFUND_COLUMNS, row) for row in rows]


async def list_pending_refunds(
    conn: Connection, updated_before: datetime, limit: int
) -> list[Refund]:
    """PENDING refunds not updated since ``updated_before``, oldest update first: what
    the reconciler asks Stripe about. A plain read: claim rows before working on them."""
    rows = await conn.fetchall(
        f"{_SELECT_REFUND} WHERE status = %s AND updated_at < %s ORDER BY updated_at, id LIMIT %s",
        (int(RefundStatus.PENDING), to_db_datetime(updated_before), max(0, limit)),
    )
    return [_from_row(Refund, REFUND_COLUMNS, row) for row in rows]


async def update_refund(conn: Connection, refund: Refund) -> None:
    """Write what changes after creation: status, failure_reason, provider_refund_id,
    updated_at. Raises NotFound when the row is gone, DuplicateKey
    ``uq_refunds_provider_refund_id`` when another refund has that Stripe id.

    The status machine is the unit of work's job (model.can_refund_transition), under
    the payment's row lock.
    """
    matched = await conn.execute(
        "UPDATE refunds SET status = %s, failure_reason = %s, provider_refund_id = %s,"
        " updated_at = %s WHERE id = %s",
        [*_to_row(refund, _UPDATE_COLUMNS), refund.id],
    )
    if matched == 0:
        raise NotFound("refund not found")


async def refund_totals(conn: Connection, payment_id: int) -> RefundTotals:
    """The PENDING and SUCCEEDED sums of a payment's refunds, in one query. Read it in
    the transaction that holds the payment's row lock, so no refund slips in between."""
    totals = await refund_totals_for(conn, (payment_id,))
    return totals.get(payment_id, RefundTotals())


async def refund_totals_for(
    conn: Connection, payment_ids: Iterable[int]
) -> dict[int, RefundTotals]:
    """:func:`refund_totals` of several payments in one query (a page of ListPayments);
    payments without refunds are absent (their totals are ``RefundTotals()``)."""
    ids = sorted({int(payment_id) for payment_id in payment_ids})
    if not ids:
        return {}
    match = "= %s" if len(ids) == 1 else f"IN ({', '.join(['%s'] * len(ids))})"
    rows = await conn.fetchall(_TOTALS.format(match=match), (*_TOTALS_ARGS, *ids))
    return {
        int(payment_id): RefundTotals(pending_cents=int(pending), succeeded_cents=int(succeeded))
        for payment_id, pending, succeeded in rows
    }


# --- events -------------------------------------------------------------------------


async def insert_refund_event(conn: Connection, event: RefundEvent) -> int:
    """Record one history row; return its id. Raises DuplicateKey
    ``uq_refund_events_provider_event`` when this provider event is recorded for this
    refund already: a replayed event, to acknowledge and ignore."""
    return await conn.insert(_INSERT_EVENT, _to_row(event, _INSERT_EVENT_COLUMNS))


async def list_refund_events(conn: Connection, refund_id: int) -> list[RefundEvent]:
    """A refund's history, oldest first."""
    rows = await conn.fetchall(f"{_SELECT_EVENT} WHERE refund_id = %s ORDER BY id", (refund_id,))
    return [_from_row(RefundEvent, EVENT_COLUMNS, row) for row in rows]
