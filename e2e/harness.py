"""The real processes around the e2e tests, and small clients for them.

Nothing here is mocked: ``payments serve`` / ``payments migrate`` run as separate
processes (``.venv/bin/payments``) with an explicit environment and a scratch working
directory (so no stray ``.env`` is read); the Stripe emulator runs as
``python -m payments.sandbox`` and is driven through its ``/_sandbox/`` control API; the
purerpc FakeAuthServer of tests/fixtures/auth.py runs in a background thread under its
own ``trio.run``, listening on loopback, and the service connects to it over TCP.

Tests talk to the service with httpx and the official grpcio client (blocking calls run
in a worker thread through ``trio.to_thread``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx
import trio

from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from tests.fixtures.auth import (
    APP_API_KEY,
    GATEWAY_KEY,
    NO_ACCESS_KEY,
    ORDERS_KEY,
    SERVICE_NAME,
    FakeAuthServer,
)

# An upper bound on start-up, not a pause: a ready process is seen at once. Start-up
# (imports, migrations) took over 20 s when 2 cores ran several suites at once.
START_TIMEOUT = 60.0

BIN = Path(sys.executable).parent
PAYMENTS_BIN = BIN / "payments"

# The emulator's secret key; the service is given the same one as STRIPE_SECRET_KEY.
STRIPE_KEY = "sk_test_e2eSecretKey4f0c9b2d7a61e8"
STRIPE_WEBHOOK_SECRET = "whsec_e2eWebhookSecret5a7c1e9b3d"
# Standard Webhooks secret of the status callbacks (whsec_ + base64 of 32 bytes).
CALLBACK_SIGNING_SECRET = "whsec_" + base64.b64encode(b"e2e-callback-signing-key-32bytes").decode()
CALLBACK_BASE_URL = "https://pay.e2e.test/webhooks/providers/stripe"
# A key the Auth server grants to a second caller, ``shop`` (isolation tests).
SHOP_KEY = "e2e-key-shop-6d1c0a7b"
SHOP = "shop"
ORDERS = "orders"
GATEWAY = "gateway"
MAX_BODY_BYTES = 16 * 1024

__all__ = [
    "APP_API_KEY",
    "GATEWAY",
    "GATEWAY_KEY",
    "NO_ACCESS_KEY",
    "ORDERS",
    "ORDERS_KEY",
    "SERVICE_NAME",
    "SHOP",
    "SHOP_KEY",
]


def rid(label: str = "req") -> str:
    """A fresh request id."""
    return f"e2e-{label}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(home: Path) -> dict[str, str]:
    """What every child process gets besides its settings: nothing inherited."""
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        # Passed on so `make bench` can be run with tracing exported (README).
        **{
            name: os.environ[name]
            for name in ("OTEL_EXPORTER_OTLP_ENDPOINT",)
            if os.environ.get(name)
        },
    }


def run_cli(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``payments <args>`` to completion."""
    return subprocess.run(
        [str(PAYMENTS_BIN), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- listening sockets ------------------------------------------------------------------


def _proc_addr(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6 prints the address as four host-order (little-endian) 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listen_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port`` (from /proc/net)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address, port_hex = fields[1].rsplit(":", 1)
                if fields[3] == "0A" and int(port_hex, 16) == port:
                    found.append(_proc_addr(address))
    return found


def local_addresses() -> list[str]:
    """Every address of this machine's interfaces other than loopback (v4 and v6)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(
                    sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15])
                )  # SIOCGIFADDR
            except OSError:
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not address.startswith("127."):
                found.append(address)
    with contextlib.suppress(FileNotFoundError), open("/proc/net/if_inet6") as lines:
        for line in lines:
            fields = line.split()
            address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
            scope = int(fields[3], 16)
            if address != "::1" and scope == 0:  # global scope only (no link-local)
                found.append(address)
    return found


def connect_error(host: str, port: int, timeout: float = 2.0) -> OSError | None:
    """None when a TCP connection to host:port succeeds, else the error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError as exc:
            return exc
    return None


# --- the Stripe emulator ----------------------------------------------------------------


@attrs.define
class SandboxProcess:
    """``python -m payments.sandbox`` and its control API."""

    proc: subprocess.Popen[bytes]
    url: str
    secret_key: str
    log_path: Path

    @classmethod
    def start(cls, secret_key: str, env: Mapping[str, str], cwd: Path) -> SandboxProcess:
        """Start it and wait for its ``listening on <url>`` line. Its output goes to
        ``sandbox.log`` (a file: a pipe nobody reads could fill up and stall it)."""
        log_path = cwd / "sandbox.log"
        command = [sys.executable, "-m", "payments.sandbox", "--port", "0"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*command, "--secret-key", secret_key],
                env=dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        prefix = "payments-sandbox listening on "
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return cls(proc, line.removeprefix(prefix).strip(), secret_key, log_path)
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the sandbox did not start:\n{log_path.read_text(errors='replace')}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret_key}"}

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            response = await client.request(
                method, f"/_sandbox/{path}", json=body, headers=self._auth
            )
        assert response.status_code == 200, response.text
        return response.json()

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        return await self.control("GET", "objects")

    async def requests(self) -> list[dict[str, Any]]:
        return (await self.control("GET", "requests"))["data"]

    async def fault(self, kind: str, path: str, **spec: Any) -> dict[str, Any]:
        """Inject a fault (see payments/sandbox/control.py); ``times=None`` until cleared."""
        return await self.control("POST", "faults", {"kind": kind, "path": path, **spec})

    async def clear_faults(self) -> None:
        await self.control("DELETE", "faults")

    async def deliveries(self) -> list[dict[str, Any]]:
        """Every webhook delivery attempt (event_id, event_type, url, status, ...)."""
        return (await self.control("GET", "webhook/deliveries"))["data"]

    async def events(self) -> list[dict[str, Any]]:
        return (await self.control("GET", "events"))["data"]

    async def objects_for(self, request_id: str) -> dict[str, list[dict[str, Any]]]:
        """The Stripe objects the service made for one request (by metadata.request_id);
        prices are those of the matching products."""
        everything = await self.objects()

        def mine(kind: str) -> list[dict[str, Any]]:
            return [
                obj
                for obj in everything[kind].values()
                if (obj.get("metadata") or {}).get("request_id") == request_id
            ]

        products = mine("products")
        product_ids = {p["id"] for p in products}
        return {
            "checkout_sessions": mine("checkout_sessions"),
            "payment_links": mine("payment_links"),
            "products": products,
            "prices": [p for p in everything["prices"].values() if p["product"] in product_ids],
        }

    async def requests_for(self, request_id: str, endpoint: str) -> list[dict[str, Any]]:
        """Logged API requests to ``endpoint`` whose params carry this request id."""
        return [
            r
            for r in await self.requests()
            if r["endpoint"] == endpoint
            and (r["params"].get("metadata") or {}).get("request_id") == request_id
        ]


# --- the Auth server --------------------------------------------------------------------


class AuthThread:
    """FakeAuthServer (tests/fixtures/auth.py) served in a thread with its own trio run.

    Keys: ORDERS_KEY (``orders``), GATEWAY_KEY (``gateway``), NO_ACCESS_KEY (``billing``,
    may not call payments), SHOP_KEY (``shop``); any other key is UNAUTHENTICATED.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.server: FakeAuthServer | None = None
        self._thread = threading.Thread(target=self._run, name="fake-auth", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self.server is None:
            raise RuntimeError(f"the fake Auth server did not start: {self._error!r}")

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                server = FakeAuthServer(nursery)
                server.grant(SHOP_KEY, SHOP)
                await server.start()
                self.server = server
                self._ready.set()
                await self._stop.wait()
                await server.stop()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    @property
    def addr(self) -> str:
        assert self.server is not None
        return self.server.addr

    def keys_asked(self) -> list[str]:
        """Every caller key the service asked Auth about, in order."""
        assert self.server is not None
        return [call.api_key for call in list(self.server.calls)]

    def stop(self) -> None:
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


# --- the service ------------------------------------------------------------------------


@attrs.define
class ServiceProcess:
    """One ``payments serve`` process; its stderr (the JSON log) goes to ``log_path``."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        """Every log line, parsed (each must be one JSON object)."""
        entries = []
        for line in self.log_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries

    def wait_ready(self, timeout: float = START_TIMEOUT, *, http: bool = True) -> None:
        """Until GET /healthz answers 200 (or, with ``http=False``, the gRPC port
        accepts connections); fails with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"payments serve exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            if http:
                try:
                    if httpx.get(f"{self.http_url}/healthz", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            elif connect_error("127.0.0.1", self.grpc_port) is None:
                return
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"payments serve did not get ready in {timeout}s:\n{self.log_text()}")

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, then wait for the exit code (killed and failed after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 15) -> int:
        """The exit code, once the process ends (killed and failed after ``timeout``)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"payments serve did not exit within {timeout}s:\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_service(
    env: Mapping[str, str],
    workdir: Path,
    *,
    args: Sequence[str] = ("serve",),
    ready: bool = True,
    ready_http: bool = True,
) -> ServiceProcess:
    """Start ``payments <args>`` on fresh ports (unless ``env`` fixes them) and wait for it."""
    full = dict(env)
    full.setdefault("HTTP_PORT", str(free_port()))
    full.setdefault("GRPC_PORT", str(free_port()))
    full.setdefault("PAYMENTS_METRICS_PORT", str(free_port()))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"serve-{uuid.uuid4().hex[:8]}.log"
    with open(log_path, "wb") as log, open(workdir / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            [str(PAYMENTS_BIN), *args], env=full, cwd=workdir, stdout=out, stderr=log
        )
    service = ServiceProcess(proc, full, log_path, int(full["HTTP_PORT"]), int(full["GRPC_PORT"]))
    if ready:
        try:
            service.wait_ready(http=ready_http)
        except BaseException:
            service.kill()
            raise
    return service


# --- clients ----------------------------------------------------------------------------


# Default of the request id arguments below: a fresh id per call.
FRESH = "<fresh>"


def headers(key: str | None = ORDERS_KEY, request_id: str | None = FRESH) -> dict[str, str]:
    """HTTP headers; None leaves one out; FRESH (the default) makes a new request id."""
    out = {}
    if request_id is not None:
        out["X-Request-ID"] = rid("hdr") if request_id == FRESH else request_id
    if key is not None:
        out["X-API-Key"] = key
    return out


def create_body(**changes: Any) -> dict[str, Any]:
    """A valid one-time hosted-card create body for ``orders``; ``...`` drops a field."""
    body: dict[str, Any] = {
        "request_id": rid("create"),
        "caller_service": ORDERS,
        "resource_type": "order",
        "resource_id": "1042",
        "customer_ref": "cus-7",
        "amount_cents": 2500,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": 1,
        "status_callback_url": "https://orders.internal/payments/callback",
        "metadata": {"order_ref": "A-1042"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def create_message(**changes: Any) -> pb.CreatePaymentRequest:
    """The gRPC twin of :func:`create_body` (same defaults)."""
    fields = create_body(**changes)
    return pb.CreatePaymentRequest(**fields)


class GrpcClient:
    """The official grpcio client, its blocking calls run in a worker thread."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PaymentsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def metadata(key: str | None = ORDERS_KEY, request_id: str | None = FRESH) -> list[tuple]:
        out = []
        if request_id is not None:
            out.append(("x-request-id", rid("md") if request_id == FRESH else request_id))
        if key is not None:
            out.append(("x-api-key", key))
        return out

    async def call(
        self,
        method: str,
        message: Any,
        *,
        key: str | None = ORDERS_KEY,
        request_id: str | None = FRESH,
        deadline_seconds: float = 15,
    ) -> tuple[Any, dict[str, str]]:
        """(response, initial metadata); raises grpc.RpcError."""
        bound = getattr(self.stub, method).with_call
        call = functools.partial(
            bound, message, metadata=self.metadata(key, request_id), timeout=deadline_seconds
        )
        response, rpc = await trio.to_thread.run_sync(call)
        return response, dict(rpc.initial_metadata())

    async def error(
        self, method: str, message: Any, **kwargs: Any
    ) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        """(code, details, initial metadata) of a call that must fail."""
        try:
            response, _ = await self.call(method, message, **kwargs)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", dict(exc.initial_metadata() or ())
        raise AssertionError(f"{method} succeeded, expected an error: {response}")


def payment_fields(payment: pb.Payment) -> dict[str, Any]:
    """A proto Payment as the HTTP JSON shape (zero values left out)."""
    out: dict[str, Any] = {}
    for field, value in payment.ListFields():
        out[field.name] = dict(value) if field.name == "metadata" else value
    return out


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10) -> Any:
    """Poll ``check`` until it returns something truthy (returned), failing after
    ``within`` seconds with its last value."""
    last: Any = None
    with trio.move_on_after(within):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(0.05)
    raise AssertionError(f"not within {within}s; last: {last!r}")


# --- status callbacks -------------------------------------------------------------------


@attrs.frozen
class Received:
    """One request the callback receiver got."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes
    at: float = 0.0  # time.time() when the request (headers and body) was in

    def json(self) -> Any:
        return json.loads(self.body)


class _ReceiverServer(http.server.ThreadingHTTPServer):
    # A burst of concurrent callbacks (a dispatcher sends 16 at once) must not overflow
    # the listen backlog: a dropped SYN is retried after a second, skewing timings.
    request_queue_size = 128
    daemon_threads = True


class CallbackReceiver:
    """A caller's status-callback endpoint: an HTTP server on 127.0.0.1 in a thread that
    records every request and answers the statuses queued for its path (else 200).

    ``delay`` (seconds, settable any time) holds each answer that long after the
    request is recorded: a slow caller (each request has its own thread, so slow
    answers overlap as a real server's would).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.received: list[Received] = []
        self.answers: dict[str, list[int]] = {}
        self.delay = delay
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            "POST",
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.time(),
                        )
                    )
                    queued = receiver.answers.get(self.path) or []
                    status = queued.pop(0) if queued else 200
                    delay = receiver.delay
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the sender went away (or was killed)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _ReceiverServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *statuses: int) -> None:
        """Answer the next requests to ``path`` with these statuses (then 200)."""
        with self._lock:
            self.answers[path] = list(statuses)

    def requests_to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- a world of its own -----------------------------------------------------------------


