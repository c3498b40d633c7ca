"""A raw HTTP/2 client for tests: sends header blocks that real clients refuse to send
(h2's outbound validation is off), several streams on one connection, and reports what
each stream got and whether the connection was torn down (GOAWAY or EOF)."""

from __future__ import annotations

import attrs
import h2.config
import h2.connection
import h2.events
import trio

Headers = list[tuple[str, str]]


@attrs.define
class StreamResult:
    """What one stream received."""

    headers: dict[str, str] = attrs.field(factory=dict)
    trailers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    ended: bool = False
    reset_code: int | None = None

    @property
    def status(self) -> int:
        return int(self.headers.get(":status", "0"))

    @property
    def grpc_status(self) -> str:
        return self.trailers.get("grpc-status") or self.headers.get("grpc-status", "")

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message") or self.headers.get("grpc-message", "")


class RawH2:
    """One prior-knowledge (h2c) connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.socket = stream
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.results: dict[int, StreamResult] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> RawH2:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.socket.send_all(data)

    async def headers(self, headers: Headers, *, end_stream: bool = False) -> int:
        """Open a stream with these headers (sent as they are); its id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.results[stream_id] = StreamResult()
        await self.flush()
        return stream_id

    async def data(self, stream_id: int, data: bytes, *, end_stream: bool = True) -> None:
        self.conn.send_data(stream_id, data, end_stream=end_stream)
        await self.flush()

    def _done(self, stream_ids: list[int]) -> bool:
        if self.goaway is not None or self.closed:
            return True
        return bool(stream_ids) and all(
            self.results[s].ended or self.results[s].reset_code is not None for s in stream_ids
        )

    async def wait(self, *stream_ids: int) -> None:
        """Read until every stream named ended or was reset, or the connection ended
        (GOAWAY or EOF; with no stream named, only that)."""
        with trio.fail_after(10):
            while not self._done(list(stream_ids)):
                data = await self.socket.receive_some(65536)
                if not data:
                    self.closed = True
                    return
                for event in self.conn.receive_data(data):
                    self._on(event)
                await self.flush()

    async def wait_headers(self, stream_id: int) -> None:
        """Read until the stream's response headers arrived."""
        with trio.fail_after(10):
            while not self.results[stream_id].headers:
                data = await self.socket.receive_some(65536)
                assert data, "connection closed"
                for event in self.conn.receive_data(data):
                    self._on(event)
                await self.flush()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            return
        result = self.results.get(getattr(event, "stream_id", 0) or 0)
        if result is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            result.headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.TrailersReceived):
            result.trailers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            result.body += event.data or b""
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            result.ended = True
        elif isinstance(event, h2.events.StreamReset):
            result.reset_code = int(event.error_code or 0)

    async def aclose(self) -> None:
        await self.socket.aclose()
