"""Callback delivery states and timing (issue 11): 410 Gone, Retry-After, the default
schedule's 72 hours, signing with several secrets, and isolation between receivers.

Real receivers on loopback (tests/callback_support.py) answer scripted statuses, delays
and Retry-After headers; the dispatcher runs against the real database.
"""

from __future__ import annotations

import base64
import random
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import trio
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from payments.config import ConfigError, Settings, parse_signing_secrets
from payments.jobs import dispatcher as dispatcher_module
from payments.jobs.dispatcher import (
    MAX_RETRY_DELAY,
    PassResult,
    open_notice_channel,
    retry_after_seconds,
    retry_schedule,
)
from payments.model import OutboxState, utcnow
from payments.storage import outbox
from payments.storage.pool import Pool
from tests.callback_support import (
    HANG,
    SECRET,
    Answer,
    MakeDispatcher,
    Receiver,
    WallClock,
    attempts,
    payment_of,
    soon,
    start_actor,
    until,
    until_state,
)
from tests.callback_support import dispatchers as dispatchers
from tests.callback_support import receiver as receiver
from tests.storage_support import fetch, queue_callbacks

NEW_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()


# -- states ---------------------------------------------------------------------------


async def test_410_gone_stops_the_delivery(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.script = [Answer(410)]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    dispatcher = dispatchers(db_pool, clock=clock)

    assert await dispatcher.run_pass() == PassResult(claimed=1, gone=1)

    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.last_error) == (OutboxState.GONE, 1, "HTTP 410")
    clock.now += timedelta(days=4)  # never tried again, however long we wait
    assert await dispatcher.run_pass() == PassResult()
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_a_longer_retry_after_in_seconds_sets_the_next_attempt(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, status: int
) -> None:
    receiver.script = [Answer(status, retry_after="120")]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    dispatcher = dispatchers(db_pool, clock=clock, rng=lambda: 0.5)  # gap: 1 minute

    assert await dispatcher.run_pass() == PassResult(claimed=1, retried=1)
    stored = await fetch(db_pool, entry.id)
    assert stored.next_attempt_at == clock.now + timedelta(seconds=120)  # not 1 minute
    clock.now += timedelta(seconds=119)
    assert await dispatcher.run_pass() == PassResult()
    clock.now += timedelta(seconds=1)
    assert await dispatcher.run_pass() == PassResult(claimed=1, delivered=1)
    assert [a.status_code for a in await attempts(db_pool, entry)] == [status, 200]


@pytest.mark.parametrize("status", [429, 503])
async def test_a_shorter_retry_after_never_shortens_the_schedules_gap(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, status: int
) -> None:
    """Else a receiver answering ``Retry-After: 1`` would use up every attempt in
    seconds, and the schedule's promise (days of retries) would be broken."""
    receiver.script = [Answer(status, retry_after="1")] * 2
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    dispatcher = dispatchers(
        db_pool, clock=clock, rng=lambda: 0.5, callback_retry_interval_minutes=30
    )

    for gap in (timedelta(minutes=30), timedelta(minutes=90)):  # the schedule: x3 each time
        assert await dispatcher.run_pass() == PassResult(claimed=1, retried=1)
        stored = await fetch(db_pool, entry.id)
        assert stored.next_attempt_at == clock.now + gap
        clock.now += timedelta(seconds=1)
        assert await dispatcher.run_pass() == PassResult()  # not due a second later
        clock.now = stored.next_attempt_at
    assert len(receiver.requests) == 2


