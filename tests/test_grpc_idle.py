"""PAYMENTS_GRPC_IDLE_TIMEOUT_SECONDS: a gRPC connection with no call in progress that
long is closed (GOAWAY first), silent ones included; a call in progress is never cut,
and grpcio reconnects by itself for its next call."""

from __future__ import annotations

import time
from functools import partial

import grpc
import pytest
import trio
import trio.testing

from payments.api.grpc import PaymentsConnectionHandler, PaymentsServicer
from payments.api.grpc_server import ServerStats, serve_purerpc
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from tests.fixtures.app import KEY_A, Stack
from tests.h2_raw import RawH2
from tests.test_h2_streams import EMPTY_GRPC_MESSAGE, grpc_headers

pytestmark = pytest.mark.timeout(60)

IDLE = 0.5


async def start(stack: Stack) -> tuple[int, ServerStats]:
    stats = ServerStats()
    serve = partial(
        serve_purerpc,
        [PaymentsServicer(stack.service, stack.inbound, stack.authenticator)],
        "127.0.0.1",
        0,
        handler_class=PaymentsConnectionHandler,
        stats=stats,
        idle_timeout=IDLE,
    )
    return int(await stack.nursery.start(serve)), stats


async def wait_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with trio.fail_after(10):
        while data := await stream.receive_some(65536):
            received += data
    return received


async def test_silent_connections_are_closed(stack: Stack) -> None:
    port, stats = await start(stack)
    started = trio.current_time()
    sockets = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
    for sock in sockets:
        await wait_closed(sock)
        await sock.aclose()
    assert IDLE <= trio.current_time() - started < IDLE + 5
    await trio.testing.wait_all_tasks_blocked()
    assert (stats.connections_open, stats.connections_total) == (0, 20)


async def test_an_idle_h2_connection_gets_goaway_then_eof(stack: Stack) -> None:
    port, stats = await start(stack)
    client = await RawH2.open(port)
    try:
        call = await client.headers(grpc_headers(port))
        await client.data(call, EMPTY_GRPC_MESSAGE)
        await client.wait(call)
        assert client.results[call].grpc_status == "0"
        idle_from = trio.current_time()
        await client.wait()  # reads until GOAWAY or EOF
        assert client.goaway is not None
        assert trio.current_time() - idle_from >= IDLE * 0.9
        assert await wait_closed(client.socket) == b""
    finally:
        await client.aclose()
    assert stats.connections_total == 1


async def test_a_call_in_progress_is_never_cut(stack: Stack) -> None:
    port, _ = await start(stack)
    client = await RawH2.open(port)
    try:
        call = await client.headers(grpc_headers(port, "slow-caller"))
        await trio.sleep(IDLE * 4)  # the request's message is still to come
        await client.data(call, EMPTY_GRPC_MESSAGE)
        await client.wait(call)
        assert client.goaway is None
        assert client.results[call].grpc_status == "0"
        assert client.results[call].headers["x-request-id"] == "slow-caller"
    finally:
        await client.aclose()


async def test_grpcio_reconnects_after_an_idle_close(stack: Stack) -> None:
    port, stats = await start(stack)

    def calls() -> list[grpc.StatusCode]:
        codes = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            for pause in (0, IDLE * 3, 0):
                time.sleep(pause)
                try:
                    stub.Health(
                        pb.HealthRequest(),
                        metadata=[("x-request-id", "r"), ("x-api-key", KEY_A)],
                        timeout=10,
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())  # type: ignore[attr-defined]
        return codes

    assert await trio.to_thread.run_sync(calls) == [grpc.StatusCode.OK] * 3
    assert stats.connections_total == 2
