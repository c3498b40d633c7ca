"""Builds what the CLI runs: the supervision tree of ``serve`` and the migration.

Shared resources (database pool, providers, Auth client) are opened once around the
tree and closed on the way out; the children (``http``, ``grpc``) only borrow them.
Stop order is the reverse of the list, so servers listed last stop accepting first.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from payments import logs
from payments.api.auth import GrpcAuthenticator
from payments.api.grpc import PaymentsConnectionHandler, PaymentsServicer
from payments.api.grpc_server import serve_purerpc
from payments.api.http import create_http_app, serve_http
from payments.buildinfo import build_info
from payments.config import ConfigError, Settings
from payments.errors import DependencyUnavailable
from payments.providers.registry import ProviderRegistry
from payments.service import PaymentService
from payments.storage.migrate import migrate as apply_schema
from payments.storage.pool import Pool
from supervisor import (
    Backoff,
    ChildContext,
    ChildSpec,
    RestartIntensity,
    RestartPolicy,
    Supervisor,
    SupervisorEscalation,
    run_until_signal,
)

log = logging.getLogger("payments.runtime")

# The restart budget of the tree: past it the process exits non-zero, so the
# orchestrator (which sees the exit) restarts it from a clean slate.
INTENSITY = RestartIntensity(max_restarts=5, period=60.0)
BACKOFF = Backoff(initial=0.5, factor=2.0, max_delay=30.0, jitter=0.2, reset_after=30.0)


async def migrate(settings: Settings) -> int:
    """Apply schema.sql to MYSQL_DSN; the schema version afterwards."""
    if settings.mysql_dsn is None:
        raise ConfigError("MYSQL_DSN: required by migrate")
    pool = Pool(settings.mysql_dsn, max_open=1, max_idle=1)
    try:
        return await apply_schema(pool)
    finally:
        await pool.aclose()


@attrs.define
class Resources:
    """What every child shares, opened once per process."""

    settings: Settings
    pool: Pool
    providers: ProviderRegistry
    authenticator: GrpcAuthenticator
    service: PaymentService
    supervisor: Supervisor | None = None

    def health(self) -> dict[str, Any]:
        """Details for /healthz: the children's states and the pool's use."""
        children = (
            {name: status.as_dict() for name, status in self.supervisor.snapshot().items()}
            if self.supervisor is not None
            else {}
        )
        return {"children": children, "database_pool": attrs.asdict(self.pool.stats())}


@asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    """Open the pool, providers and Auth client; close them in reverse on the way out."""
    if settings.mysql_dsn is None:
        raise ConfigError("MYSQL_DSN: required")
    pool = Pool.from_settings(settings)
    providers = ProviderRegistry.from_settings(settings)
    try:
        async with GrpcAuthenticator.from_settings(settings) as authenticator:
            service = PaymentService(pool, providers, settings.provider_callback_base_url)
            yield Resources(settings, pool, providers, authenticator, service)
    finally:
        with trio.CancelScope(shield=True):
            await providers.aclose()
            await pool.aclose()


def _http_child(res: Resources) -> Callable[[ChildContext], Awaitable[None]]:
    app = create_http_app(res.service, res.authenticator, res.settings, res.health)

    async def run(ctx: ChildContext) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_http,
                    app,
                    res.settings.http_host,
                    res.settings.http_port,
                    shutdown_trigger=ctx.stopping.wait,
                )
            )
            log.info("http listening", extra={"host": res.settings.http_host, "port": port})
            ctx.started()

    return run


def _grpc_child(res: Resources) -> Callable[[ChildContext], Awaitable[None]]:
    servicer = PaymentsServicer(res.service, res.authenticator)

    async def run(ctx: ChildContext) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_purerpc,
                    [servicer],
                    res.settings.grpc_host,
                    res.settings.grpc_port,
                    handler_class=PaymentsConnectionHandler,
                    shutdown_trigger=ctx.stopping.wait,
                    grace_seconds=res.settings.shutdown_grace_seconds,
                )
            )
            log.info("grpc listening", extra={"host": res.settings.grpc_host, "port": port})
            ctx.started()

    return run


# Children in start order; stop order is the reverse.
_CHILDREN: dict[str, Callable[[Resources], Callable[[ChildContext], Awaitable[None]]]] = {
    "grpc": _grpc_child,
    "http": _http_child,
}


def build_children(res: Resources, parts: Iterable[str]) -> list[ChildSpec]:
    wanted = set(parts)
    unknown = wanted - set(_CHILDREN)
    if unknown:
        raise ConfigError(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    # A server gets the whole grace to drain; one more second covers its own teardown.
    grace = res.settings.shutdown_grace_seconds + 1
    return [
        ChildSpec(name=name, start=factory(res), restart=RestartPolicy.PERMANENT, grace=grace)
        for name, factory in _CHILDREN.items()
        if name in wanted
    ]


async def serve(settings: Settings, parts: Iterable[str]) -> int:
    """Run the supervision tree until SIGTERM/SIGINT; the process exit code."""
    missing = settings.missing_for_serve()
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required by serve (see config/.env.example)")
    logs.setup_from_settings(settings)
    log.info("starting", extra={"parts": sorted(parts), **build_info()})
    try:
        async with open_resources(settings) as res:
            res.supervisor = Supervisor(
                build_children(res, parts), intensity=INTENSITY, backoff=BACKOFF, name="payments"
            )
            await run_until_signal(res.supervisor)
    except SupervisorEscalation as exc:
        log.error(
            "giving up: a child failed too often",
            extra={"child": exc.child},
            exc_info=exc.__cause__,
        )
        return 1
    except DependencyUnavailable as exc:
        log.error("start-up failed", extra={"error": exc.message})
        return 1
    log.info("stopped")
    return 0
