"""Metrics and traces (issue 12): /metrics read after driving each path, spans caught
by an in-memory exporter, the OTLP/HTTP exporter's real requests on a loopback
receiver, and the callback's traceparent carrying the trace of the request behind it."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator
from functools import partial

import attrs
import grpc
import httpx
import pytest
import trio
import trio.testing
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from payments.config import Settings
from payments.errors import ProviderUnavailable
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from payments.jobs.dispatcher import Dispatcher
from payments.model import Caller, Payment, PaymentStatus, RefundStatus
from payments.observability import metrics, tracing
from payments.providers.stripe import StripeProvider
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.database import Connection, Database
from payments.unit_of_work import Change, UnitOfWork
from supervisor import Backoff, ChildContext, ChildSpec, RestartIntensity, Supervisor
from tests.fixtures.app import KEY_A, Stack, closed_port
from tests.fixtures.db import make_payment
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY
from tests.observability_support import (
    new_traceparent,
    scrape,
    start_recorder,
    trace_id_of,
    value,
)

CONTRACT_NAMES = (
    "payments_http_requests_total",
    "payments_http_request_duration_seconds",
    "payments_grpc_requests_total",
    "payments_grpc_request_duration_seconds",
    "payments_stripe_requests_total",
    "payments_stripe_request_duration_seconds",
    "payments_status_changes_total",
    "payments_refunds_total",
    "payments_callback_attempts_total",
    "payments_callback_outbox_due",
    "payments_callback_outbox_oldest_due_seconds",
    "payments_supervisor_restarts_total",
    "payments_db_pool_connections",
    "payments_job_items_total",
)
FIXED_NAMES = (
    'payments_status_changes_total{to="PAID"}',
    'payments_status_changes_total{to="EXPIRED"}',
    'payments_refunds_total{status="PENDING"}',
    'payments_callback_attempts_total{outcome="timeout"}',
    "payments_callback_outbox_due ",
    "payments_callback_outbox_oldest_due_seconds ",
)


@pytest.fixture
async def metrics_url(nursery: trio.Nursery) -> AsyncIterator[str]:
    stop = trio.Event()
    port = await nursery.start(
        partial(metrics.serve_metrics, "127.0.0.1", 0, shutdown_trigger=stop.wait)
    )
    yield f"http://127.0.0.1:{port}"
    stop.set()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every finished span of the test, in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(previous)
    provider.shutdown()


@pytest.fixture
def not_exported() -> Iterator[TracerProvider]:
    """Tracing as ``payments serve`` sets it up without an OTLP endpoint."""
    provider = tracing.configure("payments-test", environ={})
    yield provider
    tracing.use_provider(TracerProvider())
    provider.shutdown()


async def finished_span(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The span called ``name`` once it ends: a server span ends just after the last
    byte of the response, so it may still be open when the client has the answer."""
    with trio.fail_after(5):
        while True:
            found = [span for span in spans.get_finished_spans() if span.name == name]
            if found:
                return found[-1]
            await trio.sleep(0.01)


