"""A connection pool for trio-mysql, which has none.

Why each rule is here:

* ``max_open`` bounds the connections this process holds (idle + in use), so many
  replicas on one server stay under its ``max_connections``. A slot (trio.Semaphore) is
  taken before a connection is found or opened and always given back, even on
  cancellation.
* At most ``max_idle`` connections wait for reuse; the rest are closed on return.
* A connection older than ``max_lifetime_seconds`` is closed on return and before
  reuse, so load balancers, failovers and server-side timeouts never meet a stale one.
* A connection that died while idle (server restarted, ``KILL``, ``wait_timeout``) is
  noticed on checkout: a free non-blocking look at its socket (an idle MySQL socket has
  nothing to read; a dead one reads EOF or an error packet), plus a ``COM_PING`` when it
  has been idle a while. It is replaced, so the next request works.
* A query cancelled mid-flight leaves the protocol in an unknown state: that connection
  is closed, never reused, and the server is told to ``KILL`` the abandoned thread so
  it stops running the statement (and holding its row locks).
* Every round trip has a deadline (``query_timeout``, PAYMENTS_DB_QUERY_TIMEOUT_SECONDS):
  a server that stops answering (TCP open, no bytes) costs a request that long, then
  "database unavailable"; the session is discarded, never returned to the pool, and the
  ``KILL`` is sent from a background task so the caller's answer does not wait on a
  server that may not answer it either. Finding or opening a session has one deadline
  too (``connect_timeout``), the liveness ping of an idle session included.
* Connection failures are the database's fault, not the caller's: they surface as
  ``DependencyUnavailable("database unavailable")`` (never with SQL text). A duplicate
  key surfaces as :class:`DuplicateKey`, so the service can spot idempotent duplicates.
  Other server errors (a bad statement: a bug) propagate as trio-mysql raised them.

Every session runs with utf8mb4, autocommit on, ``time_zone = '+00:00'`` (DATETIME
columns hold UTC) and strict SQL mode (too-long values fail instead of being cut).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import select
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_mysql
from trio_mysql import err as mysql_err
from trio_mysql.constants import CLIENT, SERVER_STATUS
from trio_mysql.cursors import Cursor

from payments.config import ConfigError, MysqlDsn, Settings
from payments.errors import DependencyUnavailable
from payments.storage.database import UNAVAILABLE, Deadlock, DuplicateKey, PoolStats
from payments.storage.dialect import MYSQL, Dialect

log = logging.getLogger("payments.storage")


# Session settings: UTC for DATETIME columns; strict mode so a value too long for its
# column is an error, not silently truncated money data.
_SESSION_INIT = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'"
)

# Server errors that mean "the database cannot serve this now, retry later", not "the
# statement is wrong": too many connections, shutdown, lock wait timeout, deadlock,
# query interrupted, connection killed, statement time limits, idle disconnect.
_UNAVAILABLE_SERVER_ERRORS = frozenset({1040, 1053, 1205, 1213, 1317, 1927, 1969, 3024, 4031})
# Of those, the ones after which the server closes the session.
_FATAL_SERVER_ERRORS = frozenset({1053, 1927, 4031})
_DUPLICATE_ERRORS = frozenset({1062, 1586})  # ER_DUP_ENTRY, ER_DUP_ENTRY_WITH_KEY_NAME
_DUPLICATE_KEY_NAME = re.compile(r"for key '(?:[^'.]*\.)?([^']*)'")


class _Cursor(Cursor):
    # trio-mysql otherwise sends SHOW WARNINGS after any statement with a warning or
    # note (one more round trip, e.g. for every CREATE TABLE IF NOT EXISTS). Strict
    # mode turns the warnings that matter into errors.
    _defer_warnings = True


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, mysql_err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _is_server_error(errno: int | None) -> bool:
    """True for an error packet the server sent (the session is still in sync).

    Client-side codes (2000-2999: lost connection, server gone...) are not.
    """
    return errno is not None and errno >= 1000 and not 2000 <= errno < 3000


DEADLOCK_ERRNO = 1213


def _is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable or cannot serve us right now."""
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return True
    if isinstance(exc, trio.TooSlowError):
        return True
    if isinstance(exc, mysql_err.OperationalError | mysql_err.InterfaceError):
        errno = _errno(exc)
        return not _is_server_error(errno) or errno in _UNAVAILABLE_SERVER_ERRORS
    if isinstance(exc, mysql_err.InternalError):  # packet out of order and the like
        return not _is_server_error(_errno(exc))
    return False


