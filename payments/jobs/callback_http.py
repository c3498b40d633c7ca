"""The HTTP/1.1 client status callbacks go out on: h11 over trio streams.

Why not httpx: a callback is one small POST whose answer's status (and Retry-After) is
all we need, and httpx's layers were ~40% of the dispatcher's CPU (a profile of 10,000
callbacks), a new TCP connection per callback included. This client does only what a
callback needs:

* it connects to the addresses the dispatcher resolved *and checked*
  (payments.jobs.dispatcher.resolve_checked), never resolving the name again: a
  rebinding DNS server cannot answer 127.0.0.1 the second time. Host and TLS SNI stay
  the URL's name; TLS is verified with the default context (or the one given);
* keep-alive connections are pooled per receiver (scheme, host, port) and reused only
  for an address the current attempt checked; an idle connection the receiver closed
  is dropped before use, and a reused connection that fails before any byte of an
  answer is retried once on a new one (at-least-once, like every delivery);
* the answer's head is read; a small body (``DRAIN_LIMIT``, ``DRAIN_SECONDS``) is read
  and discarded so the connection can be reused, a large or slow one closes it;
* no redirects (a 3xx is just a status), no proxies, no cookies, no decompression.

The caller bounds the whole attempt (``trio.move_on_at``); a connection caught in a
cancellation is closed, never pooled.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote, urlsplit

import attrs
import h11
import trio

USER_AGENT = "payments-service/callbacks"
# Body bytes of an answer read (and discarded) to keep its connection; beyond, close.
DRAIN_LIMIT = 64 * 1024
# Time allowed for that body after the head arrived: a trickling answer is not waited
# for (the status is known), its connection is closed instead.
DRAIN_SECONDS = 0.5
# Idle connections kept per receiver (the dispatcher sends at most HOST_CONCURRENCY
# at once to one) and in all; an idle connection older than IDLE_SECONDS is closed.
IDLE_PER_RECEIVER = 16
IDLE_TOTAL = 128
IDLE_SECONDS = 30.0
READ_SIZE = 65536
DEFAULT_PORTS = {"http": 80, "https": 443}

Receiver = tuple[str, str, int]  # scheme, host, port


class CallbackHTTPError(Exception):
    """The attempt got no answer; ``str()`` reads ``Kind: detail`` for the attempt's
    error column (kinds: ConnectError, WriteError, ReadError, RemoteProtocolError)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class _NoAnswer(CallbackHTTPError):
    """Failed before any byte of an answer came: on a reused connection, the receiver
    may have closed it while idle, so one retry on a new connection is safe."""


@attrs.frozen
class Answer:
    status: int
    retry_after: str | None


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    sock: trio.socket.SocketType
    address: str
    protocol: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        """Close at once (no TLS close_notify): usable inside a cancelled scope."""
        self.sock.close()

    def looks_closed(self) -> bool:
        """An idle connection has nothing to read: anything (EOF, a stray byte) means
        the receiver closed it or broke the protocol."""
        # poll, not select: select refuses descriptors past FD_SETSIZE (1024), which a
        # busy process reaches, and every connection would then look closed.
        poller = select.poll()
        try:
            poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


@attrs.frozen
class _Request:
    receiver: Receiver
    target: str
    host_header: str
    head_and_body: Sequence[h11.Request | h11.Data | h11.EndOfMessage]


def _request(url: str, body: bytes, headers: Mapping[str, str], user_agent: str) -> _Request:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise CallbackHTTPError("ConnectError", "not an absolute http(s) URL")
    host = parts.hostname
    port = parts.port or DEFAULT_PORTS[scheme]
    ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    shown = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    fields = [
        ("Host", host_header),
        ("User-Agent", user_agent),
        ("Content-Length", str(len(body))),
        *headers.items(),
    ]
    return _Request(
        (scheme, ascii_host, port),
        target,
        host_header,
        (
            h11.Request(method="POST", target=target, headers=fields),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ),
    )


