"""How long provider work may lease a payment, how long others wait for it, and giving a
lease back when the work fails (the leases themselves: payments/storage/leases.py).

Create, cancel and the reconciler call the provider holding a lease instead of a row
lock and a pooled session, so a hung provider stalls only the payment it is about.
"""

from __future__ import annotations

import logging

import attrs
import trio

from payments.config import Settings
from payments.storage import leases
from payments.storage.database import Database

log = logging.getLogger("payments.leasing")

# Provider calls one piece of work may make (cancel's closing: replayed create, state,
# close, state again), each bounded by STRIPE_HTTP_TIMEOUT_SECONDS.
_CALLS_PER_LEASE = 4
_FIRST_POLL_SECONDS = 0.02
_MAX_POLL_SECONDS = 0.5


@attrs.frozen
class LeasePolicy:
    """``lease_seconds``: how long a lease lasts (outlives the holder's provider calls
    and its two transactions, so a live holder never loses it); ``wait_seconds``: how
    long a request waits for another holder before answering 504 (one provider call)."""

    lease_seconds: float = 55.0
    wait_seconds: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        stripe, database = settings.stripe_http_timeout_seconds, settings.db_query_timeout_seconds
        return cls(
            lease_seconds=_CALLS_PER_LEASE * stripe + 2 * database + 5,
            wait_seconds=stripe + database,
        )


class Polling:
    """Sleeps between looks at a leased payment: short at first, then up to 0.5 s."""

    def __init__(self, wait_seconds: float) -> None:
        self.deadline = trio.current_time() + wait_seconds
        self._delay = _FIRST_POLL_SECONDS

    @property
    def expired(self) -> bool:
        return trio.current_time() >= self.deadline

    async def pause(self) -> None:
        await trio.sleep(min(self._delay, max(0.0, self.deadline - trio.current_time())))
        self._delay = min(self._delay * 2, _MAX_POLL_SECONDS)


async def give_back(database: Database, payment_id: int, owner: str) -> None:
    """Release ``owner``'s lease after failed work, so a retry need not wait for it to
    lapse. Shielded (it runs on the way out of a cancelled request too) and bounded by
    the database's own deadlines; a failure only logs: the lease lapses by itself."""
    with trio.CancelScope(shield=True):
        try:
            async with database.connection() as conn:
                await leases.release(conn, payment_id, owner)
        except Exception as exc:  # the lease lapses on its own
            log.warning(
                "could not give a payment lease back: %s",
                type(exc).__name__,
                extra={"payment_id": payment_id},
            )
