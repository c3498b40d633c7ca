"""The ``payments`` command as a process: configuration errors, ``version``, ``serve
--only``, the addresses it binds, and dependencies being down."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
import trio

import payments
from e2e.harness import (
    APP_API_KEY,
    ORDERS_KEY,
    STRIPE_KEY,
    STRIPE_WEBHOOK_SECRET,
    GrpcClient,
    ServiceProcess,
    connect_error,
    create_body,
    create_message,
    free_port,
    headers,
    listen_addresses,
    local_addresses,
    run_cli,
)
from payments.gen import payments_pb2 as pb

Spawn = Callable[..., ServiceProcess]


def env_with(service_env: dict[str, str], **changes: str | None) -> dict[str, str]:
    env = dict(service_env)
    env.update(HTTP_PORT=str(free_port()), GRPC_PORT=str(free_port()))
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_serve(env: dict[str, str], e2e_dir: Path) -> tuple[int, str]:
    done = run_cli(["serve"], env, e2e_dir, timeout=20)
    return done.returncode, done.stdout + done.stderr


def assert_no_secret(text: str) -> None:
    for secret in (STRIPE_KEY, STRIPE_WEBHOOK_SECRET, APP_API_KEY):
        assert secret not in text


async def test_serve_with_half_configured_stripe(
    service_env: dict[str, str], e2e_dir: Path
) -> None:
    # A Stripe key without the callback base URL is refused, not replaced by the sandbox.
    env = env_with(service_env, PAYMENTS_PROVIDER_CALLBACK_BASE_URL=None)
    code, output = await trio.to_thread.run_sync(run_serve, env, e2e_dir)
    assert code != 0, output
    assert "PAYMENTS_PROVIDER_CALLBACK_BASE_URL" in output
    assert "MYSQL_DSN" not in output  # set: not named as missing
    assert_no_secret(output)
    assert listen_addresses(int(env["HTTP_PORT"])) == []


@pytest.mark.parametrize("key", [None, "  "])
async def test_serve_with_stripe_settings_but_no_key(
    service_env: dict[str, str], e2e_dir: Path, key: str | None
) -> None:
    env = env_with(service_env, STRIPE_SECRET_KEY=key)
    code, output = await trio.to_thread.run_sync(run_serve, env, e2e_dir)
    assert code != 0, output
    assert "STRIPE_SECRET_KEY" in output
    assert_no_secret(output)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_PORT", "abc"),
        ("GRPC_PORT", "70000"),
        ("MYSQL_MAX_OPEN_CONNS", "many"),
        ("PAYMENTS_PROVIDER_CALLBACK_BASE_URL", "not a url"),
        ("AUTH_SERVICE_GRPC_ADDR", "auth-without-port"),
        ("LOG_LEVEL", "loud"),
    ],
)
async def test_serve_with_a_bad_value(
    service_env: dict[str, str], e2e_dir: Path, variable: str, value: str
) -> None:
    env = env_with(service_env, **{variable: value})
    code, output = await trio.to_thread.run_sync(run_serve, env, e2e_dir)
    assert code != 0, output
    assert variable in output, output
    assert_no_secret(output)
    assert "Traceback" not in output, output


async def test_version(e2e_dir: Path, service_env: dict[str, str]) -> None:
    done = await trio.to_thread.run_sync(run_cli, ["version"], service_env, e2e_dir)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["version"] == payments.__version__
    for name in ("commit", "build_time"):
        assert isinstance(info[name], str) and info[name], info


async def test_unknown_part_is_refused(e2e_dir: Path, service_env: dict[str, str]) -> None:
    done = await trio.to_thread.run_sync(
        run_cli, ["serve", "--only", "bogus"], service_env, e2e_dir
    )
    assert done.returncode != 0
    assert "--only" in done.stderr and "bogus" in done.stderr, done.stderr


async def test_serve_only_http(spawn: Spawn) -> None:
    process = await trio.to_thread.run_sync(spawn, None, ("serve", "--only", "http"))
    async with httpx.AsyncClient(base_url=process.http_url, timeout=10) as http:
        health = await http.get("/health", headers=headers())
        assert health.status_code == 200, health.text
        created = await http.post("/payments", json=create_body(), headers=headers())
        assert created.status_code == 201, created.text
        healthz = (await http.get("/healthz")).json()
    assert set(healthz["children"]) == {"http", "metrics"}  # /metrics runs with every serve
    assert listen_addresses(process.grpc_port) == []
    assert connect_error("127.0.0.1", process.grpc_port) is not None
    code = await trio.to_thread.run_sync(process.terminate)
    assert code == 0, process.log_text()


async def test_serve_only_grpc(spawn: Spawn) -> None:
    process = await trio.to_thread.run_sync(
        lambda: spawn(None, ("serve", "--only", "grpc"), ready_http=False)
    )
    client = GrpcClient(process.grpc_target)
    try:
        reply, _ = await client.call("CreatePayment", create_message())
        assert reply.payment.status == 2
    finally:
        client.close()
    assert listen_addresses(process.http_port) == []
    assert connect_error("127.0.0.1", process.http_port) is not None
    code = await trio.to_thread.run_sync(process.terminate)
    assert code == 0, process.log_text()


async def test_servers_bind_only_the_configured_host(service: ServiceProcess) -> None:
    """HTTP_HOST=GRPC_HOST=127.0.0.1: listening on loopback alone, so every other
    address of this machine refuses the connection."""
    for port in (service.grpc_port, service.http_port):
        assert listen_addresses(port) == ["127.0.0.1"], port
        assert connect_error("127.0.0.1", port) is None
        for address in local_addresses():
            error = connect_error(address, port)
            assert isinstance(error, ConnectionRefusedError), (address, port, error)


async def test_auth_unreachable_is_503(spawn: Spawn) -> None:
    """Auth being down is not the caller's fault: 503 / UNAVAILABLE, never 401."""
    process = await trio.to_thread.run_sync(
        spawn, {"AUTH_SERVICE_GRPC_ADDR": f"127.0.0.1:{free_port()}"}
    )
    async with httpx.AsyncClient(base_url=process.http_url, timeout=15) as http:
        response = await http.get("/payments", headers=headers(ORDERS_KEY))
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "auth service unavailable"}
    client = GrpcClient(process.grpc_target)
    try:
        code, details, _ = await client.error("ListPayments", pb.ListPaymentsRequest())
    finally:
        client.close()
    assert code == grpc.StatusCode.UNAVAILABLE, details


