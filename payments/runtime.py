"""Builds what the CLI runs: the supervision tree of ``serve``, the one-off jobs, and
the migration.

Shared resources (database pool, providers, Auth client, the dispatcher's notice
channel) are opened once around the tree and closed on the way out; the children only
borrow them. Children start in the order of ``_CHILDREN`` and stop in reverse, so the
servers (last) stop accepting first and the workers (first) stop last, after the final
requests' callbacks are queued.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
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
from payments.jobs.batch import JobSummary
from payments.jobs.dispatcher import Dispatcher, DispatchNotifier, PassResult, open_notice_channel
from payments.jobs.expirer import Expirer
from payments.jobs.reconciler import Reconciler
from payments.model import Payment
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe_events import StripeEventParser
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

# What `serve --only` can pick, in start order.
PARTS = ("reconcile", "dispatch", "expire", "grpc", "http")
SERVERS = frozenset({"http", "grpc"})
JOBS = ("reconcile", "dispatch", "expire")

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
    """What the children share, opened once per process."""

    settings: Settings
    pool: Pool
    providers: ProviderRegistry
    service: PaymentService
    authenticator: GrpcAuthenticator | None = None
    notifier: DispatchNotifier | None = None
    notices: trio.MemoryReceiveChannel[int] | None = None
    dispatcher: Dispatcher | None = None
    supervisor: Supervisor | None = None

    def on_terminal(self, payment: Payment) -> None:
        """Tell the dispatcher (if this process runs one) that a payment ended."""
        if self.notifier is not None:
            self.notifier.notify(payment)

    def health(self) -> dict[str, Any]:
        """Details for /healthz: the children's states and the pool's use."""
        children = (
            {name: status.as_dict() for name, status in self.supervisor.snapshot().items()}
            if self.supervisor is not None
            else {}
        )
        return {"children": children, "database_pool": attrs.asdict(self.pool.stats())}


def check_settings(settings: Settings, parts: Iterable[str]) -> None:
    missing = settings.missing_for(parts)
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required (see config/.env.example)")


@asynccontextmanager
async def open_resources(settings: Settings, parts: Iterable[str]) -> AsyncIterator[Resources]:
    """Open what ``parts`` need; close it all in reverse on the way out."""
    parts = set(parts)
    check_settings(settings, parts)
    assert settings.mysql_dsn is not None  # checked above
    async with AsyncExitStack() as stack:
        pool = Pool.from_settings(settings)
        stack.push_async_callback(pool.aclose)
        providers = ProviderRegistry.from_settings(settings)
        stack.push_async_callback(providers.aclose)
        res = Resources(settings, pool, providers, service=None)  # type: ignore[arg-type]
        parsers = {}
        if settings.stripe_webhook_secret:
            parsers["stripe"] = StripeEventParser(
                settings.stripe_webhook_secret, settings.stripe_signature_tolerance_seconds
            )
        res.service = PaymentService(
            pool,
            providers,
            settings.provider_callback_base_url,
            on_terminal=res.on_terminal,
            event_parsers=parsers,
        )
        if "dispatch" in parts:
            # Built before the tree starts: a bad signing secret stops the start here.
            res.dispatcher = await stack.enter_async_context(Dispatcher(pool, settings))
            res.notifier, res.notices = open_notice_channel()
        if parts & SERVERS:
            res.authenticator = await stack.enter_async_context(
                GrpcAuthenticator.from_settings(settings)
            )
        yield res


# --- children -----------------------------------------------------------------------

ChildStart = Callable[[ChildContext], Awaitable[None]]


def _http_child(res: Resources) -> ChildStart:
    assert res.authenticator is not None
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


def _grpc_child(res: Resources) -> ChildStart:
    assert res.authenticator is not None
    servicer = PaymentsServicer(
        res.service, res.authenticator, max_payload_bytes=res.settings.max_body_bytes
    )

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


def _reconciler(res: Resources) -> Reconciler:
    return Reconciler(
        res.pool,
        res.providers,
        res.settings,
        on_terminal=res.on_terminal,
        rate_per_second=res.settings.reconcile_rate_per_second,
        concurrency=res.settings.job_concurrency,
    )


def _expirer(res: Resources) -> Expirer:
    return Expirer(
        res.pool,
        res.providers,
        res.settings,
        on_terminal=res.on_terminal,
        rate_per_second=res.settings.reconcile_rate_per_second,
        concurrency=res.settings.job_concurrency,
    )


def _dispatcher_child(res: Resources) -> ChildStart:
    assert res.dispatcher is not None
    return partial(res.dispatcher.run, notices=res.notices)


# part -> (child name, how to build its start function, its grace beyond the base)
_CHILDREN: dict[str, tuple[str, Callable[[Resources], ChildStart]]] = {
    "reconcile": ("reconciler", lambda res: _reconciler(res).run),
    "dispatch": ("dispatcher", _dispatcher_child),
    "expire": ("expirer", lambda res: _expirer(res).run),
    "grpc": ("grpc", _grpc_child),
    "http": ("http", _http_child),
}


def build_children(res: Resources, parts: Iterable[str]) -> list[ChildSpec]:
    wanted = set(parts)
    unknown = wanted - set(_CHILDREN)
    if unknown:
        raise ConfigError(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    settings = res.settings
    # Servers get the whole grace to drain; a worker finishes the item in hand (a
    # callback delivery or a Stripe call), bounded by its own timeout.
    graces = {
        "http": settings.shutdown_grace_seconds + 1,
        "grpc": settings.shutdown_grace_seconds + 1,
        "dispatch": settings.callback_http_timeout_seconds + 5,
        "reconcile": settings.stripe_http_timeout_seconds + 5,
        "expire": settings.stripe_http_timeout_seconds + 5,
    }
    return [
        ChildSpec(
            name=name, start=factory(res), restart=RestartPolicy.PERMANENT, grace=graces[part]
        )
        for part, (name, factory) in _CHILDREN.items()
        if part in wanted
    ]


async def serve(settings: Settings, parts: Iterable[str]) -> int:
    """Run the supervision tree until SIGTERM/SIGINT; the process exit code."""
    parts = frozenset(parts)
    check_settings(settings, parts)
    logs.setup_from_settings(settings)
    log.info("starting", extra={"parts": sorted(parts), **build_info()})
    try:
        async with open_resources(settings, parts) as res:
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


# --- one-off jobs -------------------------------------------------------------------


def _progress(job: str) -> Callable[[object], None]:
    """A progress line on a terminal (stderr), nothing when output is piped."""
    if not sys.stderr.isatty():
        return lambda _: None

    def show(progress: object) -> None:
        print(f"\r{job}: {progress}", end="", file=sys.stderr, flush=True)

    return show


async def run_job(settings: Settings, part: str) -> int:
    """One run of a job that drains its backlog in batches; prints a summary.

    Exit code 1 when the job could not do its work (database down, provider errors);
    a receiver that refuses a callback is not the job's failure: its row stays queued.
    """
    if part not in JOBS:
        raise ConfigError(f"unknown job {part!r}")
    logs.setup_from_settings(settings)
    progress = _progress(part)
    async with open_resources(settings, {part}) as res:
        summary: JobSummary | PassResult
        try:
            if part == "dispatch":
                assert res.dispatcher is not None
                summary = await res.dispatcher.drain(on_progress=progress)
                failed = False
            else:
                job = _reconciler(res) if part == "reconcile" else _expirer(res)
                summary = await job.run_pass(on_progress=progress)
                failed = summary.failed
        except DependencyUnavailable as exc:
            print(f"\n{part}: failed: {exc.message}", file=sys.stderr)
            return 1
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if isinstance(summary, PassResult):
        print(f"{part}: " + " ".join(f"{k}={v}" for k, v in attrs.asdict(summary).items()))
    else:
        print(summary)
    return 1 if failed else 0
