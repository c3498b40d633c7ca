"""The status-callback dispatcher: delivers callback-outbox rows to the callers.

The outbox row is written in the transaction that ended the payment
(payments.unit_of_work), so nothing here decides *what* to send: the body is fixed. The
dispatcher claims due rows with a lease (payments.storage.outbox.claim_due, safe with
many replicas), POSTs each to its URL, and records the attempt:

* 2xx: delivered. Anything else (another status, a timeout, a connection error) is
  retried after ``PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES * 2**(attempt-1)``, jittered
  by +-20% so callbacks that failed together do not retry in lockstep, capped at
  :data:`MAX_RETRY_DELAY`; after ``PAYMENTS_CALLBACK_MAX_ATTEMPTS`` attempts it is
  failed.
* Redirects are never followed (a 3xx is a failed attempt): a callback URL must not be
  able to bounce our signed, API-keyed request somewhere else.
* Only URLs that payments.callback_urls allows, as written and as resolved (no
  loopback, private or link-local targets unless ``PAYMENTS_CALLBACK_ALLOWED_HOSTS``
  says so); any other URL is failed at once, without a request.

As an actor (:meth:`Dispatcher.run`) it wakes at once when the service sends a notice
after committing a terminal status, so a caller hears within milliseconds; it also
sweeps every ``PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES`` (or sooner when a retry
falls due) for retries and for rows other replicas committed. Notices are only
wake-ups: the database is the source of truth, so a dropped notice costs latency,
never a callback.

Scheduling (due times, leases, webhook-timestamp) reads the injectable wall ``clock``;
waiting uses trio's clock, so tests drive both with MockClock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import random
import secrets
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

import attrs
import httpx
import trio

from payments.callback_urls import CallbackPolicy, check_url
from payments.config import Settings
from payments.errors import DependencyUnavailable
from payments.jobs.signing import CallbackSigner
from payments.model import OutboxEntry, OutboxState, utcnow
from payments.observability import hooks, metrics, tracing
from payments.storage import outbox
from payments.storage.database import Database
from payments.storage.outbox import CallbackAttempt
from supervisor import Backoff, ChildContext

log = logging.getLogger("payments.jobs.dispatcher")

# The longest wait between two attempts, however many failed before.
MAX_RETRY_DELAY = timedelta(hours=24)
RETRY_JITTER = 0.2
# Deliveries in flight at once per dispatcher (each also borrows a DB connection
# briefly to record its attempt).
DEFAULT_CONCURRENCY = 16
# Added to a lease beyond the HTTP time it must cover: recording the attempt, clock
# skew between replicas.
LEASE_MARGIN_SECONDS = 30.0
# Per delivery, beyond the HTTP timeout: the database round trips around it.
RECORD_ALLOWANCE_SECONDS = 2.0
# Notices queued before more are dropped; one is enough to wake the dispatcher.
NOTICE_CAPACITY = 256
# After the database failed a pass, wait this long (or the sweep, if shorter).
DB_RETRY_SECONDS = 5.0


@attrs.frozen
class PassResult:
    """What one pass (or several, summed with ``+``) did with the rows it claimed.

    ``skipped`` rows were claimed but not attempted (shutting down, a lease too short
    to finish in, the database failing around it) or attempted but not recorded (the
    lease was taken over meanwhile); they stay pending for a later pass.
    """

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: PassResult) -> PassResult:
        return PassResult(
            *(a + b for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True))
        )

    @property
    def progressed(self) -> bool:
        """True when some row moved (was attempted and recorded)."""
        return self.delivered + self.retried + self.failed > 0


@attrs.define
class DispatcherStats:
    """Counters for health and tests."""

    passes: int = 0
    notices: int = 0  # notices received (each batch of queued notices wakes one drain)
    totals: PassResult = attrs.field(factory=PassResult)
    waiting: bool = False  # True while the actor waits for a notice or its sweep


def retry_delay(attempt: int, interval_minutes: float, rng: Callable[[], float]) -> timedelta:
    """Wait after failed attempt number ``attempt`` (1-based): exponential, jittered,
    capped at MAX_RETRY_DELAY."""
    backoff = Backoff(
        initial=interval_minutes * 60,
        factor=2.0,
        max_delay=MAX_RETRY_DELAY.total_seconds(),
        jitter=RETRY_JITTER,
        random=rng,
    )
    return timedelta(seconds=backoff.delay(attempt))


def url_problem(url: str, policy: CallbackPolicy) -> str:
    """Why ``url`` may not be called as written ('' when it may): payments.callback_urls's
    rule, the same as at create (the allow-list may have changed since)."""
    problem = policy.url_problem(url)
    return f"callback URL rejected: {problem}" if problem else ""


async def resolved_problem(url: str, policy: CallbackPolicy, limit_seconds: float) -> str:
    """Why the addresses ``url``'s host name resolves to may not be called ('' when
    they may, or when it does not resolve: the attempt then fails on its own). A name
    is checked like an address, so ``evil.example`` -> 127.0.0.1 is refused.
    (httpx resolves again when it connects: a rebinding DNS server could still answer
    differently the second time.)"""
    host = check_url(url, policy)
    if not isinstance(host, str):
        return ""
    infos: list[Any] = []
    with trio.move_on_after(limit_seconds), contextlib.suppress(OSError):
        infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    name_allowed = policy.name_allowed(host)
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if problem := policy.address_problem(address, name_allowed=name_allowed):
            return f"callback URL rejected: {host} resolves to {address}, which {problem}"
    return ""


def default_worker_id() -> str:
    """host:pid:random, unique per Dispatcher, within claimed_by's 64 characters."""
    suffix = f":{os.getpid()}:{secrets.token_hex(3)}"
    return socket.gethostname()[: outbox.WORKER_ID_MAX_CHARS - len(suffix)] + suffix


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The HTTP client callbacks go out on (share one per process).

    No redirects; no proxy or netrc from the environment (callbacks go straight to
    internal callers, and an ambient proxy must not see API keys); the callback timeout
    per phase (the dispatcher also bounds the whole attempt).
    """
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(settings.callback_http_timeout_seconds),
        limits=httpx.Limits(max_connections=DEFAULT_CONCURRENCY * 2, max_keepalive_connections=16),
        headers={"User-Agent": "payments-service/callbacks"},
    )


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


class DispatchNotifier:
    """The service's side of the dispatcher's channel: ``notify`` after a commit.

    Never blocks and never raises (the change is already committed; the caller must
    not see an error for it). A full or closed channel drops the notice: the row is in
    the database and the sweep delivers it.
    """

    def __init__(self, send: trio.MemorySendChannel[int]) -> None:
        self._send = send
        self.dropped = 0

    def notify(self, payment: _HasId) -> bool:
        """Tell the dispatcher ``payment`` has a callback due; False if dropped."""
        try:
            self._send.send_nowait(payment.id)
        except trio.WouldBlock:
            self.dropped += 1
            log.debug("dispatcher notice dropped: channel full", extra={"payment_id": payment.id})
            return False
        except Exception:  # closed or broken channel, a bad argument: never the caller's problem
            self.dropped += 1
            log.debug("dispatcher notice dropped", exc_info=True)
            return False
        return True

    __call__ = notify  # usable directly as the unit of work's notifier


def open_notice_channel(
    capacity: int = NOTICE_CAPACITY,
) -> tuple[DispatchNotifier, trio.MemoryReceiveChannel[int]]:
    """A notifier for the service and the receive end for :meth:`Dispatcher.run`."""
    send, receive = trio.open_memory_channel[int](capacity)
    return DispatchNotifier(send), receive


class Dispatcher:
    """Delivers status callbacks; one per process (any number of replicas).

    ``http_client`` is borrowed when given (redirects are refused per request
    anyway); otherwise one is made and closed by :meth:`aclose`. ``clock`` is the
    wall clock for due times, leases and webhook-timestamp; ``rng`` returns floats in
    [0, 1) for the jitter. Raises ConfigError at construction for a bad signing secret.
    """

    def __init__(
        self,
        pool: Database,
        settings: Settings,
        http_client: httpx.AsyncClient | None = None,
        worker_id: str | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: Callable[[], float] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._pool = pool
        self._settings = settings
        self._signer = CallbackSigner(settings.app_api_key, settings.callback_signing_secret)
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else make_http_client(settings)
        self.worker_id = worker_id or default_worker_id()
        if len(self.worker_id) > outbox.WORKER_ID_MAX_CHARS:
            raise ValueError(f"worker_id longer than {outbox.WORKER_ID_MAX_CHARS} characters")
        self._clock = clock
        self._rng = rng if rng is not None else random.random
        self._concurrency = concurrency
        self._timeout = settings.callback_http_timeout_seconds
        self.stats = DispatcherStats()

    async def aclose(self) -> None:
        """Close the HTTP client if this dispatcher made it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- passes --------------------------------------------------------------------

    def lease_seconds(self, limit: int) -> float:
        """A lease long enough for ``limit`` deliveries ``concurrency`` at a time."""
        rounds = math.ceil(limit / self._concurrency)
        return rounds * (self._timeout + RECORD_ALLOWANCE_SECONDS) + LEASE_MARGIN_SECONDS

    async def run_pass(
        self, limit: int | None = None, *, stopping: trio.Event | None = None
    ) -> PassResult:
        """Claim up to ``limit`` (PAYMENTS_JOB_BATCH_SIZE) due rows and deliver them,
        ``concurrency`` at a time. Once ``stopping`` is set, deliveries in flight finish
        and the rest are released untried. Raises DependencyUnavailable if the claim
        fails (nothing was claimed then)."""
        limit = self._settings.job_batch_size if limit is None else limit
        entries = await outbox.claim_due(
            self._pool, self.worker_id, self._clock(), self.lease_seconds(limit), limit
        )
        counts: dict[str, int] = {"delivered": 0, "retried": 0, "failed": 0, "skipped": 0}
        if entries:
            limiter = trio.CapacityLimiter(self._concurrency)

            async def one(entry: OutboxEntry) -> None:
                async with limiter:
                    outcome = await self._work(entry, stopping)
                    counts[outcome] += 1
                    metrics.job_item("dispatch", outcome)

            async with trio.open_nursery() as nursery:
                for entry in entries:
                    nursery.start_soon(one, entry)
        result = PassResult(claimed=len(entries), **counts)
        self.stats.passes += 1
        self.stats.totals = self.stats.totals + result
        return result

    async def drain(
        self,
        limit: int | None = None,
        *,
        stopping: trio.Event | None = None,
        on_progress: Callable[[PassResult], None] | None = None,
    ) -> PassResult:
        """Run passes until no due row is left (or a pass moves nothing, or ``stopping``
        is set); the summed result. ``on_progress`` gets the running total after each
        pass that claimed something (the one-off command's progress line)."""
        total = PassResult()
        while stopping is None or not stopping.is_set():
            result = await self.run_pass(limit, stopping=stopping)
            if not result.claimed:
                break
            total = total + result
            if on_progress is not None:
                on_progress(total)
            if not result.progressed:
                break
        return total

    # -- one delivery --------------------------------------------------------------

    async def _work(self, entry: OutboxEntry, stopping: trio.Event | None) -> str:
        """Attempt one claimed entry and record it; the PassResult field to count."""
        base: dict[str, Any] = {
            "payment_id": entry.payment_id,
            "outbox_id": entry.id,
            "delivery_id": entry.delivery_id,
            "worker_id": self.worker_id,
        }
        try:
            assert entry.claimed_until is not None
            remaining = (entry.claimed_until - self._clock()).total_seconds()
            if (stopping is not None and stopping.is_set()) or remaining < (
                self._timeout + RECORD_ALLOWANCE_SECONDS
            ):
                async with self._pool.connection() as conn:
                    await outbox.release(conn, entry, self.worker_id)
                return "skipped"
            attempt_no = entry.attempts + 1
            policy = self._settings.callback_policy()
            problem = url_problem(entry.url, policy) or await resolved_problem(
                entry.url, policy, self._timeout
            )
            if problem:
                attempt = CallbackAttempt(entry.id, attempt_no, self._clock(), None, problem, 0)
            else:
                attempt = await hooks.callback_attempt(self._post, entry, attempt_no)
            state, next_at, outcome = self._decide(attempt, rejected=bool(problem))
            async with self._pool.transaction() as conn:
                recorded = await outbox.record_attempt(
                    conn, entry, self.worker_id, attempt, state, next_at
                )
        except DependencyUnavailable:
            # The lease runs out and the row is tried again: at-least-once.
            log.warning("callback left for a later pass: database unavailable", extra=base)
            return "skipped"
        extra = {
            **base,
            "attempt": attempt.attempt,
            "status_code": attempt.status_code,
            "error": attempt.error,
            "latency_ms": attempt.latency_ms,
            "outcome": outcome if recorded else "lease_lost",
        }
        if not recorded:
            log.warning("callback attempt not recorded: lease taken over", extra=extra)
            return "skipped"
        if outcome == "retried":
            extra["next_attempt_at"] = next_at.isoformat()
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(level, f"callback attempt {outcome}", extra=extra)
        return outcome

    async def _post(self, entry: OutboxEntry, attempt_no: int) -> CallbackAttempt:
        """One HTTP attempt, bounded as a whole by the callback timeout (httpx's own
        timeout is per phase, so a receiver trickling bytes could outlast it)."""
        at = self._clock()
        headers = self._signer.headers(entry, at)
        tracing.inject(headers)  # the trace of the request that ended the payment
        started = trio.current_time()
        status: int | None = None
        error = ""
        with trio.move_on_after(self._timeout) as scope:
            try:
                # Streamed and never read: the answer's status is all we need, and a
                # huge body must not cost memory.
                async with self._client.stream(
                    "POST",
                    entry.url,
                    content=entry.payload.encode("utf-8"),
                    headers=headers,
                    follow_redirects=False,
                    timeout=self._timeout,
                ) as response:
                    status = response.status_code
            except httpx.TimeoutException:
                error = f"timed out after {self._timeout:g}s"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except Exception as exc:
                # One bad row (say, a header value httpx refuses) must cost one attempt,
                # not crash every pass that claims it.
                log.exception("callback attempt raised", extra={"outbox_id": entry.id})
                error = f"unexpected error: {type(exc).__name__}"
        if scope.cancelled_caught and status is None:
            error = f"timed out after {self._timeout:g}s"
        latency_ms = round((trio.current_time() - started) * 1000)
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}" + (
                " (redirects are not followed)" if 300 <= status < 400 else ""
            )
        return CallbackAttempt(entry.id, attempt_no, at, status, error, latency_ms)

    def _decide(
        self, attempt: CallbackAttempt, *, rejected: bool
    ) -> tuple[OutboxState, datetime, str]:
        """(new state, next_attempt_at, outcome) after ``attempt``."""
        now = self._clock()
        if attempt.status_code is not None and 200 <= attempt.status_code < 300:
            return OutboxState.DELIVERED, now, "delivered"
        if rejected or attempt.attempt >= self._settings.callback_max_attempts:
            return OutboxState.FAILED, now, "failed"
        delay = retry_delay(
            attempt.attempt, self._settings.callback_retry_interval_minutes, self._rng
        )
        return OutboxState.PENDING, now + delay, "retried"

    # -- the actor -----------------------------------------------------------------

    async def run(
        self, ctx: ChildContext, notices: trio.MemoryReceiveChannel[int] | None = None
    ) -> None:
        """Run as a supervised child until ``ctx.stopping``.

        Drains what is due, then waits for a notice, the next due retry or the sweep
        interval, whichever comes first, and drains again. On ``ctx.stopping`` the
        deliveries in flight finish (give the child a grace of at least the callback
        timeout) and it returns. A database outage is waited out here rather than
        crashing the child, so it does not eat the supervisor's restart budget.
        """
        sweep = self._settings.callback_dispatch_interval_minutes * 60
        ctx.started()
        log.info("dispatcher running", extra={"worker_id": self.worker_id, "sweep_s": sweep})
        while not ctx.stop_requested:
            try:
                await self.drain(stopping=ctx.stopping)
                wait = await self._until_next_due(sweep)
            except DependencyUnavailable:
                log.warning("dispatcher pass failed: database unavailable; retrying")
                wait = min(sweep, DB_RETRY_SECONDS)
            if ctx.stop_requested:
                break
            notices = await self._wait_for_work(ctx.stopping, notices, wait)
        log.info("dispatcher stopped", extra={"worker_id": self.worker_id})

    async def _until_next_due(self, sweep: float) -> float:
        """Seconds until the sweep, or sooner when a retry falls due before it."""
        now = self._clock()
        async with self._pool.connection() as conn:
            due = await outbox.next_due_at(conn, now + timedelta(seconds=sweep))
            await hooks.record_outbox_backlog(conn, now)
        if due is None:
            return sweep
        # At least a moment: a row due "now" that a pass could not move is not retried hot.
        return min(sweep, max((due - now).total_seconds(), 0.5))

    async def _wait_for_work(
        self,
        stopping: trio.Event,
        notices: trio.MemoryReceiveChannel[int] | None,
        seconds: float,
    ) -> trio.MemoryReceiveChannel[int] | None:
        """Sleep until a notice, ``stopping`` or ``seconds`` pass; swallow queued notices (one
        drain serves them all). Returns the channel, or None once it has closed."""
        self.stats.waiting = True
        try:
            with trio.move_on_after(seconds):
                async with trio.open_nursery() as nursery:

                    async def watch_stop() -> None:
                        await stopping.wait()
                        nursery.cancel_scope.cancel()

                    async def watch_notices(channel: trio.MemoryReceiveChannel[int]) -> None:
                        nonlocal notices
                        try:
                            await channel.receive()
                            self.stats.notices += 1
                        except (trio.EndOfChannel, trio.ClosedResourceError):
                            notices = None  # no more notices: sweep only
                            return
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_stop)
                    if notices is not None:
                        nursery.start_soon(watch_notices, notices)
        finally:
            self.stats.waiting = False
        while notices is not None:
            try:
                notices.receive_nowait()
                self.stats.notices += 1
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                notices = None
        return notices
