"""Metrics and traces of the real process: /metrics on its own port, spans exported over
OTLP/HTTP to a collector on loopback, the callback's traceparent, and a one-off job's
metrics textfile."""

from __future__ import annotations

import httpx
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from e2e.harness import (
    CallbackReceiver,
    Isolated,
    ServiceProcess,
    create_body,
    eventually,
    headers,
    run_cli,
)
from tests.observability_support import new_traceparent, trace_id_of


async def scrape(service: ServiceProcess) -> dict[str, float]:
    """The process's /metrics as 'name{k="v",...}' -> value (labels sorted)."""
    port = service.env["PAYMENTS_METRICS_PORT"]
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def exported_trace_ids(collector: CallbackReceiver) -> set[str]:
    ids: set[str] = set()
    for request in collector.received:
        assert request.path == "/v1/traces"
        export = ExportTraceServiceRequest.FromString(request.body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                ids.update(span.trace_id.hex() for span in scope.spans)
    return ids


async def test_metrics_and_traces_of_a_payment_from_request_to_callback(
    isolated: Isolated, own_receiver: CallbackReceiver
) -> None:
    collector = CallbackReceiver()
    try:
        service = await isolated.aspawn(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}"}
        )
        create_trace, create_trace_id = new_traceparent()
        cancel_trace, cancel_trace_id = new_traceparent()
        async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as client:
            created = await client.post(
                "/payments",
                json=create_body(status_callback_url=own_receiver.url("/callback")),
                headers={**headers(), "traceparent": create_trace},
            )
            assert created.status_code == 201, created.text
            payment_id = created.json()["payment"]["id"]
            canceled = await client.post(
                f"/payments/{payment_id}/cancel",
                headers={**headers(), "traceparent": cancel_trace},
            )
            assert canceled.status_code == 200, canceled.text

        async def callback_arrived() -> bool:
            return bool(own_receiver.received)

        await eventually(callback_arrived)
        (callback,) = own_receiver.received
        assert trace_id_of(callback.headers["traceparent"]) == cancel_trace_id

        samples = await scrape(service)
        assert (
            samples['payments_http_requests_total{code="201",method="POST",route="/payments"}'] == 1
        )
        route = "/payments/<payment_id>/cancel"
        assert (
            samples[f'payments_http_requests_total{{code="200",method="POST",route="{route}"}}']
            == 1
        )
        assert (
            samples['payments_stripe_requests_total{operation="create_checkout",outcome="ok"}'] == 1
        )
        assert samples['payments_status_changes_total{to="CANCELED"}'] == 1
        assert samples['payments_callback_attempts_total{outcome="delivered"}'] == 1
        assert samples['payments_db_pool_connections{state="in_use"}'] == 0
        assert samples['payments_db_pool_connections{state="idle"}'] >= 1

        service.terminate()  # the last batch of spans goes out on the way down

        async def both_traces_exported() -> bool:
            return {create_trace_id, cancel_trace_id} <= exported_trace_ids(collector)

        await eventually(both_traces_exported)
    finally:
        collector.stop()


async def test_a_one_off_job_writes_its_metrics_textfile(isolated: Isolated) -> None:
    service = await isolated.aspawn({"PAYMENTS_PENDING_TIMEOUT_MINUTES": "600"})
    async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as client:
        reply = await client.post("/payments", json=create_body(), headers=headers())
    assert reply.status_code == 201, reply.text
    service.terminate()
    textfile = isolated.workdir / "expire.prom"
    env = {
        **isolated.env,
        "PAYMENTS_PENDING_TIMEOUT_MINUTES": "0",
        "PAYMENTS_METRICS_TEXTFILE": str(textfile),
    }
    done = await trio.to_thread.run_sync(run_cli, ["expire", "pending"], env, isolated.workdir)
    assert done.returncode == 0, done.stderr
    assert "EXPIRED 1" in done.stdout  # the summary is printed as before
    families = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(textfile.read_text())
        for sample in family.samples
    }
    items = ("payments_job_items_total", (("job", "expire"), ("outcome", "changed")))
    assert families[items] == 1
    assert families[("payments_status_changes_total", (("to", "EXPIRED"),))] == 1
