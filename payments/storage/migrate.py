"""Apply schema.sql to the database, step by step, at most once per step.

schema.sql is a list of numbered steps (``-- migrate:step N``); ``schema_version``
records the steps applied. ``migrate`` applies the steps above the recorded version,
in order, and records each, so a later release adds a step (new tables, an ALTER) and
every database catches up exactly once. Replicas starting together may all run it:
a named server lock (GET_LOCK) lets one work while the others wait, then find
nothing left to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import trio

from payments.config import ConfigError, MysqlDsn
from payments.errors import DependencyUnavailable
from payments.storage.pool import Connection, Pool

log = logging.getLogger("payments.storage.migrate")

_STEP_MARKER = re.compile(r"^--\s*migrate:step\s+(\d+)\b")


@attrs.frozen
class Step:
    """One schema step: its number and its statements, sent one at a time."""

    version: int
    statements: tuple[str, ...]


def schema_path() -> Path:
    """Where schema.sql is: $PAYMENTS_SCHEMA_FILE, else the repository root (editable
    install, tests), else a copy inside the package (for a wheel that ships one)."""
    override = os.environ.get("PAYMENTS_SCHEMA_FILE", "").strip()
    if override:
        return Path(override)
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "schema.sql", here.parent / "schema.sql"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("schema.sql not found (set PAYMENTS_SCHEMA_FILE)")


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


def load_steps(path: Path | None = None) -> list[Step]:
    """The steps of schema.sql."""
    return parse_schema((path or schema_path()).read_text(encoding="utf-8"))


def latest_version(steps: Sequence[Step] | None = None) -> int:
    """The version a fully migrated database has."""
    return (steps or load_steps())[-1].version


async def current_version(conn: Connection) -> int:
    """The highest step recorded in this database, 0 for an empty one."""
    row = await conn.fetchone(
        "SELECT COUNT(*) FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'schema_version'"
    )
    if not row or not row[0]:
        return 0
    row = await conn.fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(row[0]) if row else 0


def lock_name(database: str) -> str:
    """The GET_LOCK name migrations of ``database`` take."""
    # GET_LOCK is server-wide, so the name carries the database; names are <= 64 chars.
    return "payments.migrate." + hashlib.sha256(database.encode()).hexdigest()[:40]


async def migrate(
    target: Pool | Connection,
    *,
    steps: Sequence[Step] | None = None,
    lock_timeout: float = 60.0,
) -> int:
    """Bring the database up to the last step; return the version it is at.

    ``target`` is a pool (a session is borrowed) or an autocommit connection. Safe to
    run concurrently (GET_LOCK) and again (applied steps are skipped). A database ahead
    of this code (a newer release migrated it) is left alone and its version returned.
    """
    steps = list(steps) if steps is not None else load_steps()
    if isinstance(target, Pool):
        async with target.connection() as conn:
            return await _migrate(conn, steps, lock_timeout)
    return await _migrate(target, steps, lock_timeout)


async def _migrate(conn: Connection, steps: Sequence[Step], lock_timeout: float) -> int:
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
