"""The status-callback dispatcher: delivers callback-outbox rows to the callers.

The outbox row is written in the transaction that ended the payment
(payments.unit_of_work), so nothing here decides *what* to send: the body is fixed. The
dispatcher claims due rows with a lease (payments.storage.outbox.claim_due, safe with
many replicas), POSTs each to its URL, and records the attempt:

* 2xx: delivered. ``410 Gone``: the receiver says it will never want it; the delivery
  stops (state ``gone``). Anything else (another status, a timeout, a connection error)
  is retried after ``PAYMENTS_CALLBACK_RETRY_INTERVAL_MINUTES * 3**(attempt-1)``,
  jittered by +-20% so callbacks that failed together do not retry in lockstep, capped
  at :data:`MAX_RETRY_DELAY`; a ``429`` or ``503`` with a longer ``Retry-After`` waits
  that long instead (capped the same), a shorter one is not honoured: the schedule's
  span is the promise. After ``PAYMENTS_CALLBACK_MAX_ATTEMPTS`` attempts (the
  first included) it is failed. The defaults (10 attempts, 5 minutes first) keep trying
  for 81.9 to 108.1 hours (:func:`retry_schedule`): a receiver down for a weekend still
  gets its callbacks.
* Redirects are never followed (a 3xx is a failed attempt): a callback URL must not be
  able to bounce our signed, API-keyed request somewhere else.
* Only URLs that payments.callback_urls allows, as written and as resolved (no
  loopback, private or link-local targets unless ``PAYMENTS_CALLBACK_ALLOWED_HOSTS``
  says so); any other URL is failed at once, without a request.

As an actor (:meth:`Dispatcher.run`) it wakes at once when the service sends a notice
after committing a terminal status, so a caller hears within milliseconds. Each
delivery runs as its own task, bounded by the callback timeout, so a slow or dead
receiver never holds up anyone else's callback; at most :data:`HOST_CONCURRENCY`
requests go to one receiver (scheme, host and port) at once, and a receiver that
holds :data:`HOST_BACKLOG` rows is left out of further claims until only the ones
being sent are left (rows of its that arrive anyway are parked for
:data:`PARK_SECONDS`), and notices naming only such receivers claim nothing, so a slow
receiver's backlog never fills the dispatcher's slots while others wait. It also
sweeps every ``PAYMENTS_CALLBACK_DISPATCH_INTERVAL_MINUTES`` (or sooner when a retry
falls due) for retries and for rows other replicas committed. Notices are only
wake-ups: the database is the source of truth, so a dropped notice costs latency,
never a callback.

Scheduling (due times, leases, webhook-timestamp) reads the injectable wall ``clock``;
waiting uses trio's clock, so tests drive both with MockClock.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import random
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import trio

from payments.callback_urls import CallbackPolicy, IPAddress, UrlRefused, check_url
from payments.config import Settings
from payments.errors import DependencyUnavailable
from payments.jobs.attempt_recorder import AttemptRecorder
from payments.jobs.callback_http import CallbackClient, CallbackHTTPError
from payments.jobs.signing import CallbackSigner
from payments.model import OutboxEntry, OutboxState, utcnow
from payments.observability import hooks, metrics, tracing
from payments.storage import deliveries, outbox
from payments.storage.database import Database
from payments.storage.outbox import CallbackAttempt, FinishedAttempt
from supervisor import Backoff, ChildContext

log = logging.getLogger("payments.jobs.dispatcher")

# The longest wait between two attempts, however many failed before (and the longest a
# Retry-After is honoured for).
MAX_RETRY_DELAY = timedelta(hours=24)
# Each gap is this many times the one before: the contract's 10 attempts at a 5-minute
# first gap then span more than 72 hours (a weekend) without many more requests.
RETRY_FACTOR = 3.0
RETRY_JITTER = 0.2
# Deliveries in flight at once per dispatcher pass (each also borrows a DB connection
# briefly to record its attempt).
DEFAULT_CONCURRENCY = 16
# The actor: requests to one receiver at once, and its rows held at once (sending or
# waiting for a turn); more are parked.
HOST_CONCURRENCY = 16
HOST_BACKLOG = 4 * HOST_CONCURRENCY
# How long rows of a busy receiver that a claim brought anyway are set aside.
PARK_SECONDS = 2.0
# How often the actor deletes deliveries past the retention (storage.deliveries).
PRUNE_INTERVAL = timedelta(hours=1)
# Statuses whose Retry-After header sets the next attempt (RFC 9110 15.6.4, 6585 4).
RETRY_AFTER_STATUSES = frozenset({429, 503})
# Added to a lease beyond the HTTP time it must cover: recording the attempt, clock
# skew between replicas.
LEASE_MARGIN_SECONDS = 30.0
# Per delivery, beyond the HTTP timeout: the database round trips around it.
RECORD_ALLOWANCE_SECONDS = 2.0
# Notices queued before more are dropped; one is enough to wake the dispatcher.
NOTICE_CAPACITY = 256
# After the database failed a pass, wait this long (or the sweep, if shorter).
DB_RETRY_SECONDS = 5.0
# The actor looks up the next due time (and the backlog gauges) after a notice's
# claim at most this often; after any other wake-up, always.
NEXT_DUE_REFRESH_SECONDS = 1.0


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
    gone: int = 0

    def __add__(self, other: PassResult) -> PassResult:
        return PassResult(
            *(a + b for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True))
        )

    @property
    def progressed(self) -> bool:
        """True when some row moved (was attempted and recorded)."""
        return self.delivered + self.retried + self.failed + self.gone > 0


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
        factor=RETRY_FACTOR,
        max_delay=MAX_RETRY_DELAY.total_seconds(),
        jitter=RETRY_JITTER,
        random=rng,
    )
    return timedelta(seconds=backoff.delay(attempt))


def retry_schedule(
    max_attempts: int, interval_minutes: float, rng: Callable[[], float]
) -> list[timedelta]:
    """The gaps between ``max_attempts`` attempts of a delivery no one answers."""
    return [retry_delay(n, interval_minutes, rng) for n in range(1, max_attempts)]


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or
    None when absent or unreadable."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def url_prefix(url: str) -> str:
    """``scheme://netloc`` as the URL spells it (what a claim can leave out)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return url[: len(parts.scheme) + 3 + len(parts.netloc)] if parts.netloc else url


