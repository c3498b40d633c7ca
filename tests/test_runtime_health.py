"""/healthz details from the runtime: child states without error text (the route is open)."""

from __future__ import annotations

import trio

from payments.runtime import Resources
from payments.storage.database import Database
from supervisor import ChildContext, ChildSpec, RestartPolicy, Supervisor


async def test_health_shows_states_and_restarts_but_no_error_text(db_pool: Database) -> None:
    async def crash(ctx: ChildContext) -> None:
        ctx.started()
        raise RuntimeError("SELECT secret FROM internals failed at db.internal:3306")

    supervisor = Supervisor([ChildSpec("worker", crash, restart=RestartPolicy.TEMPORARY)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    res = Resources(profile=None, pool=db_pool, providers=None, service=None)  # type: ignore[arg-type]
    res.supervisor = supervisor
    health = res.health()
    assert health["children"] == {"worker": {"state": "failed", "restarts": 0}}
    assert "internals" not in repr(health) and "database_pool" in health
