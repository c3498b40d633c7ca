"""Builds what the CLI runs: the supervision tree of ``serve``, the one-off jobs, and
the migration.

Shared resources (database pool, providers, Auth client, the dispatcher's notice
channel and the unit of work that sends on it) are opened once around the tree and
closed on the way out; the children only borrow them. Children start in the order of
``_CHILDREN`` and stop in reverse, so the servers (last) stop accepting first and the
workers (first) stop last, after the final requests' callbacks are queued.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from payments import logs
from payments.auth import Authenticator
from payments.auth.chain import FirstKnown
from payments.auth.client import GrpcAuthenticator
from payments.auth.dev_key import dev_key_entry
from payments.auth.local_keys import KeyEntry, LocalKeyAuthenticator
from payments.buildinfo import build_info
from payments.config import ConfigError, Settings
from payments.errors import DependencyUnavailable
from payments.inbound import ProviderEvents
from payments.jobs.batch import JobSummary
from payments.jobs.dispatcher import Dispatcher, DispatchNotifier, PassResult, open_notice_channel
from payments.jobs.expirer import Expirer
from payments.jobs.reconciler import Reconciler
from payments.leasing import LeasePolicy
from payments.observability import metrics, tracing
from payments.profile import (
    Profile,
    banner,
    every_interface_notice,
    listeners,
    resolve_profile,
)
from payments.providers.registry import ProviderRegistry
from payments.readiness import Readiness
from payments.service import PaymentService
from payments.storage.backends import open_database
from payments.storage.database import Database
from payments.storage.migrate import migrate as apply_schema
from payments.unit_of_work import UnitOfWork
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

if TYPE_CHECKING:  # the 3.5k-line emulator loads only when a profile runs it
    from payments.sandbox import StripeState

log = logging.getLogger("payments.runtime")

# What `serve --only` can pick, in start order.
PARTS = ("reconcile", "dispatch", "expire", "grpc", "http")
SERVERS = frozenset({"http", "grpc"})
JOBS = ("reconcile", "dispatch", "expire")

# The restart budget of the tree: past it the process exits non-zero, so the
# orchestrator (which sees the exit) restarts it from a clean slate.
INTENSITY = RestartIntensity(max_restarts=5, period=60.0)
BACKOFF = Backoff(initial=0.5, factor=2.0, max_delay=30.0, jitter=0.2, reset_after=30.0)
# Allocations between young-generation collections in ``payments serve`` (Python: 700).
GC_YOUNG_THRESHOLD = 10_000


async def migrate(settings: Settings) -> int:
    """Apply the schema to the database (MYSQL_DSN, else the SQLite file); its version."""
    database = open_database(settings)
    try:
        return await apply_schema(database)
    finally:
        await database.aclose()


@attrs.define
class Resources:
    """What the children share, opened once per process."""

    profile: Profile
    pool: Database
    providers: ProviderRegistry
    uow: UnitOfWork
    service: PaymentService
    inbound: ProviderEvents
    authenticator: Authenticator | None = None
    notices: trio.MemoryReceiveChannel[str] | None = None
    dispatcher: Dispatcher | None = None
    supervisor: Supervisor | None = None
    # The sandbox's objects outlive a restart of its child.
    sandbox_state: StripeState | None = None
    # The Auth service client when the profile uses one (readiness watches it).
    auth_client: GrpcAuthenticator | None = None

    @property
    def settings(self) -> Settings:
        return self.profile.settings

    def health(self) -> dict[str, Any]:
        """Details for /healthz: the children's states and the pool's use."""
        # /healthz is open to anyone who reaches the port: states and restart counts,
        # never error text (it goes to the log).
        children = (
            {
                name: {"state": str(status.state), "restarts": status.restarts}
                for name, status in self.supervisor.snapshot().items()
            }
            if self.supervisor is not None
            else {}
        )
        return {"children": children, "database_pool": attrs.asdict(self.pool.stats())}


def check_settings(settings: Settings, parts: Iterable[str]) -> Profile:
    """The profile these parts run with; ConfigError naming what is missing or wrong."""
    parts = set(parts)
    profile = resolve_profile(settings, serves_api=bool(parts & SERVERS))
    if "dispatch" in parts and not profile.settings.app_api_key:
        raise ConfigError("APP_API_KEY: required to send status callbacks")
    return profile


async def _open_authenticator(
    stack: AsyncExitStack, profile: Profile, auth_client: GrpcAuthenticator | None
) -> Authenticator:
    settings = profile.settings
    access = [settings.app_service_name]
    main: Authenticator
    if auth_client is not None:
        main = await stack.enter_async_context(auth_client)
    elif profile.auth == "local-keys":
        main = LocalKeyAuthenticator.load(
            settings.api_keys_file or None,
            settings.api_keys or None,
            settings.app_service_name,
            settings.trusted_callers,
        )
    else:
        dev = dev_key_entry(profile.dev_api_key, access)
        main = LocalKeyAuthenticator([dev], settings.app_service_name, settings.trusted_callers)
    if not profile.sandbox_gateway_key:
        return main
    gateway = KeyEntry.from_key(profile.sandbox_gateway_key, "stripe-sandbox", access, "sandbox")
    return FirstKnown([LocalKeyAuthenticator([gateway], settings.app_service_name), main])


@asynccontextmanager
async def open_resources(profile: Profile, parts: Iterable[str]) -> AsyncIterator[Resources]:
    """Open what ``parts`` need; close it all in reverse on the way out."""
    parts = set(parts)
    settings = profile.settings
    async with AsyncExitStack() as stack:
        database = open_database(settings)
        stack.push_async_callback(database.aclose)
        metrics.watch_pool(database)
        stack.callback(metrics.watch_pool, None)
        if profile.storage == "sqlite":
            await apply_schema(database)  # the embedded file is made and kept current here
        providers = ProviderRegistry.from_settings(settings)
        stack.push_async_callback(providers.aclose)
        dispatcher: Dispatcher | None = None
        notifier: DispatchNotifier | None = None
        notices: trio.MemoryReceiveChannel[str] | None = None
        authenticator: Authenticator | None = None
        auth_client: GrpcAuthenticator | None = None
        if "dispatch" in parts:
            # Built before the tree starts: a bad signing secret stops the start here.
            dispatcher = await stack.enter_async_context(Dispatcher(database, settings))
            notifier, notices = open_notice_channel()
        if parts & SERVERS:
            if profile.auth == "auth-service":
                auth_client = GrpcAuthenticator.from_settings(settings)
            authenticator = await _open_authenticator(stack, profile, auth_client)
        uow = UnitOfWork(database, notifier)
        yield Resources(
            profile,
            database,
            providers,
            uow,
            PaymentService(
                uow,
                providers,
                settings.provider_callback_base_url,
                LeasePolicy.from_settings(settings),
            ),
            ProviderEvents(uow, providers),
            authenticator=authenticator,
            notices=notices,
            dispatcher=dispatcher,
            auth_client=auth_client,
        )


# --- children -----------------------------------------------------------------------

ChildStart = Callable[[ChildContext], Awaitable[None]]


def _http_child(res: Resources) -> ChildStart:
    # The transports are imported by the children that serve them: a one-off job
    # (`payments callbacks dispatch`, ...) never loads quart, hypercorn or the gRPC
    # server, a quarter of a second of its start-up.
    from payments.api.http import create_http_app, serve_http

    assert res.authenticator is not None
    readiness = Readiness(res.pool, auth=res.auth_client)
    app = create_http_app(
        res.service, res.inbound, res.authenticator, res.settings, res.health, readiness
    )

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
    from payments.api.grpc import SERVICE_NAME as GRPC_SERVICE_NAME
    from payments.api.grpc import PaymentsConnectionHandler, PaymentsServicer
    from payments.api.grpc_reflection import Reflection
    from payments.api.grpc_server import serve_purerpc

    assert res.authenticator is not None
    servicer = PaymentsServicer(
        res.service,
        res.inbound,
        res.authenticator,
        max_payload_bytes=res.settings.max_body_bytes,
        callback_policy=res.settings.callback_policy(),
    )

    async def run(ctx: ChildContext) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_purerpc,
                    [servicer, *Reflection([GRPC_SERVICE_NAME]).services()],
                    res.settings.grpc_host,
                    res.settings.grpc_port,
                    handler_class=PaymentsConnectionHandler,
                    shutdown_trigger=ctx.stopping.wait,
                    grace_seconds=res.settings.shutdown_grace_seconds,
                    idle_timeout=res.settings.grpc_idle_timeout_seconds,
                )
            )
            log.info("grpc listening", extra={"host": res.settings.grpc_host, "port": port})
            ctx.started()

    return run


def _metrics_child(res: Resources) -> ChildStart:
    async def run(ctx: ChildContext) -> None:
        host = res.settings.http_host
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    metrics.serve_metrics,
                    host,
                    res.settings.metrics_port,
                    shutdown_trigger=ctx.stopping.wait,
                )
            )
            log.info("metrics listening", extra={"host": host, "port": port})
            ctx.started()

    return run


def _sandbox_child(res: Resources) -> ChildStart:
    """The emulator as a child (payments.sandbox.child), over one state kept for the
    process: a restart of the child keeps every object, and the state writes each
    change through to ``var/sandbox.sqlite`` before answering, so a restart of the
    process (even after kill -9) finds every checkout it handed out."""
    profile = res.profile
    settings = profile.settings
    # Beside the dev key: a restarted service must still find the checkouts it handed out.
    state_dir = Path(settings.sqlite_path).parent

    async def run(ctx: ChildContext) -> None:
        from payments.sandbox import sandbox_child

        if res.sandbox_state is None:
            res.sandbox_state = await trio.to_thread.run_sync(
                _load_sandbox_state, state_dir, settings.stripe_secret_key
            )
        start = sandbox_child(
            res.sandbox_state,
            port=settings.sandbox_port,
            webhook_url=settings.provider_callback_base_url,
            webhook_secret=settings.stripe_webhook_secret,
            gateway_api_key=profile.sandbox_gateway_key,
        )
        await start(ctx)

    return run


def _load_sandbox_state(state_dir: Path, secret_key: str) -> StripeState:
    """The sandbox's account from ``sandbox.sqlite`` (importing an old ``sandbox.json``
    once). An unreadable store is a start-up error: silently starting empty would
    strand every checkout already handed out."""
    from payments.sandbox.store import persistent_state

    return persistent_state(
        state_dir / "sandbox.sqlite", secret_key, legacy=state_dir / "sandbox.json"
    )


def _reconciler(res: Resources) -> Reconciler:
    return Reconciler(
        res.uow,
        res.providers,
        res.settings,
        rate_per_second=res.settings.reconcile_rate_per_second,
        concurrency=res.settings.job_concurrency,
    )


def _expirer(res: Resources) -> Expirer:
    return Expirer(
        res.uow,
        res.providers,
        res.settings,
        rate_per_second=res.settings.reconcile_rate_per_second,
        concurrency=res.settings.job_concurrency,
    )


def _dispatcher_child(res: Resources) -> ChildStart:
    assert res.dispatcher is not None
    return partial(res.dispatcher.run, notices=res.notices)


# part -> (child name, how to build its start function, its grace beyond the base)
_CHILDREN: dict[str, tuple[str, Callable[[Resources], ChildStart]]] = {
    "metrics": ("metrics", _metrics_child),
    "sandbox": ("stripe-sandbox", _sandbox_child),
    "reconcile": ("reconciler", lambda res: _reconciler(res).run),
    "dispatch": ("dispatcher", _dispatcher_child),
    "expire": ("expirer", lambda res: _expirer(res).run),
    "grpc": ("grpc", _grpc_child),
    "http": ("http", _http_child),
}


def build_children(res: Resources, parts: Iterable[str]) -> list[ChildSpec]:
    wanted = set(parts)
    unknown = wanted - set(PARTS)
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
        "sandbox": 2,
        "metrics": 2,
    }
    if res.profile.stripe == "sandbox":
        wanted.add("sandbox")  # the stand-in for Stripe runs wherever the service does
    wanted.add("metrics")  # every serve, workers too, has its /metrics
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
    profile = check_settings(settings, parts)
    settings = profile.settings
    logs.setup_from_settings(settings)
    logs.add_secrets([profile.dev_api_key, profile.sandbox_gateway_key])
    notice = every_interface_notice(profile, parts)
    log.info(
        "starting",
        extra={
            "parts": sorted(parts),
            "stand_ins": profile.stand_ins,
            "listening": {x.name: x.address for x in listeners(profile, parts)},
            **({"every_interface": notice} if notice else {}),
            **build_info(),
        },
    )
    traces = tracing.configure(settings.app_service_name)
    try:
        async with open_resources(profile, parts) as res:
            # Only once the files opened fine. The notice says plainly that a real
            # profile is open to every interface because nothing said otherwise.
            if profile.stand_ins and parts & SERVERS:
                print(banner(profile), file=sys.stderr, flush=True)
            if notice:
                print(f"payments: {notice}", file=sys.stderr, flush=True)
            res.supervisor = Supervisor(
                build_children(res, parts),
                intensity=INTENSITY,
                backoff=BACKOFF,
                name="payments",
                on_restart=metrics.child_restarted,
            )
            # What start-up made lives for the whole run: keeping it out of the
            # collector's generations removes the long full collections that made the
            # status-propagation tail (bench/README.md).
            gc.freeze()
            # Collect the young generation every 10,000 allocations instead of 700: a
            # request leaves little cyclic garbage, and under load the collector ran
            # ~20 times a second, 2.5% of serve's CPU (0.4% after; bench/README.md).
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
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
    finally:
        traces.shutdown()  # sends the last batch of spans, if exporting
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
    profile = check_settings(settings, {part})
    logs.setup_from_settings(profile.settings)
    progress = _progress(part)
    traces = tracing.configure(profile.settings.app_service_name)
    try:
        return await _run_job(profile, part, progress)
    finally:
        traces.shutdown()
        if profile.settings.metrics_textfile:  # for node_exporter's textfile collector
            metrics.write_textfile(profile.settings.metrics_textfile)


async def _run_job(profile: Profile, part: str, progress: Callable[[object], None]) -> int:
    async with open_resources(profile, {part}) as res:
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
