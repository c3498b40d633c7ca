"""Which PENDING refunds the reconciler asks the provider about, and the claim that
makes one replica's question exclusive.

Candidates are PENDING refunds nothing has touched since the cutoff, oldest first
(``ix_refunds_status_updated``), read with keyset pagination on ``(updated_at, id)``.
A candidate is claimed by one compare-and-set ``UPDATE`` of its ``updated_at`` that
only matches while the row is still PENDING and older than the cutoff: the first
replica moves it past the cutoff, so the same statement matches nothing for any other
replica in this stale window. The claim commits before the provider is asked, so no
row lock is held across that call; the answer is then applied under the payment's row
lock (payments.jobs.refund_settling). A replica that dies after claiming leaves a row
that becomes a candidate again one stale window later.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from payments.model import RefundStatus
from payments.storage.database import Connection
from payments.storage.timestamps import from_db_datetime, to_db_datetime


@attrs.frozen
class RefundCandidate:
    """A stale PENDING refund as the candidate read saw it (re-checked by the claim)."""

    id: int
    payment_id: int
    updated_at: datetime


async def stale_pending(
    conn: Connection,
    cutoff: datetime,
    after: RefundCandidate | None,
    limit: int,
) -> list[RefundCandidate]:
    """Up to ``limit`` PENDING refunds last updated before ``cutoff``, oldest first,
    after ``after`` (keyset)."""
    where = "status = %s AND updated_at < %s"
    args: list[object] = [int(RefundStatus.PENDING), to_db_datetime(cutoff)]
    if after is not None:
        at = to_db_datetime(after.updated_at)
        where += " AND (updated_at > %s OR (updated_at = %s AND id > %s))"
        args += [at, at, after.id]
    rows = await conn.fetchall(
        f"SELECT id, payment_id, updated_at FROM refunds WHERE {where}"  # noqa: S608 - fixed SQL
        " ORDER BY updated_at, id LIMIT %s",
        (*args, max(0, limit)),
    )
    return [RefundCandidate(int(row[0]), int(row[1]), from_db_datetime(row[2])) for row in rows]


async def claim(conn: Connection, refund_id: int, cutoff: datetime, now: datetime) -> bool:
    """Claim the refund for this pass (touch its ``updated_at`` to ``now``); False when
    another replica did first or it is no longer a stale PENDING refund."""
    matched = await conn.execute(
        "UPDATE refunds SET updated_at = %s WHERE id = %s AND status = %s AND updated_at < %s",
        (to_db_datetime(now), refund_id, int(RefundStatus.PENDING), to_db_datetime(cutoff)),
    )
    return matched == 1