def _unavailable(exc: BaseException, during: str) -> DependencyUnavailable:
    log.warning(
        "database unavailable during %s: %s %s",
        during,
        type(exc).__name__,
        _errno(exc) or "",
    )
    if _errno(exc) == DEADLOCK_ERRNO:
        return Deadlock(UNAVAILABLE)
    return DependencyUnavailable(UNAVAILABLE)


def _duplicate_key(exc: BaseException) -> DuplicateKey | None:
    if isinstance(exc, mysql_err.IntegrityError) and _errno(exc) in _DUPLICATE_ERRORS:
        message = str(exc.args[1]) if len(exc.args) > 1 else ""
        match = _DUPLICATE_KEY_NAME.search(message)
        return DuplicateKey(match[1] if match else "")
    return None


def _socket_looks_alive(raw: trio_mysql.Connection) -> bool:
    """Free liveness check of an idle connection: nothing may be waiting to be read.

    An idle session has no pending bytes; a server that closed it (KILL, restart,
    wait_timeout) left EOF or an error packet. Cannot see a silent network partition:
    the ping after ``ping_after_idle_seconds`` covers that.
    """
    stream = getattr(raw, "_sock", None)
    if stream is None:
        return False
    if len(raw._rbuf) > raw._rbuf_offset:  # unread bytes buffered: out of sync
        return False
    try:
        fd = stream.socket.fileno()
    except (AttributeError, OSError):  # cannot look: let the first query tell
        return True
    if fd < 0:
        return False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    readable, _, _ = select.select([fd], [], [], 0)
    return not readable


class _RawConnection(trio_mysql.connections.Connection):  # type: ignore[misc]
    """trio-mysql's connection, closing its socket for real when it gives up on it.

    Its ``_force_close`` (used by ``close()`` and whenever a read fails or is
    cancelled) calls ``SocketStream.close()``, which does not exist; the error is
    swallowed and the socket left to the garbage collector. Close the trio socket
    ourselves, so the server sees the disconnect at once and rolls back whatever the
    session had open.
    """

    def _force_close(self) -> None:
        stream = self._sock
        self._sock = None
        self._closed = True
        sock = getattr(stream, "socket", None)
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()

    __del__ = _force_close


