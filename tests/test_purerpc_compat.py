"""purerpc 0.8 pins ``h2<4``; we run it on h2 >= 4.3 (for hypercorn) through the alias in
payments/purerpc_compat.py. These tests prove the pairing works on the wire: a purerpc
server answers the purerpc client and the official grpcio client, metadata and error
statuses included. If an h2 upgrade breaks purerpc, this is the file that says so.
"""

from __future__ import annotations

import payments.purerpc_compat  # noqa: F401  (before purerpc)

# isort: split
import functools
from collections.abc import AsyncIterator
from importlib.metadata import version

import grpc
import h2.events
import pytest
import trio
from purerpc import RpcFailedError, Status, StatusCode, insecure_channel
from purerpc.grpclib.events import RequestReceived

from payments.api.grpc_server import ServerStats, serve_purerpc
from payments.gen import auth_pb2, auth_pb2_grpc
from payments.gen.auth_grpc import AuthServiceServicer, AuthServiceStub

# Non-ASCII and reserved characters: grpc-message must be percent-encoded and decoded.
ERROR_MESSAGE = "no access: 100% refusé"


class EchoAuth(AuthServiceServicer):
    """Answers with what it received: the ``x-api-key`` metadata as service_name, the
    request's api_key and every other metadata pair in allowed_access. The key
    ``deny`` fails with PERMISSION_DENIED."""

    async def ValidateInternalAccess(
        self, message: auth_pb2.ValidateInternalAccessRequest, request: RequestReceived
    ) -> auth_pb2.ValidateInternalAccessResponse:
        if message.api_key == "deny":
            raise RpcFailedError(Status(StatusCode.PERMISSION_DENIED, ERROR_MESSAGE))
        metadata = dict(request.custom_metadata)
        return auth_pb2.ValidateInternalAccessResponse(
            service_name=metadata.get("x-api-key", ""),
            allowed_access=[message.api_key, *(f"{k}={v}" for k, v in sorted(metadata.items()))],
        )


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    yield await nursery.start(serve_purerpc, [EchoAuth()], "127.0.0.1", 0)


def test_installed_h2_is_the_one_hypercorn_needs() -> None:
    major, minor = (int(part) for part in version("h2").split(".")[:2])
    assert (major, minor) >= (4, 3)
    assert h2.events.PingAcknowledged is h2.events.PingAckReceived


async def test_purerpc_client_and_server_round_trip_with_metadata(echo_port: int) -> None:
    async with insecure_channel("127.0.0.1", echo_port) as channel:
        stub = AuthServiceStub(channel)
        for key in ("k1", "k2"):  # two calls on one connection
            reply = await stub.ValidateInternalAccess(
                auth_pb2.ValidateInternalAccessRequest(api_key=key),
                metadata=(("x-api-key", "own-key"), ("x-request-id", "r-1")),
            )
            assert reply.service_name == "own-key"
            assert list(reply.allowed_access) == [key, "x-api-key=own-key", "x-request-id=r-1"]
        with pytest.raises(RpcFailedError) as failure:
            await stub.ValidateInternalAccess(
                auth_pb2.ValidateInternalAccessRequest(api_key="deny")
            )
        assert failure.value.status.status_code is StatusCode.PERMISSION_DENIED
        assert failure.value.status.status_message == ERROR_MESSAGE


def _grpcio_calls(port: int) -> tuple[auth_pb2.ValidateInternalAccessResponse, grpc.RpcError]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        reply = stub.ValidateInternalAccess(
            auth_pb2.ValidateInternalAccessRequest(api_key="k1"),
            metadata=[("x-api-key", "own-key")],
            timeout=5,
        )
        try:
            stub.ValidateInternalAccess(
                auth_pb2.ValidateInternalAccessRequest(api_key="deny"), timeout=5
            )
        except grpc.RpcError as exc:
            return reply, exc
        raise AssertionError("the deny call succeeded")


async def test_grpcio_client_talks_to_purerpc_server(echo_port: int) -> None:
    with trio.fail_after(10):
        reply, error = await trio.to_thread.run_sync(_grpcio_calls, echo_port)
    assert reply.service_name == "own-key"
    assert reply.allowed_access[0] == "k1"
    assert "x-api-key=own-key" in reply.allowed_access
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert error.details() == ERROR_MESSAGE  # type: ignore[attr-defined]


# --- serve_purerpc (payments/api/grpc_server.py) ----------------------------------------


async def _round_trip(port: int) -> str:
    async with insecure_channel("127.0.0.1", port) as channel:
        reply = await AuthServiceStub(channel).ValidateInternalAccess(
            auth_pb2.ValidateInternalAccessRequest(api_key="k"), metadata=(("x-api-key", "a"),)
        )
    return reply.service_name


async def test_serve_purerpc_binds_without_reuse_port(echo_port: int) -> None:
    # purerpc's own server sets SO_REUSEPORT, so a second one would silently share the
    # port; ours must fail loudly instead.
    with pytest.raises(OSError):
        await serve_purerpc([EchoAuth()], "127.0.0.1", echo_port)


async def test_a_garbage_connection_does_not_end_the_server(echo_port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", echo_port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    with trio.move_on_after(1):
        while await stream.receive_some():  # the server closes it
            pass
    await stream.aclose()
    assert await _round_trip(echo_port) == "a"


async def test_serve_purerpc_counts_connections_and_drops_them(nursery: trio.Nursery) -> None:
    stats = ServerStats()
    port = await nursery.start(
        functools.partial(serve_purerpc, [EchoAuth().service], "127.0.0.1", 0, stats=stats)
    )
    assert await _round_trip(port) == "a"
    client = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(1):
        while stats.connections_total < 2:  # noqa: ASYNC110  (a counter, no event)
            await trio.sleep(0.01)
    stats.close_connections()
    with trio.fail_after(1):
        while await client.receive_some():  # the server ends it: EOF
            pass
        while stats.connections_open:  # noqa: ASYNC110
            await trio.sleep(0.01)
    await client.aclose()
    assert await _round_trip(port) == "a"  # still listening
    assert stats.connections_total == 3
