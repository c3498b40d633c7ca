"""One-for-one supervisor: restarts each child on its own, gives up past an intensity.

Each child is driven by one task in the supervisor's nursery that runs it, decides
from its policy whether to restart it, waits out the backoff, and runs it again. A
crash only ever touches that child (one-for-one). Shutdown walks the children in
reverse start order: set ``ctx.stopping``, wait up to the child's grace, then cancel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from supervisor.backoff import Backoff, RestartIntensity, RestartWindow
from supervisor.spec import ChildContext, ChildSpec, RestartPolicy
from supervisor.status import ChildState, ChildStatus

log = logging.getLogger("supervisor")

_ERROR_REPR_LIMIT = 200


class SupervisorEscalation(Exception):
    """The restart intensity ran out: the supervisor stopped every child and gave up.

    ``child`` names the child whose failure tipped it over; ``__cause__`` is that
    failure (None if a permanent child kept returning normally). Let it end the
    process with a non-zero status so the orchestrator restarts it.
    """

    def __init__(self, child: str, intensity: RestartIntensity) -> None:
        super().__init__(
            f"child {child!r} failed after {intensity.max_restarts} restarts within "
            f"{intensity.period:g}s; supervisor gave up"
        )
        self.child = child
        self.intensity = intensity


def _short_repr(exc: BaseException) -> str:
    text = repr(exc)
    if len(text) > _ERROR_REPR_LIMIT:
        text = text[: _ERROR_REPR_LIMIT - 3] + "..."
    return text


async def _wait_any(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    if any(event.is_set() for event in events):
        return
    async with trio.open_nursery() as nursery:

        async def _wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(_wait, event)


class _Child:
    """Mutable bookkeeping for one child; only the supervisor touches it."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.state = ChildState.PENDING
        self.restarts = 0
        self.failures = 0  # consecutive, drives the backoff; reset after a healthy run
        self.last_error: str | None = None
        self.last_started_at: float | None = None
        self.launched = False
        self.stopping = trio.Event()
        self.first_run_settled = trio.Event()  # ready or ended: the next sibling may start
        self.done = trio.Event()
        self.scope: trio.CancelScope | None = None

    def status(self) -> ChildStatus:
        return ChildStatus(
            name=self.spec.name,
            state=self.state,
            restarts=self.restarts,
            last_error=self.last_error,
            last_started_at=self.last_started_at,
        )


