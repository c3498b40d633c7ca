"""Apply the schema to the database, step by step, at most once per step.

schema.sql (MySQL) and schema.sqlite.sql (SQLite) are lists of numbered steps
(``-- migrate:step N``), step N of one making what step N of the other makes;
``schema_version`` records the steps applied. ``migrate`` applies the steps above the
recorded version, in order, and records each, so a later release adds a step (new
tables, an ALTER) to both files and every database catches up exactly once.

MySQL: replicas starting together may all run it; a named server lock (GET_LOCK) lets
one work while the others wait, then find nothing left to do. DDL commits implicitly,
so each statement is written to be re-runnable.

SQLite has no named locks and needs none: the whole migration is one ``BEGIN
IMMEDIATE`` transaction (SQLite's DDL is transactional), so it takes the file's write
lock, sees the version under it, and applies every missing step or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import attrs
import trio

from payments.config import ConfigError, MysqlDsn
from payments.errors import DependencyUnavailable
from payments.model import utcnow
from payments.storage.database import Connection, Database
from payments.storage.dialect import MYSQL, SQLITE, Dialect
from payments.storage.pool import Connection as MysqlConnection
from payments.storage.pool import Pool
from payments.storage.timestamps import to_db_datetime

log = logging.getLogger("payments.storage.migrate")

_STEP_MARKER = re.compile(r"^--\s*migrate:step\s+(\d+)\b")


@attrs.frozen
class Step:
    """One schema step: its number and its statements, sent one at a time."""

    version: int
    statements: tuple[str, ...]


SCHEMA_FILES = {MYSQL.name: "schema.sql", SQLITE.name: "schema.sqlite.sql"}


def schema_path(dialect: Dialect = MYSQL) -> Path:
    """Where the dialect's schema file is: for MySQL $PAYMENTS_SCHEMA_FILE if set; else
    the repository root (editable install, tests), else a copy inside the package (for
    a wheel that ships one)."""
    name = SCHEMA_FILES[dialect.name]
    override = os.environ.get("PAYMENTS_SCHEMA_FILE", "").strip()
    if override and dialect == MYSQL:
        return Path(override)
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / name, here.parent / name):
        if candidate.is_file():
            return candidate
    hint = " (set PAYMENTS_SCHEMA_FILE)" if dialect == MYSQL else ""
    raise FileNotFoundError(f"{name} not found{hint}")


def parse_schema(text: str) -> list[Step]:
    """Split schema text into steps and statements.

    Whole-line ``--`` comments are dropped; a statement ends at a line ending in ``;``.
    Steps must be numbered 1, 2, 3... (a gap or reordering is a mistake in the file).
    """
    steps: list[Step] = []
    version: int | None = None
    statements: list[str] = []
    current: list[str] = []

    def finish_step() -> None:
        if version is None:
            return
        if current:
            raise ValueError(f"schema step {version}: statement without a closing ';'")
        steps.append(Step(version, tuple(statements)))

    for line in text.splitlines():
        stripped = line.strip()
        marker = _STEP_MARKER.match(stripped)
        if marker:
            finish_step()
            version = int(marker[1])
            if version != len(steps) + 1:
                raise ValueError(f"schema step {version} out of order (expected {len(steps) + 1})")
            statements = []
            continue
        if not stripped or stripped.startswith("--"):
            continue
        if version is None:
            raise ValueError("schema.sql: SQL before the first '-- migrate:step' marker")
        current.append(line.rstrip())
        if stripped.endswith(";"):
            statements.append("\n".join(current).strip().removesuffix(";").rstrip())
            current = []
    finish_step()
    if not steps:
        raise ValueError("schema.sql has no '-- migrate:step' sections")
    return steps


def load_steps(path: Path | None = None, dialect: Dialect = MYSQL) -> list[Step]:
    """The steps of the schema file (``path``, or the dialect's)."""
    return parse_schema((path or schema_path(dialect)).read_text(encoding="utf-8"))


def latest_version(steps: Sequence[Step] | None = None) -> int:
    """The version a fully migrated database has."""
    return (steps or load_steps())[-1].version


async def current_version(conn: Connection) -> int:
    """The highest step recorded in this database, 0 for an empty one."""
    if conn.dialect == SQLITE:
        sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    else:
        sql = (
            "SELECT COUNT(*) FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'schema_version'"
        )
    row = await conn.fetchone(sql)
    if not row or not row[0]:
        return 0
    row = await conn.fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(row[0]) if row else 0


def lock_name(database: str) -> str:
    """The GET_LOCK name migrations of ``database`` take."""
    # GET_LOCK is server-wide, so the name carries the database; names are <= 64 chars.
    return "payments.migrate." + hashlib.sha256(database.encode()).hexdigest()[:40]


async def migrate(
    target: Database | Connection,
    *,
    steps: Sequence[Step] | None = None,
    lock_timeout: float = 60.0,
) -> int:
    """Bring the database up to the last step; return the version it is at.

    ``target`` is a database (a session is borrowed) or an autocommit connection, of
    either backend; ``steps`` default to the backend's schema file. Safe to run
    concurrently (GET_LOCK on MySQL, the write lock on SQLite) and again (applied steps
    are skipped). A database ahead of this code (a newer release migrated it) is left
    alone and its version returned. ``lock_timeout`` is MySQL's; SQLite waits its
    busy_timeout.
    """
    if isinstance(target, Database):
        async with target.connection() as conn:
            return await _migrate_on(conn, steps, lock_timeout)
    return await _migrate_on(target, steps, lock_timeout)


async def _migrate_on(conn: Connection, steps: Sequence[Step] | None, lock_timeout: float) -> int:
    steps = list(steps) if steps is not None else load_steps(dialect=conn.dialect)
    if conn.dialect == SQLITE:
        return await _migrate_sqlite(conn, steps)
    return await _migrate(cast(MysqlConnection, conn), steps, lock_timeout)


async def _migrate_sqlite(conn: Connection, steps: Sequence[Step]) -> int:
    """All missing steps in one write transaction: the file's lock serializes starts."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        version = await current_version(conn)
        for step in steps:
            if step.version <= version:
                continue
            for statement in step.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                (step.version, to_db_datetime(utcnow())),
            )
            version = step.version
            log.info("schema step %d applied to the SQLite database", step.version)
        await conn.execute("COMMIT")
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")  # DDL included: nothing of a failed step stays
        raise
    return version


async def _migrate(conn: MysqlConnection, steps: Sequence[Step], lock_timeout: float) -> int:
    # Not bounded by PAYMENTS_DB_QUERY_TIMEOUT_SECONDS: waiting for another replica's
    # migration (lock_timeout) and DDL on a big table take what they take.
    bounded, conn.query_timeout = conn.query_timeout, math.inf
    try:
        return await _migrate_unbounded(conn, steps, lock_timeout)
    finally:
        conn.query_timeout = bounded


async def _migrate_unbounded(
    conn: MysqlConnection, steps: Sequence[Step], lock_timeout: float
) -> int:
    row = await conn.fetchone("SELECT DATABASE()")
    database = row[0] if row else None
    if not database:
        raise ConfigError("MYSQL_DSN: names no database to migrate")
    lock = lock_name(database)
    row = await conn.fetchone("SELECT GET_LOCK(%s, %s)", (lock, lock_timeout))
    if not row or row[0] != 1:
        raise DependencyUnavailable("timed out waiting for another schema migration")
    try:
        version = await current_version(conn)
        for step in steps:
            if step.version <= version:
                continue
            for statement in step.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, UTC_TIMESTAMP(6))",
                (step.version,),
            )
            version = step.version
            log.info("schema step %d applied to %s", step.version, database)
        return version
    finally:
        if not conn.broken:  # a lost session has released its locks already
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await conn.fetchone("SELECT RELEASE_LOCK(%s)", (lock,))


def quote_identifier(name: str) -> str:
    """`name` quoted for SQL text (database names cannot be parameters)."""
    if not name or len(name) > 64 or "\x00" in name:
        raise ValueError(f"not a usable database name: {name!r}")
    return "`" + name.replace("`", "``") + "`"


async def create_database(dsn: MysqlDsn, *, connect_timeout: float = 5.0) -> None:
    """CREATE DATABASE IF NOT EXISTS for the database ``dsn`` names (utf8mb4, binary
    collation), connecting to the server without selecting it. For dev setups and
    tests; production databases are usually made by whoever grants the user."""
    await _server_statements(
        dsn,
        [
            f"CREATE DATABASE IF NOT EXISTS {quote_identifier(dsn.database)}"
            " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ],
        connect_timeout=connect_timeout,
    )


async def drop_database(dsn: MysqlDsn, *, connect_timeout: float = 5.0) -> None:
    """DROP DATABASE IF EXISTS for the database ``dsn`` names (tests clean up with it)."""
    await _server_statements(
        dsn,
        [f"DROP DATABASE IF EXISTS {quote_identifier(dsn.database)}"],
        connect_timeout=connect_timeout,
    )


async def _server_statements(
    dsn: MysqlDsn, statements: Iterable[str], *, connect_timeout: float
) -> None:
    pool = Pool(attrs.evolve(dsn, database=""), 1, 0, 0, connect_timeout=connect_timeout)
    try:
        async with pool.connection() as conn:
            for statement in statements:
                await conn.execute(statement)
    finally:
        await pool.aclose()
