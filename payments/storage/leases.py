"""Leases on payments: who is talking to the provider about one, and until when.

A call to Stripe can take seconds (or hang until its timeout); holding a row lock and
a pooled session across it stalls everything else that needs either. So the work that
calls the provider about a payment (create, cancel, the reconciler, the expirer's
per-payment path) first takes a lease in a short committed statement, calls the
provider holding nothing, then applies the answer in a second short transaction under
the row lock and gives the lease back.

* One holder at a time: taking is one conditional UPDATE (status still one the work
  is for, and no live lease), so of two concurrent takers exactly one matches the row.
* A holder that crashed holds nothing forever: its lease lapses at ``claimed_until``,
  and the next taker (a retried request, a job) repeats the provider call with the same
  idempotency key, so the provider hands back what it already made.
* The lease serializes provider work; it does not replace the status machine: the
  apply step re-reads the row under its lock and lets the machine decide.
* ``claimed_by`` is ``<purpose>:<token>`` (``open``, ``cancel``, ``reconcile``,
  ``expire``), so a provider event can tell that a cancel is closing the payment it is
  about.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from payments.model import PaymentStatus, utcnow
from payments.storage.database import Connection
from payments.storage.timestamps import to_db_datetime

OPEN = "open"
CANCEL = "cancel"
RECONCILE = "reconcile"
EXPIRE = "expire"


def new_owner(purpose: str) -> str:
    """A lease holder's name: the purpose and a random token (fits VARCHAR(64))."""
    return f"{purpose}:{uuid.uuid4().hex}"


def purpose_of(owner: str) -> str:
    return owner.partition(":")[0]


async def take(
    conn: Connection,
    payment_id: int,
    owner: str,
    seconds: float,
    statuses: Iterable[PaymentStatus],
    *,
    now: datetime | None = None,
) -> bool:
    """Take the lease when the payment is in ``statuses`` and no live lease is held
    (one statement, autocommit or inside the caller's transaction); True when taken."""
    now = now or utcnow()
    wanted = [int(status) for status in statuses]
    placeholders = ", ".join(["%s"] * len(wanted))
    # By the primary key, as the apply step locks it: through the status index the
    # UPDATE would lock that index first and deadlock with a status change in flight.
    primary = conn.dialect.force_index("PRIMARY")
    matched = await conn.execute(
        f"UPDATE payments{primary} SET claimed_by = %s, claimed_until = %s"  # noqa: S608
        f" WHERE id = %s AND status IN ({placeholders})"
        " AND (claimed_until IS NULL OR claimed_until < %s)",
        (
            owner,
            to_db_datetime(now + timedelta(seconds=seconds)),
            payment_id,
            *wanted,
            to_db_datetime(now),
        ),
    )
    return matched == 1


async def release(conn: Connection, payment_id: int, owner: str) -> bool:
    """Give the lease back if ``owner`` still holds it; True when it did."""
    matched = await conn.execute(
        "UPDATE payments SET claimed_by = '', claimed_until = NULL"
        " WHERE id = %s AND claimed_by = %s",
        (payment_id, owner),
    )
    return matched == 1


async def live_purpose(conn: Connection, payment_id: int, *, now: datetime | None = None) -> str:
    """The purpose of the live lease on the payment ('' when none)."""
    row = await conn.fetchone(
        "SELECT claimed_by FROM payments WHERE id = %s AND claimed_until >= %s",
        (payment_id, to_db_datetime(now or utcnow())),
    )
    return purpose_of(str(row[0])) if row else ""
