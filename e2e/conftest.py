"""Session fixtures of the e2e suite: real processes, started once, stopped at the end.

``e2e_db``      a fresh MariaDB database (tests/fixtures/db.py's ``mysql_server``),
                migrated by running ``payments migrate`` as a process
``sandbox``     the Stripe emulator process (``python -m payments.sandbox``)
``auth``        the purerpc FakeAuthServer, in a background thread on loopback
``service_env`` the environment ``payments serve`` runs with (ports left out)
``service``     the shared ``payments serve`` process; SIGTERM at the end must exit 0
``grpc_client`` the official grpcio client on it (session); ``http`` an httpx client
``db``          a pool on the e2e database for setup by direct SQL (per test)
``spawn``       start extra ``payments`` processes for one test (killed afterwards)
``receiver``    a status-callback endpoint on loopback (CallbackReceiver)
``isolated``    a fresh migrated database and an emulator of its own (per test), for
                workers that would otherwise reach other tests' payments
``isolated_db`` direct SQL on that database
``own_receiver`` a status-callback endpoint for one test only
``webhooks``    the emulator forwards its events to ``service`` for one test, as the
                gateway forwards Stripe's

Tests share the service, so each uses fresh request ids and resource names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.harness import (
    APP_API_KEY,
    CALLBACK_BASE_URL,
    CALLBACK_SIGNING_SECRET,
    GATEWAY,
    MAX_BODY_BYTES,
    SERVICE_NAME,
    STRIPE_KEY,
    STRIPE_WEBHOOK_SECRET,
    AuthThread,
    CallbackReceiver,
    GrpcClient,
    Isolated,
    SandboxProcess,
    ServiceProcess,
    base_env,
    forward_events,
    run_cli,
    start_service,
)
from payments.config import MysqlDsn
from payments.model import PaymentStatus
from payments.storage.pool import Pool
from tests.fixtures.db import MysqlServer, dsn_url


@pytest.fixture(scope="session")
def e2e_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Scratch directory of the run (process logs, working directories). Not pytest's
    tmp_path: concurrent pytest runs prune those. Kept for a look when a test failed or
    PAYMENTS_E2E_KEEP is set."""
    path = Path(tempfile.mkdtemp(prefix="payments-e2e-"))
    yield path
    if request.session.testsfailed or os.environ.get("PAYMENTS_E2E_KEEP"):
        print(f"\ne2e: process logs kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_db(mysql_server: MysqlServer, e2e_dir: Path) -> MysqlDsn:
    """A new database, schema applied by ``payments migrate`` (dropped at session end)."""
    dsn = mysql_server.create_database("e2e")
    env = {**base_env(e2e_dir), "MYSQL_DSN": dsn_url(dsn)}
    done = run_cli(["migrate"], env, e2e_dir)
    assert done.returncode == 0, f"payments migrate failed:\n{done.stdout}\n{done.stderr}"
    assert "schema at version" in done.stdout, done.stdout
    return dsn


@pytest.fixture(scope="session")
def sandbox(e2e_dir: Path) -> Iterator[SandboxProcess]:
    process = SandboxProcess.start(STRIPE_KEY, base_env(e2e_dir), e2e_dir)
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="session")
def auth() -> Iterator[AuthThread]:
    server = AuthThread()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_env(
    e2e_db: MysqlDsn, sandbox: SandboxProcess, auth: AuthThread, e2e_dir: Path
) -> dict[str, str]:
    """Settings of ``payments serve`` for the e2e run (HTTP_PORT/GRPC_PORT added per
    process). Stripe network retries are off so an injected fault is one failure."""
    return {
        **base_env(e2e_dir),
        "APP_SERVICE_NAME": SERVICE_NAME,
        "APP_API_KEY": APP_API_KEY,
        "AUTH_SERVICE_GRPC_ADDR": auth.addr,
        "HTTP_HOST": "127.0.0.1",
        "GRPC_HOST": "127.0.0.1",
        "MYSQL_DSN": dsn_url(e2e_db),
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "PAYMENTS_CALLBACK_SIGNING_SECRET": CALLBACK_SIGNING_SECRET,
        "STRIPE_API_BASE": sandbox.url,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "STRIPE_HTTP_TIMEOUT_SECONDS": "5",
        "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": CALLBACK_BASE_URL,
        "PAYMENTS_TRUSTED_CALLERS": GATEWAY,
        # The receivers listen on loopback, refused unless listed; most payments call
        # back orders.internal (never delivered: nothing there).
        "PAYMENTS_CALLBACK_ALLOWED_HOSTS": "127.0.0.1,orders.internal",
        "PAYMENTS_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        # Above the 1.5 s Stripe delay of test_shutdown.py; short, as an idle keep-alive
        # connection holds a stop for the whole grace (test_keepalive.py).
        "PAYMENTS_SHUTDOWN_GRACE_SECONDS": "4",
        "LOG_LEVEL": "info",
    }


