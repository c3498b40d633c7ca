"""What the reconciler and the expirer share: the pass over claimed payments, its
summary, the rate limit on provider calls, and the supervised loop.

A pass fixes its cutoff once, then reads candidates in batches (payments.storage.claims:
keyset order, so it drains a backlog of any size and never revisits a row) and works
each candidate on its own: claimed under its row lock (a payment leased by a create,
cancel or another job is skipped), the provider asked, the answer applied through the
unit of work (which tells the dispatcher after each commit). Both ask the provider
under the payment's lease, holding no session or row lock (the rule in
payments/leasing.py). Up to ``concurrency`` items run at once, because a pass is bound
by the provider's latency, not by CPU. One item failing (provider down, provider refusing,
even a bug) is counted and logged and the pass goes on: one bad payment must not stop
the others from being settled. A stop request is honoured between items: no new item
starts, the ones in flight finish.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import attrs
import trio

from payments.config import Settings
from payments.errors import DependencyUnavailable, PaymentsError
from payments.leasing import LeasePolicy
from payments.model import PaymentStatus, utcnow
from payments.observability import metrics
from payments.providers.registry import ProviderRegistry
from payments.storage import claims
from payments.storage.database import Deadlock
from payments.unit_of_work import UnitOfWork
from supervisor import ChildContext

T = TypeVar("T")

# Stripe allows 100 requests/s in live mode (25 in test mode) per account, shared with
# the API's own creates and cancels; each replica runs its own bucket.
DEFAULT_RATE_PER_SECOND = 20.0
# Items of one batch in flight at once, each bound by the provider's latency (the
# reconciler holds no session while it waits on the provider).
DEFAULT_CONCURRENCY = 4
# A deadlock victim's transaction was rolled back whole: its item runs again (up to this
# many times) rather than failing the pass, as service.py does for creates.
DEADLOCK_RETRIES = 3


class Outcome(enum.Enum):
    """How one claimed candidate ended (errors are raised, not returned)."""

    CHANGED = "changed"  # its status moved
    UNCHANGED = "unchanged"  # looked at, nothing to move
    SKIPPED = "skipped"  # busy elsewhere, or no longer a candidate under the lock


@attrs.frozen
class ItemResult:
    outcome: Outcome
    status: PaymentStatus | None = None  # the new status, for CHANGED


@attrs.define
class JobSummary:
    """What one pass did. ``checked`` = changed + unchanged + skipped + errors."""

    job: str
    checked: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0
    errors: int = 0
    batches: int = 0
    stopped: bool = False  # ended early on a stop request
    moved_to: Counter[str] = attrs.field(factory=Counter)  # status name -> count

    @property
    def expired(self) -> int:
        """Payments this pass moved to EXPIRED."""
        return self.moved_to[PaymentStatus.EXPIRED.name]

    @property
    def failed(self) -> bool:
        """True when some payment could not be worked (the CLI exits non-zero)."""
        return self.errors > 0

    def record(self, result: ItemResult) -> None:
        metrics.job_item(self.job, result.outcome.value)
        if result.outcome is Outcome.CHANGED:
            self.changed += 1
            if result.status is not None:
                self.moved_to[result.status.name] += 1
        elif result.outcome is Outcome.UNCHANGED:
            self.unchanged += 1
        else:
            self.skipped += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "checked": self.checked,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "errors": self.errors,
            "batches": self.batches,
            "stopped": self.stopped,
            "moved_to": dict(self.moved_to),
        }

    def __str__(self) -> str:
        moved = ", ".join(f"{name} {count}" for name, count in sorted(self.moved_to.items()))
        return (
            f"{self.job}: checked {self.checked}, changed {self.changed}"
            + (f" ({moved})" if moved else "")
            + f", unchanged {self.unchanged}, skipped {self.skipped}, errors {self.errors}"
            + (" (stopped early)" if self.stopped else "")
        )


class TokenBucket:
    """At most ``rate`` acquisitions per second on trio's clock, after a burst of
    ``burst``. Waiters are served in arrival order (trio.Lock is fair).

    Kept as the time the next acquisition is due (GCRA) rather than a float count of
    tokens: sleeping until an absolute deadline cannot stall on rounding.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        self._interval = 1 / rate
        self._slack = (max(1, burst) - 1) * self._interval
        self._due = -math.inf
        self._lock = trio.Lock()

    @property
    def rate(self) -> float:
        return 1 / self._interval

    async def acquire(self) -> None:
        async with self._lock:
            due = max(self._due, trio.current_time())
            await trio.sleep_until(due - self._slack)
            self._due = due + self._interval