class CallbackClient:
    """POSTs callbacks; one per process, closed by :meth:`aclose`.

    ``ssl_context`` verifies https receivers (default: the system's CAs, hostname
    checked); tests give one trusting their own CA.
    """

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, user_agent: str = USER_AGENT
    ) -> None:
        self._ssl = ssl_context
        self._user_agent = user_agent
        self._idle: dict[Receiver, list[_Connection]] = {}
        self._idle_count = 0
        self.connections_opened = 0  # for tests and profiles

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], addresses: Sequence[str]
    ) -> Answer:
        """POST ``body`` to ``url`` on one of ``addresses`` (already checked; tried in
        order). Raises CallbackHTTPError when no answer came; a LocalProtocolError for
        a header h11 refuses (a bad row's value)."""
        request = _request(url, body, headers, self._user_agent)
        if not addresses:
            raise CallbackHTTPError("ConnectError", f"{request.receiver[1]} did not resolve")
        connection = self._take_idle(request.receiver, addresses)
        if connection is not None:
            try:
                return await self._exchange(request, connection)
            except _NoAnswer:
                pass  # closed while idle (most likely): once more on a new connection
        connection = await self._connect(request.receiver, addresses)
        return await self._exchange(request, connection)

    async def aclose(self) -> None:
        """Close the idle connections."""
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        await trio.lowlevel.checkpoint()

    # -- connections ---------------------------------------------------------------

    def _take_idle(self, receiver: Receiver, addresses: Sequence[str]) -> _Connection | None:
        """The most recently used idle connection to one of ``addresses``; stale ones
        met on the way are closed."""
        idle = self._idle.get(receiver)
        if not idle:
            return None
        oldest = trio.current_time() - IDLE_SECONDS
        for index in range(len(idle) - 1, -1, -1):
            connection = idle[index]
            if connection.address not in addresses:
                continue
            del idle[index]
            self._idle_count -= 1
            if connection.idle_since >= oldest and not connection.looks_closed():
                return connection
            connection.close()
        return None

    def _put_idle(self, receiver: Receiver, connection: _Connection) -> None:
        now = trio.current_time()
        if self._idle_count >= IDLE_TOTAL:
            self._drop_expired(now - IDLE_SECONDS)
        idle = self._idle.setdefault(receiver, [])
        if len(idle) >= IDLE_PER_RECEIVER or self._idle_count >= IDLE_TOTAL:
            connection.close()
            return
        connection.idle_since = now
        idle.append(connection)
        self._idle_count += 1

    def _drop_expired(self, oldest: float) -> None:
        for receiver, idle in list(self._idle.items()):
            kept = [c for c in idle if c.idle_since >= oldest]
            for connection in idle:
                if connection.idle_since < oldest:
                    connection.close()
            self._idle_count -= len(idle) - len(kept)
            if kept:
                self._idle[receiver] = kept
            else:
                del self._idle[receiver]

    async def _connect(self, receiver: Receiver, addresses: Iterable[str]) -> _Connection:
        scheme, host, port = receiver
        failure = ""
        for address in addresses:
            try:
                tcp = await trio.open_tcp_stream(address, port)
            except OSError as exc:
                failure = str(exc) or type(exc).__name__
                continue
            self.connections_opened += 1
            if scheme == "http":
                return _Connection(tcp, tcp.socket, address)
            tls = trio.SSLStream(
                tcp, self._ssl or _default_context(), server_hostname=host, https_compatible=True
            )
            try:
                await tls.do_handshake()
            except BaseException as exc:
                tcp.socket.close()
                if isinstance(exc, trio.BrokenResourceError):
                    cause = exc.__cause__ or exc
                    raise CallbackHTTPError("ConnectError", str(cause) or repr(cause)) from exc
                raise
            return _Connection(tls, tcp.socket, address)
        raise CallbackHTTPError("ConnectError", failure or f"no address for {host}")

    # -- one request ---------------------------------------------------------------

    async def _exchange(self, request: _Request, connection: _Connection) -> Answer:
        """Send the request, read the answer's head and a small body; pool the
        connection when it can carry another request, close it otherwise."""
        reusable = False
        try:
            protocol = connection.protocol
            data = b"".join(protocol.send(event) or b"" for event in request.head_and_body)
            try:
                await connection.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _NoAnswer("WriteError", _reason(exc)) from exc
            response = await self._read_head(connection)
            answer = Answer(response.status_code, _header(response.headers, b"retry-after"))
            reusable = await self._drain(connection)
            return answer
        finally:
            if reusable:
                self._put_idle(request.receiver, connection)
            else:
                connection.close()

    async def _receive(self, connection: _Connection) -> bytes:
        try:
            return await connection.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise CallbackHTTPError("ReadError", _reason(exc)) from exc

    async def _read_head(self, connection: _Connection) -> h11.Response:
        protocol = connection.protocol
        answered = False
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                kind = CallbackHTTPError if answered else _NoAnswer
                raise kind("RemoteProtocolError", str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self._receive(connection)
                except CallbackHTTPError as exc:
                    if answered:
                        raise
                    raise _NoAnswer(exc.kind, str(exc).partition(": ")[2]) from exc
                answered = answered or bool(data)
                protocol.receive_data(data)
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise _NoAnswer("RemoteProtocolError", "closed without an answer")
            # h11.InformationalResponse (100 Continue and the like): read on

    async def _drain(self, connection: _Connection) -> bool:
        """Read the rest of the answer if it is small and comes at once; True when
        the connection may carry another request."""
        protocol = connection.protocol
        received = 0
        with trio.move_on_after(DRAIN_SECONDS):
            while True:
                try:
                    event = protocol.next_event()
                except h11.RemoteProtocolError:
                    return False
                if event is h11.NEED_DATA:
                    try:
                        data = await self._receive(connection)
                    except CallbackHTTPError:
                        return False  # the status is known; only the connection is lost
                    received += len(data)
                    if received > DRAIN_LIMIT:
                        return False
                    protocol.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif not isinstance(event, h11.Data):
                    return False
            if protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE:
                return False
            protocol.start_next_cycle()
            return not protocol.trailing_data[0]
        return False


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


_context: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    """The system's CAs, hostname checked; made once (loading CAs costs milliseconds)."""
    global _context
    if _context is None:
        _context = ssl.create_default_context()
    return _context
