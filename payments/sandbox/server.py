"""The emulator's HTTP/1.1 server: a small h11 server on trio.

Why not hypercorn + quart-trio (the service's own HTTP stack)? Fault injection needs
the socket: "drop the connection without an answer" means closing the TCP stream
mid-request, which an ASGI app cannot do (the server would answer 500). A plain trio
server over h11 (the HTTP/1.1 state machine hypercorn itself uses) does it in one line,
adds no framework per request (the emulator sits on the hot path of benchmarks), and
keeps delays, drops and answers in one readable loop. The Stripe SDK speaks HTTP/1.1
with keep-alive, which is all this serves.

``serve_sandbox`` runs it under a nursery (``nursery.start`` hands back the running
:class:`Sandbox`); ``open_sandbox`` wraps that as an async context manager. The same
nursery runs webhook delivery (payments.sandbox.webhooks): give ``webhook_url`` and
``webhook_secret`` (or set ``state.webhook`` later) and every emitted event is posted.

Three kinds of request share the port: the Stripe API (``/v1/...``, Bearer auth), the
hosted checkout pages and the dashboard (``/pay/...``, ``/_sandbox/dashboard``:
payments.sandbox.pages, HTML for a browser) and the control API (``/_sandbox/...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio

from payments.sandbox.api import ApiRequest, ApiResponse, StripeApi
from payments.sandbox.control import ControlApi
from payments.sandbox.pages import CheckoutPages, is_loopback_host
from payments.sandbox.params import StripeError
from payments.sandbox.state import FaultKind, Faults, StripeState, WebhookEndpoint
from payments.sandbox.webhooks import WebhookSender

log = logging.getLogger("payments.sandbox")

DEFAULT_SECRET_KEY = "sk_test_sandbox"  # noqa: S105  (the emulator's well-known test key)
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_READ_CHUNK = 65536
EXPIRY_TICK_SECONDS = 1.0  # how often open sessions past their expires_at are closed


@attrs.define
class Sandbox:
    """A running emulator: where it listens and the state behind it."""

    url: str
    host: str
    port: int
    state: StripeState
    api: StripeApi
    webhooks: WebhookSender
    pages: CheckoutPages

    @property
    def secret_key(self) -> str:
        return self.state.secret_key

    def configure_webhook(
        self,
        url: str,
        secret: str,
        *,
        api_key: str = "",
        envelope: bool = False,
        **options: Any,
    ) -> WebhookEndpoint:
        """Post every event from now on to ``url`` (see WebhookEndpoint)."""
        self.state.webhook = WebhookEndpoint(
            url=url, secret=secret, api_key=api_key, envelope=envelope, **options
        )
        return self.state.webhook

    @property
    def faults(self) -> Faults:
        return self.state.faults


class _Dropped(Exception):
    """A fault asked for the connection to be closed without an answer."""


class _Server:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.control = ControlApi(sandbox.state, sandbox.webhooks)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                request = await self._read_request(stream, conn)
                if request is None:
                    return
                response = await self._dispatch(request)
                # Committed before the answer: what a client was told exists survives a
                # kill -9 (a failed write drops the connection unanswered instead).
                self.sandbox.state.flush()
                await self._send(stream, conn, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except _Dropped:
            return
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                error = StripeError(f"Invalid HTTP request: {exc}", status=exc.error_status_hint)
                body = ApiResponse(
                    error.status,
                    _json(error.body()),
                    (("content-type", "application/json"),),
                )
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError
                ):
                    await self._send(stream, conn, body, close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away (e.g. it timed out during a delay)
        except Exception:
            # One broken connection must not take the server (and its nursery) down.
            log.exception("sandbox connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await self._send_event(stream, conn, h11.InformationalResponse(status_code=100))
            conn.receive_data(await stream.receive_some(_READ_CHUNK))

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> ApiRequest | None:
        event = await self._next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
        body = bytearray()
        while True:
            part = await self._next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return None
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers
        }
        return ApiRequest(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=headers,
            body=bytes(body),
        )

    async def _dispatch(self, request: ApiRequest) -> ApiResponse:
        path = request.target.partition("?")[0]
        if CheckoutPages.serves(path):
            return self.sandbox.pages.handle(request)
        if path.startswith(ControlApi.PREFIX):
            return self.control.handle(request)
        api = self.sandbox.api
        call = api.begin(request)
        faults = self.sandbox.state.faults.take(call.method, call.path)
        if not faults:
            return api.respond(call)
        call.record.fault = ",".join(sorted({f.kind.value for f in faults}))
        before = sum(f.seconds for f in faults if f.kind is FaultKind.DELAY and not f.after)
        after = sum(f.seconds for f in faults if f.kind is FaultKind.DELAY and f.after)
        if before:
            await trio.sleep(before)
        for hang in (f for f in faults if f.kind is FaultKind.HANG):
            await hang.released.wait()
        if any(f.kind is FaultKind.DROP for f in faults):
            raise _Dropped
        error = next((f for f in faults if f.kind is FaultKind.ERROR), None)
        response = api.fault_response(call, error) if error else api.respond(call)
        if after:
            await trio.sleep(after)
        return response

    async def _send_event(
        self, stream: trio.SocketStream, conn: h11.Connection, event: object
    ) -> None:
        data = conn.send(event)  # type: ignore[arg-type]
        if data:
            await stream.send_all(data)

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        response: ApiResponse,
        *,
        close: bool = False,
    ) -> None:
        headers = [
            *response.headers,
            ("content-length", str(len(response.body))),
            ("server", "payments-sandbox"),
        ]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers))
        out += conn.send(h11.Data(data=response.body)) if response.body else b""
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)


async def _expire_due_sessions(state: StripeState) -> None:
    """Stripe closes an open Checkout Session at its ``expires_at`` by itself and sends
    ``checkout.session.expired``: so does the emulator, within a second of it."""
    while True:
        state.expire_due_sessions()
        await trio.sleep(EXPIRY_TICK_SECONDS)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve_sandbox(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    secret_key: str = DEFAULT_SECRET_KEY,
    state: StripeState | None = None,
    public_url: str | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    gateway_api_key: str = "",
    envelope: bool = False,
    dashboard_open: bool | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Sandbox] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the emulator until cancelled (or ``shutdown_trigger`` returns);
    ``task_status.started`` gets the :class:`Sandbox` once it accepts connections.

    ``port=0`` picks a free port (read it from ``sandbox.url``). ``public_url`` overrides
    the base URL put in objects' ``url`` fields, the checkout URLs a browser opens (say,
    behind a proxy). Pass ``state`` to keep objects across restarts of the server (a
    supervisor restarting it). ``webhook_url`` and ``webhook_secret`` turn on event
    delivery (with ``gateway_api_key`` as ``X-API-Key``, and the envelope form when
    ``envelope``). ``dashboard_open``: whether ``/_sandbox/dashboard`` answers without
    the secret key; by default only when ``host`` is a loopback address (pass False
    when a proxy makes a loopback-bound sandbox public). ``shutdown_trigger`` (say, a
    supervisor's ``stopping.wait``) ends serving cleanly when it returns; webhooks not
    yet delivered are dropped, as on cancellation.
    """
    if (webhook_url is None) != (webhook_secret is None):
        raise ValueError("webhook_url and webhook_secret go together")
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    url = (public_url or f"http://{_url_host(host)}:{bound_port}").rstrip("/")
    if state is None:
        state = StripeState(secret_key, base_url=url)
    else:
        state.base_url = url
    sandbox = Sandbox(
        url=url,
        host=host,
        port=bound_port,
        state=state,
        api=StripeApi(state),
        webhooks=WebhookSender(state),
        pages=CheckoutPages(
            state,
            dashboard_open=is_loopback_host(host) if dashboard_open is None else dashboard_open,
        ),
    )
    if webhook_url is not None and webhook_secret is not None:
        sandbox.configure_webhook(
            webhook_url, webhook_secret, api_key=gateway_api_key, envelope=envelope
        )
    server = _Server(sandbox)
    async with trio.open_nursery() as nursery:
        await nursery.start(sandbox.webhooks.run)
        log.info("stripe sandbox listening", extra={"url": url})
        nursery.start_soon(trio.serve_listeners, server.handle_connection, listeners)
        nursery.start_soon(_expire_due_sessions, sandbox.state)
        task_status.started(sandbox)
        if shutdown_trigger is not None:
            await shutdown_trigger()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_sandbox(
    secret_key: str = DEFAULT_SECRET_KEY,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    state: StripeState | None = None,
    public_url: str | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    gateway_api_key: str = "",
    envelope: bool = False,
    dashboard_open: bool | None = None,
) -> AsyncIterator[Sandbox]:
    """Run the emulator for the body of the ``async with``; stop it on the way out
    (events not yet delivered are dropped)."""
    async with trio.open_nursery() as nursery:
        sandbox: Sandbox = await nursery.start(
            lambda task_status: serve_sandbox(
                host,
                port,
                secret_key=secret_key,
                state=state,
                public_url=public_url,
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
                gateway_api_key=gateway_api_key,
                envelope=envelope,
                dashboard_open=dashboard_open,
                task_status=task_status,
            )
        )
        try:
            yield sandbox
        finally:
            nursery.cancel_scope.cancel()
