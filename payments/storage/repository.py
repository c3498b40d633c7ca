"""Payments and their events: plain functions over a connection of either backend.

The caller owns the transaction (``async with db.transaction() as conn``), so one use
case can write a payment, its event and its outbox row atomically. Every statement is
parameterized (``%s``); only fixed column names are ever put into SQL text. The SQL is
the subset MySQL and SQLite share, plus the row lock the connection's dialect renders.

Row <-> entity mapping lives in the ``_*_to_row`` / ``_*_from_row`` pairs below and
nowhere else: entities hold timezone-aware UTC datetimes and enums, the database naive
UTC datetimes with microseconds and small ints, metadata as compact JSON text.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs

from payments.errors import NotFound
from payments.model import (
    MAX_LIST_LIMIT,
    STORED,
    EventKind,
    ListFilter,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
)
from payments.storage.database import Connection
from payments.storage.timestamps import from_db_datetime, to_db_datetime

# --- mapping ------------------------------------------------------------------------

# Column names are the Payment field names; a field without a column fails loudly.
PAYMENT_COLUMNS: tuple[str, ...] = tuple(
    field.name for field in attrs.fields(Payment) if field.metadata.get(STORED, True)
)
_INSERT_COLUMNS = tuple(column for column in PAYMENT_COLUMNS if column != "id")
_ENUMS: dict[str, type[Any]] = {
    "status": PaymentStatus,
    "payment_method": PaymentMethod,
    "payment_type": PaymentType,
    "provider": ProviderType,
}
_DATETIMES = frozenset({"created_at", "updated_at"})

EVENT_COLUMNS: tuple[str, ...] = (
    "id",
    "payment_id",
    "kind",
    "from_status",
    "to_status",
    "reason",
    "provider_event_id",
    "provider_event_type",
    "created_at",
)


def _metadata_to_db(metadata: dict[str, str]) -> str:
    # ensure_ascii=False keeps emoji and CJK as utf8mb4 text, not \ud83d escapes.
    return json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _metadata_from_db(text: str | bytes | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    return {str(key): str(item) for key, item in value.items()} if isinstance(value, dict) else {}


def _payment_to_row(payment: Payment) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column in _INSERT_COLUMNS:
        value = getattr(payment, column)
        if column in _ENUMS:
            value = int(value)
        elif column in _DATETIMES:
            value = to_db_datetime(value)
        elif column == "metadata":
            value = _metadata_to_db(value)
        row[column] = value
    return row


def _enum_decoder(kind: type[enum.IntEnum]) -> Callable[[Any], Any]:
    """The member for a stored number: a dict lookup, the enum's own call (and its
    ValueError) for anything else."""
    members = {int(member): member for member in kind}

    def decode(value: Any) -> Any:
        member = members.get(value) if type(value) is int else None
        return member if member is not None else kind(value)

    return decode


def _column_decoder(column: str) -> Callable[[Any], Any] | None:
    if column in _ENUMS:
        return _enum_decoder(_ENUMS[column])
    if column in _DATETIMES:
        return from_db_datetime
    if column == "metadata":
        return _metadata_from_db
    if column == "id":
        return int
    return None


def _make_payment_from_row() -> Callable[[Sequence[Any]], Payment]:
    """The row -> Payment function, generated once: the row unpacked into one local per
    column, each through its decoder (found once, not per row and column) or as stored,
    into one Payment call. A row of the wrong length raises ValueError, as zip(strict)
    did. Every read decodes a row: 5.2 -> 4.2 us against the dict comprehension over
    (column, decoder) pairs it replaces."""
    scope: dict[str, Any] = {"Payment": Payment}
    arguments = []
    for index, column in enumerate(PAYMENT_COLUMNS):
        decode = _column_decoder(column)
        if decode is None:
            arguments.append(f"{column}=c{index}")
        else:
            scope[f"decode_{index}"] = decode
            arguments.append(f"{column}=decode_{index}(c{index})")
    names = ", ".join(f"c{index}" for index in range(len(PAYMENT_COLUMNS)))
    source = (
        "def payment_from_row(row):\n"
        f"    ({names},) = row\n"
        f"    return Payment({', '.join(arguments)})\n"
    )
    exec(compile(source, "<payment_from_row>", "exec"), scope)  # noqa: S102 - fixed names
    return scope["payment_from_row"]  # type: ignore[no-any-return]


_payment_from_row = _make_payment_from_row()


def _event_to_row(event: PaymentEvent) -> dict[str, Any]:
    return {
        "payment_id": event.payment_id,
        "kind": str(event.kind),
        "from_status": int(event.from_status),
        "to_status": int(event.to_status),
        "reason": event.reason,
        # NULL, not '': the UNIQUE key then allows any number of rows without one.
        "provider_event_id": event.provider_event_id or None,
        "provider_event_type": event.provider_event_type,
        "created_at": to_db_datetime(event.created_at),
    }


def _event_from_row(row: Sequence[Any]) -> PaymentEvent:
    values = dict(zip(EVENT_COLUMNS, row, strict=True))
    return PaymentEvent(
        id=int(values["id"]),
        payment_id=int(values["payment_id"]),
        kind=EventKind(values["kind"]),
        from_status=PaymentStatus(values["from_status"]),
        to_status=PaymentStatus(values["to_status"]),
        reason=values["reason"],
        provider_event_id=values["provider_event_id"] or "",
        provider_event_type=values["provider_event_type"],
        created_at=from_db_datetime(values["created_at"]),
    )


_SELECT_PAYMENT = f"SELECT {', '.join(PAYMENT_COLUMNS)} FROM payments"  # noqa: S608 - fixed names
# The row as one JSON array column: the server then describes one column instead of 25,
# and trio-mysql's parsing of 25 column-definition packets per result was ~130 us of the
# ~245 us a GET spent in the database (bench/README.md, py-spy). MariaDB, MySQL and
# SQLite all have JSON_ARRAY; DATETIME(6) comes out as its ISO text, metadata as a string.
_SELECT_PAYMENT_ARRAY = f"SELECT JSON_ARRAY({', '.join(PAYMENT_COLUMNS)}) FROM payments"  # noqa: S608
# For other storage modules that read whole payments (claims.claim_many).
SELECT_PAYMENT = _SELECT_PAYMENT
payment_from_row = _payment_from_row
_SELECT_EVENT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM payment_events"  # noqa: S608
_SELECT_BY_PROVIDER_REF = (
    f"SELECT * FROM ({_SELECT_PAYMENT} WHERE provider_payment_id = %s"  # noqa: S608
    f" UNION {_SELECT_PAYMENT} WHERE provider_subscription_id = %s) AS found"
    " ORDER BY id DESC LIMIT 1"
)


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    placeholders = ", ".join(["%s"] * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608


_INSERT_PAYMENT = _insert_sql("payments", _INSERT_COLUMNS)
_INSERT_EVENT = _insert_sql("payment_events", EVENT_COLUMNS[1:])


def _lock(conn: Connection, for_update: bool) -> str:
    """The row-lock clause, asked of the dialect only when wanted (a plain read runs the
    same text on both engines)."""
    return conn.dialect.for_update if for_update else ""


async def _one_payment(conn: Connection, sql: str, args: Sequence[Any]) -> Payment | None:
    row = await conn.fetchone(sql, args)
    return None if row is None else _payment_from_row(row)


# --- payments -----------------------------------------------------------------------


async def insert_payment(conn: Connection, payment: Payment) -> int:
    """Insert a new payment (``payment.id`` is ignored); return its id.

    Raises DuplicateKey (key ``uq_payments_caller_request``) when (caller_service,
    request_id) already names a payment: the idempotency check of create.
    """
    row = _payment_to_row(payment)
    return await conn.insert(_INSERT_PAYMENT, [row[column] for column in _INSERT_COLUMNS])


async def get_payment(
    conn: Connection, payment_id: int, *, for_update: bool = False
) -> Payment | None:
    """The payment with this id, or None. ``for_update`` locks the row until the
    transaction ends (use it inside ``db.transaction()``)."""
    if payment_id <= 0:
        return None
    sql = f"{_SELECT_PAYMENT_ARRAY} WHERE id = %s" + _lock(conn, for_update)
    row = await conn.fetchone(sql, (payment_id,))
    return None if row is None else _payment_from_row(json.loads(row[0]))


async def get_payments(conn: Connection, payment_ids: Sequence[int]) -> list[Payment]:
    """The payments with these ids that exist (any order): one statement."""
    wanted = [number for number in payment_ids if number > 0]
    if not wanted:
        return []
    marks = ", ".join(["%s"] * len(wanted))
    rows = await conn.fetchall(f"{_SELECT_PAYMENT_ARRAY} WHERE id IN ({marks})", wanted)
    return [_payment_from_row(json.loads(row[0])) for row in rows]


async def get_payment_by_request(
    conn: Connection, caller_service: str, request_id: str, *, for_update: bool = False
) -> Payment | None:
    """The payment (caller_service, request_id) names, or None."""
    sql = f"{_SELECT_PAYMENT} WHERE caller_service = %s AND request_id = %s" + _lock(
        conn, for_update
    )
    return await _one_payment(conn, sql, (caller_service, request_id))


async def get_payment_by_callback_hash(
    conn: Connection, callback_hash: str, *, for_update: bool = False
) -> Payment | None:
    """The payment whose provider callback URL ends in this hash, or None."""
    if not callback_hash:
        return None
    sql = f"{_SELECT_PAYMENT} WHERE provider_callback_hash = %s" + _lock(conn, for_update)
    return await _one_payment(conn, sql, (callback_hash,))


async def get_payment_by_provider_ref(
    conn: Connection, provider_ref: str, *, for_update: bool = False
) -> Payment | None:
    """The payment whose provider payment id or subscription id is ``provider_ref``.

    Provider events name a Checkout Session / Payment Link, or for recurring payments
    a subscription. A UNION of two indexed lookups (an OR across two columns scans);
    the newest payment wins should two ever share a reference. With ``for_update``
    the row is then read again by id under its lock (a locking read sees the latest
    committed version).
    """
    if not provider_ref:
        return None
    payment = await _one_payment(conn, _SELECT_BY_PROVIDER_REF, (provider_ref, provider_ref))
    if payment is None or not for_update:
        return payment
    return await get_payment(conn, payment.id, for_update=True)


def list_query(f: ListFilter) -> tuple[str, list[Any]]:
    """The SELECT that list_payments runs for ``f`` (public for the EXPLAIN test)."""
    where: list[str] = []
    args: list[Any] = []
    for column in ("caller_service", "request_id", "resource_type", "resource_id"):
        value = getattr(f, column)
        if value:
            where.append(f"{column} = %s")
            args.append(value)
    if f.status is not None:
        where.append("status = %s")
        args.append(int(f.status))
    if f.provider is not None:
        where.append("provider = %s")
        args.append(int(f.provider))
    sql = _SELECT_PAYMENT
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT %s OFFSET %s"
    args += [max(0, min(f.limit, MAX_LIST_LIMIT)), max(0, f.offset)]
    return sql, args


async def list_payments(conn: Connection, f: ListFilter) -> list[Payment]:
    """Payments matching every non-empty filter, newest first, paged by limit/offset."""
    sql, args = list_query(f)
    return [_payment_from_row(row) for row in await conn.fetchall(sql, args)]


async def update_payment(conn: Connection, payment: Payment) -> None:
    """Write what changes after creation: status, provider ids, checkout URL,
    updated_at. Raises NotFound when the row is gone (a bug, or a concurrent delete).

    Not ``refunded_cents``: a copy read before a refund moved would write a stale sum
    back; only :func:`write_refunded_cents` does, from the refunds table.
    The status machine is the unit of work's job (model.can_transition); the caller
    holds the row lock (``for_update``) while it decides.
    """
    matched = await conn.execute(
        "UPDATE payments SET status = %s, provider_payment_id = %s,"
        " provider_subscription_id = %s, checkout_url = %s, provider_payment_intent_id = %s,"
        " provider_charge_id = %s, updated_at = %s WHERE id = %s",
        (
            int(payment.status),
            payment.provider_payment_id,
            payment.provider_subscription_id,
            payment.checkout_url,
            payment.provider_payment_intent_id,
            payment.provider_charge_id,
            to_db_datetime(payment.updated_at),
            payment.id,
        ),
    )
    if matched == 0:
        raise NotFound("payment not found")


async def write_refunded_cents(conn: Connection, payment_id: int, refunded_cents: int) -> None:
    """Store the SUCCEEDED refunds' sum (a copy of the refunds table's, kept for plain
    readers of the table); call it under the payment's row lock after a refund moved."""
    await conn.execute(
        "UPDATE payments SET refunded_cents = %s WHERE id = %s", (refunded_cents, payment_id)
    )


