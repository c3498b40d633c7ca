"""``payments callbacks list | retry | prune``: operating the callback outbox by hand.

``list`` shows deliveries across payments (a table for people, ``--json`` for
scripts); ``retry`` re-queues failed deliveries with their original ``webhook-id`` and
prints how many (safe from two places at once: see payments.storage.deliveries);
``prune`` deletes finished deliveries and their attempts past the retention. The
dispatcher prunes on its own too (hourly, :data:`RETENTION`); the command is for a
one-off cleanup or a shorter retention. None of them talk to Stripe or a receiver:
a re-queued row is sent by the dispatcher.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO

import attrs

from payments.api import wire
from payments.callbacks import delivery_view
from payments.config import Settings
from payments.mapping import format_timestamp
from payments.model import OutboxEntry, OutboxState, utcnow
from payments.storage import deliveries
from payments.storage.backends import open_database
from payments.storage.database import Connection
from payments.storage.deliveries import DeliveryFilter

RETENTION = deliveries.RETENTION
_TABLE_COLUMNS = ("id", "payment", "caller", "kind", "state", "tries", "created", "webhook_id")


def parse_since(text: str) -> datetime:
    """An RFC 3339 time with an offset (``2026-11-28T09:00:00Z``); ValueError otherwise."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("needs a time zone offset, e.g. 2026-11-28T09:00:00Z")
    return moment.astimezone(UTC)


async def _callers(conn: Connection, entries: Sequence[OutboxEntry]) -> dict[int, str]:
    ids = sorted({entry.payment_id for entry in entries})
    if not ids:
        return {}
    marks = ", ".join(["%s"] * len(ids))
    rows = await conn.fetchall(
        f"SELECT id, caller_service FROM payments WHERE id IN ({marks})",  # noqa: S608
        tuple(ids),
    )
    return {int(row[0]): row[1] for row in rows}


async def list_deliveries(
    settings: Settings, filters: DeliveryFilter, out: TextIO, *, as_json: bool
) -> int:
    """Print the deliveries ``filters`` match, oldest first; how many."""
    database = open_database(settings)
    try:
        async with database.connection() as conn:
            found = await deliveries.find_deliveries(conn, filters)
            attempts = await deliveries.attempts_by_outbox(conn, [e.id for e in found])
            callers = await _callers(conn, found)
    finally:
        await database.aclose()
    if as_json:
        rows = [
            {
                "payment_id": entry.payment_id,
                "caller_service": callers.get(entry.payment_id, ""),
                "last_error": entry.last_error,
                **wire.delivery_to_json(delivery_view(entry, attempts[entry.id])),
            }
            for entry in found
        ]
        out.write(json.dumps({"deliveries": rows}) + "\n")
        return len(found)
    table = [_TABLE_COLUMNS] + [
        (
            str(entry.id),
            str(entry.payment_id),
            callers.get(entry.payment_id, ""),
            str(entry.kind),
            str(entry.state),
            str(len(attempts[entry.id])),
            format_timestamp(entry.created_at),
            entry.delivery_id,
        )
        for entry in found
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(_TABLE_COLUMNS))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")
    return len(found)


async def retry_failed(settings: Settings, filters: DeliveryFilter) -> int:
    """Re-queue the failed deliveries ``filters`` match, due now; how many."""
    database = open_database(settings)
    try:
        return await deliveries.requeue_failed(database, filters, utcnow())
    finally:
        await database.aclose()


async def prune(settings: Settings, retention: timedelta = RETENTION) -> int:
    """Delete deliveries finished more than ``retention`` ago; how many."""
    database = open_database(settings)
    try:
        return await deliveries.prune(database, utcnow() - retention)
    finally:
        await database.aclose()


def filters_from(state: str | None, since: str | None, caller: str | None) -> DeliveryFilter:
    """The CLI's filter flags as a DeliveryFilter; ValueError naming a bad flag."""
    try:
        chosen = OutboxState(state) if state else None
    except ValueError:
        names = ", ".join(s.value for s in OutboxState)
        raise ValueError(f"--state: must be one of {names}") from None
    try:
        moment = parse_since(since) if since else None
    except ValueError as exc:
        raise ValueError(f"--since: not an RFC 3339 time ({exc})") from None
    return attrs.evolve(DeliveryFilter(), state=chosen, since=moment, caller_service=caller or "")
