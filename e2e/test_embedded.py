"""The embedded profile as a real process: ``payments serve`` with nothing configured.

Each scenario runs ``.venv/bin/payments serve`` in a fresh working directory (so its
``var/`` is made there) with a minimal environment: ``PATH``, ``HOME`` and the three
ports (``HTTP_PORT``, ``GRPC_PORT``, ``PAYMENTS_SANDBOX_PORT``), free ones so runs do
not collide. Nothing else is set, so the service picks SQLite under ``var/``, the Stripe
sandbox as its child and the dev API key, and binds loopback only.

- the start: the banner, /healthz, loopback-only listeners, the SQLite file in WAL mode;
- the README quick start: create with the dev key, the sandbox checkout page, Pay, the
  payment PAID, the caller's status callback, the sandbox dashboard;
- a restart in the same directory keeps the dev key, the payments and idempotency, and
  a pending payment stays payable, after a clean stop or a ``kill -9``;
- refusals: a non-loopback host, a half-configured Stripe, a corrupt or locked database
  file, a keys file with a bad line (each exits non-zero, its last line naming what is
  wrong, no traceback);
- local keys (``payments keys create`` + ``PAYMENTS_API_KEYS_FILE``) with the sandbox;
- MySQL (``MYSQL_DSN`` alone, after ``payments migrate``) with the sandbox.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from e2e.harness import (
    CallbackReceiver,
    GrpcClient,
    ServiceProcess,
    base_env,
    connect_error,
    eventually,
    free_port,
    listen_addresses,
    local_addresses,
    rid,
    run_cli,
    start_service,
)
from payments.config import MysqlDsn
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus
from payments.storage.pool import Pool
from tests.fixtures.db import MysqlServer, dsn_url

# Every test (its fixtures included) well under this.
pytestmark = pytest.mark.timeout(30)

DEV = "dev"
ORDERS = "orders"
EMBEDDED_TITLE = "payments: embedded profile (development only, loopback only)"
SQLITE_MAGIC = b"SQLite format 3\x00"
PAY_FORM = re.compile(r'<form method="post" action="([^"]+/pay)">')


# --- helpers ----------------------------------------------------------------------------


def fresh_dir(e2e_dir: Path, label: str) -> Path:
    path = e2e_dir / f"{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def minimal_env(workdir: Path, **extra: str) -> dict[str, str]:
    """PATH, HOME and three free ports: nothing else is configured."""
    http_port, grpc_port, sandbox_port = free_ports(3)
    return {
        "PATH": base_env(workdir)["PATH"],
        "HOME": str(workdir),
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "PAYMENTS_SANDBOX_PORT": str(sandbox_port),
        **extra,
    }


def sandbox_port(process: ServiceProcess) -> int:
    return int(process.env["PAYMENTS_SANDBOX_PORT"])


def banner_lines(process: ServiceProcess) -> list[str]:
    """The non-JSON lines of stderr (the log is JSON, one object a line)."""
    return [
        line.strip()
        for line in process.log_text().splitlines()
        if line.strip() and not line.lstrip().startswith("{")
    ]


def banner_key(process: ServiceProcess) -> str:
    keys = [line.split()[2] for line in banner_lines(process) if line.startswith("API key ")]
    assert len(keys) == 1, banner_lines(process)
    return keys[0]


def dev_key_file(workdir: Path) -> str:
    return (workdir / "var" / "dev-api-key").read_text().strip()


def auth(key: str, request_id: str | None = None) -> dict[str, str]:
    return {"X-Request-ID": request_id or rid("emb"), "X-API-Key": key}


def quick_start_body(**changes: Any) -> dict[str, Any]:
    """The README's quick-start create body (plus the request id in the body)."""
    body: dict[str, Any] = {
        "request_id": rid("demo"),
        "caller_service": DEV,
        "resource_type": "order",
        "resource_id": "1",
        "amount_cents": 2500,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": 1,
        "status_callback_url": "http://127.0.0.1:9/callback",
    }
    body.update(changes)
    return body


