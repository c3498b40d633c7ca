"""Which payments the jobs work on, and the row lock each one is worked under.

A job's pass reads candidates in batches without locking anything (a plain consistent
read), oldest first, with keyset pagination on ``(<age column>, id)``: the next batch
starts after the last row of the previous one, so one pass drains any backlog and never
meets a row twice, even one it skipped or failed on. Each candidate is then worked in
its own short transaction that first takes the row lock with ``FOR UPDATE SKIP LOCKED``
and re-checks the selection under it: a row another replica is working on is skipped
(not waited on), and a row another replica already finished (its status or age no
longer match) is skipped too. So two processes never work one payment at once, and a
payment is worked at most once per pass whatever the number of replicas.

Each status is read as its own ``UNION ALL`` branch: ``status = s`` then a range on the
age column is one range scan of ``ix_payments_status_updated`` /
``ix_payments_status_created`` (InnoDB appends ``id`` to the index, as SQLite appends
the rowid), already in ``(age, id)`` order, so a batch costs ``limit`` index entries per
status, not a sort of the whole backlog.

On SQLite the work transaction holds the database's write lock from its start, so the
claim is exclusive without a row lock (see dialect.py); the re-check under it is the
same.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any, Literal

import attrs

from payments.model import Payment, PaymentStatus, utcnow
from payments.storage import repository as repo
from payments.storage.database import Connection
from payments.storage.dialect import MYSQL, Dialect
from payments.storage.timestamps import from_db_datetime, to_db_datetime


@attrs.frozen
class Selection:
    """A job's candidates: payments in ``statuses`` whose ``age_column`` is older than
    the pass's cutoff (and, with ``needs_provider_id``, that exist at the provider)."""

    job: str
    statuses: tuple[PaymentStatus, ...]
    age_column: Literal["updated_at", "created_at"]
    index: str
    needs_provider_id: bool


# The reconciler: open payments nothing has touched for a while. Only those the provider
# knows of: a CREATED row has no provider object to ask about.
STALE = Selection(
    job="reconcile",
    statuses=(PaymentStatus.PENDING, PaymentStatus.PROCESSING),
    age_column="updated_at",
    index="ix_payments_status_updated",
    needs_provider_id=True,
)

# The expirer: payments still open long after they were made, by created_at (which the
# reconciler's touches never move). CREATED is included: such a row is a create that
# crashed or met a provider outage and was never retried; the expirer replays the create
# (same idempotency key, so Stripe hands back any object it made), closes that object
# and ends the payment, so every payment reaches a terminal status and its caller hears.
STUCK = Selection(
    job="expire",
    statuses=(PaymentStatus.CREATED, PaymentStatus.PENDING, PaymentStatus.PROCESSING),
    age_column="created_at",
    index="ix_payments_status_created",
    needs_provider_id=False,
)


@attrs.frozen
class Candidate:
    """A payment to work on, as the candidate read saw it (re-checked under the lock)."""

    id: int
    status: PaymentStatus
    at: datetime  # the selection's age column: the keyset cursor with ``id``


def candidates_query(
    selection: Selection,
    cutoff: datetime,
    after: Candidate | None,
    limit: int,
    dialect: Dialect = MYSQL,
) -> tuple[str, list[Any]]:
    """The SELECT of one batch (public for the EXPLAIN test)."""
    age = selection.age_column
    branches: list[str] = []
    args: list[Any] = []
    for status in selection.statuses:
        where = [f"status = %s AND {age} < %s"]
        args += [int(status), to_db_datetime(cutoff)]
        if selection.needs_provider_id:
            where.append("provider_payment_id <> ''")
        if after is not None:
            where.append(f"({age} > %s OR ({age} = %s AND id > %s))")
            at = to_db_datetime(after.at)
            args += [at, at, after.id]
        branches.append(
            dialect.limited_branch(
                f"SELECT id, status, {age} FROM payments WHERE {' AND '.join(where)}"  # noqa: S608
                f" ORDER BY {age}, id LIMIT %s"
            )
        )
        args.append(limit)
    sql = " UNION ALL ".join(branches) + f" ORDER BY {age}, id LIMIT %s"
    args.append(limit)
    return sql, args


