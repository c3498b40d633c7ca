"""The status-callback dispatcher against the real database and a real HTTP receiver.

The receiver is a small HTTP/1.1 server (trio + h11) on 127.0.0.1 that records every
request and answers what each test scripts: a status, a delay, a redirect, or never.
Retry timing is driven through the dispatcher's injectable wall clock, or under
MockClock where the actor's own waiting matters.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import random
import re
import socket
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from standardwebhooks.webhooks import Webhook

from payments.callback_urls import parse_policy
from payments.config import ConfigError, MysqlDsn, parse_signing_secret
from payments.jobs import dispatcher as dispatcher_module
from payments.jobs.dispatcher import (
    MAX_RETRY_DELAY,
    Dispatcher,
    PassResult,
    open_notice_channel,
    resolved_problem,
    retry_delay,
    url_problem,
)
from payments.jobs.signing import CallbackSigner
from payments.model import OutboxEntry, OutboxState, utcnow
from payments.storage import outbox
from payments.storage.pool import Pool
from supervisor import ChildSpec, ChildState, RestartPolicy, Supervisor
from tests.callback_support import (
    API_KEY,
    HANG,
    SECRET,
    Answer,
    MakeDispatcher,
    Receiver,
    ScriptedResolver,
    WallClock,
    attempts,
    payment_of,
    settings,
    soon,
    start_actor,
    until,
    until_state,
)
from tests.callback_support import dispatchers as dispatchers
from tests.callback_support import receiver as receiver
from tests.storage_support import fetch, queue_callbacks

# -- delivery -------------------------------------------------------------------------


async def test_a_signed_callback_verifies_with_standard_webhooks(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    payment = await payment_of(db_pool, entry)

    result = await dispatchers(db_pool).run_pass()

    assert result == PassResult(claimed=1, delivered=1)
    (request,) = receiver.requests
    assert (request.method, request.path) == ("POST", "/callback")
    body = Webhook(SECRET).verify(request.body, request.headers)
    assert body == json.loads(entry.payload)
    assert body["payment"]["id"] == payment.id and body["payment"]["status"] == 10
    # RFC 3339 UTC to the second, as on HTTP and gRPC (storage keeps the microseconds).
    for name in ("created_at", "updated_at"):
        text = body["payment"][name]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
        assert datetime.fromisoformat(text) == getattr(payment, name).replace(microsecond=0)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-request-id"] == payment.request_id
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["webhook-id"] == entry.delivery_id
    stored = await fetch(db_pool, entry.id)
    assert stored.state == OutboxState.DELIVERED and stored.delivered_at is not None
    assert (stored.attempts, stored.claimed_by, stored.last_error) == (1, "", "")
    (attempt,) = await attempts(db_pool, entry)
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 200, "")
    assert attempt.latency_ms >= 0
    # Delivered once: nothing is due any more.
    assert await dispatchers(db_pool).run_pass() == PassResult()


async def test_a_tampered_body_does_not_verify(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    await queue_callbacks(db_pool, url=receiver.url())
    await dispatchers(db_pool).run_pass()
    (request,) = receiver.requests
    tampered = request.body.replace(b'"status":10', b'"status":20')
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(tampered, request.headers)
    other_secret = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
    with pytest.raises(Exception, match="signature"):
        Webhook(other_secret).verify(request.body, request.headers)


async def test_without_a_secret_the_contract_headers_go_unsigned(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    await dispatchers(db_pool, callback_signing_secret="").run_pass()
    (request,) = receiver.requests
    assert request.body == entry.payload.encode()
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["x-request-id"] == entry.request_id
    # Unsigned, but still with the stable id a receiver deduplicates retries by.
    assert "webhook-signature" not in request.headers
    assert request.headers["webhook-id"] == entry.delivery_id
    assert request.headers["webhook-timestamp"].isdigit()


async def test_fails_twice_then_delivered_on_the_third_attempt_with_growing_backoff(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.script = [Answer(500), Answer(503), Answer(200)]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    dispatcher = dispatchers(db_pool, clock=clock, rng=random.Random(7).random)
    gaps: list[float] = []

    for expected in (PassResult(claimed=1, retried=1), PassResult(claimed=1, retried=1)):
        assert await dispatcher.run_pass() == expected
        stored = await fetch(db_pool, entry.id)
        assert stored.state == OutboxState.PENDING and stored.claimed_by == ""
        gaps.append((stored.next_attempt_at - clock.now).total_seconds())
        # Not due before its time.
        clock.now = stored.next_attempt_at - timedelta(seconds=1)
        assert await dispatcher.run_pass() == PassResult()
        clock.now = stored.next_attempt_at
    assert await dispatcher.run_pass() == PassResult(claimed=1, delivered=1)

    # 1 minute, then 3, each +-20%.
    assert 48 <= gaps[0] <= 72 and 144 <= gaps[1] <= 216
    assert gaps[1] > gaps[0]
    history = await attempts(db_pool, entry)
    assert [(a.attempt, a.status_code, a.error) for a in history] == [
        (1, 500, "HTTP 500"),
        (2, 503, "HTTP 503"),
        (3, 200, ""),
    ]
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.delivered_at) == (
        OutboxState.DELIVERED,
        3,
        clock.now,
    )
    # One delivery id across retries; each attempt freshly timestamped and signed.
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {entry.delivery_id}
    stamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert stamps == sorted(set(stamps))
    assert stamps[-1] == int(clock.now.timestamp())
    for request in receiver.requests:  # all within the library's 5-minute tolerance
        Webhook(SECRET).verify(request.body, request.headers)


async def test_the_actor_retries_on_the_backoff_schedule_under_mock_clock(
    db_pool: Pool,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
    mock_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    # Jump virtual time only when everything has waited 0.25 s of real time, so real
    # database and HTTP round trips are never mistaken for idleness.
    mock_clock.autojump_threshold = 0.25
    base, t0 = soon(), trio.current_time()

    def clock() -> datetime:
        return base + timedelta(seconds=trio.current_time() - t0)

    receiver.script = [Answer(500), Answer(500), Answer(200)]
    dispatcher = dispatchers(db_pool, clock=clock, rng=random.Random(3).random)
    notifier, notices = open_notice_channel()
    await start_actor(nursery, dispatcher, notices)
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    notifier.notify(await payment_of(db_pool, entry))

    with trio.fail_after(3600):  # virtual seconds; the sweep is an hour
        requests = await receiver.wait_for(3)
        stored = await until_state(db_pool, entry, OutboxState.DELIVERED)

    assert stored.attempts == 3
    first, second, third = (r.at for r in requests)
    # The actor slept exactly until each retry was due, not until its hourly sweep.
    assert 48 <= second - first <= 73 and 144 <= third - second <= 217
    history = await attempts(db_pool, entry)
    assert [a.status_code for a in history] == [500, 500, 200]
    gap1 = (history[1].attempted_at - history[0].attempted_at).total_seconds()
    gap2 = (history[2].attempted_at - history[1].attempted_at).total_seconds()
    assert gap2 > gap1


async def test_a_receiver_that_never_answers_fails_after_max_attempts(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.default = HANG
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    dispatcher = dispatchers(
        db_pool,
        callback_http_timeout_seconds=0.2,
        callback_max_attempts=3,
        callback_retry_interval_minutes=0,  # due again at once: drain retries in one go
    )

    with trio.fail_after(5):
        total = await dispatcher.drain()

    assert total == PassResult(claimed=3, retried=2, failed=1)
    assert len(receiver.requests) == 3
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts, stored.last_error) == (
        OutboxState.FAILED,
        3,
        "timed out after 0.2s",
    )
    history = await attempts(db_pool, entry)
    assert [(a.attempt, a.status_code, a.error) for a in history] == [
        (n, None, "timed out after 0.2s") for n in (1, 2, 3)
    ]
    assert all(190 <= a.latency_ms < 1000 for a in history)
    # Failed is final.
    assert await dispatcher.drain() == PassResult()


async def test_a_connection_error_is_retried(
    db_pool: Pool, dispatchers: MakeDispatcher, receiver: Receiver
) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    closed_port = listener.getsockname()[1]
    listener.close()  # nothing listens there
    (entry,) = await queue_callbacks(db_pool, url=f"http://127.0.0.1:{closed_port}/cb")
    assert await dispatchers(db_pool).run_pass() == PassResult(claimed=1, retried=1)
    (attempt,) = await attempts(db_pool, entry)
    assert attempt.status_code is None and attempt.error.startswith("ConnectError")


async def test_redirects_are_not_followed(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.script = [Answer(307, location=receiver.url("/elsewhere"))]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())

    assert await dispatchers(db_pool).run_pass() == PassResult(claimed=1, retried=1)

    assert [r.path for r in receiver.requests] == ["/callback"]
    stored = await fetch(db_pool, entry.id)
    assert stored.last_error == "HTTP 307 (redirects are not followed)"
    (attempt,) = await attempts(db_pool, entry)
    assert attempt.status_code == 307


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://127.0.0.1/callback", "must be an absolute http or https URL"),
        ("file:///etc/passwd", "must be an absolute http or https URL"),
        ("orders.internal/callback", "must be an absolute http or https URL"),
        ("http:///callback", "must be an absolute http or https URL"),
        ("http://127.0.0.1:99999/x", "is not a valid URL"),
        ("http://[::1/x", "is not a valid URL"),
        ("http://user:pw@127.0.0.1/x", "must not contain user:password@"),
        ("http://169.254.169.254/latest/meta-data", "host is a link-local address"),
        ("http://2130706433/x", "has a non-canonical IP address (write it as a.b.c.d)"),
        ("http://10.0.0.1/x", "host is a private address (not in PAYMENTS_CALLBACK_ALLOWED_HOSTS)"),
    ],
)
async def test_a_non_http_url_fails_at_once_without_a_request(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, url: str, problem: str
) -> None:
    (entry,) = await queue_callbacks(db_pool, url=url)
    assert await dispatchers(db_pool).run_pass() == PassResult(claimed=1, failed=1)
    assert receiver.requests == []
    stored = await fetch(db_pool, entry.id)
    assert stored.state == OutboxState.FAILED
    assert stored.last_error == f"callback URL rejected: {problem}"
    (attempt,) = await attempts(db_pool, entry)
    assert (attempt.status_code, attempt.error, attempt.latency_ms) == (None, stored.last_error, 0)


async def test_the_host_allow_list(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    (refused,) = await queue_callbacks(db_pool, url=receiver.url())
    only_others = dispatchers(db_pool, callback_allowed_hosts=("callbacks.internal",))
    assert await only_others.run_pass() == PassResult(claimed=1, failed=1)
    assert receiver.requests == []
    stored = await fetch(db_pool, refused.id)
    assert stored.last_error == (
        "callback URL rejected: host is a loopback address (not in PAYMENTS_CALLBACK_ALLOWED_HOSTS)"
    )

    await queue_callbacks(db_pool, url=receiver.url())
    listed = dispatchers(db_pool, callback_allowed_hosts=("callbacks.internal", "127.0.0.1"))
    assert await listed.run_pass() == PassResult(claimed=1, delivered=1)

    await queue_callbacks(db_pool, url=receiver.url())
    by_range = dispatchers(db_pool, callback_allowed_hosts=("127.0.0.0/8",))
    assert await by_range.run_pass() == PassResult(claimed=1, delivered=1)


def _own_host_name() -> tuple[str, str]:
    """This machine's host name and an address it resolves to (never a global one)."""
    name = socket.gethostname().lower()
    address = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    assert not ipaddress.ip_address(address).is_global, (name, address)
    return name, str(address)


