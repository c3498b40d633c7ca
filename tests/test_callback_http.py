"""The callbacks' HTTP client (payments.jobs.callback_http) against real servers on
loopback that answer raw bytes: keep-alive reuse, receivers that close, trickle, send
huge or chunked answers, redirect or ask to retry later; TLS with a test CA; and the
dispatcher connecting only to the address it checked (DNS rebinding)."""

from __future__ import annotations

import os
import re
import resource
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from payments.jobs import callback_http
from payments.jobs.callback_http import Answer, CallbackClient, CallbackHTTPError
from payments.jobs.dispatcher import PassResult
from payments.model import OutboxState
from payments.storage.pool import Pool
from tests.callback_support import MakeDispatcher, Receiver, ScriptedResolver, attempts
from tests.callback_support import dispatchers as dispatchers
from tests.callback_support import receiver as receiver
from tests.storage_support import fetch, queue_callbacks

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BODY = b'{"payment": {"id": 1}}'
HEADERS = {"Content-Type": "application/json", "webhook-id": "msg_1"}

Respond = Callable[[trio.abc.Stream, int], Awaitable[bool]]


async def answer_ok(stream: trio.abc.Stream, index: int) -> bool:
    await stream.send_all(OK)
    return True


@attrs.define
class RawServer:
    """Reads whole requests (Content-Length bodies) and lets ``respond`` write the raw
    answer; it returns whether to keep the connection. Counts connections."""

    respond: Respond = answer_ok
    host: str = "127.0.0.1"
    tls: ssl.SSLContext | None = None
    port: int = 0
    connections: int = 0
    requests: list[bytes] = attrs.field(factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[Any] = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        if self.tls is not None:
            listeners = [trio.SSLListener(x, self.tls, https_compatible=True) for x in listeners]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def url(self, path: str = "/cb", host: str = "") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                length = int(found.group(1)) if found else 0
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                buffer = rest[length:]
                self.requests.append(head)
                if not await self.respond(stream, len(self.requests)):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)


async def started(nursery: trio.Nursery, server: RawServer) -> RawServer:
    await nursery.start(server.serve)
    return server


async def post(client: CallbackClient, server: RawServer, host: str = "") -> Answer:
    return await client.post(server.url(host=host), BODY, HEADERS, [server.host])