async def test_database_unreachable_is_503(spawn: Spawn) -> None:
    """The database being down: /healthz says so (503), calls answer 503 / UNAVAILABLE."""
    dead = f"mysql://root@127.0.0.1:{free_port()}/payments"
    process = await trio.to_thread.run_sync(lambda: spawn({"MYSQL_DSN": dead}, ready=False))
    async with httpx.AsyncClient(base_url=process.http_url, timeout=15) as http:
        for _ in range(200):
            try:
                healthz = await http.get("/healthz")
                break
            except httpx.TransportError:
                await trio.sleep(0.05)
        else:
            raise AssertionError(f"no HTTP answer:\n{process.log_text()}")
        assert healthz.status_code == 503, healthz.text
        assert healthz.json()["database"] == "unavailable"
        response = await http.post("/payments", json=create_body(), headers=headers())
        assert response.status_code == 503, response.text
        assert "internal" not in response.text
    client = GrpcClient(process.grpc_target)
    try:
        code, details, _ = await client.error("GetPayment", pb.GetPaymentRequest(id=1))
    finally:
        client.close()
    assert code == grpc.StatusCode.UNAVAILABLE, details


async def test_a_real_profile_on_every_interface_by_default_says_so(
    spawn: Spawn, service: ServiceProcess
) -> None:
    """HTTP_HOST / GRPC_HOST unset on a real profile: 0.0.0.0, and one plain line on
    stderr and in the "starting" record naming both; set (the shared service), neither."""
    process = await trio.to_thread.run_sync(spawn, {"HTTP_HOST": None, "GRPC_HOST": None})
    for port in (process.http_port, process.grpc_port):
        assert listen_addresses(port) == ["0.0.0.0"], port
    code = await trio.to_thread.run_sync(process.terminate)
    assert code == 0, process.log_text()
    lines = process.log_text().splitlines()
    plain = [line for line in lines if line.strip() and not line.startswith("{")]
    assert plain == [
        "payments: GRPC_HOST and HTTP_HOST unset: listening on every network interface"
        " (0.0.0.0); set them to the address to serve on (deployment.md)"
    ]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    (starting,) = [e for e in entries if e["message"] == "starting"]
    assert starting["every_interface"] == plain[0].removeprefix("payments: ")
    assert starting["listening"] == {
        "HTTP": f"0.0.0.0:{process.http_port}",
        "gRPC": f"0.0.0.0:{process.grpc_port}",
        "metrics": f"0.0.0.0:{process.env['PAYMENTS_METRICS_PORT']}",
    }
    (shared,) = [e for e in service.log_entries() if e.get("message") == "starting"]
    assert "every_interface" not in shared
    assert shared["listening"]["HTTP"] == f"127.0.0.1:{service.http_port}"
