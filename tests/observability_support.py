"""Helpers of the observability tests: a loopback HTTP recorder (stands for a callback
receiver and for an OTLP/HTTP collector), the /metrics scrape, W3C trace ids."""

from __future__ import annotations

import secrets
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client.parser import text_string_to_metric_families


@attrs.frozen
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@attrs.define
class Recorder:
    """Answers every request 200 and keeps it."""

    url: str = ""
    requests: list[Recorded] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Recorded(scope["method"], scope["path"], headers, body))
        self._changed.set()
        self._changed = trio.Event()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int) -> list[Recorded]:
        with trio.fail_after(10):
            while len(self.requests) < count:
                await self._changed.wait()
        return self.requests


async def start_recorder(nursery: trio.Nursery) -> Recorder:
    recorder = Recorder()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds: list[str] = await nursery.start(partial(hypercorn_serve, recorder.app, config))
    recorder.url = binds[0]
    return recorder


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def new_traceparent() -> tuple[str, str]:
    """(traceparent header, its trace id) for a sampled trace from an outside caller."""
    trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01", trace_id


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]