def fill_money_refs(payment: Payment, payment_intent: str, charge: str) -> bool:
    """Give ``payment`` the PaymentIntent and charge that paid it where it has none yet
    (a stored id is kept: refunds go to the money that paid); True when any was new."""
    filled = False
    if payment_intent and not payment.provider_payment_intent_id:
        payment.provider_payment_intent_id = payment_intent
        filled = True
    if charge and not payment.provider_charge_id:
        payment.provider_charge_id = charge
        filled = True
    return filled


async def store_money_refs(
    conn: Connection, payment: Payment, payment_intent: str, charge: str
) -> bool:
    """:func:`fill_money_refs` and write them; the caller holds the row lock. Refund
    events, which carry no callback hash, find the payment by these ids."""
    if not fill_money_refs(payment, payment_intent, charge):
        return False
    await update_payment(conn, payment)
    return True


async def get_payment_by_money_ref(
    conn: Connection, payment_intent_id: str, charge_id: str = "", *, for_update: bool = False
) -> Payment | None:
    """The payment whose Stripe PaymentIntent is ``payment_intent_id`` or, failing that,
    whose charge is ``charge_id`` (refund events name both); None when neither is known.
    Indexed lookups (ix_payments_payment_intent, ix_payments_charge)."""
    for column, value in (
        ("provider_payment_intent_id", payment_intent_id),
        ("provider_charge_id", charge_id),
    ):
        if value:
            sql = f"{_SELECT_PAYMENT} WHERE {column} = %s ORDER BY id DESC LIMIT 1" + _lock(
                conn, for_update
            )
            found = await _one_payment(conn, sql, (value,))
            if found is not None:
                return found
    return None


