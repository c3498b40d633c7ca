"""A status-callback receiver for tests: a small HTTP/1.1 server (trio + h11) on
127.0.0.1 that records every request and answers what each test scripts: a status, a
delay, a Retry-After, a redirect, or never. It counts requests open at once, so a test
can check the per-receiver bound. Also the dispatchers tests make and drive."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import attrs
import h11
import pytest
import trio

from payments.config import Settings
from payments.jobs import dispatcher as dispatcher_module
from payments.jobs.dispatcher import Dispatcher
from payments.model import OutboxEntry, OutboxState, Payment, utcnow
from payments.storage import outbox
from payments.storage import repository as repo
from payments.storage.pool import Pool
from supervisor import ChildContext
from tests.storage_support import fetch

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
API_KEY = "payments-own-api-key-0123"


def settings(**overrides: Any) -> Settings:
    """Dispatcher settings for tests: signed, 5 attempts a minute apart, 2 s timeout."""
    fields: dict[str, Any] = {
        "app_api_key": API_KEY,
        "callback_signing_secret": SECRET,
        "callback_max_attempts": 5,
        "callback_retry_interval_minutes": 1,
        "callback_http_timeout_seconds": 2,
        "callback_dispatch_interval_minutes": 60,
        "job_batch_size": 50,
        # The receivers listen on loopback, which the callback rule refuses unless listed.
        "callback_allowed_hosts": ("127.0.0.1",),
    }
    fields.update(overrides)
    return Settings(**fields)


@attrs.frozen
class Answer:
    status: int = 200
    delay: float = 0.0
    location: str = ""
    retry_after: str = ""


HANG = "hang"  # read the request, never answer


@attrs.frozen
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # trio time


class Receiver:
    """Records requests; answers from ``script`` in order, then ``default``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Answer | str] = []
        self.default: Answer | str = Answer(200)
        self.port = 0
        self.open_now = 0  # requests received and not yet answered
        self.most_open = 0
        self._changed = trio.Event()

    def url(self, path: str = "/callback") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_for(self, count: int) -> list[Received]:
        while len(self.requests) < count:
            await self._changed.wait()
        return self.requests

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _next_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> Received | None:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return Received(
                    method=request.method.decode(),
                    path=request.target.decode(),
                    headers={k.decode(): v.decode() for k, v in request.headers},
                    body=body,
                    at=trio.current_time(),
                )
            else:  # ConnectionClosed
                return None

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while (received := await self._next_request(conn, stream)) is not None:
                self.requests.append(received)
                self._changed.set()
                self._changed = trio.Event()
                action = self.script.pop(0) if self.script else self.default
                self.open_now += 1
                self.most_open = max(self.most_open, self.open_now)
                try:
                    if action == HANG:
                        await trio.sleep_forever()
                    assert isinstance(action, Answer)
                    await trio.sleep(action.delay)
                finally:
                    self.open_now -= 1
                headers = [("content-length", "2"), ("content-type", "text/plain")]
                if action.location:
                    headers.append(("location", action.location))
                if action.retry_after:
                    headers.append(("retry-after", action.retry_after))
                for event in (
                    h11.Response(status_code=action.status, headers=headers),
                    h11.Data(data=b"ok"),
                    h11.EndOfMessage(),
                ):
                    await stream.send_all(conn.send(event))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    server = Receiver()
    await nursery.start(server.serve)
    return server


MakeDispatcher = Callable[..., Dispatcher]


@pytest.fixture
async def dispatchers() -> AsyncIterator[MakeDispatcher]:
    """``make(pool, clock=, worker_id=, rng=, concurrency=, **settings)``; closed afterwards."""
    made: list[Dispatcher] = []

    def make(
        pool: Pool,
        *,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
        rng: Callable[[], float] | None = None,
        concurrency: int = dispatcher_module.DEFAULT_CONCURRENCY,
        **overrides: Any,
    ) -> Dispatcher:
        dispatcher = Dispatcher(
            pool,
            settings(**overrides),
            worker_id=worker_id,
            clock=clock,
            rng=rng,
            concurrency=concurrency,
        )
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.aclose()


class ScriptedResolver(trio.abc.HostnameResolver):
    """A DNS server for tests: :meth:`answer` for ``host`` (counted in ``asked``);
    other names resolve as usual. Install with trio.socket.set_custom_hostname_resolver."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.asked = 0

    async def answer(self) -> list[Any]:
        raise NotImplementedError

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        if host is not None and host.decode() == self.host:
            self.asked += 1
            return await self.answer()
        return await trio.to_thread.run_sync(
            socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


class WallClock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def soon() -> datetime:
    """Just ahead of real time: rows queued now are due."""
    return utcnow() + timedelta(seconds=1)


async def attempts(pool: Pool, entry: OutboxEntry) -> list[outbox.CallbackAttempt]:
    async with pool.connection() as conn:
        return await outbox.attempts_for(conn, entry.id)


async def payment_of(pool: Pool, entry: OutboxEntry) -> Payment:
    async with pool.connection() as conn:
        payment = await repo.get_payment(conn, entry.payment_id)
    assert payment is not None
    return payment


@attrs.define
class RunningActor:
    ctx: ChildContext
    stopping: trio.Event
    started: trio.Event
    done: trio.Event


async def start_actor(
    nursery: trio.Nursery, dispatcher: Dispatcher, notices: trio.MemoryReceiveChannel[str] | None
) -> RunningActor:
    stopping, started, done = trio.Event(), trio.Event(), trio.Event()
    ctx = ChildContext("dispatcher", restarts=0, stopping=stopping, on_started=started.set)

    async def run() -> None:
        try:
            await dispatcher.run(ctx, notices)
        finally:
            done.set()

    nursery.start_soon(run)
    await started.wait()
    return RunningActor(ctx, stopping, started, done)


async def until(condition: Callable[[], bool], *, step: float = 0.01) -> None:
    while not condition():  # noqa: ASYNC110  (polls state the code under test owns)
        await trio.sleep(step)


async def until_state(pool: Pool, entry: OutboxEntry, state: OutboxState) -> OutboxEntry:
    while (stored := await fetch(pool, entry.id)).state != state:  # noqa: ASYNC110  (the DB)
        await trio.sleep(0.01)
    return stored
