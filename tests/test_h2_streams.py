"""A malformed HTTP/2 request fails alone (payments/h2_streams.py): on the gRPC port and
on the HTTP port (h2c), a refused header block answers its own stream while a request
in flight on the same connection, and the next one, are served as usual."""

from __future__ import annotations

import json
from functools import partial

import grpc
import pytest
import trio

from payments.api.grpc import PaymentsConnectionHandler, PaymentsServicer
from payments.api.grpc_server import ServerStats, serve_purerpc
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from tests.fixtures.app import KEY_A, Stack
from tests.h2_raw import Headers, RawH2

pytestmark = pytest.mark.timeout(60)

EMPTY_GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"  # HealthRequest{}: no flag, length 0

# (extra headers, the message naming what is wrong). Every header shape h2 refuses.
BAD_HEADERS: list[tuple[Headers, str]] = [
    ([("x-request-id", "r ")], "x-request-id: header value has leading or trailing whitespace"),
    ([("x-request-id", " r")], "x-request-id: header value has leading or trailing whitespace"),
    ([("x-api-key", "k\t")], "x-api-key: header value has leading or trailing whitespace"),
    ([("x-request-id", "a\x00b")], "x-request-id: header value contains NUL, CR or LF"),
    ([("x-request-id", "a\nb")], "x-request-id: header value contains NUL, CR or LF"),
    ([("X-Request-Id", "r")], "request headers: a header name is not a lowercase token"),
    ([("x request", "r")], "request headers: a header name is not a lowercase token"),
    ([("", "r")], "request headers: a header name is not a lowercase token"),
    ([("connection", "keep-alive")], "connection: connection-specific header is not allowed"),
    ([("keep-alive", "5")], "keep-alive: connection-specific header is not allowed"),
    ([("upgrade", "websocket")], "upgrade: connection-specific header is not allowed"),
    ([("proxy-connection", "x")], "proxy-connection: connection-specific header is not allowed"),
    ([("transfer-encoding", "chunked")], "transfer-encoding: connection-specific header is not"),
    ([("te", "gzip")], "te: only 'trailers' is allowed in HTTP/2"),
    ([("content-length", "abc")], "content-length: must be a number"),
    ([(":path", "/again")], "request headers: malformed HTTP/2 request (pseudo-headers)"),
    ([(":bogus", "x")], "request headers: malformed HTTP/2 request (pseudo-headers)"),
]
SECRET = "sk-secret-value"


def grpc_headers(port: int, rid: str = "ok-1") -> Headers:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/payments.PaymentsService/Health"),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-request-id", rid),
        ("x-api-key", KEY_A),
    ]


def http_headers(port: int, path: str = "/health", rid: str = "ok-1") -> Headers:
    return [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("x-request-id", rid),
        ("x-api-key", KEY_A),
    ]


def with_bad(headers: Headers, bad: Headers) -> Headers:
    """``headers`` with ``bad`` in place of (or beside) the header of the same name."""
    names = {name for name, _ in bad}
    return [h for h in headers if h[0] not in names] + bad


@pytest.mark.parametrize(("bad", "message"), BAD_HEADERS)
async def test_grpc_bad_header_fails_only_its_call(
    stack: Stack, bad: Headers, message: str
) -> None:
    client = await RawH2.open(stack.grpc_port)
    try:
        # A call in flight (headers sent, request not finished) when the bad one comes.
        first = await client.headers(grpc_headers(stack.grpc_port, "in-flight"))
        refused = await client.headers(with_bad(grpc_headers(stack.grpc_port), bad))
        await client.data(refused, EMPTY_GRPC_MESSAGE)
        await client.data(first, EMPTY_GRPC_MESSAGE)
        await client.wait(first, refused)
        after = await client.headers(grpc_headers(stack.grpc_port, "after"))
        await client.data(after, EMPTY_GRPC_MESSAGE)
        await client.wait(after)

        assert client.goaway is None and not client.closed
        assert client.results[refused].grpc_status == "3"  # INVALID_ARGUMENT
        assert message.split(":")[0] in client.results[refused].grpc_message
        for ok in (first, after):
            assert client.results[ok].grpc_status == "0", client.results[ok]
            assert client.results[ok].headers.get("x-request-id") in ("in-flight", "after")
    finally:
        await client.aclose()


