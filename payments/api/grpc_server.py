"""Serve purerpc services on one host and port, on trio.

purerpc's own ``Server.serve_async`` listens on every interface with ``SO_REUSEPORT``
and never closes accepted sockets (a stopped server's clients only see EOF when the
garbage collector runs). This binds exactly the host asked for, without
``SO_REUSEPORT`` (a second process on the same port is an error, not a silent
load-balancer), and closes each connection when its handler ends, so clients notice
a stop or restart at once. The Auth test server and the service's gRPC server share it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio
import anyio.abc
import attrs
import h2.exceptions
import purerpc  # payments/__init__.py has applied the h2 alias by now
import trio
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.server import ConnectionHandler

from payments.purerpc_compat import quiet_header_logging

log = logging.getLogger("payments.api.grpc_server")

# After the last call of a shutdown, how long connections get to write their final
# responses before they are cut.
FLUSH_SECONDS = 1.0


quiet_header_logging()


@attrs.define
class ServerStats:
    """Connection counters of one :func:`serve_purerpc` run (for health and tests), and
    a way to drop the open connections while the listener stays."""

    connections_total: int = 0
    connections_open: int = 0
    _scopes: set[trio.CancelScope] = attrs.field(factory=set, repr=False)

    def close_connections(self) -> None:
        """Close every open connection now (requests on them are cut off); clients see
        EOF at once and reconnect. New connections are still accepted."""
        for scope in self._scopes:
            scope.cancel()


@attrs.define
class _Activity:
    """Calls in progress on one connection, and a wake-up when that count changes."""

    calls: int = 0
    stopped: bool = False
    changed: trio.Event = attrs.field(factory=trio.Event)

    def change(self, delta: int) -> None:
        self.calls += delta
        self.changed.set()
        self.changed = trio.Event()

    def stop(self) -> None:
        self.stopped = True
        self.changed.set()


async def _close_when_idle(
    activity: _Activity,
    idle_seconds: float,
    grpc_socket: GRPCProtoSocket,
    listening: trio.CancelScope,
) -> None:
    """Close the connection once it has had no call in progress for ``idle_seconds``:
    GOAWAY (a client opens a new connection for its next call), then stop listening."""
    while not activity.stopped:
        changed = activity.changed
        if activity.calls:
            await changed.wait()
            continue
        with trio.move_on_after(idle_seconds):
            await changed.wait()
            continue
        log.debug("grpc connection idle: closing", extra={"idle_seconds": idle_seconds})
        with contextlib.suppress(h2.exceptions.ProtocolError):  # a peer that never spoke h2
            grpc_socket._grpc_connection.h2_connection.close_connection()
            await grpc_socket._socket.flush()
        listening.cancel()
        return


def _as_service(item: purerpc.Service | purerpc.Servicer) -> purerpc.Service:
    return item.service if isinstance(item, purerpc.Servicer) else item


async def serve_purerpc(
    services: Iterable[purerpc.Service | purerpc.Servicer],
    host: str,
    port: int,
    *,
    handler_class: type[ConnectionHandler] = ConnectionHandler,
    stats: ServerStats | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    grace_seconds: float = 10.0,
    idle_timeout: float = 0.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port`` until cancelled, or until
    ``shutdown_trigger`` returns: then the listener closes at once, calls in flight get
    ``grace_seconds`` to finish, and the connections are closed.

    ``port`` 0 picks a free port; ``task_status.started`` reports the bound port once
    the listener accepts connections. A host name that resolves to several addresses
    (``localhost``) binds each of them, on one port. ``handler_class`` is purerpc's
    per-connection handler or a subclass (the payments server's echoes ``x-request-id``).
    ``idle_timeout`` (seconds; 0 = never): a connection with no call in progress that
    long gets GOAWAY and is closed, silent ones (no HTTP/2 preface) included.
    """
    by_name = {service.name: service for service in map(_as_service, services)}
    if not by_name:
        raise ValueError("serve_purerpc needs at least one service")
    # purerpc's handler counts connections and errors on a Server; it is never started.
    handler = handler_class(by_name, purerpc.Server(port=port))
    counters = stats if stats is not None else ServerStats()

    in_flight = 0
    drained = trio.Event()
    listen_scopes: set[trio.CancelScope] = set()
    connection_closed = trio.Event()

    async def tracked(
        request_stream: purerpc.grpc_proto.GRPCProtoStream, activity: _Activity
    ) -> None:
        nonlocal in_flight, drained
        in_flight += 1
        activity.change(+1)
        try:
            await handler.request_received(request_stream)
        finally:
            activity.change(-1)
            in_flight -= 1
            if in_flight == 0:
                drained.set()
                drained = trio.Event()

    async def serve_connection(stream: anyio.abc.SocketStream) -> None:
        nonlocal connection_closed
        # purerpc's ConnectionHandler.__call__, minus its bare ``except:`` that swallows
        # cancellation and logs a warning for every connection a shutdown closes.
        counters.connections_total += 1
        counters.connections_open += 1
        scope = trio.CancelScope()
        counters._scopes.add(scope)
        # Only the listening is cancelled at shutdown or when idle: leaving the socket's
        # context normally lets purerpc's writer flush the last responses (and GOAWAY).
        listening = trio.CancelScope()
        activity = _Activity()
        try:
            with scope:
                async with (
                    stream,
                    GRPCProtoSocket(handler.config, stream) as grpc_socket,
                    anyio.create_task_group() as requests,
                ):
                    if idle_timeout > 0:
                        requests.start_soon(
                            _close_when_idle, activity, idle_timeout, grpc_socket, listening
                        )
                    listen_scopes.add(listening)
                    try:
                        with listening:
                            async for request_stream in grpc_socket.listen():
                                requests.start_soon(tracked, request_stream, activity)
                    finally:
                        listen_scopes.discard(listening)
                        activity.stop()
        except* Exception as group:  # a peer that breaks the protocol or resets: its problem
            # except*, not except: one bad connection must never end the server, and a
            # shutdown's cancellation mixed into the group must still go on up.
            log.debug("grpc connection ended: %r", [type(e).__name__ for e in group.exceptions])
        finally:
            counters._scopes.discard(scope)
            counters.connections_open -= 1
            connection_closed.set()
            connection_closed = trio.Event()

    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    # Connections live in their own task group so that closing the listener (the
    # accept scope) leaves the calls already in flight running.
    async with anyio.create_task_group() as connections:
        accepting = trio.CancelScope()

        async def accept() -> None:
            with accepting:
                async with listener:
                    await listener.serve(serve_connection, task_group=connections)

        connections.start_soon(accept)
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        accepting.cancel()
        with trio.move_on_after(grace_seconds):
            while in_flight:
                await drained.wait()
        if in_flight:
            log.warning("grpc shutdown: calls cut off after the grace", extra={"calls": in_flight})
        for listening in list(listen_scopes):
            listening.cancel()
        with trio.move_on_after(FLUSH_SECONDS):
            while counters.connections_open:
                await connection_closed.wait()
        connections.cancel_scope.cancel()