async def test_a_name_that_resolves_to_a_refused_range_is_refused_at_delivery(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    """A host name passes the rule as written; what it resolves to is checked too."""
    name, address = _own_host_name()
    (entry,) = await queue_callbacks(db_pool, url=f"http://{name}:{receiver.port}/cb")
    assert await dispatchers(db_pool, callback_allowed_hosts=()).run_pass() == PassResult(
        claimed=1, failed=1
    )
    assert receiver.requests == []
    stored = await fetch(db_pool, entry.id)
    assert stored.last_error.startswith(f"callback URL rejected: {name} resolves to {address}")
    # Named on the allow-list, the operator vouches for it.
    policy = parse_policy([name])
    assert await resolved_problem(f"http://{name}/cb", policy, 5) == ""
    assert "not in" in await resolved_problem(f"http://{name}/cb", parse_policy([]), 5)


class HangingResolver(ScriptedResolver):
    """A DNS server that never answers for ``host``; other names resolve as usual."""

    async def answer(self) -> list[Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_the_dns_check_and_the_post_share_one_callback_timeout(
    db_pool: Pool, dispatchers: MakeDispatcher
) -> None:
    """The lease covers one callback timeout: a hung resolver must not get one for the
    check and another for the POST (which resolves again), or a second replica could
    deliver the same callback while this one still sends it."""
    host = "hung-dns.invalid"
    resolver = HangingResolver(host)
    (entry,) = await queue_callbacks(db_pool, url=f"http://{host}/cb")
    dispatcher = dispatchers(
        db_pool, callback_http_timeout_seconds=0.5, callback_allowed_hosts=(host,)
    )
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        started = trio.current_time()
        assert await dispatcher.run_pass() == PassResult(claimed=1, retried=1)
        elapsed = trio.current_time() - started
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert resolver.asked >= 1
    assert elapsed < 0.9, elapsed  # one timeout (and the database), not two
    stored = await fetch(db_pool, entry.id)
    assert stored.last_error == "timed out after 0.5s"


def test_url_problem_matches_hosts_exactly_and_case_insensitively() -> None:
    allowed = parse_policy(("Orders.Internal",))
    assert url_problem("https://orders.internal/cb", allowed) == ""
    assert url_problem("HTTPS://ORDERS.INTERNAL./cb", allowed) == ""
    assert "not in" in url_problem("https://evil.orders.internal/cb", allowed)
    assert "not in" in url_problem("https://orders.internal.evil.com/cb", allowed)
    assert "user:password" in url_problem("https://orders.internal@evil.com/cb", allowed)
    assert url_problem("http://anything:8080/cb", parse_policy(())) == ""


# -- many replicas --------------------------------------------------------------------


async def test_two_dispatchers_racing_deliver_each_callback_once(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, test_db_dsn: MysqlDsn
) -> None:
    entries = await queue_callbacks(db_pool, 200, url=receiver.url())
    other_pool = Pool(test_db_dsn, max_open=5, max_idle=5)
    first = dispatchers(db_pool, worker_id="replica-a", job_batch_size=25)
    second = dispatchers(other_pool, worker_id="replica-b", job_batch_size=25)
    totals: dict[str, PassResult] = {}

    async def drain(dispatcher: Dispatcher) -> None:
        totals[dispatcher.worker_id] = await dispatcher.drain()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, first)
                nursery.start_soon(drain, second)
    finally:
        await other_pool.aclose()

    seen = Counter(r.headers["webhook-id"] for r in receiver.requests)
    assert set(seen) == {e.delivery_id for e in entries}
    assert set(seen.values()) == {1}
    a, b = totals["replica-a"], totals["replica-b"]
    assert a.delivered + b.delivered == 200 and a.delivered > 0 and b.delivered > 0
    async with db_pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT state, attempts, COUNT(*) FROM callback_outbox GROUP BY 1, 2"
        )
        (attempt_rows,) = await conn.fetchone("SELECT COUNT(*) FROM callback_attempts")
    assert rows == [("delivered", 1, 200)]
    assert attempt_rows == 200


