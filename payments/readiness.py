"""Is this replica ready for traffic? The checks behind ``GET /readyz``.

Readiness, not liveness: a replica that is not ready is taken out of the load balancer
until it is, never restarted (``/healthz`` stays the liveness probe). Each part that
can make every request fail is checked and named when it does:

- ``database``: one session answers a query within the timeout;
- ``schema``: the database is at this release's schema version (a rollout that runs
  the code before ``payments migrate`` would fail on the new tables);
- ``auth``: the Auth service has given no answer for longer than the auth cache covers
  (while cached keys still work, the replica still serves its callers).
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from payments.storage.database import Database
from payments.storage.migrate import current_version, latest_version, load_steps

log = logging.getLogger("payments.readiness")

DEFAULT_TIMEOUT_SECONDS = 2.0


class AuthReachability(Protocol):
    """What readiness needs of the Auth client (GrpcAuthenticator has it)."""

    @property
    def unreachable_since(self) -> float | None:
        """trio time of the first failed look-up since Auth last answered."""
        ...

    @property
    def cache_ttl_seconds(self) -> float: ...

    async def probe(self) -> bool:
        """One call past the cache; True when Auth answered."""
        ...


@attrs.frozen
class NotReady:
    """One part that is not ready, and why (safe to show: no secrets, no SQL)."""

    part: str
    reason: str


@attrs.define
class Readiness:
    """The checks of one process; :meth:`check` runs them all."""

    database: Database
    auth: AuthReachability | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    _latest: int = attrs.field(init=False, default=0)

    async def check(self) -> list[NotReady]:
        """Every part that is not ready; empty when the replica is."""
        failing: list[NotReady] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_database, failing)
            if self.auth is not None:
                nursery.start_soon(self._check_auth, self.auth, failing)
        return sorted(failing, key=lambda item: item.part)

    async def _check_database(self, failing: list[NotReady]) -> None:
        version: int | None = None
        with trio.move_on_after(self.timeout_seconds):
            try:
                async with self.database.connection() as conn:
                    version = await current_version(conn)
            except Exception as exc:  # DependencyUnavailable, or anything: not answering
                log.warning("readiness: database failed", extra={"error": type(exc).__name__})
        if version is None:
            failing.append(NotReady("database", "database unavailable"))
            return
        latest = self._latest_version()
        if version < latest:
            failing.append(NotReady("schema", f"schema version {version} is behind {latest}"))

    def _latest_version(self) -> int:
        if not self._latest:  # read once: the schema file does not change under a process
            self._latest = latest_version(load_steps(dialect=self.database.dialect))
        return self._latest

    async def _check_auth(self, auth: AuthReachability, failing: list[NotReady]) -> None:
        if auth.unreachable_since is None:
            return  # Auth answered the last look-up: no call needed
        answered = False
        with trio.move_on_after(self.timeout_seconds):
            answered = await auth.probe()
        if answered:
            return
        since = auth.unreachable_since
        if since is not None and trio.current_time() - since > auth.cache_ttl_seconds:
            failing.append(
                NotReady("auth", f"auth service unreachable for over {auth.cache_ttl_seconds:g} s")
            )
