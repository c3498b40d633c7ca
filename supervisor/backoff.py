"""How long to wait before restarting a child, and how many restarts are too many.

Backoff spaces restarts out so a child whose dependency is down does not spin; jitter
keeps replicas that failed together from retrying in lockstep. RestartIntensity is
OTP's MaxR/MaxT: past it, restarting is not helping and the process should exit so the
orchestrator can act.
"""

from __future__ import annotations

import random as _random
from collections import deque
from collections.abc import Callable

import attrs


def _non_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential backoff with proportional jitter.

    The n-th consecutive failure waits ``min(max_delay, initial * factor**(n-1))``,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` and clipped to
    ``max_delay`` (a hard ceiling). A child that ran ``reset_after`` seconds before
    failing counts as healthy, so its next delay starts again from ``initial``.
    ``random`` returns a float in [0, 1); inject a seeded one in tests.
    """

    initial: float = attrs.field(default=0.5, validator=_non_negative)
    factor: float = attrs.field(default=2.0)
    max_delay: float = attrs.field(default=30.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.2)
    reset_after: float = attrs.field(default=30.0, validator=_non_negative)
    random: Callable[[], float] = attrs.field(
        default=_random.random, eq=False, repr=False, kw_only=True
    )

    @factor.validator
    def _check_factor(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value < 1:
            raise ValueError(f"factor must be >= 1, got {value!r}")

    @jitter.validator
    def _check_jitter(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 <= value <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {value!r}")

    def base_delay(self, failures: int) -> float:
        """Delay before jitter after ``failures`` consecutive failures (>= 1)."""
        exponent = max(failures, 1) - 1
        try:
            base = self.initial * self.factor**exponent
        except OverflowError:
            base = self.max_delay
        return min(self.max_delay, base)

    def delay(self, failures: int) -> float:
        """Jittered delay to wait after ``failures`` consecutive failures (>= 1)."""
        spread = self.jitter * (2.0 * self.random() - 1.0)
        return min(self.max_delay, max(0.0, self.base_delay(failures) * (1.0 + spread)))


@attrs.frozen
class RestartIntensity:
    """At most ``max_restarts`` restarts within any ``period`` seconds (OTP MaxR/MaxT).

    Counted per supervisor, across all children: the failure that would make restart
    number ``max_restarts + 1`` inside the window makes the supervisor give up.
    """

    max_restarts: int = attrs.field(default=5, validator=_non_negative)
    period: float = attrs.field(default=60.0)

    @period.validator
    def _check_period(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value <= 0:
            raise ValueError(f"period must be > 0, got {value!r}")


class RestartWindow:
    """Sliding record of recent restart times, checked against a RestartIntensity."""

    def __init__(self, intensity: RestartIntensity) -> None:
        self._intensity = intensity
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the intensity permits it; False means give up."""
        horizon = now - self._intensity.period
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        if len(self._times) >= self._intensity.max_restarts:
            return False
        self._times.append(now)
        return True

    def __len__(self) -> int:
        return len(self._times)
