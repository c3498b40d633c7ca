"""OpenTelemetry traces: the provider, W3C trace-context propagation, span helpers.

The SDK's tracer provider is always in place, so a request without an incoming
``traceparent`` still gets a trace id and the callback it causes carries it (CONTRACT.md,
"Operations endpoints"). Spans are exported (OTLP/HTTP, batched on the SDK's own thread)
only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Otherwise nothing would ever read a
span's name, attributes or timings, so :func:`span` makes a non-recording span: the
same trace id, span id, flags and tracestate as the SDK would give it (the provider's
id generator and sampler decide them), current while the block runs, so propagation is
unchanged; building and ending the SDK's recording span was ~50 us of every request
(bench/README.md).

The module keeps its own provider instead of the API's global one (which can be set
once per process): the service configures it at start, tests swap in one with an
in-memory exporter. The current span lives in a contextvar, and trio gives each task a
copy of its parent's context at spawn, so spans opened around a nursery reach the
tasks started in it (quart-trio's request task, purerpc's handler) and a span opened in
a task never leaks into its siblings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACEPARENT = "traceparent"
INSTRUMENTATION_NAME = "payments"

_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    provider: TracerProvider = TracerProvider()
    tracer: trace.Tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    recording: bool = True  # False: spans only carry the context (nothing exports them)


def use_provider(provider: TracerProvider, *, recording: bool = True) -> TracerProvider:
    """Make ``provider`` the one spans go to; returns the previous one. ``recording``
    False says no span processor will ever be added: spans then only carry context."""
    previous = _State.provider
    _State.provider = provider
    _State.tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    _State.recording = recording
    return previous


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """Install the process's provider; with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans
    go to it over OTLP/HTTP (the exporter reads the standard OTEL_* variables itself).
    Call ``shutdown()`` on the result at exit so the last batch is sent."""
    environ = os.environ if environ is None else environ
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    exporting = bool(environ.get(ENDPOINT_VARIABLE, "").strip())
    if exporting:
        # Imported only when used: the exporter pulls in requests and protobuf encoders.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use_provider(provider, recording=exporting)
    return provider


def extract(carrier: Mapping[str, str]) -> Context:
    """The trace context a ``traceparent`` (and ``tracestate``) in ``carrier`` names;
    an empty context when there is none or it is malformed (a new trace then starts)."""
    return _PROPAGATOR.extract(carrier)


def carrier_from_pairs(pairs: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    """The trace-context headers out of ASGI headers or gRPC metadata (other keys
    are not copied)."""
    found: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        name = name.lower()
        if name in _PROPAGATOR.fields:
            value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
            found[name] = value
    return found


def current_traceparent() -> str:
    """The current span's ``traceparent`` header value ('' outside any span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def inject(headers: dict[str, str]) -> None:
    """Add the current span's trace-context headers to outgoing ``headers``."""
    _PROPAGATOR.inject(headers)


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    errors_from_exceptions: bool = True,
) -> AbstractContextManager[Span]:
    """A current span around the block (child of ``parent``, else of the current one).
    An exception escaping the block marks it as an error unless
    ``errors_from_exceptions`` is False (the caller then judges, say a gRPC NOT_FOUND).
    Without an exporter the span is non-recording (see the module docstring)."""
    if not _State.recording:
        return _CurrentSpan(_context_only_span(name, kind, parent, attributes))
    return _State.tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        record_exception=errors_from_exceptions,
        set_status_on_exception=errors_from_exceptions,
    )


class _CurrentSpan(AbstractContextManager[Span]):
    """A non-recording span made current for the block: a plain class, not a
    @contextmanager generator (every request opens one: 3.9 -> 3.0 us per span)."""

    __slots__ = ("_span", "_token")

    def __init__(self, current: Span) -> None:
        self._span = current
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        context_api.detach(self._token)  # type: ignore[arg-type]


def _context_only_span(
    name: str,
    kind: SpanKind,
    parent: Context | None,
    attributes: Mapping[str, AttributeValue] | None,
) -> NonRecordingSpan:
    """The span context the SDK's ``Tracer.start_span`` would make (same ids, sampler
    decision, flags and tracestate), as a non-recording span: nothing is recorded."""
    provider = _State.provider
    parent_context = trace.get_current_span(parent).get_span_context()
    ids = provider.id_generator
    if parent_context.is_valid:
        trace_id = parent_context.trace_id
        random_trace_id = parent_context.trace_flags.random_trace_id
    else:
        trace_id = ids.generate_trace_id()
        random_trace_id = ids.is_trace_id_random()
    decision = provider.sampler.should_sample(parent, trace_id, name, kind, attributes)
    flags = TraceFlags.SAMPLED if decision.decision.is_sampled() else TraceFlags.DEFAULT
    if random_trace_id:
        flags |= TraceFlags.RANDOM_TRACE_ID
    context = SpanContext(
        trace_id,
        ids.generate_span_id(),
        is_remote=False,
        trace_flags=TraceFlags(flags),
        trace_state=decision.trace_state,
    )
    return NonRecordingSpan(context)


def mark_error(current: Span, description: str) -> None:
    """Set the span's status to ERROR with a short description (no secrets)."""
    current.set_status(Status(StatusCode.ERROR, description))