class Supervisor:
    """Runs ``children`` one-for-one until they are all done or shutdown is requested.

    Children start in list order, each after the previous one reported ready (or
    ended), and stop in reverse order, so list dependencies and workers first and
    servers last: on shutdown the servers stop accepting before the workers stop.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        intensity: RestartIntensity | None = None,
        backoff: Backoff | None = None,
        name: str = "supervisor",
        on_restart: Callable[[str], object] | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate child names: {', '.join(duplicates)}")
        self.name = name
        # Told the child's name at each restart (a metrics counter, say); must not block.
        self._on_restart = on_restart
        self.intensity = intensity if intensity is not None else RestartIntensity()
        self.backoff = backoff if backoff is not None else Backoff()
        self._children = [_Child(spec) for spec in children]
        self._window = RestartWindow(self.intensity)
        self._wake = trio.Event()  # shutdown asked, escalation, or every child finished
        self._shutdown_requested = False
        self._forced = trio.Event()
        self._escalation: tuple[str, BaseException | None] | None = None
        self._starting = True
        self._active = 0
        self._ran = False

    # -- public API ----------------------------------------------------------------

    def snapshot(self) -> dict[str, ChildStatus]:
        """Per-child state, restart count, last error and last start, in start order."""
        return {child.spec.name: child.status() for child in self._children}

    def shutdown(self, *, force: bool = False) -> None:
        """Ask for an ordered graceful stop; ``force`` skips the remaining grace periods.

        Safe to call any number of times, from any task in the supervisor's trio run,
        before or during ``run()``.
        """
        if not self._shutdown_requested:
            log.info("%s: shutdown requested", self.name, extra={"supervisor": self.name})
        self._shutdown_requested = True
        if force:
            self._forced.set()
        self._wake.set()

    @property
    def shutdown_requested(self) -> bool:
        """True once ``shutdown()`` was called (e.g. to answer /health with 503)."""
        return self._shutdown_requested

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children, supervise them, and return after an ordered stop.

        With ``nursery.start(sup.run)`` the caller resumes once the startup phase is
        over. Raises SupervisorEscalation if the restart intensity ran out.
        """
        if self._ran:
            raise RuntimeError("a Supervisor can run only once")
        self._ran = True
        async with trio.open_nursery() as nursery:
            for child in self._children:
                if self._wake.is_set():
                    break
                child.launched = True
                self._active += 1
                nursery.start_soon(self._supervise, child, name=f"child:{child.spec.name}")
                await _wait_any(child.first_run_settled, self._wake)
            self._starting = False
            if self._active == 0:
                self._wake.set()
            task_status.started()
            await self._wake.wait()
            await self._stop_all()
        if self._escalation is not None:
            child_name, cause = self._escalation
            raise SupervisorEscalation(child_name, self.intensity) from cause

    # -- internals -----------------------------------------------------------------

    async def _stop_all(self) -> None:
        """Stop launched children one by one, in reverse start order."""
        for child in reversed(self._children):
            if child.launched:
                await self._stop_child(child)

    async def _stop_child(self, child: _Child) -> None:
        if child.done.is_set():
            return
        if child.state in (ChildState.STARTING, ChildState.RUNNING):
            child.state = ChildState.STOPPING
        log.info(
            "%s: stopping child %s (grace %.1fs)",
            self.name,
            child.spec.name,
            child.spec.grace,
            extra={"supervisor": self.name, "child": child.spec.name, "grace": child.spec.grace},
        )
        child.stopping.set()
        with trio.move_on_after(child.spec.grace):
            await _wait_any(child.done, self._forced)
        if not child.done.is_set():
            log.warning(
                "%s: child %s still running after its grace; cancelling",
                self.name,
                child.spec.name,
                extra={"supervisor": self.name, "child": child.spec.name},
            )
            if child.scope is not None:
                child.scope.cancel()
            await child.done.wait()

    async def _supervise(self, child: _Child) -> None:
        """Run one child again and again, as its policy and the intensity allow."""
        try:
            await self._supervise_loop(child)
        finally:
            child.first_run_settled.set()
            child.done.set()
            self._active -= 1
            if self._active == 0 and not self._starting:
                self._wake.set()

    async def _supervise_loop(self, child: _Child) -> None:
        spec = child.spec
        backoff = spec.backoff if spec.backoff is not None else self.backoff
        extra: dict[str, object] = {"supervisor": self.name, "child": spec.name}
        while True:
            if child.stopping.is_set():
                child.state = ChildState.STOPPED
                return
            error, ran_for = await self._run_once(child)
            child.first_run_settled.set()
            if error is not None:
                child.last_error = _short_repr(error)

            if child.stopping.is_set():
                child.state = ChildState.STOPPED if error is None else ChildState.FAILED
                if error is not None:
                    log.warning(
                        "%s: child %s failed while stopping",
                        self.name,
                        spec.name,
                        exc_info=error,
                        extra=extra,
                    )
                return

            if error is None and spec.restart is not RestartPolicy.PERMANENT:
                child.state = ChildState.COMPLETED
                log.info("%s: child %s completed", self.name, spec.name, extra=extra)
                return
            if error is not None and spec.restart is RestartPolicy.TEMPORARY:
                child.state = ChildState.FAILED
                log.error(
                    "%s: temporary child %s failed; not restarting",
                    self.name,
                    spec.name,
                    exc_info=error,
                    extra=extra,
                )
                return

            if not self._window.allow(trio.current_time()):
                child.state = ChildState.FAILED
                log.error(
                    "%s: child %s exceeded restart intensity (%d in %gs); giving up",
                    self.name,
                    spec.name,
                    self.intensity.max_restarts,
                    self.intensity.period,
                    exc_info=error,
                    extra={**extra, "restarts": child.restarts},
                )
                if self._escalation is None:
                    self._escalation = (spec.name, error)
                self._wake.set()
                return

            if ran_for >= backoff.reset_after:
                child.failures = 0
            child.failures += 1
            delay = backoff.delay(child.failures)
            child.state = ChildState.BACKING_OFF
            log.warning(
                "%s: child %s %s; restart %d in %.3fs",
                self.name,
                spec.name,
                "exited" if error is None else f"crashed: {child.last_error}",
                child.restarts + 1,
                delay,
                exc_info=error,
                extra={**extra, "restarts": child.restarts + 1, "delay": delay},
            )
            with trio.move_on_after(delay):
                await child.stopping.wait()
            if child.stopping.is_set():
                child.state = ChildState.STOPPED
                return
            child.restarts += 1
            if self._on_restart is not None:
                try:
                    self._on_restart(spec.name)
                except Exception:  # an observer must not take the supervisor down
                    log.exception("%s: on_restart hook failed", self.name, extra=extra)

    async def _run_once(self, child: _Child) -> tuple[Exception | None, float]:
        """Run the child once; return what it raised (None if it returned) and its runtime."""
        spec = child.spec

        def on_started() -> None:
            if child.state is ChildState.STARTING:
                child.state = ChildState.RUNNING
                log.info(
                    "%s: child %s ready",
                    self.name,
                    spec.name,
                    extra={"supervisor": self.name, "child": spec.name, "restarts": child.restarts},
                )
            child.first_run_settled.set()

        ctx = ChildContext(
            spec.name, restarts=child.restarts, stopping=child.stopping, on_started=on_started
        )
        child.state = ChildState.STARTING
        child.last_started_at = time.time()
        began = trio.current_time()
        error: Exception | None = None
        try:
            with trio.CancelScope() as scope:
                child.scope = scope
                await spec.start(ctx)
        except Exception as exc:
            error = exc
        finally:
            child.scope = None
        return error, trio.current_time() - began
