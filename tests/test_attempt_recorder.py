"""The dispatcher's group commit of finished attempts (payments.jobs.attempt_recorder),
on both backends: a lone attempt is written at once, attempts finishing meanwhile share
the next transaction, the lease guard and the outcome stay per row, and a failed or
cancelled write leaves the recorder usable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from payments.errors import DependencyUnavailable
from payments.jobs.attempt_recorder import AttemptRecorder
from payments.model import OutboxEntry, OutboxState
from payments.storage import outbox
from payments.storage.database import Database
from payments.storage.outbox import FinishedAttempt
from tests.storage_support import LEASE, attempt_of, fetch, later, queue_callbacks


def delivered(entry: OutboxEntry, at: datetime) -> FinishedAttempt:
    return FinishedAttempt(entry, attempt_of(entry, at, 200), OutboxState.DELIVERED, at)


async def record_all(
    recorder: AttemptRecorder, finished: list[FinishedAttempt]
) -> dict[int, bool | BaseException]:
    """Each attempt recorded by its own task, all started together (as deliveries
    finishing at once); the outcome per outbox id."""
    results: dict[int, bool | BaseException] = {}

    async def one(item: FinishedAttempt) -> None:
        try:
            results[item.entry.id] = await recorder.record(item)
        except Exception as exc:
            results[item.entry.id] = exc

    async with trio.open_nursery() as nursery:
        for item in finished:
            nursery.start_soon(one, item)
    return results


async def test_a_lone_attempt_is_written_at_once(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    now = later()
    (claimed,) = await outbox.claim_due(database, "w", now, LEASE, limit=1)
    recorder = AttemptRecorder(database, "w")
    assert await recorder.record(delivered(claimed, now))
    assert recorder.batches == 1
    assert (await fetch(database, entry.id)).state == OutboxState.DELIVERED


async def test_attempts_finishing_during_a_write_share_the_next_one(database: Database) -> None:
    entries = await queue_callbacks(database, 20)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, LEASE, limit=20)
    # One of them was taken over by another worker meanwhile: only its own is False.
    lost = claimed[7]
    async with database.connection() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET claimed_by = 'other' WHERE id = %s", (lost.id,)
        )
    recorder = AttemptRecorder(database, "w")
    results = await record_all(recorder, [delivered(e, now) for e in claimed])
    assert results == {e.id: e.id != lost.id for e in claimed}
    # The first alone (nobody waits for a batch to fill), the 19 others together.
    assert recorder.batches == 2
    for entry in entries:
        stored = await fetch(database, entry.id)
        expected = OutboxState.PENDING if entry.id == lost.id else OutboxState.DELIVERED
        assert stored.state == expected
    async with database.connection() as conn:
        (rows,) = await conn.fetchone("SELECT COUNT(*) FROM callback_attempts")  # type: ignore[misc]
    assert rows == 19


async def test_batches_are_capped(database: Database) -> None:
    claimed_count = 12
    await queue_callbacks(database, claimed_count)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, LEASE, limit=claimed_count)
    recorder = AttemptRecorder(database, "w", max_batch=5)
    results = await record_all(recorder, [delivered(e, now) for e in claimed])
    assert all(results.values()) and len(results) == claimed_count
    assert recorder.batches == 4  # 1 alone, then 5, 5, 1


class FailingOnce:
    """A database whose next transaction fails as unavailable; then the real one."""

    def __init__(self, real: Database) -> None:
        self.real = real
        self.fail_next = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        if self.fail_next:
            self.fail_next = False
            await trio.sleep(0.01)  # the others queue meanwhile
            raise DependencyUnavailable("database unavailable")
        async with self.real.transaction() as conn:
            yield conn


async def test_a_failed_write_fails_its_batch_only(database: Database) -> None:
    await queue_callbacks(database, 6)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, LEASE, limit=6)
    failing = FailingOnce(database)
    recorder = AttemptRecorder(failing, "w")  # type: ignore[arg-type]
    results = await record_all(recorder, [delivered(e, now) for e in claimed])
    # The first write (the first attempt alone) failed; the rest went in the next one.
    (first,) = [e for e in claimed if isinstance(results[e.id], DependencyUnavailable)]
    assert [results[e.id] for e in claimed if e is not first] == [True] * 5
    assert (await fetch(database, first.id)).state == OutboxState.PENDING
    # And the recorder goes on.
    failing.fail_next = True
    with pytest.raises(DependencyUnavailable):
        await recorder.record(delivered(first, now))
    assert await recorder.record(delivered(first, now))


async def test_a_caller_cancelled_while_waiting_leaves_its_row_unwritten(
    database: Database,
) -> None:
    first, second, third = await queue_callbacks(database, 3)
    now = later()
    claimed = await outbox.claim_due(database, "w", now, LEASE, limit=3)
    recorder = AttemptRecorder(database, "w")
    outcome: dict[int, bool] = {}

    async def record(item: FinishedAttempt, patience: float) -> None:
        with trio.move_on_after(patience):
            outcome[item.entry.id] = await recorder.record(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, delivered(claimed[0], now), 10)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(record, delivered(claimed[1], now), 0)  # gives up at once
        nursery.start_soon(record, delivered(claimed[2], now), 10)
    assert outcome == {first.id: True, third.id: True}
    assert (await fetch(database, second.id)).state == OutboxState.PENDING
    assert (await fetch(database, second.id)).claimed_by == "w"  # its lease runs out
    assert recorder.batches == 2


async def test_an_entry_claimed_by_no_one_is_refused(database: Database) -> None:
    (entry,) = await queue_callbacks(database)
    now = later()
    recorder = AttemptRecorder(database, "w")
    with pytest.raises(ValueError, match="not claimed"):
        await recorder.record(delivered(entry, now + timedelta(seconds=1)))
    # The failure ended its write: the next caller writes.
    (claimed,) = await outbox.claim_due(database, "w", now, LEASE, limit=1)
    assert await recorder.record(delivered(claimed, now))
