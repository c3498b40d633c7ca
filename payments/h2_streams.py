"""Malformed HTTP/2 requests fail their own stream, not the whole connection.

h2 treats every header block it refuses (a value with leading or trailing whitespace,
an uppercase name, a connection-specific header such as ``connection`` or
``transfer-encoding``, ``te`` other than ``trailers``, NUL/CR/LF, bad pseudo-headers, a
non-numeric ``content-length``) and a body whose length differs from its
``content-length`` as a *connection* error: GOAWAY, and every call in flight on the
channel fails with it. RFC 9113 section 8.1.1 makes these *stream* errors.
:func:`install` wraps h2's server side so a refused request gets an answer of its own
(gRPC: trailers-only ``INVALID_ARGUMENT``; anything else: 400 JSON), naming the header
but never echoing its value (it may be an API key), then its stream is reset; a request
the app already holds (bad trailers, wrong body length) is reset and the app told with
a StreamReset event. The other streams on the connection go on. HPACK decoding errors
stay connection errors (the shared compression state is lost). Both purerpc and
hypercorn build ``h2.connection.H2Connection`` themselves, and purerpc already patches
that class, so the wrap is applied to the class, server side only, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

import h2.connection
import h2.stream
from h2.errors import ErrorCodes
from h2.events import StreamReset
from h2.exceptions import InvalidBodyLengthError, ProtocolError
from h2.utilities import CONNECTION_HEADERS
from hyperframe.frame import WindowUpdateFrame

log = logging.getLogger("payments.h2")

Header = tuple[bytes, bytes]
_GRPC_INVALID_ARGUMENT = b"3"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


class MalformedHeaders(ProtocolError):
    """A header block h2 refused; carries the raw headers for the answer."""

    def __init__(self, headers: Sequence[Header]) -> None:
        super().__init__("malformed header block")
        self.headers = headers


def describe(headers: Iterable[Header]) -> str:
    """What is wrong with a refused header block, naming the header, never its value."""
    for name, value in headers:
        pseudo = name.startswith(b":")
        if not name or not all(c in _TOKEN for c in (name[1:] if pseudo else name)):
            return "request headers: a header name is not a lowercase token"
        shown = name.decode("ascii")
        if name in CONNECTION_HEADERS:
            return f"{shown}: connection-specific header is not allowed in HTTP/2"
        if name == b"te" and value.lower() != b"trailers":
            return "te: only 'trailers' is allowed in HTTP/2"
        if any(c in (0, 0x0A, 0x0D) for c in value):
            return f"{shown}: header value contains NUL, CR or LF"
        if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
            return f"{shown}: header value has leading or trailing whitespace"
        if name == b"content-length" and not value.isdigit():
            return "content-length: must be a number"
    return "request headers: malformed HTTP/2 request (pseudo-headers)"


def refuse_grpc(connection: h2.connection.H2Connection, stream_id: int, message: str) -> None:
    """Answer one gRPC call INVALID_ARGUMENT (trailers only), then reset its stream with
    NO_ERROR if the client is still sending ("stop sending the request body")."""
    status = [
        (b"grpc-status", _GRPC_INVALID_ARGUMENT),
        (b"grpc-message", quote(message, safe=" :'-").encode("ascii")),
    ]
    stream = connection.streams.get(stream_id)
    if stream is None or not stream.state_machine.headers_sent:  # trailers-only response
        status = [(b":status", b"200"), (b"content-type", b"application/grpc"), *status]
    connection.send_headers(stream_id, status, end_stream=True)
    if stream is not None and not stream.closed:
        connection.reset_stream(stream_id, ErrorCodes.NO_ERROR)
    log.info("malformed grpc request refused", extra={"reason": message})


def _answer(
    connection: h2.connection.H2Connection, stream_id: int, error: MalformedHeaders
) -> None:
    """Answer the one refused request."""
    message = describe(error.headers)
    content_type = dict(error.headers).get(b"content-type", b"")
    if content_type.startswith(b"application/grpc"):
        refuse_grpc(connection, stream_id, message)
        return
    body = json.dumps({"error": message}).encode()
    connection.send_headers(
        stream_id,
        [
            (b":status", b"400"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    )
    connection.send_data(stream_id, body, end_stream=True)
    log.info("malformed http/2 request refused", extra={"reason": message})


_original_process = h2.stream.H2Stream._process_received_headers
_original_content_length = h2.stream.H2Stream._initialize_content_length
_original_receive_headers = h2.connection.H2Connection._receive_headers_frame
_original_receive_data = h2.connection.H2Connection._receive_data_frame


def _reset_event(stream_id: int) -> StreamReset:
    """What the app hears of a stream reset here (it already holds the request)."""
    return StreamReset(
        stream_id=stream_id, error_code=ErrorCodes.PROTOCOL_ERROR, remote_reset=False
    )


def _process_received_headers(self: h2.stream.H2Stream, headers: Any, *args: Any) -> Any:
    headers = list(headers)
    try:
        return _original_process(self, headers, *args)
    except ProtocolError as exc:
        raise MalformedHeaders(headers) from exc


def _initialize_content_length(self: h2.stream.H2Stream, headers: Any) -> None:
    headers = list(headers)
    try:
        _original_content_length(self, headers)
    except ProtocolError as exc:
        raise MalformedHeaders(headers) from exc


def _receive_headers_frame(self: h2.connection.H2Connection, frame: Any) -> Any:
    known = frame.stream_id in self.streams  # trailers of a request the app already has
    try:
        return _original_receive_headers(self, frame)
    except MalformedHeaders as error:
        if self.config.client_side:
            raise
        stream_id = frame.stream_id
        answered = False
        if not known:
            try:
                _answer(self, stream_id, error)
                answered = True
            except ProtocolError:  # the stream cannot take an answer: the reset says it
                reason = describe(error.headers)
                log.info("malformed http/2 request reset", extra={"reason": reason})
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.closed:
            # NO_ERROR after a complete answer: "stop sending the request body".
            code = ErrorCodes.NO_ERROR if answered else ErrorCodes.PROTOCOL_ERROR
            self.reset_stream(stream_id, code)
        return [], [] if not known else [_reset_event(stream_id)]


def _receive_data_frame(self: h2.connection.H2Connection, frame: Any) -> Any:
    """A body longer or shorter than its ``content-length``: reset that stream only."""
    try:
        return _original_receive_data(self, frame)
    except InvalidBodyLengthError:
        if self.config.client_side:
            raise
        frames = []
        # The app never sees (so never acknowledges) this frame: give the window back.
        increment = self._inbound_flow_control_window_manager.process_bytes(
            frame.flow_controlled_length
        )
        if increment:
            update = WindowUpdateFrame(0)
            update.window_increment = increment
            frames.append(update)
        self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
        log.info("http/2 body length differs from content-length: stream reset")
        return frames, [_reset_event(frame.stream_id)]


def install() -> None:
    """Wrap h2 once (idempotent); purerpc_compat calls this at import."""
    if getattr(h2.connection.H2Connection, "_payments_stream_errors", False):
        return
    h2.stream.H2Stream._process_received_headers = _process_received_headers  # type: ignore[method-assign]
    h2.stream.H2Stream._initialize_content_length = _initialize_content_length  # type: ignore[method-assign]
    h2.connection.H2Connection._receive_headers_frame = _receive_headers_frame  # type: ignore[method-assign]
    h2.connection.H2Connection._receive_data_frame = _receive_data_frame  # type: ignore[method-assign]
    h2.connection.H2Connection._payments_stream_errors = True  # type: ignore[attr-defined]
