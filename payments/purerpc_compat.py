"""Make purerpc 0.8 importable beside h2 >= 4.3, and keep its bad streams to themselves.

purerpc 0.8.0 (the latest release) refers to ``h2.events.PingAcknowledged``, which h2 4
renamed ``PingAckReceived``; hypercorn 0.18 needs h2 >= 4.3. Aliasing the old name is
all purerpc needs (tests/test_purerpc_compat.py proves a server and client talk). Import
this module before purerpc; ``payments/__init__.py`` does so for the whole package.
Also here: keeping hpack's header logging quiet, for every module that speaks HTTP/2.

Then, on the server side, one malformed call must not end its connection (the other
calls on it fail too): :mod:`payments.h2_streams` does so for what h2 refuses, and
:func:`_isolate_grpc_streams` for what purerpc refuses. purerpc raises out of its
connection for a request that is valid HTTP/2 but not gRPC (a method other than POST,
a path that is not ``/service/method``, no ``te: trailers``, another content type, a
bad ``grpc-timeout``, HEADERS with END_STREAM, a message over the size limit or in an
unknown encoding); those now answer INVALID_ARGUMENT on their own stream. And purerpc
ignores a client's RST_STREAM, leaving a handler waiting for a request message forever
(holding the connection "busy" past the idle timeout): the reset now ends the request.
"""

import logging

import h2.events

if not hasattr(h2.events, "PingAcknowledged"):
    h2.events.PingAcknowledged = h2.events.PingAckReceived  # type: ignore[attr-defined]


# Below the alias: purerpc refers to the old name on import.
from typing import Any

from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import RequestEnded

from payments import h2_streams


def quiet_header_logging() -> None:
    """Keep hpack's DEBUG lines out of the log whatever LOG_LEVEL says: hpack logs every
    header it encodes or decodes, value included, so ``x-api-key`` (ours and callers')
    would reach the log verbatim. Called on import by the modules that speak HTTP/2."""
    hpack_log = logging.getLogger("hpack")
    if hpack_log.level < logging.INFO:  # NOTSET (0) would follow the root down to DEBUG
        hpack_log.setLevel(logging.INFO)


_request_received = GRPCConnection._request_received
_data_received = GRPCConnection._data_received


def _refuse(connection: GRPCConnection, stream_id: int, exc: Exception) -> list[Any]:
    connection.message_read_buffers.pop(stream_id, None)
    reason = str(exc)[:200] or type(exc).__name__
    h2_streams.refuse_grpc(connection.h2_connection, stream_id, f"request: {reason}")
    return []


def _guarded_request_received(self: GRPCConnection, event: Any) -> list[Any]:
    if self.config.client_side:
        return list(_request_received(self, event))
    try:
        return list(_request_received(self, event))
    except Exception as exc:  # purerpc's ProtocolError, or KeyError/ValueError it lets out
        return _refuse(self, event.stream_id, exc)


def _guarded_data_received(self: GRPCConnection, event: Any) -> list[Any]:
    if self.config.client_side:
        return list(_data_received(self, event))
    if event.stream_id not in self.message_read_buffers:
        # A stream refused above, with DATA already in the same read: give the window back.
        self.h2_connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return []
    try:
        return list(_data_received(self, event))
    except Exception as exc:  # message too large, unknown encoding
        self.h2_connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return [*_refuse(self, event.stream_id, exc), RequestEnded(event.stream_id)]


def _stream_reset(self: GRPCConnection, event: h2.events.StreamReset) -> list[Any]:
    """The request is over: a handler still waiting for its message gets none."""
    if self.config.client_side or self.message_read_buffers.pop(event.stream_id, None) is None:
        return []
    return [RequestEnded(event.stream_id)]


def _isolate_grpc_streams() -> None:
    GRPCConnection._request_received = _guarded_request_received  # type: ignore[method-assign]
    GRPCConnection._data_received = _guarded_data_received  # type: ignore[method-assign]
    GRPCConnection._stream_reset = _stream_reset  # type: ignore[method-assign]


h2_streams.install()
_isolate_grpc_streams()