@pytest.mark.parametrize(("bad", "message"), BAD_HEADERS)
async def test_h2c_bad_header_fails_only_its_request(
    stack: Stack, bad: Headers, message: str
) -> None:
    port = stack.http.port
    client = await RawH2.open(port)
    try:
        first = await client.headers(http_headers(port, rid="in-flight"))
        refused = await client.headers(with_bad(http_headers(port), bad), end_stream=True)
        await client.data(first, b"")
        await client.wait(first, refused)
        after = await client.headers(http_headers(port, rid="after"), end_stream=True)
        await client.wait(after)

        assert client.goaway is None and not client.closed
        answer = client.results[refused]
        assert answer.status == 400
        assert json.loads(answer.body)["error"].startswith(message)
        for ok in (first, after):
            assert client.results[ok].status == 200, client.results[ok]
            assert json.loads(client.results[ok].body) == {"status": "ok"}
    finally:
        await client.aclose()


async def test_refusal_never_echoes_the_value(stack: Stack) -> None:
    port = stack.http.port
    client = await RawH2.open(port)
    try:
        refused = await client.headers(
            with_bad(http_headers(port), [("x-api-key", f" {SECRET}")]), end_stream=True
        )
        await client.wait(refused)
        assert client.results[refused].status == 400
        assert SECRET not in client.results[refused].body.decode()
    finally:
        await client.aclose()


async def test_grpcio_channel_survives_a_bad_metadata_value(stack: Stack) -> None:
    """The issue's case with the official client: one channel, one connection."""
    stats = ServerStats()
    servicer = PaymentsServicer(stack.service, stack.inbound, stack.authenticator)
    serve = partial(
        serve_purerpc,
        [servicer],
        "127.0.0.1",
        0,
        handler_class=PaymentsConnectionHandler,
        stats=stats,
    )
    port = await stack.nursery.start(serve)

    def calls() -> list[tuple[grpc.StatusCode, str]]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            codes = []
            for rid in ("ok-1", "r ", "ok-2", " r", "ok-3"):
                try:
                    stub.Health(
                        pb.HealthRequest(),
                        metadata=[("x-request-id", rid), ("x-api-key", KEY_A)],
                        timeout=10,
                    )
                    codes.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as error:
                    codes.append((error.code(), error.details()))  # type: ignore[attr-defined]
            return codes

    codes = await trio.to_thread.run_sync(calls)
    bad = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "x-request-id: header value has leading or trailing whitespace",
    )
    ok = (grpc.StatusCode.OK, "")
    assert codes == [ok, bad, ok, bad, ok]
    assert stats.connections_total == 1


@pytest.mark.parametrize("sent", [b"short", b"x" * 40])
async def test_h2c_body_length_unlike_content_length_resets_only_its_stream(
    stack: Stack, sent: bytes
) -> None:
    port = stack.http.port
    client = await RawH2.open(port)
    try:
        first = await client.headers(http_headers(port, rid="in-flight"))
        post = [
            (":method", "POST"),
            *[h for h in http_headers(port, "/payments") if h[0] != ":method"],
            ("content-type", "application/json"),
            ("content-length", "20"),
        ]
        refused = await client.headers(post)
        await client.data(refused, sent)
        await client.data(first, b"")
        await client.wait(first, refused)
        after = await client.headers(http_headers(port, rid="after"), end_stream=True)
        await client.wait(after)

        assert client.goaway is None and not client.closed
        assert client.results[refused].reset_code == 1  # PROTOCOL_ERROR
        for ok in (first, after):
            assert client.results[ok].status == 200, client.results[ok]
    finally:
        await client.aclose()


async def test_grpc_body_length_unlike_content_length_resets_only_its_stream(
    stack: Stack,
) -> None:
    client = await RawH2.open(stack.grpc_port)
    try:
        refused = await client.headers([*grpc_headers(stack.grpc_port), ("content-length", "50")])
        await client.data(refused, EMPTY_GRPC_MESSAGE)
        await client.wait(refused)
        after = await client.headers(grpc_headers(stack.grpc_port, "after"))
        await client.data(after, EMPTY_GRPC_MESSAGE)
        await client.wait(after)
        assert client.goaway is None and not client.closed
        assert client.results[refused].reset_code == 1
        assert client.results[after].grpc_status == "0"
    finally:
        await client.aclose()