async def forward_events(
    sandbox: SandboxProcess, service: ServiceProcess, **options: Any
) -> dict[str, Any]:
    """The emulator posts its events to ``service``'s provider callback route, signed
    and with the gateway's headers, as the gateway forwards them (``options``: more
    fields of ``POST /_sandbox/webhook``, e.g. ``retry_delays``)."""
    return await sandbox.control(
        "POST",
        "webhook",
        {
            "url": f"{service.http_url}/webhooks/providers/stripe",
            "secret": STRIPE_WEBHOOK_SECRET,
            "api_key": GATEWAY_KEY,
            "retry_delays": [0.1, 0.5],
            **options,
        },
    )


@attrs.define
class Isolated:
    """A fresh migrated database and a Stripe emulator of its own, with the settings of
    ``payments serve`` pointed at both (the conftest fixture ``isolated`` makes one).

    For tests whose workers reach every row of their database (a tiny expiry or
    reconcile window, replicas racing, ``kill -9``): on the shared database they would
    expire or reconcile other tests' payments, and counts would include them.
    ``spawn`` starts ``payments`` processes on it; ``close`` kills any still running and
    stops the emulator.
    """

    database: str
    sandbox: SandboxProcess
    env: dict[str, str]
    workdir: Path
    processes: list[ServiceProcess] = attrs.field(factory=list)

    def spawn(
        self,
        env_changes: Mapping[str, str | None] | None = None,
        args: Sequence[str] = ("serve",),
        **kw: Any,
    ) -> ServiceProcess:
        """Start ``payments <args>`` (fresh ports) with these setting changes (None
        removes one) and wait until it is ready."""
        env = dict(self.env)
        for name, value in (env_changes or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        process = start_service(env, self.workdir / f"proc-{uuid.uuid4().hex[:8]}", args=args, **kw)
        self.processes.append(process)
        return process

    async def aspawn(
        self, env_changes: Mapping[str, str | None] | None = None, **kw: Any
    ) -> ServiceProcess:
        """:meth:`spawn` from a trio test (the wait runs in a worker thread)."""
        return await trio.to_thread.run_sync(functools.partial(self.spawn, env_changes, **kw))

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        self.sandbox.stop()


def received_by_payment(received: Sequence[Received]) -> dict[int, list[Received]]:
    """Callbacks grouped by the id of the payment in their body."""
    out: dict[int, list[Received]] = {}
    for request in received:
        out.setdefault(request.json()["payment"]["id"], []).append(request)
    return out
