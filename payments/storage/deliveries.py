"""Operating the callback outbox: the delivery log, bulk re-queue and retention.

The dispatcher's own reads and writes (claim, record, release) are in outbox.py; this
module is what operators and owners use on top of them:

* :func:`attempts_by_outbox`: the attempts of many deliveries in one query (the
  delivery log must not cost a query per delivery).
* :func:`find_deliveries`: deliveries by state, creation time and caller, for
  ``payments callbacks list``.
* :func:`requeue_failed`: ``payments callbacks retry``. One UPDATE that only matches
  rows still ``failed``: run from two places at once, the second statement waits on
  the first's row locks (MySQL) or the write lock (SQLite), then finds those rows
  ``pending`` and leaves them, so each failed delivery is re-queued once. The row keeps
  its ``delivery_id`` (the ``webhook-id``), so receivers deduplicate.
* :func:`prune`: deletes finished deliveries (delivered, failed, gone) and their
  attempts once they have been finished longer than the retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import attrs

from payments.model import OutboxEntry, OutboxState
from payments.storage import outbox
from payments.storage.database import Connection, Database
from payments.storage.outbox import SELECT_OUTBOX, CallbackAttempt
from payments.storage.timestamps import from_db_datetime, to_db_datetime

# States a delivery never leaves by itself: what retention deletes.
FINISHED_STATES = (OutboxState.DELIVERED, OutboxState.FAILED, OutboxState.GONE)
# How long finished deliveries (delivered, failed, gone) and their attempts are kept
# after they finished: long enough to answer "did you tell us?" for a month and to
# retry a failure found late; short enough that the outbox stays compact.
RETENTION = timedelta(days=30)
# Rows deleted per statement while pruning: short transactions, bounded lock sets.
PRUNE_BATCH = 500


async def attempts_by_outbox(
    conn: Connection, outbox_ids: Sequence[int]
) -> dict[int, list[CallbackAttempt]]:
    """The attempts of each delivery in ``outbox_ids``, first first (one query)."""
    found: dict[int, list[CallbackAttempt]] = {number: [] for number in outbox_ids}
    if not outbox_ids:
        return found
    marks = ", ".join(["%s"] * len(outbox_ids))
    rows = await conn.fetchall(
        f"SELECT {', '.join(outbox.ATTEMPT_COLUMNS)} FROM callback_attempts"  # noqa: S608
        f" WHERE outbox_id IN ({marks}) ORDER BY outbox_id, id",
        tuple(outbox_ids),
    )
    for row in rows:
        found[int(row[1])].append(
            CallbackAttempt(
                id=int(row[0]),
                outbox_id=int(row[1]),
                attempt=int(row[2]),
                attempted_at=from_db_datetime(row[3]),
                status_code=None if row[4] is None else int(row[4]),
                error=row[5],
                latency_ms=int(row[6]),
            )
        )
    return found


@attrs.frozen
class DeliveryFilter:
    """Which deliveries an operator means: each field narrows when set."""

    state: OutboxState | None = None
    since: datetime | None = None  # created at or after
    caller_service: str = ""
    limit: int = 1000

    def where(self) -> tuple[str, list[object]]:
        """The WHERE clause over callback_outbox and its arguments."""
        clauses: list[str] = []
        args: list[object] = []
        if self.state is not None:
            clauses.append("state = %s")
            args.append(str(self.state))
        if self.since is not None:
            clauses.append("created_at >= %s")
            args.append(to_db_datetime(self.since))
        if self.caller_service:
            clauses.append("payment_id IN (SELECT id FROM payments WHERE caller_service = %s)")
            args.append(self.caller_service)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def find_deliveries(conn: Connection, filters: DeliveryFilter) -> list[OutboxEntry]:
    """Deliveries matching ``filters``, oldest first, at most ``filters.limit``."""
    where, args = filters.where()
    sql = f"{SELECT_OUTBOX}{where} ORDER BY id LIMIT %s"
    rows = await conn.fetchall(sql, (*args, filters.limit))
    return [outbox.entry_from_row(row) for row in rows]


async def requeue_failed(db: Database, filters: DeliveryFilter, now: datetime) -> int:
    """Make the failed deliveries ``filters`` match due again at ``now`` with a fresh
    attempt budget; how many moved. Only ``failed`` rows qualify (a filter's other
    state is refused), and the UPDATE re-checks that under the lock (module docstring)."""
    if filters.state not in (None, OutboxState.FAILED):
        raise ValueError("only failed deliveries are re-queued")
    where, args = attrs.evolve(filters, state=OutboxState.FAILED).where()
    async with db.transaction() as conn:
        return await conn.execute(
            "UPDATE callback_outbox SET state = 'pending', attempts = 0, next_attempt_at = %s,"  # noqa: S608
            f" last_error = '', claimed_by = '', claimed_until = NULL, updated_at = %s{where}",
            (to_db_datetime(now), to_db_datetime(now), *args),
        )


async def prune(db: Database, finished_before: datetime) -> int:
    """Delete finished deliveries last changed before ``finished_before``, with their
    attempts, in batches; how many deliveries went."""
    states = ", ".join(f"'{state}'" for state in FINISHED_STATES)
    removed = 0
    while True:
        async with db.transaction() as conn:
            rows = await conn.fetchall(
                f"SELECT id FROM callback_outbox WHERE state IN ({states})"  # noqa: S608
                " AND updated_at < %s ORDER BY id LIMIT %s",
                (to_db_datetime(finished_before), PRUNE_BATCH),
            )
            ids = [int(row[0]) for row in rows]
            if not ids:
                return removed
            marks = ", ".join(["%s"] * len(ids))
            await conn.execute(
                f"DELETE FROM callback_attempts WHERE outbox_id IN ({marks})",  # noqa: S608
                tuple(ids),
            )
            await conn.execute(f"DELETE FROM callback_outbox WHERE id IN ({marks})", tuple(ids))  # noqa: S608
        removed += len(ids)
        if len(ids) < PRUNE_BATCH:
            return removed


async def next_resend_number(conn: Connection, entry: OutboxEntry) -> int:
    """The resend number a new resend of ``entry``'s announcement takes (call under
    the payment's row lock, so two resends cannot pick the same one)."""
    row = await conn.fetchone(
        "SELECT COALESCE(MAX(resend), 0) FROM callback_outbox"
        " WHERE payment_id = %s AND kind = %s AND refund_id = %s AND status = %s",
        (entry.payment_id, str(entry.kind), entry.refund_id, int(entry.status)),
    )
    return (int(row[0]) if row else 0) + 1
