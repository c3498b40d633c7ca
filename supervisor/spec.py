"""What a child is (ChildSpec) and what it is handed while it runs (ChildContext)."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable

import attrs
import trio

from supervisor.backoff import Backoff


class RestartPolicy(enum.StrEnum):
    """When a child that ended is started again (OTP's restart types)."""

    PERMANENT = "permanent"
    """Always restarted, even after a normal return: servers and endless loops."""
    TRANSIENT = "transient"
    """Restarted only if it raised: work that may legitimately finish."""
    TEMPORARY = "temporary"
    """Never restarted: one-shot tasks whose failure is only reported."""


class ChildContext:
    """Handed to each run of a child: its name, the stop request, and a readiness call.

    A new context is made for every (re)start; ``stopping`` is shared across them,
    because once the supervisor asks a child to stop it is never started again.
    """

    __slots__ = ("_name", "_on_started", "_restarts", "_stopping")

    def __init__(
        self,
        name: str,
        *,
        restarts: int,
        stopping: trio.Event,
        on_started: Callable[[], None],
    ) -> None:
        self._name = name
        self._restarts = restarts
        self._stopping = stopping
        self._on_started = on_started

    @property
    def name(self) -> str:
        """The child's name, for logs."""
        return self._name

    @property
    def restarts(self) -> int:
        """How many times this child was restarted before this run (0 on the first)."""
        return self._restarts

    @property
    def stopping(self) -> trio.Event:
        """Set when the supervisor wants the child to stop taking new work and drain.

        A server stops accepting and lets in-flight requests finish; a worker finishes
        its current item. If the child is still running when its grace period ends it
        is cancelled. Only the supervisor sets this event.
        """
        return self._stopping

    @property
    def stop_requested(self) -> bool:
        """True once ``stopping`` is set; cheap to poll between work items."""
        return self._stopping.is_set()

    def started(self) -> None:
        """Report readiness (listening, connected...); idempotent.

        The supervisor starts the next sibling only after this is called or this run
        ends, and shows the child as ``running`` rather than ``starting``.
        """
        self._on_started()


def _valid_name(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value or not value.strip():
        raise ValueError("a child needs a non-empty name")


def _valid_grace(_instance: object, _attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"grace must be >= 0, got {value!r}")


@attrs.frozen
class ChildSpec:
    """One supervised child.

    ``start`` is the async function run as the child; it gets a ChildContext.
    ``grace`` is how long it may drain after ``ctx.stopping`` is set before it is
    cancelled. ``backoff`` overrides the supervisor's default for this child.
    Children start in list order and stop in reverse order.
    """

    name: str = attrs.field(validator=_valid_name)
    start: Callable[[ChildContext], Awaitable[None]]
    restart: RestartPolicy = attrs.field(default=RestartPolicy.PERMANENT, converter=RestartPolicy)
    grace: float = attrs.field(default=5.0, validator=_valid_grace)
    backoff: Backoff | None = None