def receiver_of(url: str) -> str:
    """The receiver a URL names, for the per-receiver bound: scheme://host:port."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url


def url_problem(url: str, policy: CallbackPolicy) -> str:
    """Why ``url`` may not be called as written ('' when it may): payments.callback_urls's
    rule, the same as at create (the allow-list may have changed since)."""
    problem = policy.url_problem(url)
    return f"callback URL rejected: {problem}" if problem else ""


@functools.lru_cache(maxsize=4096)
def _url_verdict(url: str, policy: CallbackPolicy) -> tuple[str, str | IPAddress | None]:
    """:func:`url_problem` and the host it names, in one pure step: cached, since the
    same few receivers come back callback after callback."""
    try:
        return "", check_url(url, policy)
    except UrlRefused as exc:
        return f"callback URL rejected: {exc}", None


async def resolve_checked(
    url: str, policy: CallbackPolicy, limit_seconds: float
) -> tuple[str, tuple[str, ...]]:
    """Why ``url`` may not be called, as written or as resolved ('' when it may), and
    the addresses it resolves to: the only ones the attempt connects to (the client
    never resolves again, so a rebinding DNS server cannot answer differently the
    second time). A name is checked like an address, so ``evil.example`` -> 127.0.0.1
    is refused; a name that does not resolve has no address (the attempt then fails
    on its own, and is retried)."""
    problem, host = _url_verdict(url, policy)
    if problem or host is None:
        return problem, ()
    if not isinstance(host, str):
        return "", (str(host),)
    infos: list[Any] = []
    with trio.move_on_after(limit_seconds), contextlib.suppress(OSError):
        infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    name_allowed = policy.name_allowed(host)
    addresses: dict[str, None] = {}
    for *_, sockaddr in infos:
        written = str(sockaddr[0])
        address = ipaddress.ip_address(written.partition("%")[0])
        if problem := policy.address_problem(address, name_allowed=name_allowed):
            return f"callback URL rejected: {host} resolves to {address}, which {problem}", ()
        addresses[written] = None
    return "", tuple(addresses)


async def resolved_problem(url: str, policy: CallbackPolicy, limit_seconds: float) -> str:
    """:func:`resolve_checked`'s verdict alone."""
    return (await resolve_checked(url, policy, limit_seconds))[0]


