"""The direct read (payments.api.http_direct) answers exactly what Quart's route does.

Two apps serve the same service: the default one, where a plain ``GET /payments/{id}``
skips Quart, and one built with ``direct_reads=False``. Every request goes to both as
the same bytes, on a new connection each; the answers (status line, every header but
``Date``, in order, and the body) and the access lines (every field but time and
latency) must be equal. A spy on the direct path checks which requests it took, so the
comparison is never Quart against Quart.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from payments.api import http_direct
from payments.api.http_rules import DRAINING
from payments.logs import ACCESS_LOGGER
from payments.model import Caller, Payment, PaymentStatus
from payments.providers.registry import ProviderRegistry
from payments.service import PaymentService
from tests.fixtures.app import KEY_A, KEY_B, NO_ACCESS_KEY, HttpServer, Stack
from tests.h2_raw import RawH2

pytestmark = pytest.mark.timeout(180)

# Record fields that differ between two answers to the same request by nature.
_VARYING = {
    "created",
    "msecs",
    "relativeCreated",
    "latency_ms",
    "thread",
    "threadName",
    "taskName",
    "process",
    "processName",
    "asctime",
    "args",
    "msg",
    "message",
    "_payments_redacted_by",
    "exc_info",
    "exc_text",
    "stack_info",
    "lineno",
    "pathname",
    "filename",
    "module",
    "funcName",
}


@attrs.frozen
class Exchange:
    """What one request produced: the answer's bytes (``Date`` left out) and the log."""

    head: tuple[str, ...]
    body: bytes
    lines: tuple[tuple[tuple[str, Any], ...], ...]


