"""The reconciler's second half: refunds left PENDING whose provider event never came.

Each stale PENDING refund (untouched for PAYMENTS_RECONCILE_STALE_AFTER_MINUTES) is
claimed (payments.storage.refund_claims: a committed compare-and-set, so two replicas
never ask about one refund in the same window and no lock is held across the call),
then the provider is asked for it by its provider id, through the reconciler's rate
limit. The answer moves the refund forward through the unit of work under the
payment's row lock (event row; on a terminal status the callback), exactly as a
provider event would.

A PENDING refund without a provider id is a create that never stored Stripe's answer
(a crash, or Stripe down, and no retry): RefundService.resolve_unsent settles it (the
provider's refund carrying our refund_id in its metadata, or FAILED when the provider
has none); it guards itself with the claim's own stamp, so it is not claimed here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import trio

from payments.errors import PaymentsError
from payments.jobs.batch import JobSummary
from payments.model import Refund, RefundStatus, utcnow
from payments.providers.registry import ProviderRegistry
from payments.refund_service import RefundService
from payments.refunding import apply_provider_refund
from payments.storage import refund_claims
from payments.storage import refunds as refund_store
from payments.storage import repository as repo
from payments.unit_of_work import UnitOfWork

log = logging.getLogger("payments.jobs.reconcile")

T = TypeVar("T")
# The reconciler's rate-limited way to call the provider.
ProviderCall = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
REASON = "reconciled"


class RefundSettler:
    """One pass over stale PENDING refunds; counts go into the reconciler's summary."""

    def __init__(
        self,
        uow: UnitOfWork,
        providers: ProviderRegistry,
        provider_call: ProviderCall[object],
        batch_size: int,
        concurrency: int,
    ) -> None:
        self._uow = uow
        self._providers = providers
        self._refunds = RefundService(uow, providers)
        self._call = provider_call
        self._batch_size = batch_size
        self._concurrency = concurrency

    async def run_pass(
        self, summary: JobSummary, cutoff: datetime, stopping: trio.Event | None = None
    ) -> None:
        """Work every PENDING refund untouched since ``cutoff``, in keyset batches."""
        after: refund_claims.RefundCandidate | None = None
        slots = trio.Semaphore(self._concurrency)
        while True:
            if stopping is not None and stopping.is_set():
                summary.stopped = True
                return
            async with self._uow.database.connection() as conn:
                batch = await refund_claims.stale_pending(conn, cutoff, after, self._batch_size)
            if not batch:
                return
            async with trio.open_nursery() as nursery:
                for candidate in batch:
                    await slots.acquire()
                    summary.checked += 1
                    nursery.start_soon(self._work_one, candidate, cutoff, summary, slots)
            if len(batch) < self._batch_size:
                return
            after = batch[-1]

    async def _work_one(
        self,
        candidate: refund_claims.RefundCandidate,
        cutoff: datetime,
        summary: JobSummary,
        slots: trio.Semaphore,
    ) -> None:
        try:
            moved = await self._settle(candidate, cutoff)
        except Exception as exc:
            summary.errors += 1
            extra = {"refund_id": candidate.id, "error_type": type(exc).__name__}
            if isinstance(exc, PaymentsError):
                log.warning("refund reconcile failed: %s", exc.message, extra=extra)
            else:
                log.exception("refund reconcile failed", extra=extra)
        else:
            if moved is None:
                summary.skipped += 1
            elif moved is RefundStatus.PENDING:
                summary.unchanged += 1
            else:
                summary.changed += 1
                summary.moved_to[f"refund {moved.name}"] += 1
                log.info(
                    "reconcile moved a refund to %s",
                    moved.name,
                    extra={"refund_id": candidate.id, "payment_id": candidate.payment_id},
                )
        finally:
            slots.release()

    async def _settle(
        self, candidate: refund_claims.RefundCandidate, cutoff: datetime
    ) -> RefundStatus | None:
        """The refund's status after this look (PENDING: unchanged); None: skipped."""
        async with self._uow.database.connection() as conn:
            refund = await refund_store.get_refund(conn, candidate.id)
        if refund is None or refund.status != RefundStatus.PENDING:
            return None
        if not refund.provider_refund_id:
            return await self._resolve_unsent(refund, cutoff)
        async with self._uow.database.transaction() as conn:
            if not await refund_claims.claim(conn, refund.id, cutoff, utcnow()):
                return None
            payment = await repo.get_payment(conn, refund.payment_id)
        if payment is None:
            return None
        provider = self._providers.get(payment.provider)
        found = await self._call(lambda: provider.retrieve_refund(refund.provider_refund_id))
        async with self._uow.begin() as work:
            locked = await repo.get_payment(work.conn, payment.id, for_update=True)
            current = await refund_store.get_refund(work.conn, refund.id, for_update=True)
            if locked is None or current is None or current.status != RefundStatus.PENDING:
                return None  # an event settled it meanwhile
            await apply_provider_refund(work, locked, current, found, reason=REASON)
        return current.status

    async def _resolve_unsent(self, refund: Refund, cutoff: datetime) -> RefundStatus | None:
        settled = await self._call(lambda: self._refunds.resolve_unsent(refund.id, cutoff))
        return None if settled is None else settled.status
