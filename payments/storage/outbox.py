"""The callback outbox: status callbacks owed to callers, and their delivery attempts.

Rows are written by payments.lifecycle in the status-change transaction and worked by
the dispatcher (payments/jobs/dispatcher.py), which claims due rows with a lease.

Why a lease and not only a row lock: a delivery is an HTTP call of up to
PAYMENTS_CALLBACK_HTTP_TIMEOUT_SECONDS, far too long to hold a transaction open. So
:func:`claim_due` locks due rows for one short transaction (``FOR UPDATE SKIP LOCKED``:
a second replica skips them instead of waiting) and stamps them ``claimed_by`` /
``claimed_until``; other replicas leave a row alone while its lease runs. A replica
that dies mid-delivery leaves a lease that expires, and another takes the row over:
delivery is at-least-once, and the receiver deduplicates on ``webhook-id``.
:func:`record_attempt` writes the outcome only while the lease it was claimed under
is still the row's, so a slow replica whose lease was taken over cannot overwrite the
newer owner's work.

On SQLite the claim transaction holds the database's write lock instead of row locks
(see dialect.py); the leases work the same, so the dispatcher does not know which
backend it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import attrs

from payments.model import CallbackKind, OutboxEntry, OutboxState, PaymentStatus
from payments.storage.database import Connection, Database, DuplicateKey
from payments.storage.dialect import MYSQL, Dialect
from payments.storage.timestamps import from_db_datetime, to_db_datetime

# VARCHAR(500) of last_error and callback_attempts.error (strict mode refuses longer).
ERROR_MAX_CHARS = 500
# A claimer's worker id must fit claimed_by VARCHAR(64).
WORKER_ID_MAX_CHARS = 64

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
    "traceparent",
    "kind",
    "refund_id",
    "resend",
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
        traceparent=values["traceparent"],
        kind=CallbackKind(values["kind"]),
        refund_id=int(values["refund_id"]),
        resend=int(values["resend"]),
    )


# What a new entry writes (the claim and delivery columns start empty), in
# OUTBOX_COLUMNS order, which _entry_values follows.
_ENTRY_COLUMNS = tuple(
    column
    for column in OUTBOX_COLUMNS
    if column not in ("id", "claimed_by", "claimed_until", "last_error", "delivered_at")
)
_INSERT_ENTRY = (
    f"INSERT INTO callback_outbox ({', '.join(_ENTRY_COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(['%s'] * len(_ENTRY_COLUMNS))})"
)


def _entry_values(entry: OutboxEntry) -> list[Any]:
    return [
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
        entry.traceparent,
        str(entry.kind),
        entry.refund_id,
        entry.resend,
    ]


async def insert_entry(conn: Connection, entry: OutboxEntry) -> int:
    """Queue a callback; returns its id. A payment (or refund) announces each status
    once, so a second entry for the same announcement and resend number is ignored (0
    is returned)."""
    try:
        return await conn.insert(_INSERT_ENTRY, _entry_values(entry))
    except DuplicateKey as exc:
        if exc.key != "uq_callback_outbox_announcement":
            raise
        return 0


async def insert_entries(conn: Connection, entries: Sequence[OutboxEntry]) -> None:
    """Queue many callbacks in one multi-row INSERT (a bulk status change: each payment
    reaches a terminal status once, so none of them has an entry for it yet)."""
    if not entries:
        return
    row = "(" + ", ".join(["%s"] * len(_ENTRY_COLUMNS)) + ")"
    args: list[Any] = []
    for entry in entries:
        args += _entry_values(entry)
    await conn.execute(
        f"INSERT INTO callback_outbox ({', '.join(_ENTRY_COLUMNS)}) VALUES "  # noqa: S608
        + ", ".join([row] * len(entries)),
        args,
    )


async def entries_for_payment(conn: Connection, payment_id: int) -> list[OutboxEntry]:
    """A payment's callbacks, oldest first."""
    rows = await conn.fetchall(f"{SELECT_OUTBOX} WHERE payment_id = %s ORDER BY id", (payment_id,))
    return [entry_from_row(row) for row in rows]


async def get_entry(conn: Connection, outbox_id: int) -> OutboxEntry | None:
    """The outbox row with this id, or None."""
    row = await conn.fetchone(f"{SELECT_OUTBOX} WHERE id = %s", (outbox_id,))
    return None if row is None else entry_from_row(row)