def _read_answer(sock: socket.socket) -> tuple[tuple[str, ...], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the head: {data!r}"
        data += chunk
    top, rest = data.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    head = tuple(line for line in lines if not line.lower().startswith("date:"))
    return head, rest[:length]


def _fields(record: logging.LogRecord) -> tuple[tuple[str, Any], ...]:
    return (
        *tuple((key, value) for key, value in sorted(vars(record).items()) if key not in _VARYING),
        ("message", record.getMessage()),
    )


class Pair:
    """The two servers and the captured log, used from a worker thread."""

    def __init__(self, direct: HttpServer, quart: HttpServer, caplog: pytest.LogCaptureFixture):
        self.direct, self.quart, self.caplog = direct, quart, caplog

    def exchange(self, server: HttpServer, raw: bytes) -> Exchange:
        self.caplog.clear()
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(raw)
            head, body = _read_answer(sock)
        # The access line is written before the answer is sent: it is already there.
        records = [r for r in self.caplog.records if r.name in (ACCESS_LOGGER, "payments.api.http")]
        return Exchange(head, body, tuple(_fields(r) for r in records))

    def both(self, raw: bytes) -> tuple[Exchange, Exchange]:
        return self.exchange(self.direct, raw), self.exchange(self.quart, raw)


@pytest.fixture
async def pair(stack: Stack, caplog: pytest.LogCaptureFixture) -> Pair:
    caplog.set_level(logging.INFO)
    quart = await stack.start_http(direct_reads=False)
    return Pair(stack.http, quart, caplog)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the direct path answered."""
    seen: list[str] = []
    real = http_direct._get_payment

    async def spy(*args: Any) -> None:
        seen.append(args[3]["path"])
        await real(*args)

    monkeypatch.setattr(http_direct, "_get_payment", spy)
    yield seen


def request(
    target: str,
    headers: list[tuple[str, str]],
    *,
    version: str = "1.1",
    body: bytes = b"",
) -> bytes:
    lines = [
        f"GET {target} HTTP/{version}",
        "Host: payments.internal",
        *(f"{n}: {v}" for n, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _payments(stack: Stack) -> tuple[Payment, Payment, Payment]:
    """A's pending payment, A's paid one and B's pending one."""
    mine = await stack.create_payment("svc-a")
    paid = await stack.create_payment("svc-a")
    await stack.set_status(paid.id, PaymentStatus.PAID)
    theirs = await stack.create_payment("svc-b")
    return mine, paid, theirs


async def test_plain_reads_and_their_refusals_answer_the_same(
    stack: Stack, pair: Pair, taken: list[str]
) -> None:
    mine, paid, theirs = await _payments(stack)
    cases = [
        (f"/payments/{mine.id}", [("X-Request-ID", "rid-1"), ("X-API-Key", KEY_A)]),
        (f"/payments/{paid.id}", [("X-Request-ID", "rid-2"), ("X-API-Key", KEY_A)]),
        (f"/payments/{theirs.id}", [("X-Request-ID", "rid-3"), ("X-API-Key", KEY_A)]),  # 404
        (f"/payments/{mine.id}", [("X-API-Key", KEY_A)]),  # no request id: 400
        (f"/payments/{mine.id}", [("X-Request-ID", "r" * 129), ("X-API-Key", KEY_A)]),
        (f"/payments/{mine.id}", [("X-Request-ID", "rid-4")]),  # no key: 401
        (f"/payments/{mine.id}", [("X-Request-ID", "rid-5"), ("X-API-Key", "nope")]),
        (f"/payments/{mine.id}", [("X-Request-ID", "rid-6"), ("X-API-Key", NO_ACCESS_KEY)]),
        ("/payments/abc", [("X-Request-ID", "rid-7"), ("X-API-Key", KEY_A)]),  # 400
        ("/payments/0", [("X-Request-ID", "rid-8"), ("X-API-Key", KEY_A)]),
        ("/payments/9223372036854775808", [("X-Request-ID", "rid-9"), ("X-API-Key", KEY_A)]),
        (f"/payments/{mine.id}?fields=all", [("X-Request-ID", "rid-q"), ("X-API-Key", KEY_A)]),
    ]
    for target, headers in cases:
        direct, quart = await trio.to_thread.run_sync(pair.both, request(target, headers))
        assert direct == quart, target
        assert direct.lines, "every request writes its access line"
    assert len(taken) == len(cases), "each of these is plain: the direct path took it"
    # HTTP/1.0, and the owner's read seen by the other tenant's key.
    for raw in (
        request(
            f"/payments/{mine.id}", [("X-Request-ID", "r"), ("X-API-Key", KEY_A)], version="1.0"
        ),
        request(f"/payments/{mine.id}", [("X-Request-ID", "r"), ("X-API-Key", KEY_B)]),
    ):
        direct, quart = await trio.to_thread.run_sync(pair.both, raw)
        assert direct == quart


async def test_requests_that_frame_a_body_are_left_to_quart(
    stack: Stack, pair: Pair, taken: list[str]
) -> None:
    mine = await stack.create_payment("svc-a")
    auth = [("X-Request-ID", "rid-b"), ("X-API-Key", KEY_A)]
    for extra, body in (
        ([("Content-Length", "0")], b""),
        ([("Content-Length", "2")], b"{}"),
        ([("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], b"0\r\n\r\n"),  # 400
    ):
        raw = request(f"/payments/{mine.id}", [*auth, *extra], body=body)
        direct, quart = await trio.to_thread.run_sync(pair.both, raw)
        assert direct == quart, extra
    assert taken == []


async def _h2_exchange(pair: Pair, server: HttpServer, headers: list[tuple[str, str]]) -> Exchange:
    pair.caplog.clear()
    client = await RawH2.open(server.port)
    try:
        stream = await client.headers(headers, end_stream=True)
        await client.wait(stream)
    finally:
        await client.aclose()
    got = client.results[stream]
    head = tuple(sorted(f"{k}: {v}" for k, v in got.headers.items() if k != "date"))
    records = [r for r in pair.caplog.records if r.name == ACCESS_LOGGER]
    return Exchange(head, got.body, tuple(_fields(r) for r in records))


async def test_http2_reads_answer_the_same(stack: Stack, pair: Pair, taken: list[str]) -> None:
    mine, _, theirs = await _payments(stack)
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "payments.internal")]
    for path, extra in (
        (f"/payments/{mine.id}", [("x-request-id", "rid-h2"), ("x-api-key", KEY_A)]),
        (f"/payments/{theirs.id}", [("x-request-id", "rid-h2"), ("x-api-key", KEY_A)]),
        (f"/payments/{mine.id}", [("x-request-id", "rid-h2")]),
        ("/payments/x", [("x-request-id", "rid-h2"), ("x-api-key", KEY_A)]),
    ):
        headers = [*base, (":path", path), *extra]
        direct = await _h2_exchange(pair, pair.direct, headers)
        quart = await _h2_exchange(pair, pair.quart, headers)
        assert direct == quart, path
        assert direct.lines
    assert len(taken) == 4
    for server in (pair.direct, pair.quart):  # no Connection header on HTTP/2, draining or not
        server.app.config[DRAINING] = True
    headers = [
        *base,
        (":path", f"/payments/{mine.id}"),
        ("x-request-id", "r"),
        ("x-api-key", KEY_A),
    ]
    direct = await _h2_exchange(pair, pair.direct, headers)
    assert direct == await _h2_exchange(pair, pair.quart, headers)
    assert not any(line.startswith("connection") for line in direct.head)


def _counted(status: str) -> float:
    labels = {"route": http_direct.RULE, "method": "GET", "code": status}
    return REGISTRY.get_sample_value("payments_http_requests_total", labels) or 0.0


async def test_a_direct_read_is_counted_under_its_route(stack: Stack, pair: Pair) -> None:
    mine = await stack.create_payment("svc-a")
    before = _counted("200"), _counted("404")
    for target in (f"/payments/{mine.id}", "/payments/9223372036854775807"):
        raw = request(target, [("X-Request-ID", "rid-m"), ("X-API-Key", KEY_A)])
        await trio.to_thread.run_sync(pair.exchange, pair.direct, raw)
    # Counted once the answer is out: the client may read it first.
    with trio.fail_after(5):
        while (_counted("200"), _counted("404")) != (before[0] + 1, before[1] + 1):  # noqa: ASYNC110  (a counter, no event)
            await trio.sleep(0.01)


async def test_a_draining_server_closes_the_connection_on_both_paths(
    stack: Stack, pair: Pair, taken: list[str]
) -> None:
    mine = await stack.create_payment("svc-a")
    for server in (pair.direct, pair.quart):
        server.app.config[DRAINING] = True
    raw = request(f"/payments/{mine.id}", [("X-Request-ID", "rid-d"), ("X-API-Key", KEY_A)])
    direct, quart = await trio.to_thread.run_sync(pair.both, raw)
    assert direct == quart
    assert "connection: close" in (line.lower() for line in direct.head)
    assert len(taken) == 1


class _Broken(PaymentService):
    """A service whose read fails in a way no error table knows (a bug)."""

    async def get(self, caller: Caller, payment_id: int) -> Payment:
        raise RuntimeError(f"boom for {caller.service_name}")


async def test_an_unexpected_error_is_a_logged_500_on_both_paths(
    stack: Stack, caplog: pytest.LogCaptureFixture, taken: list[str]
) -> None:
    caplog.set_level(logging.INFO)
    broken = _Broken(stack.service.unit_of_work, ProviderRegistry({}), "http://x")
    pair = Pair(
        await stack.start_http(service=broken),
        await stack.start_http(service=broken, direct_reads=False),
        caplog,
    )
    raw = request("/payments/1", [("X-Request-ID", "rid-x"), ("X-API-Key", KEY_A)])
    direct, quart = await trio.to_thread.run_sync(pair.both, raw)
    assert direct == quart
    assert direct.head[0] == "HTTP/1.1 500 "
    assert direct.body == b'{"error":"internal server error"}'
    messages = [dict(line)["message"] for line in direct.lines]
    assert messages == ["unhandled error", "http GET /payments/<payment_id> 500"]
    assert len(taken) == 1


# --- generated requests ------------------------------------------------------------------

_SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "+1",
            " 1",
            "1.0",
            "01",
            "00",
            "abc",
            "\u0661",
            "9" * 20,
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "9223372036854775808",
            "%31",
            "%2F1",
            "1%00",
            "..",
            ".",
        ]
    ),
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#"),
        min_size=1,
        max_size=30,
    ),
)
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=140,
)
_REQUEST_IDS = st.one_of(st.none(), st.just(""), st.just("   "), st.just("r" * 128), _HEADER_TEXT)
_KEYS = st.one_of(
    st.none(),
    st.sampled_from([KEY_A, KEY_B, NO_ACCESS_KEY, "", "  ", f" {KEY_A} ", "nope"]),
    _HEADER_TEXT,
)