async def test_retry_after_as_a_date_and_capped_by_the_longest_step(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    clock = WallClock(soon())
    in_ten_minutes = format_datetime(clock.now + timedelta(minutes=10), usegmt=True)
    receiver.script = [Answer(503, retry_after=in_ten_minutes), Answer(429, retry_after="999999")]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    dispatcher = dispatchers(db_pool, clock=clock)

    await dispatcher.run_pass()
    stored = await fetch(db_pool, entry.id)
    gap = stored.next_attempt_at - clock.now
    assert timedelta(minutes=9) < gap <= timedelta(minutes=10)  # the date, to the second
    clock.now = stored.next_attempt_at
    await dispatcher.run_pass()
    stored = await fetch(db_pool, entry.id)
    assert stored.next_attempt_at - clock.now == MAX_RETRY_DELAY == timedelta(hours=24)


async def test_retry_after_on_other_statuses_is_ignored(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.script = [Answer(500, retry_after="1")]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    await dispatchers(db_pool, clock=clock, rng=lambda: 0.5).run_pass()
    stored = await fetch(db_pool, entry.id)
    assert stored.next_attempt_at - clock.now == timedelta(minutes=1)  # the schedule's gap


def test_retry_after_values() -> None:
    now = soon()
    assert retry_after_seconds("30", now) == 30
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("-5", now) is None
    past = format_datetime(now - timedelta(hours=1), usegmt=True)
    assert retry_after_seconds(past, now) == 0


async def test_max_attempts_counts_the_first_then_failed(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.default = Answer(500)
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    dispatcher = dispatchers(
        db_pool, callback_max_attempts=3, callback_retry_interval_minutes=0.0001
    )
    with trio.fail_after(10):
        while (await fetch(db_pool, entry.id)).state == OutboxState.PENDING:
            await dispatcher.run_pass()
            await trio.sleep(0.01)
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, len(receiver.requests)) == (OutboxState.FAILED, 3, 3)


# -- the schedule ---------------------------------------------------------------------


def test_the_default_schedule_outlasts_a_weekend() -> None:
    defaults = Settings()
    attempts, first = defaults.callback_max_attempts, defaults.callback_retry_interval_minutes
    assert (attempts, first) == (10, 5)  # CONTRACT.md "Environment"
    shortest = retry_schedule(attempts, first, lambda: 0.0)  # every gap jittered down 20%
    longest = retry_schedule(attempts, first, lambda: 0.999999)  # every gap up 20%
    nominal = retry_schedule(attempts, first, lambda: 0.5)
    assert len(shortest) == len(longest) == attempts - 1  # the gaps between the attempts
    assert sum(shortest, timedelta()) >= timedelta(hours=72)
    # Growth by 3 from 5 minutes to the 24-hour cap: 5 m, 15 m, 45 m, 2 h 15 m, 6 h 45 m,
    # 20 h 15 m, then 24 h three times.
    assert [g.total_seconds() / 60 for g in nominal] == [5, 15, 45, 135, 405, 1215] + [1440] * 3
    assert sum(nominal, timedelta()) == timedelta(minutes=6140)  # 102.3 h
    assert sum(shortest, timedelta()) == timedelta(minutes=4912)  # 81.9 h
    # The cap is a hard ceiling: the capped gaps cannot be jittered up.
    longest_total = sum(longest, timedelta()).total_seconds()
    assert longest_total == pytest.approx(6486 * 60)  # 108.1 h
    assert max(longest) == MAX_RETRY_DELAY == timedelta(hours=24)
    jittered = retry_schedule(attempts, first, random.Random(1).random)
    assert len({g.total_seconds() for g in jittered}) > 6  # jittered, not lockstep


def test_fractional_first_gap() -> None:
    assert retry_schedule(2, 0.5, lambda: 0.5) == [timedelta(seconds=30)]


# -- rotation -------------------------------------------------------------------------


async def test_every_callback_is_signed_with_each_secret(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    both = f"{SECRET}  {NEW_SECRET}"
    await dispatchers(db_pool, callback_signing_secret=both).run_pass()

    (request,) = receiver.requests
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # A receiver holding either secret alone verifies it; a third secret does not.
    assert Webhook(SECRET).verify(request.body, request.headers)["payment"]
    assert Webhook(NEW_SECRET).verify(request.body, request.headers)["payment"]
    other = "whsec_" + base64.b64encode(bytes(range(50, 82))).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body, request.headers)
    assert request.headers["webhook-id"] == entry.delivery_id

    # After the rotation: the old secret dropped, only the new one signs.
    await queue_callbacks(db_pool, url=receiver.url())
    await dispatchers(db_pool, callback_signing_secret=NEW_SECRET).run_pass()
    latest = receiver.requests[-1]
    assert len(latest.headers["webhook-signature"].split(" ")) == 1
    Webhook(NEW_SECRET).verify(latest.body, latest.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(latest.body, latest.headers)


def test_a_bad_secret_among_several_is_named_by_position() -> None:
    assert len(parse_signing_secrets(f"{SECRET} {NEW_SECRET}")) == 2
    assert parse_signing_secrets("") == []
    with pytest.raises(ConfigError, match=r"SECRET \(secret 2 of 2\): not base64") as caught:
        parse_signing_secrets(f"{SECRET} not*base64*at*all")
    assert "not*base64" not in str(caught.value)


# -- isolation ------------------------------------------------------------------------


async def fast_latency(db_pool: Pool, fast: Receiver, notify: object) -> float:
    """Seconds from the notice of a fresh callback to ``fast`` to its arrival."""
    (entry,) = await queue_callbacks(db_pool, url=fast.url())
    count = len(fast.requests)
    sent = trio.current_time()
    notify(await payment_of(db_pool, entry))  # type: ignore[operator]
    with trio.fail_after(5):
        await fast.wait_for(count + 1)
    return fast.requests[count].at - sent


async def test_a_slow_receiver_never_delays_another_callers_callback(
    db_pool: Pool,
    dispatchers: MakeDispatcher,
    nursery: trio.Nursery,
    capsys: pytest.CaptureFixture[str],
) -> None:
    slow, fast = Receiver(), Receiver()
    await nursery.start(slow.serve)
    await nursery.start(fast.serve)
    slow.default = Answer(200, delay=6.0)
    dispatcher = dispatchers(db_pool, callback_http_timeout_seconds=8)
    notifier, notices = open_notice_channel()
    await start_actor(nursery, dispatcher, notices)

    # Its normal latency, with nobody slow around.
    alone = [await fast_latency(db_pool, fast, notifier.notify) for _ in range(5)]

    # Now a slow receiver holds a request open (and has more waiting) while the fast
    # one is called.
    slow_entries = await queue_callbacks(db_pool, 3, url=slow.url())
    for entry in slow_entries:
        notifier.notify(await payment_of(db_pool, entry))
    with trio.fail_after(5):
        await slow.wait_for(3)
    beside = [await fast_latency(db_pool, fast, notifier.notify) for _ in range(5)]
    assert slow.open_now == 3  # all still held open while the fast ones arrived

    with capsys.disabled():
        print(
            f"\nfast receiver latency ms: alone max {max(alone) * 1000:.1f}, "
            f"beside a 6 s receiver max {max(beside) * 1000:.1f}"
        )
    assert max(beside) < max(0.5, 3 * max(alone))
    with trio.fail_after(10):
        for entry in slow_entries:
            await until_state(db_pool, entry, OutboxState.DELIVERED)


async def test_one_receiver_gets_a_bounded_number_of_requests_at_once(
    db_pool: Pool,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
    nursery: trio.Nursery,
) -> None:
    """A flood to one hanging receiver: at most HOST_CONCURRENCY requests open, the
    rest parked, and another receiver still served at once."""
    receiver.default = HANG
    other = Receiver()
    await nursery.start(other.serve)
    flood = await queue_callbacks(db_pool, 100, url=receiver.url())
    dispatcher = dispatchers(db_pool, callback_http_timeout_seconds=3, job_batch_size=200)
    notifier, notices = open_notice_channel()
    await start_actor(nursery, dispatcher, notices)
    notifier.notify(await payment_of(db_pool, flood[0]))
    with trio.fail_after(5):
        await receiver.wait_for(dispatcher_module.HOST_CONCURRENCY)
    await trio.sleep(0.3)
    assert receiver.most_open == dispatcher_module.HOST_CONCURRENCY
    latency = await fast_latency(db_pool, other, notifier.notify)
    assert latency < 0.5
    # HOST_BACKLOG rows held (sending, or waiting for a turn) under a long lease; the
    # rest parked or left in the table, so they do not fill the dispatcher's slots.
    now = utcnow()
    leases = [(await fetch(db_pool, e.id)).claimed_until for e in flood]
    held = [u for u in leases if u is not None and u > now + timedelta(seconds=10)]
    assert len(held) == dispatcher_module.HOST_BACKLOG
    assert len(receiver.requests) == dispatcher_module.HOST_CONCURRENCY


async def test_stopping_releases_rows_waiting_for_their_receivers_turn(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, nursery: trio.Nursery
) -> None:
    receiver.default = Answer(200, delay=0.5)
    entries = await queue_callbacks(db_pool, 20, url=receiver.url())
    dispatcher = dispatchers(db_pool)
    notifier, notices = open_notice_channel()
    actor = await start_actor(nursery, dispatcher, notices)
    notifier.notify(await payment_of(db_pool, entries[0]))
    with trio.fail_after(5):
        await receiver.wait_for(dispatcher_module.HOST_CONCURRENCY)
        actor.stopping.set()
        await actor.done.wait()
    states = [(await fetch(db_pool, e.id)) for e in entries]
    delivered = [s for s in states if s.state == OutboxState.DELIVERED]
    waiting = [s for s in states if s.state == OutboxState.PENDING]
    assert len(delivered) == dispatcher_module.HOST_CONCURRENCY  # in flight: finished
    assert len(waiting) == 20 - len(delivered)
    assert all(s.claimed_by == "" and s.attempts == 0 for s in waiting)  # released


async def test_a_notice_costs_a_claim_not_a_next_due_lookup(
    db_pool: Pool,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a notice's claim the actor keeps the due time it knows (looking it up was
    two queries per notice); a retry, which has a new due time, looks it up at once."""
    lookups: list[object] = []
    real_next_due_at = outbox.next_due_at

    async def counted(conn: Any, horizon: Any) -> Any:
        lookups.append(horizon)
        return await real_next_due_at(conn, horizon)

    monkeypatch.setattr(outbox, "next_due_at", counted)
    monkeypatch.setattr(dispatcher_module, "NEXT_DUE_REFRESH_SECONDS", 600.0)
    dispatcher = dispatchers(db_pool)
    notifier, notices = open_notice_channel()
    await start_actor(nursery, dispatcher, notices)
    with trio.fail_after(10):
        await until(lambda: dispatcher.stats.waiting)
        assert len(lookups) == 1  # at start
        for n in range(1, 6):
            (entry,) = await queue_callbacks(db_pool, url=receiver.url())
            notifier.notify(await payment_of(db_pool, entry))
            await until_state(db_pool, entry, OutboxState.DELIVERED)
            assert len(receiver.requests) == n
        await until(lambda: dispatcher.stats.waiting)
        assert len(lookups) == 1
        receiver.script = [Answer(500)]
        (entry,) = await queue_callbacks(db_pool, url=receiver.url())
        notifier.notify(await payment_of(db_pool, entry))
        await until(lambda: len(lookups) == 2)
    assert (await fetch(db_pool, entry.id)).attempts == 1
