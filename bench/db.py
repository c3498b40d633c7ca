"""The benchmark's own database access: the server to use, and backlog inserts.

Backlogs go in with straight trio-mysql rather than the service's storage layer, so the
benchmark's set-up does not change with it: plain SQL, as an operator's script would.
Its database is made and dropped by the test fixture's MysqlServer (tests/fixtures/db.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import trio_mysql

from payments.config import MysqlDsn, parse_mysql_dsn
from tests.fixtures.db import ENV_VAR

DEFAULT_SERVER = "mysql://root@127.0.0.1:3306/"
INSERT_CHUNK = 500


def server_dsn() -> MysqlDsn:
    """The MariaDB/MySQL server: PAYMENTS_TEST_MYSQL_DSN (scripts/test-db.sh exports it)
    or root without a password on 127.0.0.1:3306."""
    raw = os.environ.get(ENV_VAR, "").strip() or DEFAULT_SERVER
    return attrs.evolve(parse_mysql_dsn(raw, ENV_VAR), database="")


def naive_utc(value: datetime) -> datetime:
    """An aware datetime as the naive UTC value a DATETIME column holds."""
    return value.astimezone(UTC).replace(tzinfo=None)


def _connect(dsn: MysqlDsn, database: str | None) -> trio_mysql.Connection:
    return trio_mysql.connect(
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        password=dsn.password,
        database=database,
        unix_socket=dsn.unix_socket or None,
        charset="utf8mb4",
        autocommit=True,
        init_command="SET time_zone = '+00:00'",
        connect_timeout=5,
    )


async def insert_rows(dsn: MysqlDsn, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Multi-row INSERTs of ``INSERT_CHUNK`` rows each; the columns are the first row's
    keys, and every row must have the same ones."""
    if not rows:
        return
    columns = list(rows[0])
    marks = "(" + ", ".join(["%s"] * len(columns)) + ")"
    async with _connect(dsn, dsn.database) as conn, conn.cursor() as cursor:
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start : start + INSERT_CHUNK]
            if any(list(row) != columns for row in chunk):
                raise ValueError(f"{table}: rows name different columns")
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join(
                [marks] * len(chunk)
            )
            await cursor.execute(sql, [row[column] for row in chunk for column in columns])