async def test_a_crashed_replicas_lease_expires_and_another_delivers(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    crashed = dispatchers(db_pool, clock=clock, worker_id="crashed")
    # It claimed the row and died before delivering.
    await outbox.claim_due(db_pool, crashed.worker_id, clock.now, crashed.lease_seconds(50), 50)
    survivor = dispatchers(db_pool, clock=clock, worker_id="survivor")
    assert await survivor.run_pass() == PassResult()  # the lease still runs
    clock.now += timedelta(seconds=crashed.lease_seconds(50))
    assert await survivor.run_pass() == PassResult(claimed=1, delivered=1)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [entry.delivery_id]


async def test_a_stale_dispatcher_cannot_overwrite_the_new_owner(
    db_pool: Pool,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica stalled mid-delivery past its lease: its late outcome is dropped."""
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    clock = WallClock(soon())
    slow = dispatchers(db_pool, clock=clock, worker_id="slow")
    fast = dispatchers(db_pool, clock=clock, worker_id="fast")
    receiver.script = [Answer(500, delay=0.3), Answer(200)]
    outcome: dict[str, PassResult] = {}

    async def slow_pass() -> None:
        outcome["slow"] = await slow.run_pass()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_pass)
        await receiver.wait_for(1)  # slow's request is in flight...
        clock.now += timedelta(seconds=slow.lease_seconds(50) + 1)  # ...past its lease
        outcome["fast"] = await fast.run_pass()

    assert outcome == {
        "fast": PassResult(claimed=1, delivered=1),
        "slow": PassResult(claimed=1, skipped=1),
    }
    stored = await fetch(db_pool, entry.id)
    assert (stored.state, stored.attempts) == (OutboxState.DELIVERED, 1)
    assert [a.status_code for a in await attempts(db_pool, entry)] == [200]
    assert any("lease taken over" in r.getMessage() for r in caplog.records)


# -- the actor ------------------------------------------------------------------------


async def test_a_notice_wakes_the_actor_at_once(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, nursery: trio.Nursery
) -> None:
    dispatcher = dispatchers(db_pool, callback_dispatch_interval_minutes=60)
    notifier, notices = open_notice_channel()
    await start_actor(nursery, dispatcher, notices)
    with trio.fail_after(5):
        await until(lambda: dispatcher.stats.waiting)  # its first drain is done

    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    await trio.sleep(0.3)
    assert receiver.requests == []  # committed, but nobody told it: the sweep is an hour off

    sent = trio.current_time()
    assert notifier.notify(await payment_of(db_pool, entry))
    with trio.fail_after(5):
        (request,) = await receiver.wait_for(1)
    assert request.at - sent < 1.0
    assert request.headers["webhook-id"] == entry.delivery_id
    assert dispatcher.stats.notices == 1


async def test_the_sweep_finds_work_without_a_notice(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, nursery: trio.Nursery
) -> None:
    """Rows another replica committed (its notice went to its own dispatcher)."""
    dispatcher = dispatchers(db_pool, callback_dispatch_interval_minutes=0.005)  # 0.3 s
    await start_actor(nursery, dispatcher, None)
    await until(lambda: dispatcher.stats.waiting)
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    with trio.fail_after(5):
        await until_state(db_pool, entry, OutboxState.DELIVERED)


async def test_a_full_channel_drops_notices_without_blocking() -> None:
    notifier, notices = open_notice_channel(capacity=2)
    payment = attrs.make_class("P", ["id", "status_callback_url"])(7, "https://Orders.internal/cb")
    # notify is synchronous: it cannot block, whatever the channel holds.
    sent = [notifier.notify(payment) for _ in range(5)]
    assert sent == [True, True, False, False, False]
    assert notifier.dropped == 3
    # A notice names the receiver, so a busy one's notices need no claim.
    expected = "https://orders.internal:"
    assert [notices.receive_nowait(), notices.receive_nowait()] == [expected, expected]
    notices.close()
    assert notifier.notify(payment) is False  # a closed channel: dropped, never raised
    assert notifier(payment) is False  # usable as UnitOfWork(on_terminal=...)


async def test_queued_notices_coalesce_into_one_drain(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, nursery: trio.Nursery
) -> None:
    entries = await queue_callbacks(db_pool, 5, url=receiver.url())
    dispatcher = dispatchers(db_pool)
    notifier, notices = open_notice_channel()
    for entry in entries:
        notifier.notify(await payment_of(db_pool, entry))
    await start_actor(nursery, dispatcher, notices)
    with trio.fail_after(5):
        await receiver.wait_for(5)
        # Deliveries run on their own: the actor waits again while they are recorded.
        await until(lambda: dispatcher.stats.totals.delivered == 5)
        await until(lambda: dispatcher.stats.waiting and dispatcher.stats.notices == 5)
    assert dispatcher.stats.totals == PassResult(claimed=5, delivered=5)


async def test_the_actor_finishes_in_flight_deliveries_when_stopping(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher, nursery: trio.Nursery
) -> None:
    receiver.script = [Answer(200, delay=0.5)]
    dispatcher = dispatchers(db_pool)
    notifier, notices = open_notice_channel()
    actor = await start_actor(nursery, dispatcher, notices)
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    notifier.notify(await payment_of(db_pool, entry))
    with trio.fail_after(5):
        await receiver.wait_for(1)  # in flight: the receiver answers in 0.5 s
        actor.stopping.set()
        await actor.done.wait()
    stored = await fetch(db_pool, entry.id)
    assert stored.state == OutboxState.DELIVERED  # finished, not cut off


async def test_stopping_mid_pass_releases_the_rows_not_yet_started(
    db_pool: Pool, receiver: Receiver, dispatchers: MakeDispatcher
) -> None:
    receiver.script = [Answer(200, delay=0.3)]
    entries = await queue_callbacks(db_pool, 3, url=receiver.url())
    dispatcher = dispatchers(db_pool, concurrency=1)
    stopping = trio.Event()
    result: list[PassResult] = []

    async def run_pass() -> None:
        result.append(await dispatcher.run_pass(stopping=stopping))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pass)
        await receiver.wait_for(1)
        stopping.set()
    assert result == [PassResult(claimed=3, delivered=1, skipped=2)]
    (request,) = receiver.requests
    for entry in entries:
        stored = await fetch(db_pool, entry.id)
        if entry.delivery_id == request.headers["webhook-id"]:
            assert stored.state == OutboxState.DELIVERED  # in flight: finished
        else:  # given back at once, not held until the lease runs out
            assert (stored.state, stored.attempts, stored.claimed_by) == (
                OutboxState.PENDING,
                0,
                "",
            )


async def test_the_actor_stops_promptly_when_idle_under_a_supervisor(
    db_pool: Pool, dispatchers: MakeDispatcher
) -> None:
    dispatcher = dispatchers(db_pool, callback_dispatch_interval_minutes=60)
    _, notices = open_notice_channel()
    sup = Supervisor(
        [
            ChildSpec(
                "dispatcher",
                partial(dispatcher.run, notices=notices),
                restart=RestartPolicy.PERMANENT,
                grace=5,
            )
        ]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await until(lambda: dispatcher.stats.waiting)
        stopped_at = trio.current_time()
        sup.shutdown()
    assert trio.current_time() - stopped_at < 1.0
    assert sup.snapshot()["dispatcher"].state == ChildState.STOPPED


async def test_the_actor_waits_out_a_database_outage(
    dispatchers: MakeDispatcher, autojump_clock: trio.testing.MockClock
) -> None:
    """It keeps running (and retrying) instead of crashing into the restart budget."""
    dead = Pool(MysqlDsn("127.0.0.1", 1, "root", "", "nothing"), max_open=1, max_idle=1)
    dispatcher = dispatchers(dead, callback_dispatch_interval_minutes=1)
    async with trio.open_nursery() as nursery:
        actor = await start_actor(nursery, dispatcher, None)
        await trio.sleep(60)  # virtual: several failed passes
        assert not actor.done.is_set()
        actor.stopping.set()
    assert dispatcher.stats.passes == 0


# -- logs, settings and pure parts ----------------------------------------------------


async def test_each_attempt_is_logged_without_secrets(
    db_pool: Pool,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="payments.jobs.dispatcher")
    receiver.script = [Answer(502)]
    (entry,) = await queue_callbacks(db_pool, url=receiver.url())
    await dispatchers(db_pool).run_pass()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("callback attempt")]
    fields = record.__dict__
    assert fields["payment_id"] == entry.payment_id
    assert fields["delivery_id"] == entry.delivery_id
    assert (fields["attempt"], fields["status_code"], fields["outcome"]) == (1, 502, "retried")
    assert isinstance(fields["latency_ms"], int)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    secret_text = SECRET.removeprefix("whsec_")
    assert API_KEY not in logged and secret_text not in logged


def test_retry_delay_grows_is_jittered_and_capped() -> None:
    low, high = (lambda: 0.0), (lambda: 0.999999)
    for attempt in range(1, 6):  # under the 24 h cap even jittered up
        base = 5 * 60 * 3 ** (attempt - 1)
        assert retry_delay(attempt, 5, low).total_seconds() == pytest.approx(base * 0.8)
        assert retry_delay(attempt, 5, high).total_seconds() == pytest.approx(base * 1.2)
    # The cap is a hard ceiling; near it the jitter can only shorten the wait.
    assert retry_delay(20, 5, high) == MAX_RETRY_DELAY
    assert retry_delay(10_000, 5, low) == MAX_RETRY_DELAY * 0.8  # no overflow
    assert retry_delay(3, 0, high) == timedelta(0)


def test_the_lease_covers_a_whole_batch() -> None:
    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher._concurrency = 16
    dispatcher._timeout = 10
    per_round = 10 + dispatcher_module.RECORD_ALLOWANCE_SECONDS
    assert dispatcher.lease_seconds(100) == 7 * per_round + dispatcher_module.LEASE_MARGIN_SECONDS
    assert dispatcher.lease_seconds(1) == per_round + dispatcher_module.LEASE_MARGIN_SECONDS


def _secrets() -> Iterator[tuple[str, bytes]]:
    key = bytes(range(40))
    encoded = base64.b64encode(key).decode()
    yield "whsec_" + encoded, key
    yield encoded, key
    yield "whsec_" + encoded.rstrip("="), key  # padding optional
    yield "  whsec_" + encoded + " ", key


@pytest.mark.parametrize(("value", "key"), list(_secrets()))
def test_signing_secrets_in_whsec_or_base64_form(value: str, key: bytes) -> None:
    assert parse_signing_secret(value) == key


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("my-plain-text-signing-secret-123", "not base64"),
        ("whsec_not*base64*at*all!!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        ("whsec_", "decodes to 0 bytes"),
    ],
)
def test_other_signing_secrets_are_refused_without_echoing_them(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_signing_secret(value)
    message = str(caught.value)
    assert message.startswith("PAYMENTS_CALLBACK_SIGNING_SECRET:") and problem in message
    assert value.strip().removeprefix("whsec_") not in message or not value.removeprefix("whsec_")


async def test_a_bad_secret_stops_the_dispatcher_at_construction(db_pool: Pool) -> None:
    with pytest.raises(ConfigError, match="PAYMENTS_CALLBACK_SIGNING_SECRET"):
        Dispatcher(db_pool, settings(callback_signing_secret="plain secret"))


def test_signer_omits_the_api_key_header_when_none_is_configured() -> None:
    entry = OutboxEntry(
        payment_id=1,
        status=10,  # type: ignore[arg-type]
        delivery_id="msg_1",
        url="https://x",
        request_id="req-1",
        payload="{}",
        state=OutboxState.PENDING,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    headers = CallbackSigner("", "").headers(entry, utcnow())
    assert "X-API-Key" not in headers
    assert headers["Content-Type"] == "application/json" and headers["X-Request-ID"] == "req-1"
    assert headers["webhook-id"] == "msg_1" and "webhook-signature" not in headers
