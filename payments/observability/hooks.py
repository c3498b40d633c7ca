"""The calls the service's paths make into observability: one per site, so the unit of
work, the Stripe provider, the dispatcher and the jobs each carry a line, not the logic.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import ParamSpec, TypeVar

from opentelemetry.trace import SpanKind

from payments.errors import ProviderRejected, ProviderUnavailable
from payments.model import OutboxEntry, PaymentStatus, RefundStatus
from payments.observability import metrics, tracing
from payments.storage import outbox
from payments.storage.database import Connection
from payments.storage.outbox import CallbackAttempt

P = ParamSpec("P")
T = TypeVar("T")


# --- the unit of work ----------------------------------------------------------------


@contextmanager
def transaction_span() -> Iterator[None]:
    """The span of one unit-of-work transaction (its status changes are its events)."""
    with tracing.span("db transaction", kind=SpanKind.CLIENT, attributes={"db.system": "sql"}):
        yield


def status_changes_committed(statuses: Iterable[enum.IntEnum]) -> None:
    """Count the status changes of a committed transaction (never a rolled-back one)."""
    for status in statuses:
        if isinstance(status, RefundStatus):
            metrics.REFUNDS.labels(status.name).inc()
        elif isinstance(status, PaymentStatus):
            metrics.STATUS_CHANGES.labels(status.name).inc()


# --- Stripe ---------------------------------------------------------------------------


def _stripe_outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, ProviderRejected):
        return "rejected"
    if isinstance(exc, ProviderUnavailable):
        return "unavailable"
    return "error"


def stripe_operation(
    operation: str,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate a provider method: a client span, the call counter by outcome and the
    latency histogram, all labelled with the fixed ``operation`` name."""

    def decorate(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(call)
        async def observed(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            failure: BaseException | None = None
            with tracing.span(
                f"stripe {operation}",
                kind=SpanKind.CLIENT,
                attributes={"payments.provider": "stripe", "payments.operation": operation},
            ):
                try:
                    return await call(*args, **kwargs)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    metrics.STRIPE_DURATION.labels(operation).observe(time.perf_counter() - started)
                    metrics.STRIPE_REQUESTS.labels(operation, _stripe_outcome(failure)).inc()

        return observed

    return decorate


# --- the dispatcher ---------------------------------------------------------------------


def _attempt_outcome(attempt: CallbackAttempt) -> str:
    if attempt.status_code is not None:
        return "delivered" if 200 <= attempt.status_code < 300 else "refused"
    return "timeout" if attempt.error.startswith("timed out") else "error"


async def callback_attempt(
    post: Callable[[OutboxEntry, int], Awaitable[tuple[CallbackAttempt, float | None]]],
    entry: OutboxEntry,
    attempt_no: int,
) -> tuple[CallbackAttempt, float | None]:
    """Run one delivery attempt in a span continuing the trace stored with the row (the
    request or provider event that ended the payment), so ``post`` sends that trace on
    in its ``traceparent`` (see :func:`tracing.inject`); counts the attempt's outcome."""
    parent = tracing.extract({tracing.TRACEPARENT: entry.traceparent})
    with tracing.span(
        "callback attempt",
        kind=SpanKind.CLIENT,
        parent=parent,
        attributes={
            "payments.payment_id": entry.payment_id,
            "payments.delivery_id": entry.delivery_id,
            "payments.attempt": attempt_no,
        },
    ) as span:
        attempt, retry_after = await post(entry, attempt_no)
        outcome = _attempt_outcome(attempt)
        span.set_attribute("payments.outcome", outcome)
        if attempt.status_code is not None:
            span.set_attribute("http.response.status_code", attempt.status_code)
        if outcome != "delivered":
            tracing.mark_error(span, attempt.error)
    metrics.CALLBACK_ATTEMPTS.labels(outcome).inc()
    return attempt, retry_after


async def record_outbox_backlog(conn: Connection, now: datetime) -> None:
    """Refresh the outbox gauges (the dispatcher calls it once per wake-up)."""
    due, oldest = await outbox.due_backlog(conn, now)
    metrics.record_outbox_backlog(due, oldest, now)