@pytest.mark.timeout(300)
async def test_generated_reads_answer_the_same_on_both_paths(
    stack: Stack, pair: Pair, taken: list[str]
) -> None:
    mine, paid, theirs = await _payments(stack)
    ids = [str(mine.id), str(paid.id), str(theirs.id)]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        segment=st.one_of(st.sampled_from(ids), _SEGMENTS),
        query=st.sampled_from(["", "?a=1", "?", "?id=1&id=2"]),
        request_ids=st.lists(_REQUEST_IDS, max_size=2),
        keys=st.lists(_KEYS, max_size=2),
        version=st.sampled_from(["1.1", "1.0"]),
        shuffle=st.randoms(use_true_random=False),
    )
    def same(
        segment: str,
        query: str,
        request_ids: list[str | None],
        keys: list[str | None],
        version: str,
        shuffle: Any,
    ) -> None:
        headers = [("X-Request-ID", v) for v in request_ids if v is not None]
        headers += [("X-API-Key", v) for v in keys if v is not None]
        shuffle.shuffle(headers)
        target = f"/payments/{quote(segment, safe='%+-._~')}{query}"
        direct, quart = pair.both(request(target, headers, version=version))
        assert direct == quart, (target, headers)
        sent.append(target)

    sent: list[str] = []
    await trio.to_thread.run_sync(same)
    assert len(sent) >= 150
    assert len(taken) >= 100, "most generated requests are plain: the direct path took them"