def grpc_get(target: str, payment_id: int, traceparent: str = "") -> grpc.StatusCode:
    metadata = [("x-request-id", "g-obs"), ("x-api-key", KEY_A)]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PaymentsServiceStub(channel)
        try:
            stub.GetPayment(pb.GetPaymentRequest(id=payment_id), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def create_body() -> dict[str, object]:
    return {
        "caller_service": "svc-a",
        "resource_type": "order",
        "resource_id": "7",
        "amount_cents": 1200,
        "currency": "usd",
        "payment_method": "PAYMENT_METHOD_HOSTED_CARD",
        "payment_type": "PAYMENT_TYPE_ONE_TIME",
        "status_callback_url": "https://svc-a.internal/cb",
    }


# --- /metrics --------------------------------------------------------------------------


async def test_metrics_serves_every_contract_name_and_nothing_else(metrics_url: str) -> None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{metrics_url}/metrics")).text
        other = await client.get(f"{metrics_url}/payments")
    # Fixed label sets start at 0; the rest appear with their first event (below).
    for name in FIXED_NAMES:
        assert f"\n{name}" in text, name
    assert other.status_code == 404


async def test_http_grpc_stripe_and_status_counters_move(stack: Stack, metrics_url: str) -> None:
    before = await scrape(metrics_url)
    async with httpx.AsyncClient(base_url=stack.http.url) as client:
        created = await client.post(
            "/payments", json=create_body(), headers=stack.headers(request_id="obs-1")
        )
        assert created.status_code == 201, created.text
        payment_id = created.json()["payment"]["id"]
        got = await client.get(f"/payments/{payment_id}", headers=stack.headers())
        assert got.status_code == 200
        canceled = await client.post(f"/payments/{payment_id}/cancel", headers=stack.headers())
        assert canceled.status_code == 200
        assert (await client.get("/no/such/path/123", headers=stack.headers())).status_code == 404
    assert await trio.to_thread.run_sync(grpc_get, stack.grpc_target, payment_id) == (
        grpc.StatusCode.OK
    )
    assert await trio.to_thread.run_sync(grpc_get, stack.grpc_target, 999999999) == (
        grpc.StatusCode.NOT_FOUND
    )
    after = await scrape(metrics_url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    http = "payments_http_requests_total"
    assert moved(http, route="/payments", method="POST", code="201") == 1
    assert moved(http, route="/payments/<payment_id>", method="GET", code="200") == 1
    assert moved(http, route="/payments/<payment_id>/cancel", method="POST", code="200") == 1
    assert moved(http, route="unmatched", method="GET", code="404") == 1
    duration = "payments_http_request_duration_seconds_count"
    assert moved(duration, route="/payments", method="POST") == 1
    grpc_calls = "payments_grpc_requests_total"
    assert moved(grpc_calls, method="GetPayment", code="OK") == 1
    assert moved(grpc_calls, method="GetPayment", code="NOT_FOUND") == 1
    assert moved("payments_grpc_request_duration_seconds_count", method="GetPayment") == 2
    stripe = "payments_stripe_requests_total"
    assert moved(stripe, operation="create_checkout", outcome="ok") == 1
    assert moved(stripe, operation="cancel", outcome="ok") == 1
    assert moved("payments_stripe_request_duration_seconds_count", operation="cancel") == 1
    assert moved("payments_status_changes_total", to="CANCELED") == 1
    present = {name for name, _labels in after}
    for name in CONTRACT_NAMES:
        if name.startswith(("payments_http", "payments_grpc", "payments_stripe")):
            assert name in present or f"{name}_count" in present, name
    # Bounded labels: route templates, never a raw path or an id.
    routes = {v for _name, labels in after for k, v in labels if k == "route"}
    assert "/payments/<payment_id>" in routes
    assert not [route for route in routes if any(ch.isdigit() for ch in route)]


async def test_callback_attempts_outbox_gauges_and_dispatch_items(
    stack: Stack, metrics_url: str, nursery: trio.Nursery
) -> None:
    receiver = await start_recorder(nursery)
    payment = await stack.create_payment(status_callback_url=f"{receiver.url}/cb")
    await stack.service.cancel(Caller("svc-a"), payment.id, "changed my mind")
    async with Dispatcher(stack.pool, loopback_receivers(stack.settings)) as dispatcher:
        await dispatcher._until_next_due(60)  # the actor's gauge refresh, before delivery
        due = await scrape(metrics_url)
        before = await scrape(metrics_url)
        await dispatcher.drain()
        await dispatcher._until_next_due(60)
    after = await scrape(metrics_url)
    assert value(due, "payments_callback_outbox_due") >= 1
    assert value(due, "payments_callback_outbox_oldest_due_seconds") >= 0
    assert value(after, "payments_callback_outbox_due") == 0
    assert value(after, "payments_callback_outbox_oldest_due_seconds") == 0
    attempts = "payments_callback_attempts_total"
    assert (
        value(after, attempts, outcome="delivered") - value(before, attempts, outcome="delivered")
        == 1
    )
    items = "payments_job_items_total"
    assert (
        value(after, items, job="dispatch", outcome="delivered")
        - value(before, items, job="dispatch", outcome="delivered")
        == 1
    )
    assert len(await receiver.wait_for(1)) == 1


async def test_pool_connections_by_state(stack: Stack, metrics_url: str) -> None:
    metrics.watch_pool(stack.pool)
    try:
        async with stack.pool.connection():
            held = await scrape(metrics_url)
        released = await scrape(metrics_url)
    finally:
        metrics.watch_pool(None)
    pool = "payments_db_pool_connections"
    assert value(held, pool, state="in_use") == 1
    assert value(released, pool, state="in_use") == 0
    assert value(released, pool, state="idle") >= 1


async def test_supervisor_restarts_are_counted_by_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs = 0
    settled = trio.Event()

    async def flaky(ctx: ChildContext) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("boom")
        ctx.started()
        settled.set()
        await ctx.stopping.wait()

    before = (
        REGISTRY.get_sample_value("payments_supervisor_restarts_total", {"child": "flaky-obs"})
        or 0.0
    )
    supervisor = Supervisor(
        [ChildSpec(name="flaky-obs", start=flaky)],
        intensity=RestartIntensity(max_restarts=5, period=60),
        backoff=Backoff(initial=0.1, jitter=0),
        on_restart=metrics.child_restarted,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await settled.wait()
        supervisor.shutdown()
    restarts = REGISTRY.get_sample_value(
        "payments_supervisor_restarts_total", {"child": "flaky-obs"}
    )
    assert restarts == before + 2


# --- traces ----------------------------------------------------------------------------


async def test_an_http_request_continues_the_callers_trace_through_db_and_stripe(
    stack: Stack, spans: InMemorySpanExporter
) -> None:
    traceparent, trace_id = new_traceparent()
    headers = {**stack.headers(request_id="obs-trace"), "traceparent": traceparent}
    async with httpx.AsyncClient(base_url=stack.http.url) as client:
        response = await client.post("/payments", json=create_body(), headers=headers)
    assert response.status_code == 201, response.text
    server = await finished_span(spans, "POST /payments")
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert server.kind is SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == trace_id
    assert (
        server.parent is not None
        and format(server.parent.span_id, "016x") == (traceparent.split("-")[2])
    )
    assert server.attributes is not None and server.attributes["http.route"] == "/payments"
    in_trace = {span.context.span_id for span in finished.values()}
    for name in ("db transaction", "stripe create_checkout"):
        child = finished[name]
        assert format(child.context.trace_id, "032x") == trace_id, name
        assert child.parent is not None and child.parent.span_id in in_trace, name


async def test_a_grpc_call_continues_the_traceparent_in_its_metadata(
    stack: Stack, spans: InMemorySpanExporter
) -> None:
    payment = await stack.create_payment()
    traceparent, trace_id = new_traceparent()
    code = await trio.to_thread.run_sync(grpc_get, stack.grpc_target, payment.id, traceparent)
    assert code == grpc.StatusCode.OK
    server = await finished_span(spans, "payments.PaymentsService/GetPayment")
    assert server.kind is SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == "OK"


async def test_the_callback_carries_the_trace_of_the_request_that_ended_the_payment(
    stack: Stack, nursery: trio.Nursery, not_exported: TracerProvider
) -> None:
    """With tracing not exported (no endpoint): the context is still made, stored with
    the outbox row and sent in the callback's traceparent."""
    receiver = await start_recorder(nursery)
    payment = await stack.create_payment(status_callback_url=f"{receiver.url}/cb")
    traceparent, trace_id = new_traceparent()
    headers = {**stack.headers(request_id="obs-cancel"), "traceparent": traceparent}
    async with httpx.AsyncClient(base_url=stack.http.url) as client:
        response = await client.post(f"/payments/{payment.id}/cancel", headers=headers)
    assert response.status_code == 200, response.text
    async with stack.pool.connection() as conn:
        (entry,) = await outbox.entries_for_payment(conn, payment.id)
    assert trace_id_of(entry.traceparent) == trace_id
    async with Dispatcher(stack.pool, loopback_receivers(stack.settings)) as dispatcher:
        await dispatcher.drain()
    (callback,) = await receiver.wait_for(1)
    assert trace_id_of(callback.headers["traceparent"]) == trace_id
    assert callback.headers["traceparent"] != entry.traceparent  # the attempt's own span


async def test_a_provider_event_s_trace_reaches_the_callback(
    stack: Stack, spans: InMemorySpanExporter, nursery: trio.Nursery
) -> None:
    """A payment ended by a Stripe event: the callback's span is a child in the trace
    of the forwarded event's request."""
    receiver = await start_recorder(nursery)
    payment = await stack.create_payment(status_callback_url=f"{receiver.url}/cb")
    stack.sandbox.state.expire_session(payment.provider_payment_id)
    await stack.events_delivered()
    assert (await stack.payment(payment.id)).status is PaymentStatus.EXPIRED
    async with Dispatcher(stack.pool, loopback_receivers(stack.settings)) as dispatcher:
        await dispatcher.drain()
    (callback,) = await receiver.wait_for(1)
    event_request = await finished_span(
        spans, "POST /webhooks/providers/<provider>/<callback_hash>"
    )
    attempt = await finished_span(spans, "callback attempt")
    assert attempt.context.trace_id == event_request.context.trace_id
    assert trace_id_of(callback.headers["traceparent"]) == format(attempt.context.trace_id, "032x")


async def test_the_otlp_exporter_posts_spans_to_the_endpoint(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = await start_recorder(nursery)
    monkeypatch.setenv(tracing.ENDPOINT_VARIABLE, collector.url)
    provider = tracing.configure("payments-otlp-test")
    try:
        traceparent, trace_id = new_traceparent()
        with tracing.span("exported", parent=tracing.extract({"traceparent": traceparent})):
            pass
        # The batch processor posts from its own thread (blocking): keep trio free.
        assert await trio.to_thread.run_sync(provider.force_flush)
        (request,) = await collector.wait_for(1)
    finally:
        tracing.use_provider(TracerProvider())
        await trio.to_thread.run_sync(provider.shutdown)
    assert (request.method, request.path) == ("POST", "/v1/traces")
    assert request.headers["content-type"] == "application/x-protobuf"
    export = ExportTraceServiceRequest.FromString(request.body)
    (resource_spans,) = export.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "payments-otlp-test"
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert span.name == "exported" and span.trace_id.hex() == trace_id


def test_without_an_endpoint_nothing_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_VARIABLE, raising=False)
    provider = tracing.configure("payments-quiet")
    try:
        with tracing.span("made") as made:
            assert tracing.current_traceparent().split("-")[1] == format(
                made.get_span_context().trace_id, "032x"
            )
        assert not provider._active_span_processor._span_processors
    finally:
        tracing.use_provider(TracerProvider())
        provider.shutdown()


@pytest.mark.parametrize(
    "incoming",
    [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",  # not sampled upstream
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",  # random trace id flag
    ],
)
def test_a_span_not_exported_carries_the_context_the_sdk_would_give_it(
    incoming: str, not_exported: TracerProvider
) -> None:
    """Without an exporter a span records nothing, but its trace id, flags and
    tracestate are the SDK's own (the callbacks and outgoing calls carry them)."""
    carrier = {"traceparent": incoming, "tracestate": "vendor=abc"} if incoming else {}
    parent = tracing.extract(carrier)
    with tracing.span("quiet", kind=SpanKind.SERVER, parent=parent) as quiet:
        sent: dict[str, str] = {}
        tracing.inject(sent)
        assert tracing.current_traceparent() == sent["traceparent"]
        with tracing.span("child") as child:
            assert child.get_span_context().trace_id == quiet.get_span_context().trace_id
    assert not quiet.is_recording()
    assert tracing.current_traceparent() == ""  # no longer current after the block
    tracing.use_provider(TracerProvider())  # recording, as with an exporter
    with tracing.span("recorded", kind=SpanKind.SERVER, parent=parent) as recorded:
        recording = recorded.is_recording()
    made, expected = quiet.get_span_context(), recorded.get_span_context()
    assert recording == made.trace_flags.sampled  # the SDK's own choice
    assert (made.trace_flags, made.trace_state, made.is_remote) == (
        expected.trace_flags,
        expected.trace_state,
        expected.is_remote,
    )
    assert made.span_id != expected.span_id and made.is_valid
    if incoming:
        assert made.trace_id == expected.trace_id == int(incoming.split("-")[1], 16)
    assert sent["traceparent"].split("-")[2] == format(made.span_id, "016x")
    assert sent.get("tracestate", "") == carrier.get("tracestate", "")


# --- status changes, Stripe outcomes, trio tasks ------------------------------------------


@attrs.define
class RefundLike:
    """A second status machine (refund statuses) moved by the unit of work; its rows
    are the refunds branch's business, so it writes none."""

    payment: Payment
    status: RefundStatus = RefundStatus.PENDING

    def allows(self, new: enum.IntEnum) -> bool:
        return new != self.status

    def is_terminal(self, status: enum.IntEnum) -> bool:
        return False

    async def record(
        self, conn: Connection, new: enum.IntEnum, change: Change, *, applied: bool
    ) -> None:
        return None

    async def apply(self, conn: Connection, new: enum.IntEnum, change: Change) -> None:
        self.status = RefundStatus(new)

    def callback_body(self) -> dict[str, object]:
        return {}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_status_changes_count_once_committed_and_refunds_by_status(
    database: Database,
) -> None:
    uow = UnitOfWork(database)
    payment = make_payment(status=PaymentStatus.PENDING)
    async with database.transaction() as conn:
        payment.id = await repo.insert_payment(conn, payment)
    paid = partial(sample, "payments_status_changes_total", to="PAID")
    succeeded = partial(sample, "payments_refunds_total", status="SUCCEEDED")
    before_paid, before_succeeded = paid(), succeeded()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with uow.begin() as work:
            current = await repo.get_payment(work.conn, payment.id, for_update=True)
            assert current is not None
            assert await work.change_status(current, PaymentStatus.PAID, reason="rolled back")
            raise Boom
    assert paid() == before_paid  # rolled back: never counted
    async with uow.begin() as work:
        current = await repo.get_payment(work.conn, payment.id, for_update=True)
        assert current is not None
        assert await work.change_status(current, PaymentStatus.PAID, reason="kept")
        refund = RefundLike(current)
        assert await work.change_status(
            current, RefundStatus.SUCCEEDED, reason="refunded", subject=refund
        )
    assert paid() == before_paid + 1
    assert succeeded() == before_succeeded + 1


async def test_bulk_status_changes_are_counted_once_committed(database: Database) -> None:
    uow = UnitOfWork(database)
    payments = [make_payment(status=PaymentStatus.PENDING) for _ in range(3)]
    payments.append(make_payment(status=PaymentStatus.PAID))  # terminal: does not move
    async with database.transaction() as conn:
        for payment in payments:
            payment.id = await repo.insert_payment(conn, payment)
    expired = partial(sample, "payments_status_changes_total", to="EXPIRED")
    before = expired()

    async def expire_all(boom: bool) -> None:
        async with uow.begin() as work:
            current = [await repo.get_payment(work.conn, p.id, for_update=True) for p in payments]
            assert all(current)
            moved = await work.change_statuses(
                [p for p in current if p], PaymentStatus.EXPIRED, reason="bulk"
            )
            assert len(moved) == 3
            if boom:
                raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await expire_all(boom=True)
    assert expired() == before  # rolled back: never counted
    await expire_all(boom=False)
    assert expired() == before + 3


async def test_stripe_failures_are_counted_by_outcome(stack: Stack) -> None:
    payment = await stack.create_payment()
    down = StripeProvider(
        SANDBOX_SECRET_KEY, api_base=f"http://127.0.0.1:{closed_port()}", max_network_retries=0
    )
    unavailable = partial(
        sample, "payments_stripe_requests_total", operation="fetch_state", outcome="unavailable"
    )
    before = unavailable()
    try:
        with pytest.raises(ProviderUnavailable):
            await down.fetch_state(payment)
    finally:
        await down.aclose()
    assert unavailable() == before + 1


async def test_spans_follow_trio_tasks_and_never_leak_into_siblings(
    spans: InMemorySpanExporter,
) -> None:
    """Contextvars under trio: a task started inside a span sees it as its parent; a
    span opened in one task is not the current span of its sibling."""
    seen: dict[str, str] = {}
    opened = trio.Event()

    async def opens_its_own() -> None:
        with tracing.span("sibling-own"):
            opened.set()
            await trio.sleep(0.01)

    async def sibling() -> None:
        await opened.wait()
        seen["sibling"] = tracing.current_traceparent()

    async def child() -> None:
        seen["child"] = tracing.current_traceparent()

    with tracing.span("outer") as outer:
        outer_id = format(outer.get_span_context().span_id, "016x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        assert seen["child"].split("-")[2] == outer_id
    async with trio.open_nursery() as nursery:
        nursery.start_soon(opens_its_own)
        nursery.start_soon(sibling)
    assert seen["sibling"] == ""


def loopback_receivers(settings: Settings) -> Settings:
    """The stack's settings with the tests' loopback receivers allowed at delivery."""
    return attrs.evolve(settings, callback_allowed_hosts=("127.0.0.1",))
