"""HTTP edge behaviour over real sockets: nothing but the open probes answers before
authentication and nothing is ever redirected; ``X-Request-ID`` is bounded on every
route (and on gRPC); ``Content-Length`` with ``Transfer-Encoding`` is refused; a body
over the limit tells the client that the connection closes."""

from __future__ import annotations

import json
import logging

import attrs
import grpc
import httpx
import pytest
import trio

from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from tests.fixtures.app import KEY_A, TEST_MAX_BODY_BYTES, Stack

pytestmark = pytest.mark.timeout(60)

LIMIT = 128  # the request_id field's limit on create (payments.validation.MAX_ID_LENGTH)


@attrs.frozen
class Answer:
    """One HTTP/1.1 response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return dict(json.loads(self.body))


class RawHttp:
    """An HTTP/1.1 connection that sends exactly the bytes given."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int) -> RawHttp:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def answer(self, *, head: bool = False) -> Answer:
        """The next response (the service always sends Content-Length; none after HEAD)."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                assert await self._more(), f"connection closed; got {self.buffer!r}"
            top, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = top.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = 0 if head else int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                assert await self._more(), "connection closed mid-body"
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return Answer(int(lines[0].split()[1]), headers, body)

    async def closed(self) -> bool:
        """True when the server closes the connection (within a few seconds) with
        nothing more to say."""
        with trio.move_on_after(5):
            while await self._more():
                pass
            return self.buffer == b""
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def request(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    host: str = "evil.example",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    framed = {n.lower() for n in headers or {}} & {"content-length", "transfer-encoding"}
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def one_answer(port: int, data: bytes) -> Answer:
    client = await RawHttp.open(port)
    try:
        await client.send(data)
        return await client.answer(head=data.startswith(b"HEAD "))
    finally:
        await client.aclose()


AUTH = {"X-Request-ID": "rid-edge", "X-API-Key": KEY_A}
PATH_SHAPES = [
    "/payments//1",
    "//payments/1",
    "//payments",
    "/payments/",
    "/payments/1/",
    "/payments//1/cancel",
    "/payments/1/cancel/",
    "/payments///",
    "/./payments/1",
    "/payments/../payments/1",
    "/%2Fpayments/1",
    "/payments%2F1",
    "//evil.example/payments",
    "///evil.example",
    "/health/",
    "//health",
    "/healthz/",
    "//healthz",
    "/HEALTHZ",
    "/webhooks/providers/stripe/abc/",
    "/webhooks//providers/stripe/abc",
    "/webhooks/providers/stripe//abc",
    "/nope",
    "/",
    "",
    "*",
    "http://evil.example/payments/1",
]


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS", "DELETE"])
async def test_no_path_shape_answers_before_authentication_or_redirects(
    stack: Stack, method: str
) -> None:
    for path in PATH_SHAPES:
        await check_path_shape(stack.http.port, method, path)


async def check_path_shape(port: int, method: str, path: str) -> None:
    anonymous = await one_answer(port, request(method, path))
    assert anonymous.status in (400, 401), (anonymous, path)
    assert "location" not in anonymous.headers
    with_id = await one_answer(port, request(method, path, {"X-Request-ID": "r"}))
    assert with_id.status in (400, 401), (with_id, path)
    if with_id.status == 400:  # only for what hypercorn itself refuses as a request line
        assert path in ("", "*"), (with_id, path)
    elif method != "HEAD":
        assert with_id.json() == {"error": "X-API-Key header is required"}, path
    authenticated = await one_answer(port, request(method, path, AUTH))
    assert not 300 <= authenticated.status < 400, (authenticated, path)
    assert "location" not in authenticated.headers


async def test_the_open_probes_answer_without_headers(stack: Stack) -> None:
    port = stack.http.port
    assert (await one_answer(port, request("GET", "/healthz"))).status == 200
    page = await one_answer(port, request("GET", "/webhooks/providers/stripe/abc?state=cancel"))
    assert page.status == 200 and b"Payment canceled" in page.body
    for path in ("/payments/1", "/payments", "/health", "/openapi-ish", "/payments//1"):
        assert (await one_answer(port, request("GET", path))).status == 400


async def test_double_slash_is_a_404_after_authentication(stack: Stack) -> None:
    answer = await one_answer(stack.http.port, request("GET", "/payments//1", AUTH))
    assert (answer.status, answer.json()) == (404, {"error": "not found"})


# --- X-Request-ID bound ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/healthz"),
        ("GET", "/payments/1"),
        ("GET", "/payments"),
        ("POST", "/payments/1/cancel"),
        ("POST", "/webhooks/providers/stripe/abc"),
        ("GET", "/webhooks/providers/stripe/abc"),
        ("GET", "/nope"),
    ],
)
async def test_request_id_is_bounded_on_every_route(
    stack: Stack, method: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    huge = "R" * 12 * 1024
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        for value in ("x" * (LIMIT + 1), huge, "x" * (LIMIT + 1) + " x"):
            response = await client.request(
                method, path, headers={"X-Request-ID": value, "X-API-Key": KEY_A}
            )
            assert response.status_code == 400
            assert response.json() == {"error": f"X-Request-ID: must be at most {LIMIT} characters"}
            assert "X-Request-ID" not in response.headers
        assert huge not in caplog.text and "x" * (LIMIT + 1) not in caplog.text
        at_limit = "y" * LIMIT
        response = await client.request(
            method, path, headers={"X-Request-ID": at_limit, "X-API-Key": KEY_A}
        )
        assert response.status_code != 400 or "X-Request-ID" not in response.text
        assert response.headers["X-Request-ID"] == at_limit


async def test_grpc_request_id_is_bounded(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def call(rid: str) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            metadata = [("x-request-id", rid), ("x-api-key", KEY_A)]
            try:
                _, done = stub.GetPayment.with_call(
                    pb.GetPaymentRequest(id=1), metadata=metadata, timeout=10
                )
                return grpc.StatusCode.OK, "", dict(done.initial_metadata())
            except grpc.RpcError as error:
                initial = dict(error.initial_metadata() or ())  # type: ignore[attr-defined]
                return error.code(), error.details(), initial  # type: ignore[attr-defined]

    for value in ("x" * (LIMIT + 1), "R" * 12 * 1024):
        code, details, initial = await trio.to_thread.run_sync(call, value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == f"x-request-id: must be at most {LIMIT} characters"
        assert "x-request-id" not in initial
        assert value not in caplog.text
    code, details, initial = await trio.to_thread.run_sync(call, "y" * LIMIT)
    assert code == grpc.StatusCode.NOT_FOUND  # past the metadata checks
    assert initial["x-request-id"] == "y" * LIMIT


# --- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/payments", "/healthz", "/payments/1/cancel", "/nope"])
async def test_content_length_with_transfer_encoding_is_refused(stack: Stack, path: str) -> None:
    """The smuggled request after the chunked body is never answered."""
    smuggled = request("GET", "/healthz")
    chunked = b"0\r\n\r\n" + smuggled
    headers = {
        **AUTH,
        "Content-Type": "application/json",
        "Content-Length": str(len(chunked)),
        "Transfer-Encoding": "chunked",
    }
    before = len(stack.sandbox.state.sessions)
    client = await RawHttp.open(stack.http.port)
    try:
        await client.send(request("POST", path, headers, chunked))
        answer = await client.answer()
        assert answer.status == 400
        assert answer.json() == {"error": "Transfer-Encoding: not allowed with Content-Length"}
        assert answer.headers["connection"] == "close"
        assert await client.closed()  # no second answer: the smuggled GET was never read
    finally:
        await client.aclose()
    assert len(stack.sandbox.state.sessions) == before


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_limit_announces_the_close(stack: Stack, chunked: bool) -> None:
    body = b"{" + b" " * (TEST_MAX_BODY_BYTES + 10) + b"}"
    if chunked:
        headers = {**AUTH, "Transfer-Encoding": "chunked"}
        payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        headers = {**AUTH, "Content-Length": str(len(body))}
        payload = body
    client = await RawHttp.open(stack.http.port)
    try:
        await client.send(request("POST", "/payments", headers, payload) + request("GET", "/x"))
        answer = await client.answer()
        assert answer.status == 400
        assert answer.json()["error"].startswith("body: request body too large")
        assert answer.headers["connection"] == "close"
        assert await client.closed()
    finally:
        await client.aclose()


async def test_keep_alive_client_goes_on_after_an_oversized_body(stack: Stack) -> None:
    """httpx reuses its connection unless told otherwise: the next request must work."""
    async with httpx.AsyncClient(base_url=stack.http_url, headers=AUTH) as client:
        for _ in range(3):
            too_big = await client.post("/payments", content=b"x" * (TEST_MAX_BODY_BYTES + 1))
            assert too_big.status_code == 400
            assert too_big.headers["connection"] == "close"
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.headers.get("connection") != "close"
