"""Who is calling: the caller's API key, checked with the Auth service over gRPC.

:class:`GrpcAuthenticator` calls ``auth.AuthService/ValidateInternalAccess`` (CONTRACT.md,
"Auth service") with this service's own ``APP_API_KEY`` in ``x-api-key`` metadata and the
caller's key in ``api_key``, and turns the answer into a :class:`~payments.model.Caller`
or a domain error:

- blank key: ``Unauthenticated("missing API key")``, without asking Auth;
- Auth answers UNAUTHENTICATED or NOT_FOUND: ``Unauthenticated("invalid API key")``;
- the key is valid but ``APP_SERVICE_NAME`` is not in its ``allowed_access``:
  ``PermissionDenied``;
- anything else (Auth unreachable, too slow, another status, a malformed answer):
  ``DependencyUnavailable("auth service unavailable")``. Auth being down is never the
  caller's fault, so it is never a 401.

The hot path stays cheap:

- one HTTP/2 connection, opened on first use and kept for the authenticator's life; a
  broken one is noticed at once (EOF fails the calls waiting on it) and replaced by
  the next call. A call that fails on a connection that was already open is retried
  once on a fresh one (ValidateInternalAccess only reads), so an Auth restart costs
  callers nothing. A call that times out retires its connection (it may be half-open);
  calls still running on it finish first.
- a short-lived cache of answers, keyed by the SHA-256 of the key (raw keys are never
  kept), bounded in size (least recently used go first). Valid keys and definitive
  refusals (invalid key, no access) are cached for the TTL; "unavailable" never is, so
  Auth coming back is seen by the next request. A revoked key is thus honoured for at
  most the TTL (``PAYMENTS_AUTH_CACHE_TTL_SECONDS``; 0 disables the cache).
- single flight: concurrent look-ups of one key share one call. The call runs in the
  authenticator's own nursery, so a caller that gives up (its request was cancelled)
  does not fail the others waiting on the same answer.

API keys never reach the log, not even hashed.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import attrs
import purerpc  # payments/__init__.py has applied the h2 alias by now
import trio
from purerpc.client import _Channel as _PurerpcChannel
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from payments.auth import INVALID_KEY_MESSAGE, key_digest
from payments.config import Settings, parse_host_port
from payments.errors import DependencyUnavailable, PermissionDenied, Unauthenticated
from payments.gen import auth_pb2
from payments.gen.auth_grpc import AuthServiceStub
from payments.model import Caller
from payments.purerpc_compat import quiet_header_logging

__all__ = ["AuthStats", "GrpcAuthenticator"]

log = logging.getLogger("payments.auth.client")
quiet_header_logging()  # hpack would log our x-api-key at DEBUG

DEFAULT_CACHE_MAX_ENTRIES = 10_000
UNAVAILABLE_MESSAGE = "auth service unavailable"
# The key :meth:`GrpcAuthenticator.probe` asks about: Auth refuses it, which is an answer.
PROBE_KEY = "payments-readiness-probe"

_INVALID_KEY_CODES = frozenset({purerpc.StatusCode.UNAUTHENTICATED, purerpc.StatusCode.NOT_FOUND})


class _Refusal(enum.Enum):
    """A definitive "no" from Auth (cacheable)."""

    INVALID_KEY = "invalid"
    NO_ACCESS = "no access"


class _Unavailable(Exception):
    """Auth gave no usable answer; ``reason`` is for the log (never holds the key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# What one look-up ends with: a caller, a refusal, or None for "unavailable".
_Outcome = Caller | _Refusal | None


@attrs.define
class AuthStats:
    """Counters for health output and tests."""

    lookups: int = 0  # calls made to Auth (after cache and single flight)
    cache_hits: int = 0
    shared: int = 0  # look-ups that joined a call already in flight
    unavailable: int = 0
    connections: int = 0  # connections opened to Auth


@attrs.define(eq=False)
class _Flight:
    """One call to Auth that every concurrent look-up of the same key waits on."""

    done: trio.Event = attrs.Factory(trio.Event)
    outcome: _Outcome = None


class _ClientSocket(GRPCProtoSocket):
    """purerpc's client socket, plus: when the connection ends (EOF, error or close),
    set ``ended`` and end the streams still waiting for an answer. purerpc alone leaves
    them waiting forever, so a call on a dead connection would only end at its timeout."""

    def __init__(self, config: GRPCConfiguration, sock: anyio.abc.SocketStream, ended: trio.Event):
        super().__init__(config, sock)
        self._ended = ended

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        finally:
            self._ended.set()
            for stream in list(self._streams.values()):
                stream._incoming_events[0].close()  # its receiver gets EndOfStream


class _Channel(_PurerpcChannel):
    """``purerpc.insecure_channel`` with :class:`_ClientSocket`, and closing its socket
    on exit (purerpc's channel never closes it, leaving that to the garbage collector).
    A stub uses a channel only through ``_grpc_socket``, ``_host`` and ``_port``."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.ended = trio.Event()

    async def __aenter__(self) -> Self:
        await AsyncExitStack.__aenter__(self)
        try:
            sock = await anyio.connect_tcp(self._host, self._port)
            self.push_async_callback(sock.aclose)
            config = GRPCConfiguration(client_side=True)
            self._grpc_socket = await self.enter_async_context(
                _ClientSocket(config, sock, self.ended)
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self


@attrs.define(eq=False)
class _Connection:
    """One open channel to Auth, owned by a task in the authenticator's nursery."""

    stub: AuthServiceStub
    ended: trio.Event
    scope: trio.CancelScope
    in_flight: int = 0
    retired: bool = False

    @property
    def usable(self) -> bool:
        return not self.retired and not self.ended.is_set()

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._close_if_idle()

    def retire(self) -> None:
        """Take no new calls; close once the calls running on it are done."""
        self.retired = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.retired and self.in_flight == 0:
            self.scope.cancel()


class GrpcAuthenticator:
    """The :class:`~payments.auth.Authenticator` of the service: a purerpc client of the
    Auth service with a short cache and single flight (see the module docstring).

    Use it as an async context manager; it owns a nursery for its connection and its
    in-flight calls, closed (and the connection with it) on exit::

        async with GrpcAuthenticator.from_settings(settings) as authenticator:
            caller = await authenticator.authenticate(api_key)
    """

    def __init__(
        self,
        addr: str,
        app_api_key: str,
        service_name: str,
        trusted_callers: Iterable[str] = (),
        cache_ttl_seconds: float = 30,
        timeout_seconds: float = 5,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
    ) -> None:
        """``addr`` is ``host:port`` (``AUTH_SERVICE_GRPC_ADDR``); the rest are the
        settings of the same names. Raises ConfigError on a bad ``addr``."""
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if cache_ttl_seconds < 0 or cache_max_entries < 1:
            raise ValueError("cache_ttl_seconds must be >= 0 and cache_max_entries >= 1")
        self._host, self._port = parse_host_port(addr)
        # Our own key goes in metadata on every call; a blank one is not sent at all.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("x-api-key", app_api_key),) if app_api_key else ()
        )
        self._service_name = service_name
        self._trusted = frozenset(trusted_callers)
        self._ttl = cache_ttl_seconds
        self._timeout = timeout_seconds
        self._max_entries = cache_max_entries
        self._cache: OrderedDict[bytes, tuple[float, Caller | _Refusal]] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        self._conn: _Connection | None = None
        self._connect_lock = trio.Lock()
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self.stats = AuthStats()
        # trio time of the first "unavailable" since Auth last answered (readiness).
        self.unreachable_since: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GrpcAuthenticator:
        """The authenticator ``serve`` uses, from AUTH_SERVICE_GRPC_ADDR, APP_API_KEY,
        APP_SERVICE_NAME and the PAYMENTS_TRUSTED_CALLERS / PAYMENTS_AUTH_* settings."""
        return cls(
            addr=settings.auth_service_grpc_addr,
            app_api_key=settings.app_api_key,
            service_name=settings.app_service_name,
            trusted_callers=settings.trusted_callers,
            cache_ttl_seconds=settings.auth_cache_ttl_seconds,
            timeout_seconds=settings.auth_timeout_seconds,
        )

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._nursery_manager is not None:
            raise RuntimeError("GrpcAuthenticator is already open")
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()  # the connection and any calls in flight
        self._nursery = None
        self._conn = None
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery_manager = None

    # --- the look-up ------------------------------------------------------------------

    async def authenticate(self, api_key: str) -> Caller:
        """The calling service for ``api_key``; raises Unauthenticated,
        PermissionDenied or DependencyUnavailable (see the module docstring)."""
        digest = key_digest(api_key)

        cached = self._cache_get(digest)
        if cached is not None:
            self.stats.cache_hits += 1
            return self._answer(cached)

        flight = self._flights.get(digest)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("use GrpcAuthenticator as an async context manager")
            flight = self._flights[digest] = _Flight()
            self._nursery.start_soon(self._lookup, digest, api_key, flight)
        else:
            self.stats.shared += 1
        await flight.done.wait()
        return self._answer(flight.outcome)

    def _answer(self, outcome: _Outcome) -> Caller:
        if isinstance(outcome, Caller):
            return outcome
        if outcome is _Refusal.INVALID_KEY:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        if outcome is _Refusal.NO_ACCESS:
            raise PermissionDenied(f"API key has no access to {self._service_name}")
        raise DependencyUnavailable(UNAVAILABLE_MESSAGE)

    async def _lookup(self, digest: bytes, api_key: str, flight: _Flight) -> None:
        """Ask Auth once for everyone waiting on ``flight``. Runs in the nursery, so it
        must never raise: every failure becomes the "unavailable" outcome."""
        outcome: _Outcome = None
        try:
            self.stats.lookups += 1
            with trio.move_on_after(self._timeout):
                outcome = await self._ask_auth(api_key)
            if outcome is None:
                log.warning("auth service unavailable: no answer within %ss", self._timeout)
        except _Unavailable as exc:
            log.warning("auth service unavailable: %s", exc.reason)
        except Exception:
            log.exception("auth service unavailable: unexpected error")
        finally:
            # No checkpoint from here on: cache, then wake the waiters, atomically.
            self._note_reachable(outcome is not None)
            if outcome is None:
                self.stats.unavailable += 1
            elif self._ttl > 0:
                self._cache_put(digest, outcome)
            flight.outcome = outcome
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            flight.done.set()

    @property
    def cache_ttl_seconds(self) -> float:
        """How long a cached answer lets callers in while Auth does not answer."""
        return self._ttl

    def _note_reachable(self, answered: bool) -> None:
        if answered:
            self.unreachable_since = None
        elif self.unreachable_since is None:
            self.unreachable_since = trio.current_time()

    async def probe(self) -> bool:
        """Ask Auth once, past the cache, about a key no one holds: any answer (a
        refusal included) means it is reachable. For readiness: a replica marked not
        ready gets no traffic, so without a probe it would never see Auth come back."""
        answered = False
        try:
            with trio.move_on_after(self._timeout):
                await self._ask_auth(PROBE_KEY)
                answered = True
        except Exception as exc:  # _Unavailable, or anything else: no answer either way
            log.debug("auth probe: no answer (%s)", type(exc).__name__)
        self._note_reachable(answered)
        return answered

    async def _ask_auth(self, api_key: str) -> Caller | _Refusal:
        """One ValidateInternalAccess call, retried once on a fresh connection when a
        reused one turns out to be broken."""
        request = auth_pb2.ValidateInternalAccessRequest(api_key=api_key)
        may_retry = True
        while True:
            conn, fresh = await self._connection()
            conn.acquire()
            try:
                response = await conn.stub.ValidateInternalAccess(request, metadata=self._metadata)
            except purerpc.RpcFailedError as exc:
                code = exc.status.status_code
                if code in _INVALID_KEY_CODES:
                    return _Refusal.INVALID_KEY
                # PERMISSION_DENIED here would mean Auth refuses *our* key: not the
                # caller's fault either.
                raise _Unavailable(f"auth answered {code.name}") from None
            except Exception as exc:  # the connection failed under this call
                conn.retire()
                if fresh or not may_retry:
                    raise _Unavailable(f"connection failed ({type(exc).__name__})") from None
                may_retry = False
                log.info("auth connection broke (%s); retrying on a new one", type(exc).__name__)
                continue
            except BaseException:  # timed out or shutting down: the connection is suspect
                conn.retire()
                raise
            finally:
                conn.release()
            return self._verdict(response)

    def _verdict(self, response: auth_pb2.ValidateInternalAccessResponse) -> Caller | _Refusal:
        name = response.service_name
        if not name:
            raise _Unavailable("auth answered without a service name")
        if self._service_name not in response.allowed_access:
            return _Refusal.NO_ACCESS
        return Caller(service_name=name, trusted=name in self._trusted)

    # --- the connection ---------------------------------------------------------------

    async def _connection(self) -> tuple[_Connection, bool]:
        """The open connection, or a new one; True when it was opened for this call."""
        conn = self._conn
        if conn is not None and conn.usable:
            return conn, False
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn, False
            if self._nursery is None:
                raise _Unavailable("authenticator closed")
            try:
                conn = await self._nursery.start(self._run_connection)
            except* OSError as group:  # refused, unreachable, no such host
                reason = f"cannot connect to {self._host}:{self._port} ({group.exceptions[0]})"
                raise _Unavailable(reason) from None
            self._conn = conn
            self.stats.connections += 1
            return conn, True

    async def _run_connection(
        self, *, task_status: trio.TaskStatus[_Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own one channel: open it, hand it out, close it once it ends or is retired.
        Errors before ``started`` go to the caller of ``start``; after, they only end
        this connection (the next call opens another)."""
        channel = _Channel(self._host, self._port)
        conn: _Connection | None = None
        try:
            with trio.CancelScope() as scope:
                async with channel:
                    conn = _Connection(AuthServiceStub(channel), channel.ended, scope)
                    task_status.started(conn)
                    await channel.ended.wait()
                    # Leave under cancellation: nothing is left to flush to a dead socket.
                    scope.cancel()
        except* Exception as group:  # (except*: cancellation mixed in must go on up)
            if conn is None:
                raise
            log.info("auth connection closed (%r)", [type(e).__name__ for e in group.exceptions])
        finally:
            if conn is not None:
                conn.retired = True

    # --- the cache --------------------------------------------------------------------

    def _cache_get(self, digest: bytes) -> Caller | _Refusal | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        expires_at, outcome = entry
        if trio.current_time() >= expires_at:
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return outcome

    def _cache_put(self, digest: bytes, outcome: Caller | _Refusal) -> None:
        self._cache[digest] = (trio.current_time() + self._ttl, outcome)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
