"""How long provider work may lease a payment, how long others wait for it, and giving a
lease back when the work fails (the leases themselves: payments/storage/leases.py).

Create, cancel, the reconciler and the expirer call the provider holding a lease
instead of a row lock and a pooled session, so a hung provider stalls only the payment
it is about.
"""

from __future__ import annotations

import logging

import attrs
import trio

from payments.config import Settings
from payments.storage import leases
from payments.storage.database import Database

log = logging.getLogger("payments.leasing")

_FIRST_POLL_SECONDS = 0.02
_MAX_POLL_SECONDS = 0.5
_GIVE_BACK_SECONDS = 5.0


@attrs.frozen
class LeasePolicy:
    """How long leases last and how long a request waits for another holder.

    ``call_seconds`` bounds one provider operation (STRIPE_HTTP_TIMEOUT_SECONDS, the
    provider's own deadline); ``margin_seconds`` covers the transactions around it
    (PAYMENTS_DB_QUERY_TIMEOUT_SECONDS). A lease outlives its holder's calls, so a live
    holder keeps it; should one ever outlast it anyway, the next holder repeats the call
    with the same idempotency key and the apply step finds the work done: exactness
    rests on the keys and the status machine, the lease only keeps Stripe from being
    asked twice. A request waits as long as an opening lease lasts, so a retry after a
    crash gets through in one request (the dead holder's lease lapses meanwhile).
    """

    call_seconds: float = 10.0
    margin_seconds: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        return cls(settings.stripe_http_timeout_seconds, settings.db_query_timeout_seconds)

    def lease_seconds(self, calls: int = 1) -> float:
        """A lease for work making ``calls`` provider operations one after another."""
        return calls * self.call_seconds + self.margin_seconds

    @property
    def wait_seconds(self) -> float:
        return self.lease_seconds(1)


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
    lapse. Shielded (it runs on the way out of a cancelled request too) and bounded;
    a failure only logs: the lease lapses by itself."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _GIVE_BACK_SECONDS  # a pool with no free slot
        try:
            async with database.connection() as conn:
                await leases.release(conn, payment_id, owner)
        except Exception as exc:  # the lease lapses on its own
            log.warning(
                "could not give a payment lease back: %s",
                type(exc).__name__,
                extra={"payment_id": payment_id},
            )
