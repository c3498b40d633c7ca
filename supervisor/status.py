"""Point-in-time view of each child, for /health and logs."""

from __future__ import annotations

import enum
from typing import Any

import attrs


class ChildState(enum.StrEnum):
    """Where a child is in its life; values are stable strings for JSON."""

    PENDING = "pending"
    """Not started yet (an earlier sibling is still starting, or the tree never ran)."""
    STARTING = "starting"
    """Running but has not called ``ctx.started()`` yet."""
    RUNNING = "running"
    """Reported ready."""
    BACKING_OFF = "backing_off"
    """Ended and waiting out its backoff delay before a restart."""
    STOPPING = "stopping"
    """Asked to stop; draining within its grace period."""
    STOPPED = "stopped"
    """Ended because the supervisor stopped it."""
    FAILED = "failed"
    """Raised and will not be restarted (temporary, or the restart intensity ran out)."""
    COMPLETED = "completed"
    """Returned normally and, by its policy, is not restarted."""


@attrs.frozen
class ChildStatus:
    """Snapshot of one child. ``last_started_at`` is wall-clock epoch seconds."""

    name: str
    state: ChildState
    restarts: int
    last_error: str | None
    last_started_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "state": str(self.state),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_started_at": self.last_started_at,
        }
