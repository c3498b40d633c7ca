"""Prometheus metrics: every name of CONTRACT.md "Operations endpoints", and the
``/metrics`` server on its own port (PAYMENTS_METRICS_PORT, default 9464, on HTTP_HOST).

The metrics live in prometheus-client's default registry, beside its process and GC
collectors. Label values come from fixed sets only (route templates, gRPC method names,
status names, outcome words), never from raw paths, ids or caller input, so the number
of series stays bounded whatever callers send.

Buckets: the API answers in milliseconds (a database round trip or two; ~1 ms for a
cached auth and a point read), tens of milliseconds when it writes, and up to the
Stripe timeout (10 s) when a create waits on Stripe; Stripe itself answers in 100 ms to
a few seconds, retries included up to tens of seconds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_asgi_app, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from payments.model import PaymentStatus, RefundStatus
from payments.storage.database import Database

log = logging.getLogger("payments.observability.metrics")

DEFAULT_PORT = 9464
METRICS_PATH = "/metrics"

API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STRIPE_BUCKETS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 6.0, 10.0, 20.0, 40.0)

HTTP_REQUESTS = Counter(
    "payments_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "code"],
)
HTTP_DURATION = Histogram(
    "payments_http_request_duration_seconds",
    "HTTP request latency, from the request's arrival to the end of its response.",
    ["route", "method"],
    buckets=API_BUCKETS,
)
GRPC_REQUESTS = Counter(
    "payments_grpc_requests",
    "gRPC calls answered, by method and status code name.",
    ["method", "code"],
)
GRPC_DURATION = Histogram(
    "payments_grpc_request_duration_seconds",
    "gRPC call latency, handler included, by method.",
    ["method"],
    buckets=API_BUCKETS,
)
STRIPE_REQUESTS = Counter(
    "payments_stripe_requests",
    "Calls to Stripe by operation and outcome (ok, rejected, unavailable, error).",
    ["operation", "outcome"],
)
STRIPE_DURATION = Histogram(
    "payments_stripe_request_duration_seconds",
    "Stripe call latency by operation (the SDK's network retries included).",
    ["operation"],
    buckets=STRIPE_BUCKETS,
)
STATUS_CHANGES = Counter(
    "payments_status_changes",
    "Committed payment status changes, by the status moved to.",
    ["to"],
)
REFUNDS = Counter(
    "payments_refunds",
    "Committed refund status changes, by the status moved to.",
    ["status"],
)
CALLBACK_ATTEMPTS = Counter(
    "payments_callback_attempts",
    "Status-callback HTTP attempts by outcome (delivered, refused, timeout, error).",
    ["outcome"],
)
OUTBOX_DUE = Gauge(
    "payments_callback_outbox_due",
    "Status callbacks due now and not delivered yet (as last seen by this dispatcher).",
)
OUTBOX_OLDEST_DUE = Gauge(
    "payments_callback_outbox_oldest_due_seconds",
    "How long the oldest due status callback has been waiting (0 when none is due).",
)
SUPERVISOR_RESTARTS = Counter(
    "payments_supervisor_restarts",
    "Restarts of a supervised child after it failed.",
    ["child"],
)
JOB_ITEMS = Counter(
    "payments_job_items",
    "Items the jobs worked, by job and outcome.",
    ["job", "outcome"],
)
POOL_STATES = ("idle", "in_use", "connecting", "waiting")
# Label sets are bounded (module docstring), so every series' child can be kept: the
# lookup by labels costs a tuple, a lock and a dict per call, twice per request.
_SERIES_CACHE = 4096


@functools.lru_cache(maxsize=_SERIES_CACHE)
def http_series(route: str, method: str, code: str) -> tuple[Histogram, Counter]:
    """The latency histogram and the request counter of one HTTP route/method/code."""
    return HTTP_DURATION.labels(route, method), HTTP_REQUESTS.labels(route, method, code)


@functools.lru_cache(maxsize=_SERIES_CACHE)
def grpc_series(method: str, code: str) -> tuple[Histogram, Counter]:
    """The latency histogram and the call counter of one gRPC method/status code."""
    return GRPC_DURATION.labels(method), GRPC_REQUESTS.labels(method, code)


CALLBACK_OUTCOMES = ("delivered", "refused", "timeout", "error")


def _start_at_zero() -> None:
    """Series whose label values are a fixed set exist from the start at 0, so a
    ``rate()`` or ``increase()`` over them sees their first event."""
    for status in PaymentStatus:
        if status is not PaymentStatus.UNSPECIFIED:
            STATUS_CHANGES.labels(status.name)
    for refund_status in RefundStatus:
        if refund_status is not RefundStatus.UNSPECIFIED:
            REFUNDS.labels(refund_status.name)
    for outcome in CALLBACK_OUTCOMES:
        CALLBACK_ATTEMPTS.labels(outcome)


_start_at_zero()


class PoolCollector(Collector):
    """``payments_db_pool_connections{state}``, read from the pool at scrape time (the
    pool's own counters, so nothing is updated on the hot path)."""

    def __init__(self) -> None:
        self.database: Database | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "payments_db_pool_connections",
            "Database sessions by state (waiting: tasks waiting for one).",
            labels=["state"],
        )
        if self.database is not None:
            stats = self.database.stats()
            for state in POOL_STATES:
                family.add_metric([state], getattr(stats, state))
        yield family


POOL = PoolCollector()
REGISTRY.register(POOL)


def watch_pool(database: Database | None) -> None:
    """Report ``database``'s sessions (None: stop reporting)."""
    POOL.database = database


def record_outbox_backlog(due: int, oldest_due: datetime | None, now: datetime) -> None:
    OUTBOX_DUE.set(due)
    OUTBOX_OLDEST_DUE.set(0.0 if oldest_due is None else max((now - oldest_due).total_seconds(), 0))


def child_restarted(child: str) -> None:
    """The supervisor's restart hook."""
    SUPERVISOR_RESTARTS.labels(child).inc()


def job_item(job: str, outcome: str) -> None:
    JOB_ITEMS.labels(job, outcome).inc()


def write_textfile(path: str) -> None:
    """Write every metric to ``path`` atomically (a one-off job's figures, for
    node_exporter's textfile collector); a failure is logged, not raised."""
    try:
        write_to_textfile(path, REGISTRY)
    except OSError as exc:
        log.warning("metrics textfile not written", extra={"file": path, "error": str(exc)})


# --- the /metrics server ---------------------------------------------------------------

Asgi = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def metrics_app() -> Asgi:
    """ASGI app: ``GET /metrics`` in the Prometheus text format (gzip when asked),
    404 elsewhere; answers the lifespan protocol so hypercorn starts it quietly."""
    exposition = make_asgi_app(REGISTRY)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == METRICS_PATH and scope["method"] in ("GET", "HEAD"):
            await exposition(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"not found\n"})

    return app


async def serve_metrics(
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on host:port until ``shutdown_trigger`` returns; reports the
    bound port (so port 0 works)."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, metrics_app(), config, shutdown_trigger=shutdown_trigger)
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
