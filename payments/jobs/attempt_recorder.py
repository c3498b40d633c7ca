"""Records finished callback attempts in shared transactions (group commit).

One transaction per callback was ~30% of the dispatcher's CPU (BEGIN, UPDATE, INSERT,
COMMIT: four round trips each). Here the first delivery to finish writes at once, alone
(a lone callback waits for nobody); deliveries finishing while that write is in flight
queue up, and the next writer (the oldest of them) records them all in one transaction
(payments.storage.outbox.record_attempts: lock, lease check per row, one UPDATE, one
multi-row INSERT). So batches form by themselves under load and never wait to fill.

Each caller still learns whether *its* row was recorded (the lease guard is per row),
so outcome counts and log lines stay per callback. There is no background task: the
writer is always one of the waiting callers, so the recorder works wherever the
dispatcher does (a pass or the actor).
"""

from __future__ import annotations

import attrs
import trio

from payments.errors import DependencyUnavailable
from payments.storage import outbox
from payments.storage.database import Database
from payments.storage.outbox import FinishedAttempt


@attrs.define(eq=False)
class _Waiting:
    finished: FinishedAttempt
    done: trio.Event = attrs.field(factory=trio.Event)
    lead: bool = False  # this caller writes the next batch
    recorded: bool = False
    error: BaseException | None = None

    def result(self) -> bool:
        if self.error is None:
            return self.recorded
        if isinstance(self.error, DependencyUnavailable) or not isinstance(self.error, Exception):
            # The database failed, or the writer was cancelled (shutting down): for
            # this row as for the writer's, nothing was written.
            raise DependencyUnavailable(str(self.error) or "recording cancelled") from self.error
        raise RuntimeError("recording the callback attempt failed") from self.error


class AttemptRecorder:
    """Group commit of :class:`FinishedAttempt` for one worker id."""

    def __init__(self, pool: Database, worker_id: str, max_batch: int = 0) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._max_batch = max_batch or outbox.RECORD_BATCH_MAX
        self._queue: list[_Waiting] = []
        self._writing = False
        self.batches = 0  # transactions written (tests, profiles)

    async def record(self, finished: FinishedAttempt) -> bool:
        """Record ``finished`` (in a batch with whatever finished meanwhile); False
        when its lease was no longer held (nothing written for it). Raises
        DependencyUnavailable when the database failed the batch."""
        item = _Waiting(finished)
        self._queue.append(item)
        if not self._writing:
            self._writing = item.lead = True
        else:
            try:
                await item.done.wait()
            except BaseException:
                self._abandon(item)
                raise
        if item.lead:
            try:
                await self._write(self._take_batch(item))
            finally:
                self._hand_over()
        return item.result()

    def _take_batch(self, lead: _Waiting) -> list[_Waiting]:
        others = [waiting for waiting in self._queue if waiting is not lead]
        batch = [lead, *others[: self._max_batch - 1]]
        self._queue = others[self._max_batch - 1 :]
        return batch

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            async with self._pool.transaction() as conn:
                results = await outbox.record_attempts(
                    conn, self._worker_id, [waiting.finished for waiting in batch]
                )
        except BaseException as exc:
            # Nothing was committed: each row's lease runs out and it is tried again.
            for waiting in batch:
                waiting.error = exc
            raise
        else:
            for waiting, recorded in zip(batch, results, strict=True):
                waiting.recorded = recorded
        finally:
            self.batches += 1
            for waiting in batch[1:]:
                waiting.done.set()

    def _hand_over(self) -> None:
        """The oldest queued caller writes next (it wakes and takes the batch)."""
        self._writing = bool(self._queue)
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].done.set()

    def _abandon(self, item: _Waiting) -> None:
        """A caller gave up waiting (cancelled): drop its row from the queue (its lease
        runs out: at-least-once); if it was to write next, the next one does."""
        if item in self._queue:
            self._queue.remove(item)
            if item.lead:
                self._hand_over()