async def set_statuses(
    conn: Connection, payment_ids: Sequence[int], status: PaymentStatus, at: datetime
) -> int:
    """One UPDATE moving many payments (already locked, already checked against the
    status machine by the unit of work) to ``status`` at ``at``; returns rows matched."""
    if not payment_ids:
        return 0
    placeholders = ", ".join(["%s"] * len(payment_ids))
    # By primary key, forced: UPDATE locks every row its plan scans, and a scan beyond
    # these ids deadlocked two concurrent batches (InnoDB's deadlock report).
    hint = conn.dialect.force_index("PRIMARY")
    return await conn.execute(
        f"UPDATE payments{hint} SET status = %s, updated_at = %s"  # noqa: S608
        f" WHERE id IN ({placeholders})",
        (int(status), to_db_datetime(at), *payment_ids),
    )


async def delete_payment(conn: Connection, payment_id: int) -> None:
    """Remove a payment and its events (create undoes a row the provider refused)."""
    await conn.execute("DELETE FROM payment_events WHERE payment_id = %s", (payment_id,))
    await conn.execute("DELETE FROM payments WHERE id = %s", (payment_id,))


# --- events -------------------------------------------------------------------------


async def insert_event(conn: Connection, event: PaymentEvent) -> int:
    """Record one history row; return its id. Raises DuplicateKey (key
    ``uq_payment_events_provider_event``) for a provider event id already recorded: a
    replayed event, to acknowledge and ignore."""
    row = _event_to_row(event)
    return await conn.insert(_INSERT_EVENT, [row[column] for column in EVENT_COLUMNS[1:]])


async def insert_events(conn: Connection, events: Sequence[PaymentEvent]) -> None:
    """Record many history rows in one multi-row INSERT (a bulk status change)."""
    if not events:
        return
    columns = EVENT_COLUMNS[1:]
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    args: list[Any] = []
    for event in events:
        values = _event_to_row(event)
        args += [values[column] for column in columns]
    await conn.execute(
        f"INSERT INTO payment_events ({', '.join(columns)}) VALUES "  # noqa: S608
        + ", ".join([row] * len(events)),
        args,
    )


async def list_events(conn: Connection, payment_id: int) -> list[PaymentEvent]:
    """A payment's history, oldest first."""
    rows = await conn.fetchall(f"{_SELECT_EVENT} WHERE payment_id = %s ORDER BY id", (payment_id,))
    return [_event_from_row(row) for row in rows]


# --- health -------------------------------------------------------------------------


async def ping(conn: Connection) -> None:
    """One round trip; DependencyUnavailable when the database does not answer."""
    await conn.ping()
