"""Callback URLs cannot aim the service at itself (issue 9, class 4), end to end.

The rule itself is property-tested in test_input_rules.py and the dispatcher's checks
in test_dispatcher.py; here the wiring: the allow-list reaches create on both
transports, the embedded profile allows loopback and production does not, and a
payment whose callback was allowed at create is still refused at delivery when the
allow-list no longer names it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import grpc
import httpx
import trio

from payments.api.grpc import PaymentsConnectionHandler, PaymentsServicer
from payments.api.grpc_server import serve_purerpc
from payments.api.http import create_http_app, serve_http
from payments.config import load_settings
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from payments.jobs.callback_http import CallbackClient
from payments.jobs.dispatcher import Dispatcher, PassResult
from payments.model import Caller, OutboxState
from payments.profile import resolve_profile
from payments.storage import outbox
from tests.fixtures.app import KEY_A, Stack
from tests.test_input_rules import VALID

LISTED = ("127.0.0.1", "*.svc.local")


async def _serve_with_allow_list(stack: Stack) -> tuple[str, str]:
    """HTTP and gRPC over the stack's service with PAYMENTS_CALLBACK_ALLOWED_HOSTS set."""
    settings = attrs.evolve(stack.settings, callback_allowed_hosts=LISTED)
    app = create_http_app(stack.service, stack.inbound, stack.authenticator, settings)
    http_port = await stack.nursery.start(partial(serve_http, app, "127.0.0.1", 0))
    servicer = PaymentsServicer(
        stack.service,
        stack.inbound,
        stack.authenticator,
        callback_policy=settings.callback_policy(),
    )
    grpc_port = await stack.nursery.start(
        partial(
            serve_purerpc,
            [servicer],
            "127.0.0.1",
            0,
            handler_class=PaymentsConnectionHandler,
        )
    )
    return f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


async def test_the_allow_list_is_checked_at_create_on_both_transports(stack: Stack) -> None:
    http_url, grpc_target = await _serve_with_allow_list(stack)

    def create_both(url: str, n: int) -> tuple[int, grpc.StatusCode]:
        body = {**VALID, "request_id": f"allow-{n}", "status_callback_url": url}
        headers = {"X-Request-ID": f"allow-{n}", "X-API-Key": KEY_A}
        status = httpx.post(f"{http_url}/payments", json=body, headers=headers).status_code
        with grpc.insecure_channel(grpc_target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            metadata = (("x-request-id", f"allow-{n}"), ("x-api-key", KEY_A))
            try:
                grpc_body = {**body, "request_id": f"allow-grpc-{n}"}
                stub.CreatePayment(pb.CreatePaymentRequest(**grpc_body), metadata=metadata)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
        return status, code

    cases = [
        ("http://127.0.0.1:9000/cb", (201, grpc.StatusCode.OK)),
        ("https://orders.svc.local/cb", (201, grpc.StatusCode.OK)),
        ("https://orders.internal/cb", (400, grpc.StatusCode.INVALID_ARGUMENT)),
        ("http://10.0.0.1/cb", (400, grpc.StatusCode.INVALID_ARGUMENT)),
        ("http://169.254.169.254/cb", (400, grpc.StatusCode.INVALID_ARGUMENT)),
    ]
    for n, (url, expected) in enumerate(cases):
        assert await trio.to_thread.run_sync(create_both, url, n) == expected, url
    # The stack's own servers (empty allow-list) refuse loopback and take public names.
    reply = await trio.to_thread.run_sync(
        lambda: httpx.post(
            f"{stack.http_url}/payments",
            json={**VALID, "status_callback_url": "http://127.0.0.1:9000/cb"},
            headers={"X-Request-ID": "r-loop", "X-API-Key": KEY_A},
        )
    )
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("status_callback_url: host is a loopback address")


def test_the_embedded_profile_allows_loopback_and_production_does_not(tmp_path: Path) -> None:
    env = {"PAYMENTS_SQLITE_PATH": str(tmp_path / "p.db")}
    embedded = resolve_profile(load_settings(env, dotenv_path=None)).settings
    assert embedded.callback_policy().url_problem("http://127.0.0.1:9000/cb") == ""
    assert embedded.callback_policy().url_problem("http://localhost:9000/cb") == ""
    assert embedded.callback_policy().url_problem("http://169.254.169.254/") != ""
    production = resolve_profile(
        load_settings(
            {
                **env,
                "APP_API_KEY": "own",
                "STRIPE_SECRET_KEY": "sk_live_x",
                "STRIPE_WEBHOOK_SECRET": "whsec_x",
                "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": "https://pay.example.com/hooks",
            },
            dotenv_path=None,
        )
    ).settings
    assert "loopback" in production.callback_policy().url_problem("http://127.0.0.1:9000/cb")


async def test_an_allow_list_narrowed_after_create_refuses_at_delivery(stack: Stack) -> None:
    """Created while allowed, delivered under a list that no longer names the host: the
    real dispatcher fails it at once, without a request."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[object] = []

    async def count_connections() -> None:
        async with listener:
            while True:
                accepted.append(await listener.accept())

    stack.nursery.start_soon(count_connections)
    payment = await stack.create_payment(status_callback_url="https://orders.svc.local/cb")
    async with stack.pool.connection() as conn:
        await conn.execute(
            "UPDATE payments SET status_callback_url = %s WHERE id = %s",
            [f"http://127.0.0.1:{port}/cb", payment.id],
        )
    await stack.service.cancel(Caller("svc-a"), payment.id, "test")
    narrowed = attrs.evolve(stack.settings, callback_allowed_hosts=("*.svc.local",))
    async with Dispatcher(stack.pool, narrowed, http_client=CallbackClient()) as dispatcher:
        assert await dispatcher.run_pass() == PassResult(claimed=1, failed=1)
    async with stack.pool.connection() as conn:
        (entry,) = await outbox.entries_for_payment(conn, payment.id)
    assert entry.state == OutboxState.FAILED
    assert "loopback" in entry.last_error and accepted == []