async def create(
    client: httpx.AsyncClient, key: str, body: dict[str, Any], request_id: str | None = None
) -> dict[str, Any]:
    response = await client.post(
        "/payments", json=body, headers=auth(key, request_id or body["request_id"])
    )
    assert response.status_code == 201, response.text
    return response.json()["payment"]


async def until_status(
    client: httpx.AsyncClient, key: str, payment_id: int, status: PaymentStatus
) -> dict[str, Any]:
    async def check() -> Any:
        response = await client.get(f"/payments/{payment_id}", headers=auth(key))
        assert response.status_code == 200, response.text
        payment = response.json()["payment"]
        return payment if payment["status"] == status else None

    return await eventually(check)


async def pay(checkout_url: str, expect_amount: str = "EUR 25.00") -> str:
    """Open the sandbox checkout page, post its Pay form; the 303's Location."""
    async with httpx.AsyncClient(timeout=10) as browser:
        page = await browser.get(checkout_url)
        title = page.text.partition("<title>")[2].partition("</title>")[0]
        assert page.status_code == 200, f"GET {checkout_url}: {page.status_code} {title!r}"
        assert page.headers["content-type"].startswith("text/html")
        assert expect_amount in page.text
        for button in ("Pay", "Decline", "Cancel"):
            assert f">{button}</button>" in page.text
        found = PAY_FORM.search(page.text)
        assert found is not None, page.text
        paid = await browser.post(httpx.URL(checkout_url).join(found[1]))
    assert paid.status_code == 303, paid.text
    return paid.headers["location"]


def start(env: dict[str, str], workdir: Path) -> ServiceProcess:
    """``payments serve`` in ``workdir``, ready (GET /healthz is 200)."""
    return start_service(env, workdir)


async def astart(env: dict[str, str], workdir: Path) -> ServiceProcess:
    return await trio.to_thread.run_sync(start, env, workdir)


async def astop(process: ServiceProcess) -> int:
    return await trio.to_thread.run_sync(process.terminate)


