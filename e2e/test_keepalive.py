"""HTTP/1.1 keep-alive after an answer sent before the request body arrived.

Real clients (httpx, Go's net/http) write a request's headers and its body separately,
so on a loaded machine or a slow network the body can arrive after the service has
already answered: every answer given from the headers alone (400 without X-Request-ID,
401/403, 404 unknown route, 400 too large by Content-Length) races with it. The service may then
either keep the connection usable or close it; what it must not do is leave the
connection open and never answer the next request on it (the client hangs until its
own timeout, and the server-side socket is never closed).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import trio

from e2e.harness import MAX_BODY_BYTES, NO_ACCESS_KEY, ORDERS_KEY, ServiceProcess, create_body

Spawn = Callable[..., ServiceProcess]
KEY = {"X-API-Key": ORDERS_KEY}
HEADERS = {"X-Request-ID": "idle-2", **KEY}

EARLY_ANSWERS = {
    "no-request-id": ("/payments", {}, 400, create_body()),
    "no-key": ("/payments", {"X-Request-ID": "ka-1"}, 401, create_body()),
    "no-access": ("/payments", {"X-Request-ID": "ka-1", "X-API-Key": NO_ACCESS_KEY}, 403, None),
    "unknown-route": ("/nowhere", {"X-Request-ID": "ka-1", "X-API-Key": ORDERS_KEY}, 404, None),
    "too-large": (
        "/payments",
        {"X-Request-ID": "ka-1", "X-API-Key": ORDERS_KEY},
        400,
        create_body(metadata={"pad": "x" * 400} | {f"k{i}": "y" * 400 for i in range(45)}),
    ),
}


ATTEMPTS = 3
# How long the second request may take before it counts as never answered.
ANSWER_TIMEOUT = 1.0


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response (Content-Length framed); raises on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed mid-body")
        rest += chunk
    return status, rest


def _late_body_then_next_request(
    port: int, path: str, first_headers: dict[str, str], body: bytes
) -> tuple[int, str]:
    """Send headers, read the early answer, send the body, then a second request on the
    same connection. Returns (early status, what happened to the second request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        head = [f"POST {path} HTTP/1.1", "Host: e2e", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in first_headers.items()]
        head.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        status, _ = _read_response(sock)
        time.sleep(0.1)  # the server is done with the request by now; the body is late
        try:
            sock.sendall(body)
            time.sleep(0.05)
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: e2e\r\nX-Request-ID: ka-2\r\n"
                + f"X-API-Key: {ORDERS_KEY}\r\n\r\n".encode()
            )
            second, _ = _read_response(sock)
        except (EOFError, ConnectionError):
            return status, "closed"  # the server closed the connection: fine
        except TimeoutError:
            return status, "no answer"
        return status, f"answered {second}"


async def test_connection_is_answered_or_closed_after_an_early_answer(spawn: Spawn) -> None:
    """Against a process of its own: the dead connections this finds would otherwise
    hold the shared service's shutdown for its whole grace period."""
    process = await trio.to_thread.run_sync(spawn, {"PAYMENTS_SHUTDOWN_GRACE_SECONDS": "3"})
    dead = {}
    for case, (path, first_headers, expected, body) in EARLY_ANSWERS.items():
        raw = json.dumps(body if body is not None else create_body()).encode()
        if case == "too-large":
            assert len(raw) > MAX_BODY_BYTES
        # Which of the server's tasks runs first can decide it: try a few times.
        for _ in range(ATTEMPTS):
            status, outcome = await trio.to_thread.run_sync(
                _late_body_then_next_request, process.http_port, path, first_headers, raw
            )
            assert status == expected, case
            if outcome == "no answer":
                dead[case] = status
                break

    # Dead connections must not hold up a graceful stop either.
    started = trio.current_time()
    code = await trio.to_thread.run_sync(process.terminate)
    stop_seconds = trio.current_time() - started
    assert code == 0, process.log_text()[-3000:]
    assert dead == {}, (
        "after an early answer and a late request body, the next request on the same "
        f"connection was never answered (case: status): {dead}; the connection stays open "
        f"but dead (SIGTERM then took {stop_seconds:.1f}s of the 3s grace)"
    )
    assert stop_seconds < 2, f"SIGTERM took {stop_seconds:.1f}s with nothing in flight"


async def test_idle_keepalive_connection_does_not_hold_up_shutdown(spawn: Spawn) -> None:
    """A client holding an idle keep-alive connection (as every pooling HTTP client does,
    the gateway's included) must not make SIGTERM wait out the whole grace period:
    nothing is in flight, so the process should stop at once."""
    process = await trio.to_thread.run_sync(spawn, {"PAYMENTS_SHUTDOWN_GRACE_SECONDS": "3"})
    async with httpx.AsyncClient(base_url=process.http_url, timeout=10) as http:
        response = await http.get("/health", headers={"X-Request-ID": "idle-1"} | KEY)
        assert response.status_code == 200
        created = await http.post("/payments", json=create_body(), headers=HEADERS)
        assert created.status_code == 201, created.text
        started = trio.current_time()
        code = await trio.to_thread.run_sync(process.terminate)
        stop_seconds = trio.current_time() - started
    assert code == 0, process.log_text()[-3000:]
    assert stop_seconds < 2, (
        f"SIGTERM took {stop_seconds:.1f}s (grace 3s) with only an idle keep-alive "
        "connection open: the server never closed it"
    )
