"""Turn SIGTERM/SIGINT into an ordered graceful shutdown of a Supervisor."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

import trio

from supervisor.supervisor import Supervisor

log = logging.getLogger("supervisor")

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


async def run_until_signal(
    supervisor: Supervisor,
    signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS,
) -> None:
    """Run ``supervisor``; the first signal starts a graceful stop, a second forces it.

    Must be called from the main thread (trio's signal receiver requires it). Returns
    when the supervisor has stopped; SupervisorEscalation propagates unwrapped.
    """
    error: Exception | None = None
    with trio.open_signal_receiver(*signals) as receiver:
        async with trio.open_nursery() as nursery:

            async def forward() -> None:
                async for signum in receiver:
                    sig_name = signal.Signals(signum).name
                    force = supervisor.shutdown_requested
                    log.warning(
                        "%s: received %s; %s",
                        supervisor.name,
                        sig_name,
                        "forcing stop" if force else "stopping gracefully",
                        extra={"supervisor": supervisor.name, "signal": sig_name},
                    )
                    supervisor.shutdown(force=force)

            nursery.start_soon(forward)
            try:
                await supervisor.run()
            except Exception as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    if error is not None:
        raise error