def default_worker_id() -> str:
    """host:pid:random, unique per Dispatcher, within claimed_by's 64 characters."""
    suffix = f":{os.getpid()}:{secrets.token_hex(3)}"
    return socket.gethostname()[: outbox.WORKER_ID_MAX_CHARS - len(suffix)] + suffix


class _Notified(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def status_callback_url(self) -> str: ...


class DispatchNotifier:
    """The service's side of the dispatcher's channel: ``notify`` after a commit.

    Never blocks and never raises (the change is already committed; the caller must
    not see an error for it). A full or closed channel drops the notice: the row is in
    the database and the sweep delivers it.
    """

    def __init__(self, send: trio.MemorySendChannel[str]) -> None:
        self._send = send
        self.dropped = 0

    def notify(self, payment: _Notified) -> bool:
        """Tell the dispatcher ``payment`` has a callback due; False if dropped. The
        notice names the receiver (:func:`receiver_of` its callback URL), so the
        dispatcher need not claim for a receiver that already has its share."""
        try:
            self._send.send_nowait(receiver_of(payment.status_callback_url))
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
) -> tuple[DispatchNotifier, trio.MemoryReceiveChannel[str]]:
    """A notifier for the service and the receive end for :meth:`Dispatcher.run`."""
    send, receive = trio.open_memory_channel[str](capacity)
    return DispatchNotifier(send), receive


