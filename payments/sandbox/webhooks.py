"""Webhook delivery: the emulator posts every event it emits, signed as Stripe signs.

Stripe signs the exact body it sends: ``Stripe-Signature: t=<unix>,v1=<hex>`` where the
hex is HMAC-SHA256 of ``"<t>.<body>"`` under the endpoint's secret (a fresh ``t`` on
every attempt). The body is the event JSON, pretty-printed as Stripe sends it, so a
receiver that re-serializes before checking fails here as it would in production.

Stripe cannot address the service's per-payment URL itself; a gateway in between does
(and adds ``X-Request-ID`` and its ``X-API-Key``), so the emulator plays both: it posts
to the endpoint base plus the object's ``metadata.callback_hash`` with those headers, or
wraps the event in the gateway's envelope ``{"payload": ..., "signature": ...}``.

Delivery runs in the background, in the sandbox server's nursery: emitting stays
synchronous and never waits on the receiver. Each event gets its own task (Stripe
delivers concurrently, so order is not guaranteed), retried after a non-2xx answer or
no answer per ``retry_delays``; every attempt is recorded in ``state.deliveries``.
:meth:`WebhookSender.wait_idle` lets a test wait until everything sent is answered.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import time
from typing import Any

import attrs
import httpx
import trio

from payments.sandbox import money
from payments.sandbox.state import DeliveryRecord, StripeState, WebhookEndpoint, new_id

log = logging.getLogger("payments.sandbox.webhooks")

USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"


def stripe_signature(body: str | bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header value Stripe sends for ``body`` at ``timestamp``."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    signed = str(timestamp).encode("ascii") + b"." + raw
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event_body(event: dict[str, Any]) -> str:
    """The body Stripe posts for an event (two-space indented JSON)."""
    return json.dumps(event, indent=2)


def callback_hash_of(obj: dict[str, Any]) -> str:
    """Our ``metadata.callback_hash`` on an event's object (session, link, subscription,
    invoice: under ``parent.subscription_details`` or on its lines), or ""."""
    parent = obj.get("parent") or {}
    candidates = [
        obj.get("metadata"),
        (parent.get("subscription_details") or {}).get("metadata"),
        *(line.get("metadata") for line in (obj.get("lines") or {}).get("data", [])),
    ]
    for metadata in candidates:
        if isinstance(metadata, dict) and metadata.get("callback_hash"):
            return str(metadata["callback_hash"])
    return ""


def delivery_url(endpoint: WebhookEndpoint, event: dict[str, Any], fallback: str = "") -> str:
    """Where the gateway forwards ``event``: the endpoint base plus the callback hash
    (``fallback`` when the object carries none: a charge or refund goes where its
    payment's events went)."""
    callback_hash = callback_hash_of(event["data"]["object"]) or fallback
    if "{callback_hash}" in endpoint.url:
        return endpoint.url.replace("{callback_hash}", callback_hash)
    if not callback_hash:
        return endpoint.url  # nowhere better to go; the answer shows in the record
    return f"{endpoint.url.rstrip('/')}/{callback_hash}"


@attrs.frozen
class _Job:
    event: dict[str, Any]
    endpoint: WebhookEndpoint


class WebhookSender:
    """Posts the events of one :class:`StripeState` to its ``webhook`` endpoint."""

    def __init__(self, state: StripeState) -> None:
        self.state = state
        self._send, self._receive = trio.open_memory_channel[_Job](math.inf)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def _listener(self, event: dict[str, Any]) -> None:
        if self.state.webhook is not None:
            self._enqueue(event, self.state.webhook)

    def _enqueue(self, event: dict[str, Any], endpoint: WebhookEndpoint) -> None:
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1
        self._send.send_nowait(_Job(copy.deepcopy(event), endpoint))

    def resend(self, event_id: str) -> dict[str, Any]:
        """Deliver a recorded event again, same id and body (a fresh signature), as
        Stripe's "resend" does. KeyError for an unknown event, ValueError without an
        endpoint."""
        event = self.state.event(event_id)
        if self.state.webhook is None:
            raise ValueError("no webhook endpoint is configured")
        self._enqueue(event, self.state.webhook)
        return event

    @property
    def pending(self) -> int:
        """Events sent or still to be retried."""
        return self._pending

    async def wait_idle(self) -> None:
        """Return once every queued event is delivered or has used up its attempts."""
        while self._pending:
            await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled (the sandbox server runs this in its nursery)."""
        self.state.listeners.append(self._listener)
        try:
            async with (
                httpx.AsyncClient(follow_redirects=False) as client,
                trio.open_nursery() as nursery,
            ):
                task_status.started()
                async for job in self._receive:
                    nursery.start_soon(self._deliver, client, job)
        finally:
            if self._listener in self.state.listeners:
                self.state.listeners.remove(self._listener)

    async def _deliver(self, client: httpx.AsyncClient, job: _Job) -> None:
        try:
            delays = job.endpoint.retry_delays
            for attempt in range(1, len(delays) + 2):
                if await self._attempt(client, job, attempt):
                    return
                if attempt <= len(delays):
                    await trio.sleep(delays[attempt - 1])
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def _attempt(self, client: httpx.AsyncClient, job: _Job, attempt: int) -> bool:
        endpoint, event = job.endpoint, job.event
        body = event_body(event)
        signature = stripe_signature(body, endpoint.secret, self.state.now())
        request_id = new_id("gw_req_", 16)
        headers = {"User-Agent": USER_AGENT, "X-Request-ID": request_id}
        if endpoint.api_key:
            headers["X-API-Key"] = endpoint.api_key
        if endpoint.envelope:
            content = json.dumps({"payload": body, "signature": signature}).encode()
            headers["Content-Type"] = "application/json"
        else:
            content = body.encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
            headers[endpoint.signature_header] = signature
        url = delivery_url(endpoint, event, money.route_of(self.state, event["data"]["object"]))
        record = DeliveryRecord(
            event_id=event["id"],
            event_type=event["type"],
            url=url,
            attempt=attempt,
            at=time.time(),
            request_id=request_id,
            envelope=endpoint.envelope,
        )
        self.state.deliveries.append(record)
        try:
            response = await client.post(
                url, content=content, headers=headers, timeout=endpoint.timeout
            )
        except httpx.HTTPError as exc:
            record.error = type(exc).__name__
            log.info("webhook delivery failed", extra={"event_id": record.event_id})
            return False
        record.status = response.status_code
        return record.ok
