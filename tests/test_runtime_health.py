"""/healthz details from the runtime: child states without error text (the route is open)."""

from __future__ import annotations

import trio

from payments.config import MysqlDsn, Settings
from payments.runtime import check_settings, open_resources
from supervisor import ChildContext, ChildSpec, RestartPolicy, Supervisor


async def test_health_shows_states_and_restarts_but_no_error_text(test_db_dsn: MysqlDsn) -> None:
    async def crash(ctx: ChildContext) -> None:
        ctx.started()
        raise RuntimeError("SELECT secret FROM internals failed at db.internal:3306")

    supervisor = Supervisor([ChildSpec("worker", crash, restart=RestartPolicy.TEMPORARY)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    settings = Settings(mysql_dsn=test_db_dsn, stripe_secret_key="sk_test_health")
    async with open_resources(check_settings(settings, {"reconcile"}), {"reconcile"}) as res:
        res.supervisor = supervisor
        health = res.health()
    assert health["children"] == {"worker": {"state": "failed", "restarts": 0}}
    assert "internals" not in repr(health) and "database_pool" in health