class Connection:
    """One pooled session. Statements go through here so failures are classified in
    one place: a lost or unknown-state session is marked broken and never reused.

    Placeholders are ``%s`` (trio-mysql escapes the values client-side); never format
    values into SQL yourself.
    """

    dialect: Dialect = MYSQL

    def __init__(
        self, raw: trio_mysql.Connection, opened_at: float, query_timeout: float | None = None
    ) -> None:
        self.raw = raw
        self.query_timeout = query_timeout if query_timeout is not None else math.inf
        self.opened_at = opened_at
        self.idle_since = opened_at
        self.thread_id: int = raw.thread_id()
        self._busy = False  # a statement is on the wire
        self._broken = False
        self.abandoned = False  # left mid-statement: the server may still be running it
        self.timed_out = False  # a round trip outlived query_timeout
        self._in_transaction = False  # BEGIN sent by Pool.transaction, not yet ended

    @property
    def broken(self) -> bool:
        """True when the session must not be reused (lost, or left mid-statement)."""
        return self._broken or not self.raw.open

    @property
    def in_transaction(self) -> bool:
        """True inside BEGIN ... COMMIT/ROLLBACK (per the server's status flags too)."""
        status = getattr(self.raw, "server_status", 0) or 0
        return self._in_transaction or bool(status & SERVER_STATUS.SERVER_STATUS_IN_TRANS)

    async def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run a statement; return the rows it matched (UPDATE counts matched rows)."""
        cursor = await self._run(sql, args)
        return int(cursor.rowcount)

    async def insert(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run an INSERT; return the AUTO_INCREMENT id it generated."""
        cursor = await self._run(sql, args)
        return int(cursor.lastrowid or 0)

    async def fetchone(self, sql: str, args: Sequence[Any] | None = None) -> tuple[Any, ...] | None:
        """Run a query; return its first row, or None."""
        cursor = await self._run(sql, args)
        row = await cursor.fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query; return every row."""
        cursor = await self._run(sql, args)
        return [tuple(row) for row in await cursor.fetchall()]

    async def ping(self) -> None:
        """A COM_PING round trip (cheaper than SELECT 1); DependencyUnavailable on failure."""
        await self._guard(self.raw.ping(reconnect=False))

    async def _run(self, sql: str, args: Sequence[Any] | None) -> Cursor:
        cursor = _Cursor(self.raw)
        # Escape before anything is sent: a bad argument is a bug, not a broken session.
        query = cursor.mogrify(sql, tuple(args)) if args is not None else sql
        await self._guard(cursor.execute(query))
        return cursor

    async def _guard(self, operation: Any) -> None:
        if self._busy or self.broken:
            operation.close()  # the coroutine never ran
            if self._busy:
                raise RuntimeError("a pooled connection was used by two tasks at once")
            raise DependencyUnavailable(UNAVAILABLE)
        self._busy = True
        try:
            # trio.fail_after's own cancel scope, without its two generator layers
            # (one round trip of every request: bench/README.md).
            with trio.CancelScope(deadline=trio.current_time() + self.query_timeout) as scope:
                await operation
            if scope.cancelled_caught:
                raise trio.TooSlowError
        except BaseException as exc:
            errno = _errno(exc)
            if not (
                _is_server_error(errno) and errno not in _FATAL_SERVER_ERRORS and self.raw.open
            ):
                # Lost, out of sync, or left mid-statement: never reuse. When it was not
                # the connection failing (cancelled or timed out, say), the statement may
                # still be running on the server.
                self._broken = True
                self.timed_out = isinstance(exc, trio.TooSlowError)
                self.abandoned = self.timed_out or not _is_unavailable(exc)
            if self.timed_out:
                log.warning("database round trip timed out after %gs", self.query_timeout)
            duplicate = _duplicate_key(exc)
            if duplicate is not None:
                raise duplicate from exc
            if _is_unavailable(exc):
                raise _unavailable(exc, "a query") from exc
            raise
        finally:
            self._busy = False


class Pool:
    """A bounded pool of trio-mysql sessions for one database.

    ``async with pool.connection() as conn`` lends a session in autocommit mode;
    ``async with pool.transaction() as conn`` wraps it in BEGIN ... COMMIT, rolling
    back when the block raises. ``max_lifetime_seconds`` <= 0 means no limit.
    Implements :class:`payments.storage.database.Database`.
    """

    dialect: Dialect = MYSQL

    def __init__(
        self,
        dsn: MysqlDsn,
        max_open: int = 10,
        max_idle: int = 5,
        max_lifetime_seconds: float = 1800.0,
        *,
        connect_timeout: float = 5.0,
        acquire_timeout: float | None = 30.0,
        ping_after_idle_seconds: float = 5.0,
        query_timeout: float | None = 5.0,
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        if query_timeout is not None and not query_timeout > 0:
            raise ValueError("query_timeout must be > 0 (or None for no limit)")
        self._dsn = dsn
        self._max_open = max_open
        self._max_idle = max(0, min(max_idle, max_open))
        self._max_lifetime = max_lifetime_seconds if max_lifetime_seconds > 0 else None
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._ping_after_idle = ping_after_idle_seconds
        self._query_timeout = query_timeout
        self._slots = trio.Semaphore(max_open)
        self._idle: list[Connection] = []  # most recently returned last (LIFO reuse)
        self._in_use = 0
        self._connecting = 0
        self._waiting = 0
        self._opened_total = 0
        self._closed_total = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Pool:
        """The pool the service runs with: MYSQL_DSN, the MYSQL_* pool settings and
        PAYMENTS_DB_QUERY_TIMEOUT_SECONDS (which bounds connecting too)."""
        if settings.mysql_dsn is None:
            raise ConfigError("MYSQL_DSN: is required")
        timeout = settings.db_query_timeout_seconds
        options = {"query_timeout": timeout, "connect_timeout": timeout, **options}
        return cls(
            settings.mysql_dsn,
            max_open=settings.mysql_max_open_conns,
            max_idle=settings.mysql_max_idle_conns,
            max_lifetime_seconds=settings.mysql_conn_max_lifetime_minutes * 60,
            **options,
        )

    @property
    def dsn(self) -> MysqlDsn:
        return self._dsn

    def stats(self) -> PoolStats:
        return PoolStats(
            open=len(self._idle) + self._in_use + self._connecting,
            idle=len(self._idle),
            in_use=self._in_use,
            connecting=self._connecting,
            waiting=self._waiting,
            max_open=self._max_open,
            max_idle=self._max_idle,
            opened_total=self._opened_total,
            closed_total=self._closed_total,
        )

    # --- lending ----------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Lend a session (autocommit). It goes back to the pool, or is closed when its
        state is unknown (cancelled mid-statement, lost); the slot always comes back."""
        conn = await self._checkout()
        try:
            try:
                yield conn
            except BaseException as exc:
                if not isinstance(exc, Exception) and conn.in_transaction:
                    # Cancelled inside a transaction: rolling back would need an await
                    # we may not get; closing the session makes the server roll back.
                    conn._broken = True
                raise
        finally:
            await self._checkin(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Lend a session inside BEGIN; COMMIT when the block ends, ROLLBACK if it raises."""
        async with self.connection() as conn:
            await conn.execute("BEGIN")
            conn._in_transaction = True
            # On an exception the block's session is rolled back by _checkin (or closed
            # when it cannot be), in one place for both context managers.
            yield conn
            await conn.execute("COMMIT")
            conn._in_transaction = False

    async def _checkout(self) -> Connection:
        # A cancelled task takes no session (the slot's acquire was this checkpoint).
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self._checkout_now()
        if conn is not None:
            return conn
        if self._closed:
            raise DependencyUnavailable(UNAVAILABLE)
        self._waiting += 1
        try:
            timeout = self._acquire_timeout if self._acquire_timeout is not None else float("inf")
            with trio.move_on_after(timeout) as waited:
                await self._slots.acquire()
        finally:
            self._waiting -= 1
        if waited.cancelled_caught:
            log.warning("database pool exhausted: no connection within %.1fs", timeout)
            raise DependencyUnavailable(UNAVAILABLE)
        try:
            if self._closed:
                raise DependencyUnavailable(UNAVAILABLE)
            # One deadline for finding a live session: the ping of a stale idle one and
            # opening a new one together, not each.
            with trio.fail_after(self._connect_timeout):
                conn = await self._reuse_idle()
                if conn is None:
                    conn = await self._open()
        except trio.TooSlowError:
            self._slots.release()
            log.warning("database unavailable: no session within %gs", self._connect_timeout)
            raise DependencyUnavailable(UNAVAILABLE) from None
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        return conn

    def _checkout_now(self) -> Connection | None:
        """The common case, without waiting: a free slot and an idle session that needs
        nothing done (not expired, used within ``ping_after_idle_seconds``, its socket
        quiet). None otherwise, and then the full path below waits for a slot, pings,
        replaces or opens as it always did. (The full path's cancel scopes and the
        slot's scheduling round were ~15 us of every read, bench/README.md.)"""
        if self._closed or not self._idle or self._slots.value == 0:
            return None
        conn = self._idle[-1]
        now = trio.current_time()
        if (
            self._expired(conn, now)
            or now - conn.idle_since >= self._ping_after_idle
            or not _socket_looks_alive(conn.raw)
        ):
            return None
        self._slots.acquire_nowait()  # a free slot means no task is queued for one
        self._idle.pop()
        self._in_use += 1
        return conn

    async def _reuse_idle(self) -> Connection | None:
        """The most recently returned idle session that is still good, or None."""
        while self._idle:
            conn = self._idle.pop()
            now = trio.current_time()
            if self._expired(conn, now):
                await self._close_politely(conn)
                continue
            if not _socket_looks_alive(conn.raw):
                log.info("database connection %d died while idle; replacing it", conn.thread_id)
                self._close_now(conn)
                continue
            if now - conn.idle_since >= self._ping_after_idle:
                try:
                    with trio.fail_after(self._connect_timeout):
                        await conn.ping()
                except (DependencyUnavailable, trio.TooSlowError):
                    self._close_now(conn)
                    continue
                except BaseException:
                    self._close_now(conn)
                    raise
            return conn
        return None

    async def _open(self) -> Connection:
        dsn = self._dsn
        raw = _RawConnection(
            host=dsn.host,
            port=dsn.port,
            user=dsn.user,
            password=dsn.password,
            database=dsn.database or None,
            unix_socket=dsn.unix_socket or None,
            charset="utf8mb4",
            use_unicode=True,  # trio-mysql's default (None) returns bytes for text
            autocommit=True,
            init_command=_SESSION_INIT,
            connect_timeout=self._connect_timeout,
            cursorclass=_Cursor,
            # UPDATE reports the rows it matched, not only those it changed, so "no such
            # row" and "nothing to change" differ.
            client_flag=CLIENT.FOUND_ROWS,
            program_name="payments",
        )
        self._connecting += 1
        try:
            # trio-mysql's own timeout covers only the TCP connect, not the handshake.
            with trio.fail_after(self._connect_timeout):
                await raw.connect()
        except BaseException as exc:
            raw.close()
            if isinstance(exc, mysql_err.MySQLError) or _is_unavailable(exc):
                raise _unavailable(exc, "connect") from exc
            raise
        finally:
            self._connecting -= 1
        self._opened_total += 1
        return Connection(raw, trio.current_time(), self._query_timeout)

    async def _checkin(self, conn: Connection) -> None:
        """Put a session back or close it; the slot is released whatever happens."""
        try:
            if conn.broken:
                self._close_now(conn)
                if conn.timed_out:
                    # The server did not answer in time: it may not answer the KILL
                    # either, and the caller's 503 must not wait for that.
                    trio.lowlevel.spawn_system_task(self._kill_in_background, conn.thread_id)
                elif conn.abandoned:
                    await self._kill_abandoned(conn.thread_id)
                return
            if conn.in_transaction:
                with trio.move_on_after(self._connect_timeout) as scope:
                    scope.shield = True
                    try:
                        await conn.execute("ROLLBACK")
                        conn._in_transaction = False
                    except Exception:
                        conn._broken = True
                if scope.cancelled_caught or conn.broken:
                    conn._broken = True
                    self._close_now(conn)
                    return
            now = trio.current_time()
            # Past the idle cap the session is closed, unless a task is waiting for one:
            # closing it then would only make that task open a new one (measured under
            # load: hundreds of reconnects per 10 s without this).
            over_idle_cap = len(self._idle) >= self._max_idle and not self._waiting
            if self._closed or self._expired(conn, now) or over_idle_cap:
                await self._close_politely(conn)
                return
            conn.idle_since = now
            self._idle.append(conn)
        finally:
            self._in_use -= 1
            self._slots.release()

    def _expired(self, conn: Connection, now: float) -> bool:
        return self._max_lifetime is not None and now - conn.opened_at >= self._max_lifetime

    # --- closing ----------------------------------------------------------------------

    def _close_now(self, conn: Connection) -> None:
        """Drop the socket without a goodbye (the session is lost or in an unknown state)."""
        conn._broken = True
        conn.raw.close()
        self._closed_total += 1

    async def _close_politely(self, conn: Connection) -> None:
        """Say COM_QUIT first, so the server does not count an aborted client."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(Exception):  # closing anyway
                await conn.raw.aclose()
        conn.raw.close()  # no-op after a clean COM_QUIT
        conn._broken = True
        self._closed_total += 1

    async def _kill_abandoned(self, thread_id: int) -> None:
        """Ask the server to stop a session left mid-statement.

        Closing our socket does not stop the statement: the server notices only when it
        writes the result, so a long query (or a lock wait holding row locks) would run
        on. Best effort, shielded and bounded, on an idle session when there is one or a
        short-lived one otherwise. The slot of the abandoned session is held until this
        ends; for that moment the server may see one session more than max_open (the
        abandoned one, until the KILL lands).
        """
        # Bounded tightly: when the server hangs, cancellation must not wait long on us.
        with trio.move_on_after(min(self._connect_timeout, 2.0)) as scope:
            scope.shield = True
            helper: Connection | None = None
            borrowed = False
            try:
                if self._idle:
                    helper, borrowed = self._idle.pop(), True
                else:
                    helper = await self._open()
                await helper.execute("KILL %s", (thread_id,))
            except Exception as exc:
                # 1094: unknown thread, it ended by itself. Anything else: give up.
                if _errno(exc) != 1094:
                    log.info("could not kill abandoned database session %d", thread_id)
            finally:
                if helper is not None:
                    if borrowed and not helper.broken and not self._closed:
                        self._idle.append(helper)
                    elif not helper.broken:
                        await self._close_politely(helper)
                    else:
                        self._close_now(helper)
        if scope.cancelled_caught:
            log.info("timed out killing abandoned database session %d", thread_id)

    async def _kill_in_background(self, thread_id: int) -> None:
        """The KILL of a timed-out session, on a short-lived session of its own (outside
        ``max_open`` for its moment, like the abandoned one it stops)."""
        with trio.move_on_after(min(self._connect_timeout, 2.0)) as scope:
            scope.shield = True
            helper: Connection | None = None
            try:
                helper = await self._open()
                await helper.execute("KILL %s", (thread_id,))
            except Exception as exc:
                if _errno(exc) != 1094:
                    log.info("could not kill timed-out database session %d", thread_id)
            finally:
                if helper is not None:
                    self._close_now(helper)
        if scope.cancelled_caught:
            log.info("timed out killing timed-out database session %d", thread_id)

    async def aclose(self) -> None:
        """Close idle sessions now; sessions in use are closed when they come back."""
        self._closed = True
        while self._idle:
            await self._close_politely(self._idle.pop())
