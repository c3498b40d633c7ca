"""/readyz: 200 when ready, 503 naming what is not (a database hidden behind a paused
proxy, a schema behind this release, Auth gone for longer than its cache covers)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio

from payments.auth.client import GrpcAuthenticator
from payments.config import MysqlDsn
from payments.readiness import NotReady, Readiness
from payments.storage.migrate import latest_version, load_steps, migrate
from payments.storage.pool import Pool
from tests.fixtures.app import Stack
from tests.fixtures.auth import APP_API_KEY, SERVICE_NAME, FakeAuthServer
from tests.fixtures.proxy import PausableProxy

pytestmark = pytest.mark.timeout(60)

# Short, so a hidden database is seen quickly; the proxy hides it for much longer.
CHECK_TIMEOUT = 0.5


@pytest.fixture
async def proxied_pool(test_db_dsn: MysqlDsn) -> AsyncIterator[tuple[Pool, PausableProxy]]:
    """A pool on the test database through a pausable proxy."""
    proxy = PausableProxy.start(test_db_dsn.host, test_db_dsn.port)
    dsn = attrs.evolve(test_db_dsn, host="127.0.0.1", port=proxy.port, unix_socket="")
    pool = Pool(dsn, max_open=2, max_idle=2, max_lifetime_seconds=0, connect_timeout=CHECK_TIMEOUT)
    try:
        yield pool, proxy
    finally:
        proxy.resume()
        await pool.aclose()
        proxy.stop()


async def readyz(stack: Stack, readiness: Readiness) -> httpx.Response:
    server = await stack.start_http(readiness=readiness)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        return await http.get("/readyz")


async def test_ready_then_503_database_while_the_proxy_hides_it_then_ready_again(
    stack: Stack, proxied_pool: tuple[Pool, PausableProxy]
) -> None:
    pool, proxy = proxied_pool
    readiness = Readiness(pool, timeout_seconds=CHECK_TIMEOUT)
    server = await stack.start_http(readiness=readiness)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

        proxy.pause()
        hidden = await http.get("/readyz")
        assert hidden.status_code == 503, hidden.text
        assert hidden.json() == {
            "status": "not ready",
            "not_ready": [{"part": "database", "reason": "database unavailable"}],
        }
        assert "X-Request-ID" not in hidden.headers  # open route: no headers needed

        proxy.resume()
        again = await http.get("/readyz")
        assert again.status_code == 200, again.text


async def test_503_schema_when_the_database_is_behind_this_release(
    stack: Stack, empty_db_dsn: MysqlDsn
) -> None:
    latest = latest_version()
    pool = Pool(empty_db_dsn, max_open=1, max_idle=1, max_lifetime_seconds=0)
    try:
        await migrate(pool, steps=load_steps()[: latest - 1])
        behind = await readyz(stack, Readiness(pool))
        assert behind.status_code == 503, behind.text
        assert behind.json()["not_ready"] == [
            {"part": "schema", "reason": f"schema version {latest - 1} is behind {latest}"}
        ]
        await migrate(pool)
        assert (await readyz(stack, Readiness(pool))).status_code == 200
    finally:
        await pool.aclose()


async def test_auth_is_not_ready_only_after_its_cache_would_have_run_out(
    db_pool: Pool, auth_server: FakeAuthServer
) -> None:
    ttl = 0.3
    async with GrpcAuthenticator(
        auth_server.addr, APP_API_KEY, SERVICE_NAME, cache_ttl_seconds=ttl, timeout_seconds=1
    ) as auth:
        readiness = Readiness(db_pool, auth=auth)
        await auth.authenticate("test-key-orders")
        assert await readiness.check() == []

        await auth_server.stop()
        with pytest.raises(Exception, match="auth service unavailable"):
            await auth.authenticate("a-key-not-cached")
        assert await readiness.check() == [], "within the cache's cover: still ready"
        await trio.sleep(ttl * 2)
        assert await readiness.check() == [
            NotReady("auth", f"auth service unreachable for over {ttl:g} s")
        ]

        await auth_server.start()  # back: the probe sees it although no caller came
        assert await readiness.check() == []
        assert auth.unreachable_since is None