def check_refused(done: Any, *names: str) -> str:
    """A start that must fail: non-zero, no traceback, and its last line (what the
    operator reads) the configuration error naming each of ``names``."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("payments: configuration error: "), output
    for name in names:
        assert name in last, output
    return output


async def arun(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    return await trio.to_thread.run_sync(partial(run_cli, args, env, cwd, timeout=20))


# --- the shared embedded process (scenarios 1 and 2) ------------------------------------


@pytest.fixture(scope="module")
def embedded(e2e_dir: Path) -> Iterator[ServiceProcess]:
    workdir = fresh_dir(e2e_dir, "embedded")
    process = start(minimal_env(workdir), workdir)
    try:
        yield process
    finally:
        code = process.terminate()
    assert code == 0, f"payments serve exited {code} on SIGTERM:\n{process.log_text()[-4000:]}"


@pytest.fixture
async def client(embedded: ServiceProcess) -> Any:
    async with httpx.AsyncClient(base_url=embedded.http_url, timeout=10) as http:
        yield http


def workdir_of(process: ServiceProcess) -> Path:
    return process.log_path.parent


# --- 1. it starts -----------------------------------------------------------------------


async def test_starts_embedded_on_loopback(
    embedded: ServiceProcess, client: httpx.AsyncClient
) -> None:
    workdir = workdir_of(embedded)
    lines = banner_lines(embedded)
    assert lines.count(EMBEDDED_TITLE) == 1, lines
    assert f"HTTP     http://127.0.0.1:{embedded.http_port}" in lines
    assert f"gRPC     127.0.0.1:{embedded.grpc_port}" in lines
    assert "storage  SQLite var/payments.db (single process)" in lines
    dashboard = f"http://127.0.0.1:{sandbox_port(embedded)}/_sandbox/dashboard"
    assert f"Stripe   sandbox {dashboard}" in lines

    # The dev key: printed once, kept in var/dev-api-key (0600), caller_service "dev".
    key = banner_key(embedded)
    assert key.startswith("dev_")
    assert any(line.endswith(f'(caller_service "{DEV}")') for line in lines), lines
    key_file = workdir / "var" / "dev-api-key"
    assert dev_key_file(workdir) == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    health = await client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"
    assert "stripe-sandbox" in health.json()["children"]

    # HTTP, gRPC and the sandbox listen on 127.0.0.1 only; no other address reaches them.
    ports = {
        "http": embedded.http_port,
        "grpc": embedded.grpc_port,
        "sandbox": sandbox_port(embedded),
    }
    others = local_addresses()
    for name, port in ports.items():
        assert listen_addresses(port) == ["127.0.0.1"], name
        assert connect_error("127.0.0.1", port) is None, name
        for address in others:
            assert connect_error(address, port, timeout=1) is not None, (name, address)

    # SQLite under var/, in WAL mode: the header says so, and a write goes to the -wal.
    db_path = workdir / "var" / "payments.db"
    payment = await create(client, key, quick_start_body())
    assert payment["status"] == PaymentStatus.PENDING
    header = db_path.read_bytes()[:100]
    assert header[:16] == SQLITE_MAGIC
    assert (header[18], header[19]) == (2, 2), "file format versions: 2 means WAL"
    wal = workdir / "var" / "payments.db-wal"
    assert wal.is_file() and wal.stat().st_size > 0

    # The gRPC URL of the banner answers with the same dev key.
    grpc_client = GrpcClient(embedded.grpc_target)
    try:
        found, _ = await grpc_client.call(
            "GetPayment", pb.GetPaymentRequest(id=payment["id"]), key=key
        )
    finally:
        grpc_client.close()
    assert found.payment.id == payment["id"]
    assert found.payment.caller_service == DEV

    # The dev key is the "dev" caller and no other; a made-up key is 401.
    as_orders = quick_start_body(caller_service=ORDERS)
    other = await client.post(
        "/payments", json=as_orders, headers=auth(key, as_orders["request_id"])
    )
    assert other.status_code == 403, other.text
    wrong = await client.get(f"/payments/{payment['id']}", headers=auth("dev_not-the-key"))
    assert wrong.status_code == 401, wrong.text


# --- 2. the README quick start ----------------------------------------------------------


async def test_quick_start_pay_on_the_checkout_page(
    embedded: ServiceProcess, client: httpx.AsyncClient
) -> None:
    key = dev_key_file(workdir_of(embedded))  # KEY=$(cat var/dev-api-key)
    receiver = CallbackReceiver()
    try:
        order = rid("order")
        success_url = f"{embedded.http_url}/healthz"
        payment = await create(
            client,
            key,
            quick_start_body(
                resource_id=order,
                status_callback_url=receiver.url(f"/callback/{order}"),
                success_url=success_url,
            ),
        )
        assert payment["status"] == PaymentStatus.PENDING
        assert payment["caller_service"] == DEV
        checkout_url = payment["checkout_url"]
        assert checkout_url.startswith(f"http://127.0.0.1:{sandbox_port(embedded)}/pay/cs_")
        session_id = checkout_url.rsplit("/", 1)[1]

        # Open the page, click Pay: the browser goes to success_url (Post/Redirect/Get).
        location = await pay(checkout_url)
        assert location == success_url

        paid = await until_status(client, key, payment["id"], PaymentStatus.PAID)
        assert paid["id"] == payment["id"]

        async def callback() -> Any:
            return [
                r
                for r in receiver.requests_to(f"/callback/{order}")
                if r.json()["payment"]["status"] == PaymentStatus.PAID
            ]

        received = (await eventually(callback))[0]
        assert received.method == "POST"
        assert received.json()["payment"]["id"] == payment["id"]
        assert received.headers.get("x-api-key")  # the service's own (embedded) key

        # Paying twice is refused by the page; the payment stays PAID.
        async with httpx.AsyncClient(timeout=10) as browser:
            again = await browser.post(f"{checkout_url}/pay")
        assert again.status_code == 409, again.text

        # The dashboard lists the session and the signed event, delivered with a 200.
        async def dashboard() -> Any:
            async with httpx.AsyncClient(timeout=10) as browser:
                page = await browser.get(
                    f"http://127.0.0.1:{sandbox_port(embedded)}/_sandbox/dashboard"
                )
            assert page.status_code == 200, page.text
            events = page.text.partition('<table id="events">')[2]
            rows = [row for row in events.split("<tr>") if session_id in row]
            delivered = any(
                "checkout.session.completed" in row and '<td class="delivery">200' in row
                for row in rows
            )
            return page.text if session_id in page.text and delivered else None

        text = await eventually(dashboard)
        sessions = text.partition('<table id="sessions">')[2].partition("</table>")[0]
        assert session_id in sessions
        assert "EUR 25.00" in sessions
    finally:
        receiver.stop()


# --- 3. a restart keeps the data --------------------------------------------------------


async def test_restart_keeps_key_payments_and_idempotency(e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "restart")
    env = minimal_env(workdir)
    first = await astart(env, workdir)
    try:
        key = banner_key(first)
        body = quick_start_body()
        async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as client:
            payment = await create(client, key, body)
    finally:
        code = await astop(first)
    assert code == 0, first.log_text()[-4000:]

    second = await astart(env, workdir)
    try:
        assert banner_key(second) == key
        assert dev_key_file(workdir) == key
        async with httpx.AsyncClient(base_url=second.http_url, timeout=10) as client:
            found = await client.get(f"/payments/{payment['id']}", headers=auth(key))
            assert found.status_code == 200, found.text
            assert found.json()["payment"] == payment
            replay = await create(client, key, body)
            assert replay == payment
            # The same request id with other parameters is a conflict, not a new payment.
            changed = await client.post(
                "/payments",
                json={**body, "amount_cents": 2600},
                headers=auth(key, body["request_id"]),
            )
            assert changed.status_code == 409, changed.text
    finally:
        code = await astop(second)
    assert code == 0, second.log_text()[-4000:]


async def test_restart_keeps_checkout_pages_payable(e2e_dir: Path) -> None:
    """A payment left PENDING across a restart can still be paid on its checkout page
    (the sandbox's objects are in ``var/sandbox.sqlite``; without them the checkout_url
    answers 404 and the reconciler fails on the payment at every pass)."""
    workdir = fresh_dir(e2e_dir, "restart-pay")
    env = minimal_env(workdir)
    first = await astart(env, workdir)
    try:
        key = banner_key(first)
        async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as client:
            payment = await create(client, key, quick_start_body())
    finally:
        code = await astop(first)
    assert code == 0, first.log_text()[-4000:]

    second = await astart(env, workdir)
    try:
        await pay(payment["checkout_url"])
        async with httpx.AsyncClient(base_url=second.http_url, timeout=10) as client:
            await until_status(client, key, payment["id"], PaymentStatus.PAID)
    finally:
        code = await astop(second)
    assert code == 0, second.log_text()[-4000:]


async def test_kill_9_keeps_a_checkout_acknowledged_just_before(e2e_dir: Path) -> None:
    """The sandbox commits each object before it answers (issue 9, class 7): a payment
    created just before ``kill -9`` still has a payable checkout page after a restart,
    and its replay returns the same checkout (the sandbox kept the idempotency key)."""
    workdir = fresh_dir(e2e_dir, "kill-9")
    env = minimal_env(workdir)
    first = await astart(env, workdir)
    try:
        key = banner_key(first)
        body = quick_start_body()
        async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as client:
            payment = await create(client, key, body)
    finally:
        first.kill()  # SIGKILL straight after the answer: no chance to save anything
    assert first.proc.returncode == -9

    second = await astart(env, workdir)
    try:
        async with httpx.AsyncClient(base_url=second.http_url, timeout=10) as client:
            assert await create(client, key, body) == payment
            await pay(payment["checkout_url"])
            await until_status(client, key, payment["id"], PaymentStatus.PAID)
        assert "reconcile failed" not in second.log_text()
    finally:
        code = await astop(second)
    assert code == 0, second.log_text()[-4000:]


# --- 4. refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"HTTP_HOST": "0.0.0.0"}, ["HTTP_HOST", "loopback"]),
        ({"GRPC_HOST": "10.0.0.1"}, ["GRPC_HOST", "loopback"]),
        ({"STRIPE_SECRET_KEY": "sk_test_half"}, ["STRIPE_WEBHOOK_SECRET"]),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_half"}, ["STRIPE_SECRET_KEY"]),
    ],
    ids=["http-host", "grpc-host", "stripe-key-alone", "webhook-secret-alone"],
)
async def test_refuses_bad_settings(
    e2e_dir: Path, changes: dict[str, str], named: list[str]
) -> None:
    workdir = fresh_dir(e2e_dir, "refuse")
    env = minimal_env(workdir, **changes)
    done = await arun(["serve"], env, workdir)
    output = check_refused(done, *named)
    assert "sk_test_half" not in output
    assert "whsec_half" not in output
    for port in ("HTTP_PORT", "GRPC_PORT", "PAYMENTS_SANDBOX_PORT"):
        assert listen_addresses(int(env[port])) == []


async def test_refuses_a_corrupt_database_file(e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "corrupt")
    db_path = workdir / "var" / "payments.db"
    db_path.parent.mkdir()
    garbage = os.urandom(16384)
    db_path.write_bytes(garbage)
    done = await arun(["serve"], minimal_env(workdir), workdir)
    output = check_refused(done, str(db_path))
    assert "not an SQLite database" in output or "corrupt" in output, output
    assert db_path.read_bytes() == garbage  # left as it was, for the operator


async def test_refuses_a_database_file_locked_by_another_process(e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "locked")
    env = minimal_env(workdir)
    migrated = await arun(["migrate"], env, workdir)  # no MYSQL_DSN: the SQLite file
    assert migrated.returncode == 0, migrated.stderr
    db_path = workdir / "var" / "payments.db"
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        done = await arun(["serve"], env, workdir)
    finally:
        holder.close()
    output = check_refused(done, str(db_path), "locked")
    assert "PAYMENTS_SQLITE_PATH" in output


async def test_refuses_a_keys_file_with_a_bad_line(e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "badkeys")
    keys = workdir / "keys"
    made = await arun(
        ["keys", "create", ORDERS, "--file", str(keys)], minimal_env(workdir), workdir
    )
    assert made.returncode == 0, made.stderr
    bad_hash = "sha256:" + "z" * 64
    with keys.open("a") as out:
        out.write("\n# a comment\n" + f"{bad_hash} shop payments-service\n")
    env = minimal_env(workdir, PAYMENTS_API_KEYS_FILE=str(keys))
    done = await arun(["serve"], env, workdir)
    output = check_refused(done, f"keys file {keys}, line 4")
    assert bad_hash not in output
    assert made.stdout.strip() not in output
    for port in ("HTTP_PORT", "GRPC_PORT", "PAYMENTS_SANDBOX_PORT"):
        assert listen_addresses(int(env[port])) == []


# --- 5. local keys with the sandbox -----------------------------------------------------


async def test_local_keys_file_with_the_sandbox(e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "localkeys")
    keys = workdir / "keys"
    made = await arun(
        ["keys", "create", ORDERS, "--file", str(keys)], minimal_env(workdir), workdir
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key and "\n" not in key
    assert key not in keys.read_text()  # only its hash is kept
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600

    # A dev key left by an earlier embedded run in this directory (`make serve`).
    old_dev_key = "dev_" + uuid.uuid4().hex
    (workdir / "var").mkdir()
    (workdir / "var" / "dev-api-key").write_text(old_dev_key + "\n")

    # The profile: local keys replace the dev key; SQLite and the sandbox stay embedded
    # (so loopback only still holds). The dev key is neither printed nor accepted.
    process = await astart(minimal_env(workdir, PAYMENTS_API_KEYS_FILE=str(keys)), workdir)
    try:
        lines = banner_lines(process)
        title = "payments: stand-ins: SQLite storage, Stripe sandbox"
        assert f"{title} (development only, loopback only)" in lines, lines
        assert not any(line.startswith("API key") for line in lines), lines
        assert old_dev_key not in process.log_text()
        assert listen_addresses(process.http_port) == ["127.0.0.1"]

        async with httpx.AsyncClient(base_url=process.http_url, timeout=10) as client:
            payment = await create(client, key, quick_start_body(caller_service=ORDERS))
            assert payment["caller_service"] == ORDERS

            # The dev key and no key at all are 401 in this mode.
            for other in (old_dev_key, ""):
                refused = await client.get(f"/payments/{payment['id']}", headers=auth(other))
                assert refused.status_code == 401, refused.text
            # The orders key acts for orders only.
            body = quick_start_body(caller_service=DEV)
            as_dev = await client.post(
                "/payments", json=body, headers=auth(key, body["request_id"])
            )
            assert as_dev.status_code == 403, as_dev.text

            # The sandbox's signed event still reaches the service (its gateway key is
            # accepted alongside the file's keys): Pay moves the payment to PAID.
            await pay(payment["checkout_url"])
            await until_status(client, key, payment["id"], PaymentStatus.PAID)
    finally:
        code = await astop(process)
    assert code == 0, process.log_text()[-4000:]


# --- 6. MySQL with the sandbox ----------------------------------------------------------


@pytest.fixture
def mysql_db(mysql_server: MysqlServer, e2e_dir: Path) -> Iterator[MysqlDsn]:
    """A fresh database migrated by ``payments migrate`` (dropped afterwards)."""
    dsn = mysql_server.create_database("e2e_emb")
    try:
        workdir = fresh_dir(e2e_dir, "migrate")
        env = {**minimal_env(workdir), "MYSQL_DSN": dsn_url(dsn)}
        done = run_cli(["migrate"], env, workdir)
        assert done.returncode == 0, f"payments migrate failed:\n{done.stdout}\n{done.stderr}"
        yield dsn
    finally:
        mysql_server.drop_database(dsn.database)


async def test_mysql_with_the_sandbox(mysql_db: MysqlDsn, e2e_dir: Path) -> None:
    workdir = fresh_dir(e2e_dir, "mysql")
    process = await astart(minimal_env(workdir, MYSQL_DSN=dsn_url(mysql_db)), workdir)
    try:
        lines = banner_lines(process)
        assert (
            "payments: stand-ins: Stripe sandbox, dev API key (development only, loopback only)"
            in lines
        ), lines
        assert not any(line.startswith("storage") for line in lines), lines
        key = banner_key(process)
        assert dev_key_file(workdir) == key

        body = quick_start_body()
        async with httpx.AsyncClient(base_url=process.http_url, timeout=10) as client:
            payment = await create(client, key, body)
            await pay(payment["checkout_url"])
            await until_status(client, key, payment["id"], PaymentStatus.PAID)
    finally:
        code = await astop(process)
    assert code == 0, process.log_text()[-4000:]

    # The payment is a row in MySQL; no SQLite file was made.
    assert not (workdir / "var" / "payments.db").exists()
    assert list((workdir / "var").glob("*.db*")) == []
    pool = Pool(mysql_db, max_open=1, max_idle=1, max_lifetime_seconds=0)
    try:
        async with pool.connection() as conn:
            row = await conn.fetchone(
                "SELECT caller_service, request_id, amount_cents, status FROM payments"
                " WHERE id = %s",
                (payment["id"],),
            )
    finally:
        await pool.aclose()
    assert row is not None
    assert tuple(row) == (DEV, body["request_id"], 2500, int(PaymentStatus.PAID))