async def test_h2c_bad_trailers_reset_only_their_stream(stack: Stack) -> None:
    port = stack.http.port
    client = await RawH2.open(port)
    try:
        post = [(":method", "POST"), *[h for h in http_headers(port) if h[0] != ":method"]]
        refused = await client.headers(post)
        await client.data(refused, b"{}", end_stream=False)
        client.conn.send_headers(refused, [("x-trailer", "v ")], end_stream=True)
        await client.flush()
        await client.wait(refused)
        after = await client.headers(http_headers(port, rid="after"), end_stream=True)
        await client.wait(after)
        assert client.goaway is None and not client.closed
        assert client.results[refused].reset_code == 1
        assert client.results[after].status == 200
    finally:
        await client.aclose()


def replaced(headers: Headers, **changes: str | None) -> Headers:
    """``headers`` with values changed in place (None: left out, new names go last);
    keyword names use ``_`` for ``-`` and ``pseudo_`` for ``:``."""
    wanted = {k.replace("pseudo_", ":").replace("_", "-"): v for k, v in changes.items()}
    kept = [(n, wanted.get(n, v)) for n, v in headers]
    kept += [(n, v) for n, v in wanted.items() if n not in dict(headers)]
    return [(n, v) for n, v in kept if v is not None]


# Valid HTTP/2 that purerpc refuses as gRPC: (header changes, first message, end on headers)
NOT_GRPC: list[tuple[dict[str, str | None], bytes, bool]] = [
    ({"pseudo_method": "GET"}, EMPTY_GRPC_MESSAGE, False),
    ({"pseudo_path": "/no-method"}, EMPTY_GRPC_MESSAGE, False),
    ({"pseudo_path": "/a/b/c"}, EMPTY_GRPC_MESSAGE, False),
    ({"te": None}, EMPTY_GRPC_MESSAGE, False),
    ({"content_type": "application/json"}, EMPTY_GRPC_MESSAGE, False),
    ({"grpc_timeout": "5x"}, EMPTY_GRPC_MESSAGE, False),
    ({"grpc_timeout": "abcS"}, EMPTY_GRPC_MESSAGE, False),
    ({}, b"", True),  # HEADERS with END_STREAM: no message at all
    ({}, b"\x00" + (64 * 1024 * 1024).to_bytes(4, "big") + b"xx", False),  # over the limit
    ({}, b"\x01\x00\x00\x00\x00", False),  # compressed, with no grpc-encoding
]


@pytest.mark.parametrize(("changes", "message", "end_on_headers"), NOT_GRPC)
async def test_grpc_request_purerpc_refuses_fails_only_its_call(
    stack: Stack, changes: dict[str, str | None], message: bytes, end_on_headers: bool
) -> None:
    port = stack.grpc_port
    client = await RawH2.open(port)
    try:
        first = await client.headers(grpc_headers(port, "in-flight"))
        headers = replaced(grpc_headers(port), **changes)
        refused = await client.headers(headers, end_stream=end_on_headers)
        if not end_on_headers:
            await client.data(refused, message)
        await client.data(first, EMPTY_GRPC_MESSAGE)
        await client.wait(first, refused)
        after = await client.headers(grpc_headers(port, "after"))
        await client.data(after, EMPTY_GRPC_MESSAGE)
        await client.wait(after)

        assert client.goaway is None and not client.closed
        assert client.results[refused].grpc_status == "3", client.results[refused]
        assert client.results[refused].grpc_message.startswith("request")
        for ok in (first, after):
            assert client.results[ok].grpc_status == "0", client.results[ok]
    finally:
        await client.aclose()


async def test_a_call_reset_before_its_message_ends(stack: Stack) -> None:
    """purerpc ignored RST_STREAM: the handler waited for its message until the
    connection closed, and the idle timeout never came."""
    stats = ServerStats()
    servicer = PaymentsServicer(stack.service, stack.inbound, stack.authenticator)
    serve = partial(
        serve_purerpc,
        [servicer],
        "127.0.0.1",
        0,
        handler_class=PaymentsConnectionHandler,
        stats=stats,
        idle_timeout=0.5,
    )
    port = await stack.nursery.start(serve)
    client = await RawH2.open(port)
    try:
        call = await client.headers(grpc_headers(port, "gives-up"))
        await client.wait_headers(call)  # the handler runs, and waits for the message
        client.conn.reset_stream(call, 8)  # CANCEL
        await client.flush()
        await client.wait()  # the idle timeout closes the connection: nothing is pending
        assert client.goaway is not None
    finally:
        await client.aclose()