async def test_keep_alive_reuses_one_connection(nursery: trio.Nursery) -> None:
    server = await started(nursery, RawServer())
    client = CallbackClient()
    for _ in range(3):
        assert await post(client, server) == Answer(200, None)
    assert server.connections == client.connections_opened == 1
    head = server.requests[0].decode() + "\r\n"
    assert head.startswith("POST /cb HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head
    assert "\r\nUser-Agent: payments-service/callbacks\r\n" in head
    assert f"\r\nContent-Length: {len(BODY)}\r\n" in head
    assert "\r\nwebhook-id: msg_1\r\n" in head
    await client.aclose()


async def test_keep_alive_holds_for_descriptors_past_fd_setsize(nursery: trio.Nursery) -> None:
    """A busy process's sockets get descriptors past select's FD_SETSIZE (1024); the
    idle check must still see them as open, or no connection would ever be reused."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft > 1100, "the test needs more than 1,100 descriptors"
    server = await started(nursery, RawServer())
    client = CallbackClient()
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        for _ in range(3):
            assert await post(client, server) == Answer(200, None)
        [idle] = [c for connections in client._idle.values() for c in connections]
        assert idle.sock.fileno() > 1024
    finally:
        for fd in filler:
            os.close(fd)
    assert server.connections == client.connections_opened == 1
    await client.aclose()


async def test_a_receiver_that_says_close_gets_a_new_connection(nursery: trio.Nursery) -> None:
    async def close_after(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        return False

    server = await started(nursery, RawServer(close_after))
    client = CallbackClient()
    assert await post(client, server) == Answer(204, None)
    assert await post(client, server) == Answer(204, None)
    assert server.connections == 2


@pytest.mark.parametrize("peek", [True, False], ids=["seen-closed", "found-closed-on-use"])
async def test_a_connection_the_receiver_closed_while_idle_is_not_a_failure(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, peek: bool
) -> None:
    """Answered with keep-alive framing, then closed: the next attempt sees the idle
    connection closed, or (when that check is blind) gets no answer on it and sends
    once more on a new connection; either way it is delivered."""

    async def close_silently(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(OK)
        return False

    if not peek:
        monkeypatch.setattr(callback_http._Connection, "looks_closed", lambda self: False)
    server = await started(nursery, RawServer(close_silently))
    client = CallbackClient()
    assert await post(client, server) == Answer(200, None)
    await trio.sleep(0.05)  # the close reaches us
    assert await post(client, server) == Answer(200, None)
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_receiver_that_never_answers_fails_without_a_retry(
    nursery: trio.Nursery,
) -> None:
    """Closed without an answer on a new connection: an error, sent once."""

    async def hang_up(stream: trio.abc.Stream, index: int) -> bool:
        return False

    server = await started(nursery, RawServer(hang_up))
    client = CallbackClient()
    with pytest.raises(CallbackHTTPError, match=r"^RemoteProtocolError|^ReadError"):
        await post(client, server)
    assert len(server.requests) == 1


async def test_a_trickling_answer_is_cut_by_the_callers_deadline(nursery: trio.Nursery) -> None:
    async def trickle(stream: trio.abc.Stream, index: int) -> bool:
        for byte in OK:
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.05)
        return True

    server = await started(nursery, RawServer(trickle))
    client = CallbackClient()
    started_at = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await post(client, server)
    assert scope.cancelled_caught
    assert trio.current_time() - started_at < 0.5
    assert client._idle_count == 0  # a connection caught in a cancellation is closed


async def test_a_huge_answer_body_is_not_read(nursery: trio.Nursery) -> None:
    sent: list[int] = [0]

    async def flood(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        chunk = b"x" * 65536
        while True:  # until the client hangs up
            await stream.send_all(chunk)
            sent[0] += len(chunk)

    server = await started(nursery, RawServer(flood))
    client = CallbackClient()
    started_at = trio.current_time()
    assert await post(client, server) == Answer(200, None)
    assert trio.current_time() - started_at < callback_http.DRAIN_SECONDS + 0.5
    assert client._idle_count == 0
    await trio.sleep(0.1)
    assert sent[0] < 100_000_000


async def test_a_body_trickling_after_the_head_closes_the_connection(
    nursery: trio.Nursery,
) -> None:
    async def slow_body(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(b"HTTP/1.1 503 Busy\r\nRetry-After: 30\r\nContent-Length: 50\r\n\r\n")
        for _ in range(50):
            await stream.send_all(b"x")
            await trio.sleep(0.1)
        return True

    server = await started(nursery, RawServer(slow_body))
    client = CallbackClient()
    started_at = trio.current_time()
    assert await post(client, server) == Answer(503, "30")
    assert trio.current_time() - started_at < callback_http.DRAIN_SECONDS + 0.3
    assert client._idle_count == 0


async def test_chunked_answers_are_read_and_the_connection_reused(nursery: trio.Nursery) -> None:
    async def chunked(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n")
        await stream.send_all(b"5\r\nhello\r\n")
        await trio.sleep(0.01)
        await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")
        return True

    server = await started(nursery, RawServer(chunked))
    client = CallbackClient()
    assert await post(client, server) == Answer(202, None)
    assert await post(client, server) == Answer(202, None)
    assert server.connections == 1


async def test_statuses_and_retry_after_come_back_and_redirects_are_not_followed(
    nursery: trio.Nursery,
) -> None:
    elsewhere = await started(nursery, RawServer())
    answers = [
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 120\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 410 Gone\r\nContent-Length: 4\r\n\r\ngone",
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
        + elsewhere.url().encode()
        + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nretry-after: Fri, 01 Jan 2100"
        b" 00:00:00 GMT\r\nContent-Length: 0\r\n\r\n",
    ]

    async def scripted(stream: trio.abc.Stream, index: int) -> bool:
        await stream.send_all(answers[index - 1])
        return True

    server = await started(nursery, RawServer(scripted))
    client = CallbackClient()
    assert await post(client, server) == Answer(503, "120")
    assert await post(client, server) == Answer(410, None)
    assert await post(client, server) == Answer(307, None)
    assert await post(client, server) == Answer(429, "Fri, 01 Jan 2100 00:00:00 GMT")
    assert elsewhere.requests == [] and server.connections == 1


async def test_nothing_to_connect_to(nursery: trio.Nursery) -> None:
    client = CallbackClient()
    with pytest.raises(CallbackHTTPError, match=r"^ConnectError: nowhere.test did not resolve"):
        await client.post("http://nowhere.test/cb", BODY, HEADERS, [])
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(CallbackHTTPError, match=r"^ConnectError: "):
        await client.post(f"http://127.0.0.1:{port}/cb", BODY, HEADERS, ["127.0.0.1"])


# -- TLS ------------------------------------------------------------------------------


@attrs.frozen
class CertAuthority:
    ca: Path
    cert: Path
    key: Path


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A CA and a certificate it signed for callbacks.test (openssl, EC keys)."""
    where = tmp_path_factory.mktemp("ca")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=payments test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    openssl(
        "req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=callbacks.test",
        cwd=where,
    )  # fmt: skip
    (where / "leaf.ext").write_text(
        "subjectAltName=DNS:callbacks.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
        cwd=where,
    )  # fmt: skip
    return CertAuthority(where / "ca.pem", where / "leaf.pem", where / "leaf.key")


def server_context(test_ca: CertAuthority, names: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(test_ca.cert, test_ca.key)

    def remember(sock: Any, name: str | None, ctx: Any) -> None:
        names.append(name or "")

    context.sni_callback = remember
    return context


async def test_tls_is_verified_and_names_the_urls_host(
    nursery: trio.Nursery, test_ca: CertAuthority
) -> None:
    sni: list[str] = []
    server = await started(nursery, RawServer(tls=server_context(test_ca, sni)))
    trusting = CallbackClient(ssl_context=ssl.create_default_context(cafile=test_ca.ca))
    for _ in range(2):
        assert await post(trusting, server, host="callbacks.test") == Answer(200, None)
    assert sni == ["callbacks.test"] and server.connections == 1
    assert f"\r\nHost: callbacks.test:{server.port}\r\n" in server.requests[0].decode()
    # The system's CAs do not know the test CA; a name the certificate lacks fails too.
    with pytest.raises(CallbackHTTPError, match=r"^ConnectError: .*certificate verify failed"):
        await post(CallbackClient(), server, host="callbacks.test")
    with pytest.raises(CallbackHTTPError, match=r"^ConnectError: .*certificate verify failed"):
        await post(trusting, server, host="other.test")
    await trusting.aclose()


# -- through the dispatcher ----------------------------------------------------------------


class RebindingResolver(ScriptedResolver):
    """A DNS server that answers ``first`` for ``host`` once, then ``later``."""

    def __init__(self, host: str, first: str, later: str) -> None:
        super().__init__(host)
        self.answers = [first, later]

    async def answer(self) -> list[Any]:
        address = self.answers[min(self.asked - 1, 1)]
        return [(trio.socket.AF_INET, trio.socket.SOCK_STREAM, 6, "", (address, 0))]


async def test_the_dispatcher_connects_to_the_address_it_checked(
    db_pool: Pool,
    dispatchers: MakeDispatcher,
    receiver: Receiver,
    nursery: trio.Nursery,
) -> None:
    """A rebinding DNS server answers an allowed address for the check and another
    one (an internal service) after: the callback goes to the checked one, with the
    URL's name as Host, and the name is resolved once."""
    internal = await started(nursery, RawServer(host="127.0.0.2"))
    host = "rebind.test"
    resolver = RebindingResolver(host, "127.0.0.1", "127.0.0.2")
    (entry,) = await queue_callbacks(db_pool, url=f"http://{host}:{receiver.port}/cb")
    dispatcher = dispatchers(db_pool, callback_allowed_hosts=(host,))
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        assert await dispatcher.run_pass() == PassResult(claimed=1, delivered=1)
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert resolver.asked == 1 and internal.requests == []
    (request,) = receiver.requests
    assert request.headers["host"] == f"{host}:{receiver.port}"
    assert (await fetch(db_pool, entry.id)).state == OutboxState.DELIVERED
    (attempt,) = await attempts(db_pool, entry)
    assert attempt.status_code == 200