async def candidates(
    conn: Connection,
    selection: Selection,
    cutoff: datetime,
    after: Candidate | None = None,
    limit: int = 100,
) -> list[Candidate]:
    """Up to ``limit`` candidates older than ``cutoff``, oldest first, after ``after``."""
    sql, args = candidates_query(selection, cutoff, after, limit, conn.dialect)
    rows = await conn.fetchall(sql, args)
    return [Candidate(int(row[0]), PaymentStatus(row[1]), from_db_datetime(row[2])) for row in rows]


@cache
def _claim_sql(selection: Selection, dialect: Dialect = MYSQL) -> str:
    placeholders = ", ".join(["%s"] * len(selection.statuses))
    provider = " AND provider_payment_id <> ''" if selection.needs_provider_id else ""
    return (
        f"SELECT id FROM payments WHERE id = %s AND status IN ({placeholders})"  # noqa: S608
        f" AND {selection.age_column} < %s{provider}"
        " AND (claimed_until IS NULL OR claimed_until < %s)"
        f"{dialect.for_update_skip_locked}"
    )


async def claim(
    conn: Connection, selection: Selection, payment_id: int, cutoff: datetime
) -> Payment | None:
    """Lock the payment if it is free and still a candidate; None when another process
    holds it, a create, cancel or job is at the provider about it (its lease,
    payments/storage/leases.py), or it no longer matches (worked meanwhile). Call inside
    a transaction: the lock lasts until it ends."""
    args: Sequence[Any] = (
        payment_id,
        *(int(status) for status in selection.statuses),
        to_db_datetime(cutoff),
        to_db_datetime(utcnow()),
    )
    if await conn.fetchone(_claim_sql(selection, conn.dialect), args) is None:
        return None
    # Already ours: this locking read returns at once, with the latest committed row.
    return await repo.get_payment(conn, payment_id, for_update=True)


@cache
def _claim_many_sql(
    selection: Selection, count: int, dialect: Dialect = MYSQL, *, lock: bool = True
) -> str:
    ids = ", ".join(["%s"] * count)
    statuses = ", ".join(["%s"] * len(selection.statuses))
    provider = " AND provider_payment_id <> ''" if selection.needs_provider_id else ""
    # By primary key, forced: a plan scanning an index range (the optimizer's pick for
    # a long IN list on a small table) would lock rows of another batch, and so deadlock
    # with it (seen between two batches: InnoDB's LATEST DETECTED DEADLOCK).
    return (
        f"{repo.SELECT_PAYMENT}{dialect.force_index('PRIMARY')}"
        f" WHERE id IN ({ids}) AND status IN ({statuses})"
        f" AND {selection.age_column} < %s{provider}"
        " AND (claimed_until IS NULL OR claimed_until < %s)"
        f" ORDER BY id{dialect.for_update_skip_locked if lock else ''}"
    )


async def claim_many(
    conn: Connection, selection: Selection, payment_ids: Sequence[int], cutoff: datetime
) -> list[Payment]:
    """Lock, in one query, those of ``payment_ids`` that are free and still candidates;
    the others (held by another process, leased by a create, cancel or job at the
    provider, or worked meanwhile) are left out. By primary key, so only those rows are
    locked (no range, no gap). Call inside a transaction."""
    return await _many(conn, selection, payment_ids, cutoff, lock=True)


async def peek_many(
    conn: Connection, selection: Selection, payment_ids: Sequence[int], cutoff: datetime
) -> list[Payment]:
    """Those of ``payment_ids`` that are still candidates and not leased, read without
    a lock: what to ask the provider about before claiming (holding nothing meanwhile).
    A row locked by another process is still read (its last committed state)."""
    return await _many(conn, selection, payment_ids, cutoff, lock=False)


async def _many(
    conn: Connection,
    selection: Selection,
    payment_ids: Sequence[int],
    cutoff: datetime,
    *,
    lock: bool,
) -> list[Payment]:
    if not payment_ids:
        return []
    args: Sequence[Any] = (
        *payment_ids,
        *(int(status) for status in selection.statuses),
        to_db_datetime(cutoff),
        to_db_datetime(utcnow()),
    )
    sql = _claim_many_sql(selection, len(payment_ids), conn.dialect, lock=lock)
    return [repo.payment_from_row(row) for row in await conn.fetchall(sql, args)]
