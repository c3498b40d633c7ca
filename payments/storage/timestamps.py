"""Datetimes between entities (aware UTC) and columns (naive UTC), for both backends.

Every repository and the migrations convert through here, so there is one rule for
the zone: a naive datetime reaching the database is a bug and is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime


def to_db_datetime(value: datetime) -> datetime:
    """Aware datetime -> naive UTC for a DATETIME column. A naive one is a bug: refuse it
    rather than guess its zone."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: entities hold timezone-aware UTC datetimes")
    return value.astimezone(UTC).replace(tzinfo=None)


def from_db_datetime(value: datetime | str) -> datetime:
    """Naive UTC from a datetime column -> aware UTC.

    MySQL hands back ``datetime`` (the session time_zone is +00:00), and so does SQLite
    for a plain column (its converter); an SQLite expression over such columns (MIN,
    MAX) has no declared type and comes back as the stored ISO text.
    """
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)