@pytest.fixture(scope="session")
def service(service_env: dict[str, str], e2e_dir: Path) -> Iterator[ServiceProcess]:
    """The shared ``payments serve``: HTTP and gRPC on 127.0.0.1, free ports."""
    process = start_service(service_env, e2e_dir / "service")
    try:
        yield process
    finally:
        code = process.terminate()
    assert code == 0, f"payments serve exited {code} on SIGTERM:\n{process.log_text()[-4000:]}"


@pytest.fixture(scope="session")
def receiver() -> Iterator[CallbackReceiver]:
    endpoint = CallbackReceiver()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def grpc_client(service: ServiceProcess) -> Iterator[GrpcClient]:
    client = GrpcClient(service.grpc_target)
    yield client
    client.close()


@pytest.fixture
async def http(service: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=15) as client:
        yield client


class Database:
    """Direct SQL on the e2e database, for states a test cannot reach through the API."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def set_status(self, payment_id: int, status: PaymentStatus) -> None:
        async with self.pool.connection() as conn:
            changed = await conn.execute(
                "UPDATE payments SET status = %s WHERE id = %s", (int(status), payment_id)
            )
        assert changed == 1, f"payment {payment_id} not updated"

    async def status(self, payment_id: int) -> PaymentStatus:
        async with self.pool.connection() as conn:
            row = await conn.fetchone("SELECT status FROM payments WHERE id = %s", (payment_id,))
        assert row is not None, f"payment {payment_id} is not in the database"
        return PaymentStatus(row[0])

    async def count(self, sql: str, *args: Any) -> int:
        async with self.pool.connection() as conn:
            row = await conn.fetchone(sql, args)
        assert row is not None
        return int(row[0])

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            return [tuple(row) for row in await conn.fetchall(sql, args)]


@pytest.fixture
async def db(e2e_db: MysqlDsn) -> AsyncIterator[Database]:
    pool = Pool(e2e_db, max_open=2, max_idle=2, max_lifetime_seconds=0)
    try:
        yield Database(pool)
    finally:
        await pool.aclose()


@pytest.fixture
def spawn(service_env: dict[str, str], e2e_dir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start extra ``payments`` processes for one test; any still running at the end are
    killed (a test that cares about the exit asserts ``terminate()`` itself)."""
    started: list[ServiceProcess] = []

    def start(
        env_changes: dict[str, str | None] | None = None,
        args: tuple[str, ...] = ("serve",),
        **kw: Any,
    ) -> ServiceProcess:
        env = dict(service_env)
        for name, value in (env_changes or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        process = start_service(env, e2e_dir / f"proc-{uuid.uuid4().hex[:8]}", args=args, **kw)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def isolated(
    mysql_server: MysqlServer, service_env: dict[str, str], e2e_dir: Path
) -> Iterator[Isolated]:
    """A world of its own: a new database migrated by ``payments migrate``, a new
    emulator process, and ``service_env`` pointed at both (the Auth server is shared).
    Processes it spawned are killed and the database dropped afterwards."""
    workdir = e2e_dir / f"isolated-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    dsn = mysql_server.create_database("e2e_iso")
    try:
        env = {**base_env(workdir), "MYSQL_DSN": dsn_url(dsn)}
        done = run_cli(["migrate"], env, workdir)
        assert done.returncode == 0, f"payments migrate failed:\n{done.stdout}\n{done.stderr}"
        emulator = SandboxProcess.start(STRIPE_KEY, base_env(workdir), workdir)
        world = Isolated(
            dsn.database,
            emulator,
            {**service_env, "MYSQL_DSN": dsn_url(dsn), "STRIPE_API_BASE": emulator.url},
            workdir,
        )
        try:
            yield world
        finally:
            world.close()
    finally:
        mysql_server.drop_database(dsn.database)


@pytest.fixture
async def isolated_db(isolated: Isolated, mysql_server: MysqlServer) -> AsyncIterator[Database]:
    pool = Pool(
        mysql_server.database_dsn(isolated.database),
        max_open=2,
        max_idle=2,
        max_lifetime_seconds=0,
    )
    try:
        yield Database(pool)
    finally:
        await pool.aclose()


@pytest.fixture
def own_receiver() -> Iterator[CallbackReceiver]:
    endpoint = CallbackReceiver()
    yield endpoint
    endpoint.stop()


@pytest.fixture
async def webhooks(sandbox: SandboxProcess, service: ServiceProcess) -> AsyncIterator[None]:
    """The emulator posts its events, signed, to the shared service for one test."""
    await forward_events(sandbox, service)
    yield
    await sandbox.control("DELETE", "webhook")
