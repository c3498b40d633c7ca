"""Supervisor runtime: restart policies, backoff, intensity, ordered graceful shutdown.

Every test runs under trio's MockClock (autojump), so the seconds below are virtual.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from itertools import pairwise

import pytest
import trio

from supervisor import (
    Backoff,
    ChildContext,
    ChildSpec,
    ChildState,
    RestartIntensity,
    RestartPolicy,
    Supervisor,
    SupervisorEscalation,
    run_until_signal,
)
from supervisor.backoff import RestartWindow

ChildFn = Callable[[ChildContext], Awaitable[None]]

NO_JITTER = Backoff(initial=1.0, factor=2.0, max_delay=60.0, jitter=0.0, reset_after=5.0)
GENEROUS = RestartIntensity(max_restarts=100, period=60.0)


async def idle_until_stopped(ctx: ChildContext) -> None:
    ctx.started()
    await ctx.stopping.wait()


# -- backoff and intensity units ------------------------------------------------------


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    low = Backoff(initial=1.0, factor=2.0, max_delay=10.0, jitter=0.25, random=lambda: 0.0)
    high = Backoff(initial=1.0, factor=2.0, max_delay=10.0, jitter=0.25, random=lambda: 0.999999)
    assert [low.base_delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert low.delay(1) == pytest.approx(0.75)
    assert high.delay(1) == pytest.approx(1.25, rel=1e-5)
    assert low.delay(3) == pytest.approx(3.0)
    assert high.delay(3) == pytest.approx(5.0, rel=1e-5)
    # max_delay is a hard ceiling even with jitter, and huge exponents do not overflow.
    assert high.delay(50) == 10.0
    assert high.delay(5000) == 10.0
    assert low.delay(50) == pytest.approx(7.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"factor": 0.5}, {"jitter": 1.5}, {"initial": -1.0}, {"max_delay": -1.0}],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_restart_window_slides() -> None:
    window = RestartWindow(RestartIntensity(max_restarts=2, period=10.0))
    assert window.allow(0.0)
    assert window.allow(1.0)
    assert not window.allow(2.0)  # a third restart within 10 s is one too many
    assert window.allow(10.5)  # the restart at t=0 has left the window
    assert not window.allow(10.6)


def test_duplicate_child_names_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor([ChildSpec("a", idle_until_stopped), ChildSpec("a", idle_until_stopped)])


# -- restarts -------------------------------------------------------------------------


async def test_crashing_permanent_child_restarts_with_growing_delays(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    starts: list[float] = []
    healthy = trio.Event()

    async def flaky(ctx: ChildContext) -> None:
        starts.append(trio.current_time())
        if len(starts) <= 6:
            raise ConnectionError(f"db down {len(starts)}")
        ctx.started()
        healthy.set()
        await ctx.stopping.wait()

    jitter = 0.2
    backoff = Backoff(
        initial=1.0,
        factor=2.0,
        max_delay=1000.0,
        jitter=jitter,
        reset_after=1000.0,
        random=random.Random(7).random,
    )
    sup = Supervisor([ChildSpec("flaky", flaky)], intensity=GENEROUS, backoff=backoff)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await healthy.wait()
        sup.shutdown()

    gaps = [b - a for a, b in pairwise(starts)]
    assert len(gaps) == 6
    for n, gap in enumerate(gaps):
        base = 2.0**n
        assert base * (1 - jitter) <= gap <= base * (1 + jitter)
    # Factor 2 beats a 20% jitter, so every wait is strictly longer than the last.
    assert all(later > earlier for earlier, later in pairwise(gaps))
    # The very delays the seeded random produces: nothing else was slept.
    replay = random.Random(7)
    expected = [min(1000.0, 2.0**n * (1 + jitter * (2 * replay.random() - 1))) for n in range(6)]
    assert gaps == pytest.approx(expected)

    status = sup.snapshot()["flaky"]
    assert status.restarts == 6
    assert status.state is ChildState.STOPPED
    restart_logs = [r for r in caplog.records if getattr(r, "delay", None) is not None]
    assert [r.restarts for r in restart_logs] == [1, 2, 3, 4, 5, 6]  # type: ignore[attr-defined]
    assert {r.child for r in restart_logs} == {"flaky"}  # type: ignore[attr-defined]
    assert [r.delay for r in restart_logs] == pytest.approx(gaps)  # type: ignore[attr-defined]


async def test_backoff_resets_after_a_healthy_run(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []
    done = trio.Event()

    async def child(ctx: ChildContext) -> None:
        starts.append(trio.current_time())
        run = len(starts)
        if run == 3:
            ctx.started()
            await trio.sleep(10)  # healthy for longer than reset_after (5 s)
        if run <= 4:
            raise RuntimeError(f"crash {run}")
        done.set()
        await ctx.stopping.wait()

    sup = Supervisor([ChildSpec("c", child)], intensity=GENEROUS, backoff=NO_JITTER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await done.wait()
        sup.shutdown()
    # waits: 1 s, 2 s, then 10 s of healthy running, then back to 1 s (not 4 s).
    assert [b - a for a, b in pairwise(starts)] == pytest.approx([1.0, 2.0, 10.0 + 1.0, 2.0])


def _policy_child(behaviour: str, runs: list[int]) -> ChildFn:
    async def child(ctx: ChildContext) -> None:
        runs.append(ctx.restarts)
        ctx.started()
        await trio.sleep(0.5)
        if behaviour == "raise" or (behaviour == "raise_twice" and len(runs) <= 2):
            raise ValueError(f"run {len(runs)} failed")

    return child


@pytest.mark.parametrize(
    ("policy", "behaviour", "expected_runs", "expected_state"),
    [
        (RestartPolicy.TRANSIENT, "return", 1, ChildState.COMPLETED),
        (RestartPolicy.TRANSIENT, "raise_twice", 3, ChildState.COMPLETED),
        (RestartPolicy.TEMPORARY, "raise", 1, ChildState.FAILED),
        (RestartPolicy.TEMPORARY, "return", 1, ChildState.COMPLETED),
    ],
)
async def test_restart_policies(
    autojump_clock: trio.testing.MockClock,
    policy: RestartPolicy,
    behaviour: str,
    expected_runs: int,
    expected_state: ChildState,
) -> None:
    runs: list[int] = []
    sup = Supervisor(
        [ChildSpec("job", _policy_child(behaviour, runs), restart=policy)],
        intensity=GENEROUS,
        backoff=NO_JITTER,
    )
    with trio.fail_after(60):
        await sup.run()  # returns on its own once the only child is done for good
    assert runs == list(range(expected_runs))
    status = sup.snapshot()["job"]
    assert status.state is expected_state
    assert status.restarts == expected_runs - 1
    if behaviour == "return":
        assert status.last_error is None
    else:
        assert status.last_error is not None
        assert status.last_error.startswith("ValueError(")


async def test_permanent_child_is_restarted_even_after_returning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[int] = []
    settled = trio.Event()

    async def loop_once(ctx: ChildContext) -> None:
        runs.append(ctx.restarts)
        if len(runs) <= 3:
            return
        settled.set()
        await idle_until_stopped(ctx)

    sup = Supervisor([ChildSpec("loop", loop_once)], intensity=GENEROUS, backoff=NO_JITTER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await settled.wait()
        assert sup.snapshot()["loop"].state is ChildState.RUNNING
        sup.shutdown()
    assert runs == [0, 1, 2, 3]
    assert sup.snapshot()["loop"].last_error is None


async def test_too_many_restarts_escalate_and_stop_the_other_children(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crashes = 0
    sibling_cancelled_at: list[float] = []

    async def stubborn_sibling(ctx: ChildContext) -> None:
        ctx.started()
        try:
            await trio.sleep_forever()  # ignores ctx.stopping, so it must be cancelled
        except trio.Cancelled:
            sibling_cancelled_at.append(trio.current_time())
            raise

    async def crasher(ctx: ChildContext) -> None:
        nonlocal crashes
        ctx.started()
        await trio.sleep(0.1)
        crashes += 1
        raise ValueError(f"boom {crashes}")

    sup = Supervisor(
        [ChildSpec("sibling", stubborn_sibling, grace=1.5), ChildSpec("crasher", crasher)],
        intensity=RestartIntensity(max_restarts=3, period=60.0),
        backoff=Backoff(initial=0.1, jitter=0.0),
    )
    with trio.fail_after(60), pytest.raises(SupervisorEscalation) as caught:
        await sup.run()

    escalation = caught.value
    assert escalation.child == "crasher"
    assert isinstance(escalation.__cause__, ValueError)
    assert str(escalation.__cause__) == "boom 4"  # first run plus the 3 allowed restarts
    assert "crasher" in str(escalation)
    # The sibling got its grace and was then cancelled, not left running.
    assert len(sibling_cancelled_at) == 1
    snap = sup.snapshot()
    assert snap["crasher"].state is ChildState.FAILED
    assert snap["crasher"].restarts == 3
    assert snap["crasher"].last_error == "ValueError('boom 4')"
    assert snap["sibling"].state is ChildState.STOPPED
    assert snap["sibling"].restarts == 0


async def test_restarts_spread_wider_than_the_window_do_not_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs = 0
    settled = trio.Event()

    async def slow_crasher(ctx: ChildContext) -> None:
        nonlocal runs
        runs += 1
        if runs > 5:
            settled.set()
            await idle_until_stopped(ctx)
            return
        ctx.started()
        await trio.sleep(20)
        raise RuntimeError("every 20 s")

    sup = Supervisor(
        [ChildSpec("slow", slow_crasher)],
        intensity=RestartIntensity(max_restarts=2, period=30.0),
        backoff=NO_JITTER,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await settled.wait()
        sup.shutdown()
    assert sup.snapshot()["slow"].restarts == 5


async def test_one_crashing_child_does_not_disturb_a_healthy_sibling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticks: list[float] = []
    sibling_runs = 0
    crasher_runs = 0

    async def ticker(ctx: ChildContext) -> None:
        nonlocal sibling_runs
        sibling_runs += 1
        ctx.started()
        while not ctx.stop_requested:
            ticks.append(trio.current_time())
            await trio.sleep(1)

    async def crasher(ctx: ChildContext) -> None:
        nonlocal crasher_runs
        crasher_runs += 1
        ctx.started()
        await trio.sleep(0.5)
        if crasher_runs <= 3:
            raise OSError("flaky upstream")

    sup = Supervisor(
        [
            ChildSpec("ticker", ticker),
            ChildSpec("crasher", crasher, restart=RestartPolicy.TRANSIENT),
        ],
        intensity=GENEROUS,
        backoff=NO_JITTER,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(20)
        snap = sup.snapshot()
        assert snap["crasher"].state is ChildState.COMPLETED
        assert snap["crasher"].restarts == 3
        assert snap["ticker"].state is ChildState.RUNNING
        sup.shutdown()

    assert crasher_runs == 4
    assert sibling_runs == 1
    assert sup.snapshot()["ticker"].restarts == 0
    assert len(ticks) >= 20
    assert all(b - a == pytest.approx(1.0) for a, b in pairwise(ticks))  # never interrupted


# -- startup and shutdown -------------------------------------------------------------


async def test_children_start_in_order_each_after_the_previous_is_ready(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started_at: dict[str, float] = {}

    def slow_starter(name: str, takes: float) -> ChildFn:
        async def child(ctx: ChildContext) -> None:
            started_at[name] = trio.current_time()
            assert sup.snapshot()[name].state is ChildState.STARTING
            await trio.sleep(takes)  # e.g. binding a port, connecting to the database
            ctx.started()
            await ctx.stopping.wait()

        return child

    sup = Supervisor(
        [ChildSpec("db", slow_starter("db", 2)), ChildSpec("http", slow_starter("http", 3))]
    )
    assert {s.state for s in sup.snapshot().values()} == {ChildState.PENDING}
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(sup.run)
        assert trio.current_time() - t0 == pytest.approx(5.0)  # start() returns once all are up
        assert started_at["http"] - started_at["db"] == pytest.approx(2.0)
        assert {s.state for s in sup.snapshot().values()} == {ChildState.RUNNING}
        sup.shutdown()


def _server(
    name: str,
    request_takes: float,
    events: list[tuple[str, str, float]],
    ready: trio.Event | None = None,
) -> ChildFn:
    """A server with one in-flight request that needs ``request_takes`` s once stopping."""

    async def child(ctx: ChildContext) -> None:
        async def in_flight_request() -> None:
            await ctx.stopping.wait()
            try:
                await trio.sleep(request_takes)
            except trio.Cancelled:
                events.append((name, "request cancelled", trio.current_time()))
                raise
            events.append((name, "request finished", trio.current_time()))

        async with trio.open_nursery() as requests:
            requests.start_soon(in_flight_request)
            ctx.started()
            if ready is not None:
                ready.set()
            await ctx.stopping.wait()
            events.append((name, "stop accepting", trio.current_time()))
            # leaving the nursery waits for the in-flight request: that is the drain

    return child


async def test_graceful_shutdown_drains_within_grace_and_cancels_overruns_in_reverse_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, str, float]] = []

    async def worker(ctx: ChildContext) -> None:
        ctx.started()
        await ctx.stopping.wait()
        events.append(("worker", "stop accepting", trio.current_time()))

    sup = Supervisor(
        [
            ChildSpec("worker", worker, grace=5.0),
            ChildSpec("patient", _server("patient", 2.0, events), grace=5.0),
            ChildSpec("overrun", _server("overrun", 10.0, events), grace=3.0),
        ]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        t0 = trio.current_time()
        sup.shutdown()
        assert sup.shutdown_requested

    relative = [(name, what, at - t0) for name, what, at in events]
    assert relative == [
        # reverse start order: the last started stops first
        ("overrun", "stop accepting", pytest.approx(0.0)),
        ("overrun", "request cancelled", pytest.approx(3.0)),  # grace 3 s < 10 s of work
        ("patient", "stop accepting", pytest.approx(3.0)),
        ("patient", "request finished", pytest.approx(5.0)),  # 2 s of work < 5 s grace
        ("worker", "stop accepting", pytest.approx(5.0)),
    ]
    assert {s.state for s in sup.snapshot().values()} == {ChildState.STOPPED}


async def test_shutdown_during_backoff_stops_without_waiting_out_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def crasher(ctx: ChildContext) -> None:
        raise RuntimeError("nope")

    sup = Supervisor(
        [ChildSpec("crasher", crasher)],
        backoff=Backoff(initial=100.0, jitter=0.0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        assert sup.snapshot()["crasher"].state is ChildState.BACKING_OFF
        t0 = trio.current_time()
        sup.shutdown()
    assert trio.current_time() - t0 < 0.01
    assert sup.snapshot()["crasher"].state is ChildState.STOPPED


async def test_forced_shutdown_skips_the_grace(autojump_clock: trio.testing.MockClock) -> None:
    cancelled = False

    async def stubborn(ctx: ChildContext) -> None:
        nonlocal cancelled
        ctx.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled = True
            raise

    sup = Supervisor([ChildSpec("stubborn", stubborn, grace=300.0)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        t0 = trio.current_time()
        sup.shutdown()
        await trio.sleep(1)
        sup.shutdown(force=True)
    assert cancelled
    assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_sigterm_lets_the_in_flight_request_finish_and_run_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[tuple[str, str, float]] = []
    serving = trio.Event()
    sup = Supervisor([ChildSpec("http", _server("http", 2.0, events, serving), grace=5.0)])
    returned = trio.Event()

    async def serve() -> None:
        await run_until_signal(sup)  # SIGTERM and SIGINT by default
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await serving.wait()  # the signal receiver is open before any child starts
        t0 = trio.current_time()
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(10):
            await returned.wait()

    relative = [(what, at - t0) for _, what, at in events]
    assert relative == [
        ("stop accepting", pytest.approx(0.0, abs=0.05)),
        ("request finished", pytest.approx(2.0, abs=0.05)),
    ]
    assert sup.snapshot()["http"].state is ChildState.STOPPED


async def test_run_until_signal_lets_escalation_through_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def crasher(ctx: ChildContext) -> None:
        raise KeyError("config")

    sup = Supervisor(
        [ChildSpec("crasher", crasher)],
        intensity=RestartIntensity(max_restarts=1, period=10.0),
        backoff=Backoff(initial=0.1, jitter=0.0),
    )
    with pytest.raises(SupervisorEscalation) as caught:
        await run_until_signal(sup)
    assert isinstance(caught.value.__cause__, KeyError)


# -- status ---------------------------------------------------------------------------


async def test_snapshot_reflects_restarts_and_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs = 0
    healthy = trio.Event()

    async def worker(ctx: ChildContext) -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ConnectionError(f"db down {runs} " + "x" * 500)
        ctx.started()
        healthy.set()
        await ctx.stopping.wait()

    sup = Supervisor(
        [ChildSpec("worker", worker), ChildSpec("http", idle_until_stopped)],
        intensity=GENEROUS,
        backoff=Backoff(initial=10.0, factor=2.0, jitter=0.0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        during_backoff = sup.snapshot()["worker"]
        assert during_backoff.state is ChildState.BACKING_OFF
        assert during_backoff.restarts == 0
        assert during_backoff.last_error is not None
        assert during_backoff.last_error.startswith("ConnectionError('db down 1 ")

        await healthy.wait()
        snap = sup.snapshot()
        sup.shutdown()

    worker_status = snap["worker"]
    assert worker_status.state is ChildState.RUNNING
    assert worker_status.restarts == 2
    assert worker_status.last_error is not None
    assert worker_status.last_error.startswith("ConnectionError('db down 2 ")
    assert len(worker_status.last_error) <= 200  # short enough for logs and /health
    assert worker_status.last_started_at is not None
    assert snap["http"].restarts == 0 and snap["http"].last_error is None
    as_json = worker_status.as_dict()
    assert as_json["state"] == "running"
    assert as_json["restarts"] == 2
    assert list(snap) == ["worker", "http"]  # start order
