"""Reads of one payment each, made at the same moment, answered by one statement.

Under load many requests read one payment each at once (callers polling
``GET /payments/{id}`` and ``GetPayment``). Alone, each read is a round trip, and most of
its CPU is the round trip itself: the send that wakes the database and the wake-up
when the answer comes (bench/README.md, "This round: reads"). So the first reader of a
moment lets the scheduler run while other readers keep joining, and one
``SELECT ... WHERE id IN (...)`` (with the refund totals of the PAID ones) answers them
all. Nothing is kept: every reader's row is read from the database after its request
arrived, as a read of its own would be, so no status is ever served stale.

The first reader reads for the batch. When it is cancelled (its caller left, the
server stops) before the answer, the batch is abandoned and each of its other readers
reads again: nobody fails for somebody else's cancellation, and nothing outlives the
request that started it.
"""

from __future__ import annotations

import copy

import attrs
import trio

from payments.model import Payment
from payments.refunding import load_refund_totals
from payments.storage import repository as repo
from payments.storage.database import Database

# Ids per statement: an IN list of this many stays one cheap primary-key lookup.
MAX_BATCH = 100
# Scheduler passes the first reader waits for others: measured on GetPayment under load,
# one pass gave 0.57 of the ceiling, two 0.63, "while readers keep joining" 0.67.
MIN_PASSES = 2
MAX_PASSES = 8


@attrs.define(eq=False)
class _Batch:
    ids: list[int] = attrs.field(factory=list)
    found: dict[int, Payment] = attrs.field(factory=dict)
    error: Exception | None = None
    abandoned: bool = False  # its reader was cancelled: the others read again
    done: trio.Event = attrs.field(factory=trio.Event)
    # Ids already handed out: a second reader of one id gets its own copy.
    given: set[int] = attrs.field(factory=set)


class PaymentReads:
    """``get(id)`` for many concurrent readers over one database."""

    def __init__(self, database: Database, max_batch: int = MAX_BATCH) -> None:
        self._database = database
        self._max_batch = max_batch
        self._open: _Batch | None = None
        self.statements = 0  # statements run (the tests count them)

    async def get(self, payment_id: int) -> Payment | None:
        """The payment with this id (refund totals loaded when PAID), or None."""
        if payment_id <= 0:
            return None
        while True:
            batch = self._open
            if batch is None:
                batch = self._open = _Batch(ids=[payment_id])
                await self._lead(batch)
            else:
                batch.ids.append(payment_id)
                if len(batch.ids) >= self._max_batch:
                    self._open = None  # full: the next reader starts another
                await batch.done.wait()
            if not batch.abandoned:
                return self._answer(batch, payment_id)
            # Its reader was cancelled (its caller left) before the answer: read again.

    async def _lead(self, batch: _Batch) -> None:
        """Gather the readers of this moment, then read for all of them."""
        try:
            # Passes of the scheduler while readers keep joining (at least MIN_PASSES:
            # a request a pass behind is on its way here), so a quiet moment costs a
            # pass or two with nothing else to run.
            passes, size = 0, 0
            while passes < MIN_PASSES or (
                size < len(batch.ids) < self._max_batch and passes < MAX_PASSES
            ):
                size = len(batch.ids)
                passes += 1
                await trio.lowlevel.checkpoint()
            if self._open is batch:
                self._open = None
            batch.found = await self._read(batch.ids)
        except Exception as exc:
            batch.error = exc
            raise
        except BaseException:
            # Cancelled: this reader's caller is gone; the others must not fail for it.
            batch.abandoned = True
            if self._open is batch:
                self._open = None
            raise
        finally:
            batch.done.set()

    async def _read(self, ids: list[int]) -> dict[int, Payment]:
        self.statements += 1
        async with self._database.connection() as conn:
            if len(ids) == 1:
                one = await repo.get_payment(conn, ids[0])
                payments = [] if one is None else [one]
            else:
                payments = await repo.get_payments(conn, sorted(set(ids)))
            await load_refund_totals(conn, payments)
        return {payment.id: payment for payment in payments}

    @staticmethod
    def _answer(batch: _Batch, payment_id: int) -> Payment | None:
        if batch.error is not None:
            # Each waiter raises its own copy: one exception object raised in several
            # tasks would have their tracebacks chained onto each other.
            raise copy.copy(batch.error) from batch.error
        payment = batch.found.get(payment_id)
        if payment is None:
            return None
        if payment_id in batch.given:
            return attrs.evolve(payment, metadata=dict(payment.metadata))
        batch.given.add(payment_id)
        return payment