class PaymentJob:
    """Base of the reconciler and the expirer: a pass over ``selection`` and the loop.

    Subclasses give ``selection``, ``_cutoff_minutes``, ``_interval_minutes`` and
    ``_work`` (one claimed candidate, in its own transaction).
    """

    selection: ClassVar[claims.Selection]
    # Batches of one pass worked at once. A job whose batches have a bulk step (mostly
    # database round trips) overlaps two; each holds a database session meanwhile.
    batches_in_flight: ClassVar[int] = 1

    def __init__(
        self,
        uow: UnitOfWork,
        providers: ProviderRegistry,
        settings: Settings,
        rate_per_second: float | None = DEFAULT_RATE_PER_SECOND,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._uow = uow
        self._pool = uow.database
        self._providers = providers
        self._settings = settings
        self._lease = LeasePolicy.from_settings(settings)
        self._bucket = TokenBucket(rate_per_second) if rate_per_second else None
        self._concurrency = concurrency
        self._log = logging.getLogger(f"payments.jobs.{self.selection.job}")
        self.passes = 0
        self.last_summary: JobSummary | None = None

    # --- what a subclass says -----------------------------------------------------------

    def _cutoff_minutes(self) -> float:
        raise NotImplementedError

    def _interval_minutes(self) -> float:
        raise NotImplementedError

    async def _work(self, candidate: claims.Candidate, cutoff: datetime) -> ItemResult:
        raise NotImplementedError

    def _begin_pass(self) -> None:
        """A pass starts (before its first batch)."""

    async def _work_batch(
        self, batch: list[claims.Candidate], cutoff: datetime, summary: JobSummary
    ) -> list[claims.Candidate]:
        """Conclude what can be concluded for the whole batch at once (recorded in
        ``summary``); return the candidates left for ``_work`` one by one."""
        return batch

    # --- helpers for subclasses ---------------------------------------------------------

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` (one whole transaction) again when InnoDB picked it as a
        deadlock victim: it was rolled back, so running it again is safe."""
        for tries in range(DEADLOCK_RETRIES):
            try:
                return await attempt()
            except Deadlock:
                self._log.info("%s retried after a deadlock (%d)", self.selection.job, tries + 1)
        return await attempt()

    async def _provider_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One provider operation, after the rate limit lets it through."""
        if self._bucket is not None:
            await self._bucket.acquire()
        return await call()

    # --- the pass -----------------------------------------------------------------------

    async def run_pass(
        self,
        *,
        stopping: trio.Event | None = None,
        on_progress: Callable[[JobSummary], None] | None = None,
    ) -> JobSummary:
        """Work every candidate older than the cutoff (fixed now), in batches of
        PAYMENTS_JOB_BATCH_SIZE; ``on_progress`` after each batch (a CLI progress line).

        Raises DependencyUnavailable when the database cannot be read for a batch.
        """
        summary = JobSummary(self.selection.job)
        cutoff = utcnow() - timedelta(minutes=self._cutoff_minutes())
        batch_size = self._settings.job_batch_size
        after: claims.Candidate | None = None
        slots = trio.Semaphore(self._concurrency)

        def stop_requested() -> bool:
            if stopping is not None and stopping.is_set():
                summary.stopped = True
            return summary.stopped

        async def work_one(candidate: claims.Candidate) -> None:
            try:
                result = await self._retrying(lambda: self._work(candidate, cutoff))
                summary.record(result)
                if result.outcome is Outcome.CHANGED and result.status is not None:
                    self._log.info(
                        "%s moved a payment to %s",
                        self.selection.job,
                        result.status.name,
                        extra={"payment_id": candidate.id, "status": result.status.name},
                    )
            except Exception as exc:
                summary.errors += 1
                metrics.job_item(self.selection.job, "error")
                extra = {"payment_id": candidate.id, "error_type": type(exc).__name__}
                if isinstance(exc, PaymentsError):
                    self._log.warning("%s failed: %s", self.selection.job, exc.message, extra=extra)
                else:
                    self._log.exception("%s failed", self.selection.job, extra=extra)
            finally:
                slots.release()

        async def work_batch(batch: list[claims.Candidate]) -> None:
            try:
                try:
                    left = await self._work_batch(batch, cutoff, summary)
                except Exception as exc:
                    # The bulk step failed whole (rolled back): each item on its own,
                    # where a failure is counted and logged per payment.
                    message = exc.message if isinstance(exc, PaymentsError) else repr(exc)
                    self._log.warning("%s batch step failed: %s", self.selection.job, message)
                    left = batch
                async with trio.open_nursery() as nursery:
                    for candidate in left:
                        await slots.acquire()
                        if stop_requested():
                            slots.release()
                            break
                        summary.checked += 1
                        nursery.start_soon(work_one, candidate)
                if on_progress is not None:
                    on_progress(summary)
            finally:
                batch_slots.release()

        self._begin_pass()
        # The next batch is read and started while the last one waits on the database
        # or the provider (a bulk batch is mostly round trips); items share ``slots``.
        batch_slots = trio.Semaphore(self.batches_in_flight)
        unreadable: DependencyUnavailable | None = None
        async with trio.open_nursery() as batches:
            while not stop_requested():
                await batch_slots.acquire()
                try:
                    async with self._pool.connection() as conn:
                        batch = await claims.candidates(
                            conn, self.selection, cutoff, after, batch_size
                        )
                except DependencyUnavailable as exc:
                    unreadable, batch = exc, []
                if not batch:
                    batch_slots.release()
                    break
                summary.batches += 1
                batches.start_soon(work_batch, batch)
                if len(batch) < batch_size:
                    break
                after = batch[-1]
        if unreadable is not None:  # raised here, not as a group out of the nursery
            raise unreadable
        self.passes += 1
        self.last_summary = summary
        return summary

    # --- the supervised actor -----------------------------------------------------------

    async def run(self, ctx: ChildContext) -> None:
        """Run a pass every interval (start to start) until the supervisor asks to stop.

        A database outage skips the pass (logged) instead of crashing the child: restarts
        would burn the supervisor's restart budget and take the healthy servers down with
        the process. Anything else unexpected propagates, and the supervisor restarts us.
        """
        ctx.started()
        interval = self._interval_minutes() * 60
        while not ctx.stop_requested:
            started = trio.current_time()
            try:
                summary = await self.run_pass(stopping=ctx.stopping)
            except DependencyUnavailable as exc:
                self._log.warning("%s pass skipped: %s", self.selection.job, exc.message)
            else:
                level = logging.INFO if summary.checked or summary.stopped else logging.DEBUG
                self._log.log(level, "%s", summary, extra=summary.as_dict())
            with trio.move_on_at(started + interval):
                await ctx.stopping.wait()
