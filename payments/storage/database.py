"""The storage contract the service is written against, and what it may catch.

Two backends implement it: :class:`payments.storage.pool.Pool` (MySQL/MariaDB through
trio-mysql, for production and many replicas) and
:class:`payments.storage.sqlite.SqliteDatabase` (one SQLite file, for the embedded
single-process profile); :mod:`payments.storage.backends` picks one. This module
imports neither, so the service and the repositories load no driver. The repositories
(repository, outbox, claims, provider_callbacks) take a :class:`Connection` and run the
same SQL on both; what differs is rendered by the connection's
:class:`~payments.storage.dialect.Dialect`.

The rules both keep (tests/test_storage_contract.py checks them on both):

* ``connection()`` lends a session in autocommit mode; ``transaction()`` lends one
  inside a transaction that commits when the block ends and rolls back when it raises
  (or is cancelled). A session is one task's at a time.
* Placeholders are ``%s``; values are always parameters. Datetimes go in as naive UTC
  and come back as naive UTC ``datetime`` with microseconds (timestamps.py makes them
  aware). Text is full Unicode, emoji included, and compares exactly (binary).
* A UNIQUE violation raises :class:`DuplicateKey` naming the index as schema.sql names
  it; the statement is undone and an open transaction goes on.
* Every round trip has a deadline (PAYMENTS_DB_QUERY_TIMEOUT_SECONDS; migrations
  excepted): past it the statement is abandoned (interrupted, or its session discarded
  and KILLed) and ``DependencyUnavailable`` raised, so a database that stops answering
  costs a request that long, never more.
* The database being unreachable, locked or failing raises
  ``DependencyUnavailable("database unavailable")``; :class:`Deadlock`, a kind of it,
  when the transaction was chosen as a deadlock victim and may simply run again. A bad
  statement (a bug) raises the driver's own error.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

import attrs

from payments.config import ConfigError
from payments.errors import DependencyUnavailable
from payments.storage.dialect import Dialect

__all__ = [
    "UNAVAILABLE",
    "Connection",
    "Database",
    "DatabaseStartupError",
    "Deadlock",
    "DependencyUnavailable",
    "DuplicateKey",
    "PoolStats",
]

# What every backend's DependencyUnavailable says (never SQL text, never a path).
UNAVAILABLE = "database unavailable"


class DuplicateKey(Exception):
    """A write hit a UNIQUE key. ``key`` names the index (e.g. ``uq_payments_caller_request``).

    Not a PaymentsError: the service decides what a duplicate means (an idempotent
    retry, a replayed provider event); one it did not expect is a bug (500).
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key or '(unknown)'}")
        self.key = key


class Deadlock(DependencyUnavailable):
    """InnoDB chose this transaction as a deadlock victim and rolled it back; running the
    transaction again is the documented answer (concurrent inserts of one unique key
    meet this)."""


class DatabaseStartupError(ConfigError):
    """The database named by the settings cannot be used; the message names the file
    (or server) and what is wrong, for the operator. Raised at start, never later.

    A ConfigError, so the CLI's existing handler prints it without a traceback.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"SQLite database {path}: {problem}")
        self.path = path
        self.problem = problem


@attrs.frozen
class PoolStats:
    """A snapshot for /healthz and tests. ``open`` = idle + in_use + connecting.

    SQLite reports itself as a pool of one connection, so /healthz has one shape.
    """

    open: int
    idle: int
    in_use: int
    connecting: int
    waiting: int
    max_open: int
    max_idle: int
    opened_total: int
    closed_total: int


class Connection(Protocol):
    """One session, lent by :meth:`Database.connection` or :meth:`Database.transaction`."""

    @property
    def dialect(self) -> Dialect:
        """How this engine spells what the two do not share (see dialect.py)."""
        ...

    async def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run a statement; the rows an UPDATE/DELETE matched (0 for others)."""
        ...

    async def insert(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run an INSERT; the id it generated."""
        ...

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> tuple[Any, ...] | None:
        """Run a query; its first row, or None."""
        ...

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query; every row."""
        ...

    async def ping(self) -> None:
        """Check the database answers; DependencyUnavailable when it does not."""
        ...


@runtime_checkable
class Database(Protocol):
    """A database the service runs on: lends sessions, reports its use, closes."""

    @property
    def dialect(self) -> Dialect: ...

    def connection(self) -> AbstractAsyncContextManager[Connection]:
        """Lend a session in autocommit mode."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """Lend a session inside a transaction: COMMIT at the end, ROLLBACK on error."""
        ...

    def stats(self) -> PoolStats:
        """How the sessions are used right now (for /healthz)."""
        ...

    async def aclose(self) -> None:
        """Refuse new checkouts and close what is idle (safe to call twice)."""
        ...