class Dispatcher:
    """Delivers status callbacks; one per process (any number of replicas).

    ``http_client`` (payments.jobs.callback_http: no redirects, no proxy, only
    checked addresses) is borrowed when given; otherwise one is made and closed by
    :meth:`aclose`. ``clock`` is the
    wall clock for due times, leases and webhook-timestamp; ``rng`` returns floats in
    [0, 1) for the jitter. Raises ConfigError at construction for a bad signing secret.
    """

    def __init__(
        self,
        pool: Database,
        settings: Settings,
        http_client: CallbackClient | None = None,
        worker_id: str | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: Callable[[], float] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        in_flight: int | None = None,
    ) -> None:
        in_flight = settings.job_batch_size if in_flight is None else in_flight
        if concurrency < 1 or in_flight < 1:
            raise ValueError("concurrency and in_flight must be >= 1")
        self._pool = pool
        self._settings = settings
        self._policy = settings.callback_policy()
        self._signer = CallbackSigner(settings.app_api_key, settings.callback_signing_secret)
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else CallbackClient()
        self.worker_id = worker_id or default_worker_id()
        if len(self.worker_id) > outbox.WORKER_ID_MAX_CHARS:
            raise ValueError(f"worker_id longer than {outbox.WORKER_ID_MAX_CHARS} characters")
        # Attempts finishing together are recorded in one transaction.
        self._recorder = AttemptRecorder(pool, self.worker_id)
        self._clock = clock
        self._rng = rng if rng is not None else random.random
        self._concurrency = concurrency
        self._timeout = settings.callback_http_timeout_seconds
        self.stats = DispatcherStats()
        # The actor's rows: in flight in all, and held per receiver with its limiter.
        self._in_flight_limit = in_flight
        self._in_flight = 0
        self._full = False
        self._held: dict[str, int] = {}
        self._prefixes: dict[str, Counter[str]] = {}  # the URL prefixes of those rows
        self._saturated: set[str] = set()  # receivers left out of claims
        self._host_limiters: dict[str, trio.CapacityLimiter] = {}
        self._wake = trio.Event()

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
        counts: dict[str, int] = {
            "delivered": 0,
            "retried": 0,
            "failed": 0,
            "skipped": 0,
            "gone": 0,
        }
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
            # The DNS check and the POST share one callback timeout: the lease covers
            # one, and a lapsed lease would let another replica send it too.
            deadline = trio.current_time() + self._timeout
            problem, addresses = await resolve_checked(entry.url, self._policy, self._timeout)
            retry_after: float | None = None
            if problem:
                attempt = CallbackAttempt(entry.id, attempt_no, self._clock(), None, problem, 0)
            else:
                post = partial(self._post, deadline=deadline, addresses=addresses)
                attempt, retry_after = await hooks.callback_attempt(post, entry, attempt_no)
            state, next_at, outcome = self._decide(
                attempt, rejected=bool(problem), retry_after=retry_after
            )
            recorded = await self._recorder.record(FinishedAttempt(entry, attempt, state, next_at))
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

    async def _post(
        self,
        entry: OutboxEntry,
        attempt_no: int,
        *,
        deadline: float,
        addresses: tuple[str, ...],
    ) -> tuple[CallbackAttempt, float | None]:
        """One HTTP attempt to ``addresses`` (resolved and checked), bounded as a whole
        by ``deadline`` (trio time: the callback timeout, counted from before the DNS
        check, so a receiver trickling bytes cannot outlast it); with the seconds a
        Retry-After header asked for."""
        at = self._clock()
        headers = self._signer.headers(entry, at)
        tracing.inject(headers)  # the trace of the request that ended the payment
        started = trio.current_time()
        status: int | None = None
        retry_after: str | None = None
        error = ""
        with trio.move_on_at(deadline) as scope:
            try:
                # The DNS check may have spent the timeout (and found no address).
                await trio.lowlevel.checkpoint_if_cancelled()
                answer = await self._client.post(
                    entry.url, entry.payload.encode("utf-8"), headers, addresses
                )
                status, retry_after = answer.status, answer.retry_after
            except CallbackHTTPError as exc:
                error = str(exc)
            except Exception as exc:
                # One bad row (say, a header value h11 refuses) must cost one attempt,
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
        waited = retry_after_seconds(retry_after, at) if status in RETRY_AFTER_STATUSES else None
        return CallbackAttempt(entry.id, attempt_no, at, status, error, latency_ms), waited

    def _decide(
        self, attempt: CallbackAttempt, *, rejected: bool, retry_after: float | None = None
    ) -> tuple[OutboxState, datetime, str]:
        """(new state, next_attempt_at, outcome) after ``attempt``; ``retry_after``
        (seconds) lengthens the schedule's gap, never shortens it (at most
        MAX_RETRY_DELAY)."""
        now = self._clock()
        if attempt.status_code is not None and 200 <= attempt.status_code < 300:
            return OutboxState.DELIVERED, now, "delivered"
        if attempt.status_code == 410:
            return OutboxState.GONE, now, "gone"
        if rejected or attempt.attempt >= self._settings.callback_max_attempts:
            return OutboxState.FAILED, now, "failed"
        delay = retry_delay(
            attempt.attempt, self._settings.callback_retry_interval_minutes, self._rng
        )
        if retry_after is not None:
            # Only ever longer: a short one would spend every attempt within seconds.
            delay = max(delay, min(timedelta(seconds=retry_after), MAX_RETRY_DELAY))
        return OutboxState.PENDING, now + delay, "retried"

    # -- the actor -----------------------------------------------------------------

    async def run(
        self, ctx: ChildContext, notices: trio.MemoryReceiveChannel[str] | None = None
    ) -> None:
        """Run as a supervised child until ``ctx.stopping``.

        Claims what is due (up to its free slots) and starts each row as its own task,
        then waits for a notice, a freed slot, the next due retry or the sweep interval,
        whichever comes first, and claims again; it never waits for a delivery to end.
        On ``ctx.stopping`` the deliveries in flight finish (give the child a grace of
        at least the callback timeout), rows still waiting for their turn are released,
        and it returns. A database outage is waited out here rather than crashing the
        child, so it does not eat the supervisor's restart budget.
        """
        sweep = self._settings.callback_dispatch_interval_minutes * 60
        ctx.started()
        log.info("dispatcher running", extra={"worker_id": self.worker_id, "sweep_s": sweep})
        async with trio.open_nursery() as deliveries:
            deliveries.start_soon(self._prune_hourly, ctx.stopping)
            deadline = refreshed = trio.current_time()
            feed = True
            noticed: set[str] | None = None
            while not ctx.stop_requested:
                if feed:
                    try:
                        parked = await self._feed(deliveries, ctx.stopping)
                        now = trio.current_time()
                        # After a notice's claim the due time already known still
                        # holds (what the claim did not take is parked, a retry or a
                        # freed slot wakes us): it is looked up again at most every
                        # NEXT_DUE_REFRESH_SECONDS, saving two queries per notice.
                        if (
                            noticed is None
                            or parked
                            or deadline <= now
                            or now - refreshed >= NEXT_DUE_REFRESH_SECONDS
                        ):
                            deadline = now + await self._until_next_due(sweep)
                            refreshed = now
                    except DependencyUnavailable:
                        log.warning("dispatcher pass failed: database unavailable; retrying")
                        deadline = trio.current_time() + min(sweep, DB_RETRY_SECONDS)
                if ctx.stop_requested:
                    break
                remaining = max(0.0, deadline - trio.current_time())
                notices, noticed = await self._wait_for_work(ctx.stopping, notices, remaining)
                # Notices only for receivers that already hold their share need no
                # claim (their rows are left out of it): it would cost a round trip
                # for nothing, once per notice. Anything else does.
                feed = noticed is None or not noticed <= self._saturated
        log.info("dispatcher stopped", extra={"worker_id": self.worker_id})

    async def _prune_hourly(self, stopping: trio.Event) -> None:
        """Delete deliveries finished longer than RETENTION ago, every PRUNE_INTERVAL
        (many replicas doing it at once only delete nothing twice)."""
        while not stopping.is_set():
            try:
                removed = await deliveries.prune(self._pool, self._clock() - deliveries.RETENTION)
                if removed:
                    log.info("callback deliveries pruned", extra={"removed": removed})
            except DependencyUnavailable:
                log.warning("callback pruning skipped: database unavailable")
            with trio.move_on_after(PRUNE_INTERVAL.total_seconds()):
                await stopping.wait()

    def _actor_lease_seconds(self) -> float:
        """A lease covering a row's wait for its receiver's turn and its own attempt."""
        rounds = math.ceil(HOST_BACKLOG / HOST_CONCURRENCY) + 1
        return rounds * (self._timeout + RECORD_ALLOWANCE_SECONDS) + LEASE_MARGIN_SECONDS

    async def _feed(self, nursery: trio.Nursery, stopping: trio.Event) -> int:
        """Claim due rows into the free slots and start each. Receivers that hold
        HOST_BACKLOG rows are left out of the claim; rows of theirs that come anyway
        (another spelling of the URL, or more in one claim than their share) are
        parked for PARK_SECONDS. How many were parked. Raises DependencyUnavailable."""
        parked_in_all = 0
        while not stopping.is_set():
            free = self._in_flight_limit - self._in_flight
            if free <= 0:
                self._full = True  # a delivery ending below the low-water mark wakes us
                return parked_in_all
            now = self._clock()
            busy = [r for r, held in self._held.items() if held >= HOST_BACKLOG]
            self._saturated.update(busy)
            entries = await outbox.claim_due(
                self._pool,
                self.worker_id,
                now,
                self._actor_lease_seconds(),
                free,
                skip_prefixes=sorted({p for r in busy for p in self._prefixes[r]}),
            )
            self.stats.passes += 1
            parked: list[OutboxEntry] = []
            for entry in entries:
                receiver, prefix = receiver_of(entry.url), url_prefix(entry.url)
                if self._held.get(receiver, 0) >= HOST_BACKLOG:
                    self._saturated.add(receiver)
                    parked.append(entry)
                    continue
                self._held[receiver] = self._held.get(receiver, 0) + 1
                self._prefixes.setdefault(receiver, Counter())[prefix] += 1
                self._in_flight += 1
                nursery.start_soon(self._deliver, entry, receiver, prefix, stopping)
            if parked:
                until = now + timedelta(seconds=min(PARK_SECONDS, self._timeout))
                await outbox.park(self._pool, parked, self.worker_id, until)
                parked_in_all += len(parked)
            if len(entries) < free or len(parked) == len(entries):
                return parked_in_all
        return parked_in_all

    async def _deliver(
        self, entry: OutboxEntry, receiver: str, prefix: str, stopping: trio.Event
    ) -> None:
        """One row, on its own: wait for the receiver's turn, attempt, record."""
        limiter = self._host_limiters.get(receiver)
        if limiter is None:
            limiter = self._host_limiters[receiver] = trio.CapacityLimiter(HOST_CONCURRENCY)
        outcome = "skipped"
        try:
            async with limiter:
                outcome = await self._work(entry, stopping)
        finally:
            self._in_flight -= 1
            self._held[receiver] -= 1
            self._prefixes[receiver][prefix] -= 1
            if not self._prefixes[receiver][prefix]:
                del self._prefixes[receiver][prefix]
            if not self._held[receiver]:
                del self._held[receiver], self._host_limiters[receiver], self._prefixes[receiver]
            self.stats.totals = self.stats.totals + PassResult(claimed=1, **{outcome: 1})
            low_water = self._full and self._in_flight <= self._in_flight_limit // 2
            drained = (
                receiver in self._saturated and self._held.get(receiver, 0) <= HOST_BACKLOG // 2
            )
            if drained:
                self._saturated.discard(receiver)
            if outcome == "retried" or low_water or drained:
                # A retry has a new due time, or slots (the dispatcher's or a busy
                # receiver's) are free again: look again.
                self._full = False
                self._wake.set()

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
        notices: trio.MemoryReceiveChannel[str] | None,
        seconds: float,
    ) -> tuple[trio.MemoryReceiveChannel[str] | None, set[str] | None]:
        """Sleep until a notice, a wake-up, ``stopping`` or ``seconds`` pass; swallow
        queued notices (one claim serves them all). Returns the channel (None once it
        has closed) and the receivers the notices named, or None when something else
        (time, a wake-up, stopping) ended the wait."""
        self.stats.waiting = True
        noticed: set[str] = set()
        by_notice = False
        try:
            with trio.move_on_after(seconds):
                async with trio.open_nursery() as nursery:

                    async def watch_stop() -> None:
                        await stopping.wait()
                        nursery.cancel_scope.cancel()

                    async def watch_notices(channel: trio.MemoryReceiveChannel[str]) -> None:
                        nonlocal notices, by_notice
                        try:
                            noticed.add(await channel.receive())
                            self.stats.notices += 1
                        except (trio.EndOfChannel, trio.ClosedResourceError):
                            notices = None  # no more notices: sweep only
                            return
                        by_notice = True
                        nursery.cancel_scope.cancel()

                    async def watch_wake() -> None:
                        await self._wake.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_stop)
                    nursery.start_soon(watch_wake)
                    if notices is not None:
                        nursery.start_soon(watch_notices, notices)
        finally:
            self.stats.waiting = False
            if self._wake.is_set():
                by_notice = False
                self._wake = trio.Event()
        while notices is not None:
            try:
                noticed.add(notices.receive_nowait())
                self.stats.notices += 1
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                notices = None
        return notices, (noticed if by_notice else None)