@cache
def due_query(dialect: Dialect = MYSQL, skipping: int = 0) -> str:
    """The due rows, oldest first (without the lock clause); ``skipping`` URL prefixes
    left out (one ``url NOT LIKE`` argument each).

    FORCE INDEX on MySQL because this is a locking read: a table scan would lock (and
    make other replicas skip) every row it passed, not just the batch.
    ix_callback_outbox_due is (state, next_attempt_at) and InnoDB (like SQLite) appends
    id, so the range scan already yields ORDER BY next_attempt_at, id without a sort.
    """
    skip = " AND url NOT LIKE %s ESCAPE '!'" * skipping
    return (
        f"{SELECT_OUTBOX}{dialect.force_index('ix_callback_outbox_due')}"
        " WHERE state = 'pending' AND next_attempt_at <= %s"
        f" AND (claimed_until IS NULL OR claimed_until <= %s){skip}"
        " ORDER BY next_attempt_at, id LIMIT %s"
    )


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (ESCAPE '!') matching URLs under ``prefix`` + ``/``."""
    escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped + "/%"


DUE_QUERY = due_query(MYSQL)


async def claim_due(
    db: Database,
    worker_id: str,
    now: datetime,
    lease_seconds: float,
    limit: int,
    *,
    skip_prefixes: Sequence[str] = (),
) -> list[OutboxEntry]:
    """Claim up to ``limit`` pending rows due at ``now`` whose lease is free or expired,
    leaving out URLs under ``skip_prefixes`` (``scheme://host:port``: receivers that
    have their share in flight already).

    One short transaction: lock the rows (skipping rows another replica is claiming
    right now), stamp them with ``worker_id`` and a lease ending ``now +
    lease_seconds``, commit. The entries come back carrying that lease, which
    :func:`record_attempt` and :func:`release` check.
    """
    if not worker_id or len(worker_id) > WORKER_ID_MAX_CHARS:
        raise ValueError(f"worker_id must be 1..{WORKER_ID_MAX_CHARS} characters")
    if limit <= 0:
        return []
    until = now + timedelta(seconds=lease_seconds)
    db_now = to_db_datetime(now)
    async with db.transaction() as conn:
        dialect = conn.dialect
        patterns = [like_prefix(prefix) for prefix in skip_prefixes]
        rows = await conn.fetchall(
            due_query(dialect, len(patterns)) + dialect.for_update_skip_locked,
            (db_now, db_now, *patterns, limit),
        )
        if not rows:
            return []
        entries = [entry_from_row(row) for row in rows]
        ids = [entry.id for entry in entries]
        marks = ", ".join(["%s"] * len(ids))
        await conn.execute(
            f"UPDATE callback_outbox SET claimed_by = %s, claimed_until = %s WHERE id IN ({marks})",  # noqa: S608
            (worker_id, to_db_datetime(until), *ids),
        )
    for entry in entries:
        entry.claimed_by = worker_id
        entry.claimed_until = until
    return entries


@attrs.frozen
class CallbackAttempt:
    """One delivery attempt (a row of callback_attempts).

    ``status_code`` is None when no HTTP answer came (timeout, connection error, or a
    URL refused before any request); ``error`` then says why.
    """

    outbox_id: int
    attempt: int  # 1 for the first try
    attempted_at: datetime
    status_code: int | None
    error: str
    latency_ms: int
    id: int = 0


ATTEMPT_COLUMNS = (
    "id",
    "outbox_id",
    "attempt",
    "attempted_at",
    "status_code",
    "error",
    "latency_ms",
)


def _clip(text: str) -> str:
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 3] + "..."


def _lease_guard(entry: OutboxEntry, worker_id: str) -> tuple[Any, ...]:
    if entry.claimed_until is None or entry.claimed_by != worker_id:
        raise ValueError("the entry was not claimed by this worker (use claim_due)")
    return (entry.id, worker_id, to_db_datetime(entry.claimed_until))


# The lease an entry was claimed under is (claimed_by, claimed_until): claimed_until is
# new on every claim, so this also refuses this same worker's own expired, re-claimed
# lease.
_RECORD = (
    "UPDATE callback_outbox SET state = %s, attempts = %s, next_attempt_at = %s,"
    " last_error = %s, delivered_at = %s, updated_at = %s, claimed_by = '', claimed_until = NULL"
    " WHERE id = %s AND state = 'pending' AND claimed_by = %s AND claimed_until = %s"
)
_RELEASE = (
    "UPDATE callback_outbox SET claimed_by = '', claimed_until = NULL"
    " WHERE id = %s AND state = 'pending' AND claimed_by = %s AND claimed_until = %s"
)


_INSERT_ATTEMPT = (
    "INSERT INTO callback_attempts (outbox_id, attempt, attempted_at, status_code, error,"
    " latency_ms) VALUES "
)
_ATTEMPT_ROW = "(%s, %s, %s, %s, %s, %s)"


_RECORDED_COLUMNS = (
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "delivered_at",
    "updated_at",
)


def _record_values(
    attempt: CallbackAttempt, state: OutboxState, next_attempt_at: datetime
) -> tuple[Any, ...]:
    """The values of _RECORDED_COLUMNS (_RECORD's SET, in that order)."""
    delivered = state == OutboxState.DELIVERED
    return (
        str(state),
        attempt.attempt,
        to_db_datetime(next_attempt_at),
        "" if delivered else _clip(attempt.error),
        to_db_datetime(attempt.attempted_at) if delivered else None,
        to_db_datetime(attempt.attempted_at),
    )


def _attempt_values(outbox_id: int, attempt: CallbackAttempt) -> tuple[Any, ...]:
    return (
        outbox_id,
        attempt.attempt,
        to_db_datetime(attempt.attempted_at),
        attempt.status_code,
        _clip(attempt.error),
        attempt.latency_ms,
    )


async def record_attempt(
    conn: Connection,
    entry: OutboxEntry,
    worker_id: str,
    attempt: CallbackAttempt,
    state: OutboxState,
    next_attempt_at: datetime,
) -> bool:
    """Write ``attempt`` and move the row to ``state``, releasing the claim.

    Use inside ``db.transaction()``, so the row and its attempt are written together.
    Returns False, writing nothing, when the row is no longer held under the lease
    ``entry`` was claimed with (it expired and another worker, or a later claim, took
    it over, or it is no longer pending): the newer owner's outcome stands.
    ``delivered_at`` is set to the attempt time when ``state`` is DELIVERED.
    """
    values = _record_values(attempt, state, next_attempt_at)
    matched = await conn.execute(_RECORD, (*values, *_lease_guard(entry, worker_id)))
    if matched != 1:
        return False
    await conn.insert(_INSERT_ATTEMPT + _ATTEMPT_ROW, _attempt_values(entry.id, attempt))
    return True


@attrs.frozen
class FinishedAttempt:
    """An attempt to record, with what it decided (:func:`record_attempts`)."""

    entry: OutboxEntry  # as claimed: its lease is the guard
    attempt: CallbackAttempt
    state: OutboxState
    next_attempt_at: datetime


# Rows per record_attempts statement: 6 CASE columns x 2 arguments + the id list, well
# under SQLite's 32,766 variables and MySQL's packet.
RECORD_BATCH_MAX = 64


def _case(column: str, count: int) -> str:
    return f"{column} = CASE id{' WHEN %s THEN %s' * count} END"


async def record_attempts(
    conn: Connection, worker_id: str, finished: Sequence[FinishedAttempt]
) -> list[bool]:
    """:func:`record_attempt` for many rows (at most RECORD_BATCH_MAX, distinct ids) in
    a few statements: lock the rows, check each one's lease in Python, one UPDATE of
    the rows still held, one multi-row INSERT of their attempts. Whether each was
    recorded, in order. Use inside ``db.transaction()``: the lock (on SQLite the write
    lock) keeps the lease check exact until the UPDATE."""
    if len(finished) <= 1:
        return [
            await record_attempt(conn, f.entry, worker_id, f.attempt, f.state, f.next_attempt_at)
            for f in finished
        ]
    if len(finished) > RECORD_BATCH_MAX:
        raise ValueError(f"at most {RECORD_BATCH_MAX} attempts per call")
    for item in finished:
        _lease_guard(item.entry, worker_id)
    ids = sorted(item.entry.id for item in finished)  # one lock order for every replica
    marks = ", ".join(["%s"] * len(ids))
    rows = await conn.fetchall(
        f"SELECT id, claimed_until FROM callback_outbox WHERE id IN ({marks})"  # noqa: S608
        f" AND state = 'pending' AND claimed_by = %s{conn.dialect.for_update}",
        (*ids, worker_id),
    )
    leases = {int(row[0]): _optional_time(row[1]) for row in rows}
    held = [f for f in finished if leases.get(f.entry.id) == f.entry.claimed_until]
    if held:
        args: list[Any] = []
        values = [_record_values(item.attempt, item.state, item.next_attempt_at) for item in held]
        for index in range(len(_RECORDED_COLUMNS)):
            for item, row_values in zip(held, values, strict=True):
                args += (item.entry.id, row_values[index])
        cases = ", ".join(_case(column, len(held)) for column in _RECORDED_COLUMNS)
        held_marks = ", ".join(["%s"] * len(held))
        await conn.execute(
            f"UPDATE callback_outbox SET {cases}, claimed_by = '', claimed_until = NULL"  # noqa: S608
            f" WHERE id IN ({held_marks})",
            (*args, *(item.entry.id for item in held)),
        )
        attempt_args: list[Any] = []
        for item in held:
            attempt_args += _attempt_values(item.entry.id, item.attempt)
        await conn.execute(_INSERT_ATTEMPT + ", ".join([_ATTEMPT_ROW] * len(held)), attempt_args)
    recorded = {item.entry.id for item in held}
    return [item.entry.id in recorded for item in finished]


async def release(conn: Connection, entry: OutboxEntry, worker_id: str) -> bool:
    """Give a claimed row back untouched (not attempted: shutting down, lease too
    short), so another replica need not wait for the lease to expire. False when the
    lease was no longer ours."""
    matched = await conn.execute(_RELEASE, _lease_guard(entry, worker_id))
    return matched == 1


async def park(
    db: Database, entries: Sequence[OutboxEntry], worker_id: str, until: datetime
) -> int:
    """Keep claimed rows unattempted until ``until`` (their lease moved to it): the
    dispatcher's way to set aside rows of a receiver that already has its share in
    flight, so they do not fill its slots. ``entries`` must come from one claim (one
    lease); only rows still held under it move. How many did."""
    if not entries:
        return 0
    claimed_until = entries[0].claimed_until
    if claimed_until is None or any(e.claimed_until != claimed_until for e in entries):
        raise ValueError("park entries of one claim")
    ids = [entry.id for entry in entries]
    marks = ", ".join(["%s"] * len(ids))
    async with db.transaction() as conn:
        return await conn.execute(
            f"UPDATE callback_outbox SET claimed_until = %s WHERE id IN ({marks})"  # noqa: S608
            " AND state = 'pending' AND claimed_by = %s AND claimed_until = %s",
            (to_db_datetime(until), *ids, worker_id, to_db_datetime(claimed_until)),
        )


async def attempts_for(conn: Connection, outbox_id: int) -> list[CallbackAttempt]:
    """A callback's delivery attempts, first first."""
    rows = await conn.fetchall(
        f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM callback_attempts"  # noqa: S608
        " WHERE outbox_id = %s ORDER BY id",
        (outbox_id,),
    )
    return [
        CallbackAttempt(
            id=int(row[0]),
            outbox_id=int(row[1]),
            attempt=int(row[2]),
            attempted_at=from_db_datetime(row[3]),
            status_code=None if row[4] is None else int(row[4]),
            error=row[5],
            latency_ms=int(row[6]),
        )
        for row in rows
    ]


@cache
def _next_due_query(dialect: Dialect) -> str:
    claimable = dialect.greatest("next_attempt_at", "COALESCE(claimed_until, next_attempt_at)")
    return (
        f"SELECT MIN({claimable}) FROM callback_outbox"  # noqa: S608 - fixed SQL
        f"{dialect.force_index('ix_callback_outbox_due')}"
        " WHERE state = 'pending' AND next_attempt_at <= %s"
    )


async def next_due_at(conn: Connection, horizon: datetime) -> datetime | None:
    """When the earliest pending row up to ``horizon`` becomes claimable (its due time,
    or its lease end if later), or None. Lets the dispatcher sleep until a retry is due
    instead of until its next sweep; only rows due by ``horizon`` are read (an index
    range on ix_callback_outbox_due), so a large backlog further out costs nothing."""
    row = await conn.fetchone(_next_due_query(conn.dialect), (to_db_datetime(horizon),))
    return None if row is None or row[0] is None else from_db_datetime(row[0])


@cache
def _backlog_query(dialect: Dialect) -> str:
    return (
        "SELECT COUNT(*), MIN(next_attempt_at) FROM callback_outbox"  # noqa: S608 - fixed SQL
        f"{dialect.force_index('ix_callback_outbox_due')}"
        " WHERE state = 'pending' AND next_attempt_at <= %s"
    )


async def due_backlog(conn: Connection, now: datetime) -> tuple[int, datetime | None]:
    """How many pending rows are due at ``now`` and the earliest due time among them
    (for the outbox gauges); an index-only range on ix_callback_outbox_due."""
    row = await conn.fetchone(_backlog_query(conn.dialect), (to_db_datetime(now),))
    if row is None or not row[0]:
        return 0, None
    return int(row[0]), from_db_datetime(row[1])
