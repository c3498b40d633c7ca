"""The HTTP API end to end: hypercorn on loopback, real database, emulator and Auth."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio

from payments.config import MysqlDsn
from payments.model import PaymentStatus
from payments.providers.registry import ProviderRegistry
from payments.service import PaymentService
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.fixtures.app import KEY_A, KEY_B, NO_ACCESS_KEY, TEST_MAX_BODY_BYTES, Stack, closed_port

# The Go service's timestamp format: RFC 3339 UTC to the second.
RFC3339_SECONDS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as http:
        yield http


def new_id() -> str:
    return f"req-{uuid.uuid4().hex[:12]}"


def create_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": new_id(),
        "caller_service": "svc-a",
        "resource_type": "order",
        "resource_id": "1042",
        "customer_ref": "cus-7",
        "amount_cents": 2500,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": 1,
        "status_callback_url": "https://svc-a.internal/payments/callback",
        "metadata": {"order": "1042"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def headers(key: str | None = KEY_A, request_id: str | None = "rid-1") -> dict[str, str]:
    out = {}
    if request_id is not None:
        out["X-Request-ID"] = request_id
    if key is not None:
        out["X-API-Key"] = key
    return out


async def create(
    client: httpx.AsyncClient, key: str = KEY_A, rid: str = "rid-create", **changes: Any
) -> httpx.Response:
    """POST /payments with a valid body changed by ``changes`` (``...`` drops a field)."""
    return await client.post("/payments", json=create_body(**changes), headers=headers(key, rid))


async def created(
    client: httpx.AsyncClient, key: str = KEY_A, rid: str = "rid-create", **changes: Any
) -> dict[str, Any]:
    response = await create(client, key, rid, **changes)
    assert response.status_code == 201, response.text
    return response.json()["payment"]


# --- headers and auth -------------------------------------------------------------------


async def test_request_id_is_checked_before_the_key(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/payments", "/payments/1"):
        response = await client.get(path)
        assert response.status_code == 400
        assert response.json() == {"error": "X-Request-ID: header is required"}
    blank = await client.get("/health", headers={"X-Request-ID": "", "X-API-Key": KEY_A})
    assert blank.status_code == 400
    # Even a huge body without a request id is refused on the header alone.
    big = await client.post("/payments", content=b"x" * (TEST_MAX_BODY_BYTES * 2))
    assert big.status_code == 400


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        (None, 401, "X-API-Key header is required"),
        ("", 401, "X-API-Key header is required"),
        ("no-such-key", 401, "invalid API key"),
        (NO_ACCESS_KEY, 403, "API key has no access to payments-service"),
    ],
)
async def test_api_key_is_checked(
    client: httpx.AsyncClient, key: str | None, status: int, message: str
) -> None:
    for method, path in (("GET", "/health"), ("POST", "/payments"), ("GET", "/payments/1")):
        response = await client.request(method, path, headers=headers(key, "rid-auth"))
        assert response.status_code == status
        assert response.json() == {"error": message}
        assert response.headers["X-Request-ID"] == "rid-auth"


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers=headers(request_id="rid-health"))
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["X-Request-ID"] == "rid-health"
    assert response.headers["content-type"] == "application/json"


async def test_healthz_needs_no_headers_and_pings_the_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "ok" and document["database"] == "ok"
    assert "pool" in document  # the details the health callable adds


async def test_unknown_route_and_wrong_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope", headers=headers(request_id="rid-404"))
    assert (missing.status_code, missing.json()) == (404, {"error": "not found"})
    assert missing.headers["X-Request-ID"] == "rid-404"
    wrong = await client.delete("/payments", headers=headers())
    assert (wrong.status_code, wrong.json()) == (405, {"error": "method not allowed"})
    options = await client.options("/payments", headers=headers())
    assert options.status_code == 405


# --- create -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "payment_type"),
    [(1, 1), (1, 2), (2, 1), ("PAYMENT_METHOD_PAYMENT_LINK", "recurring")],
)
async def test_create_each_method_and_type(
    client: httpx.AsyncClient, stack: Stack, method: Any, payment_type: Any
) -> None:
    recurring = payment_type in (2, "recurring")
    extra = {"recurring_interval": "month", "recurring_interval_count": 3} if recurring else {}
    response = await create(
        client,
        rid="rid-c",
        payment_method=method,
        payment_type=payment_type,
        **extra,
    )
    assert response.status_code == 201, response.text
    assert response.headers["X-Request-ID"] == "rid-c"
    payment = response.json()["payment"]
    assert payment["status"] == PaymentStatus.PENDING
    assert payment["checkout_url"].startswith("http")
    assert payment["amount_cents"] == 2500 and payment["currency"] == "EUR"
    assert payment["provider"] == 1
    assert payment["payment_type"] == (2 if recurring else 1)
    assert RFC3339_SECONDS.fullmatch(payment["created_at"]), payment["created_at"]
    assert RFC3339_SECONDS.fullmatch(payment["updated_at"]), payment["updated_at"]
    assert payment["provider_callback_url"] == (
        f"{stack.settings.provider_callback_base_url}/{payment['provider_callback_hash']}"
    )
    assert "refundable_cents" not in payment  # zero values are left out
    link = method in (2, "PAYMENT_METHOD_PAYMENT_LINK")
    state = stack.sandbox.state
    if link:
        assert payment["provider_payment_id"] in state.payment_links
    else:
        session = state.sessions[payment["provider_payment_id"]]
        assert session["mode"] == ("subscription" if recurring else "payment")
        assert session["client_reference_id"] == payment["request_id"]
    if recurring:
        assert (payment["recurring_interval"], payment["recurring_interval_count"]) == ("month", 3)


async def test_blank_body_request_id_falls_back_to_the_header(client: httpx.AsyncClient) -> None:
    rid = new_id()
    payment = await created(client, rid=rid, request_id="  ")
    assert payment["request_id"] == rid
    other = new_id()
    missing = await created(client, rid=other, request_id=...)
    assert missing["request_id"] == other


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"amount_cents": -5}, "amount_cents"),
    ({"amount_cents": 0}, "amount_cents"),
    ({"amount_cents": "ten"}, "amount_cents"),
    ({"amount_cents": 12.5}, "amount_cents"),
    ({"amount_cents": True}, "amount_cents"),
    ({"amount_cents": 2**70}, "amount_cents"),
    ({"currency": "euro"}, "currency"),
    ({"currency": "e1r"}, "currency"),
    ({"currency": 978}, "currency"),
    ({"payment_method": "BITCOIN"}, "payment_method"),
    ({"payment_method": 9}, "payment_method"),
    ({"payment_method": 0}, "payment_method"),
    ({"payment_type": "weekly"}, "payment_type"),
    ({"payment_type": 2}, "recurring_interval"),
    ({"payment_type": 2, "recurring_interval": "month"}, "recurring_interval_count"),
    ({"payment_type": 2, "recurring_interval": "fortnight"}, "recurring_interval"),
    ({"provider": "paypal"}, "provider"),
    ({"provider": 5}, "provider"),
    ({"request_id": 7}, "request_id"),
    ({"caller_service": ""}, "caller_service"),
    ({"caller_service": None}, "caller_service"),
    ({"resource_type": "  "}, "resource_type"),
    ({"resource_id": ["1"]}, "resource_id"),
    ({"resource_id": "x" * 500}, "resource_id"),
    ({"status_callback_url": ""}, "status_callback_url"),
    ({"status_callback_url": "ftp://x/y"}, "status_callback_url"),
    ({"success_url": "not a url"}, "success_url"),
    ({"metadata": ["a"]}, "metadata"),
    ({"metadata": {"a": 1}}, "metadata"),
    ({"metadata": {"request_id": "mine"}}, "metadata"),
    ({"customer_ref": {"id": 1}}, "customer_ref"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_BODIES)
async def test_validation_errors_name_the_field(
    client: httpx.AsyncClient, stack: Stack, changes: dict[str, Any], field: str
) -> None:
    response = await create(client, rid="rid-bad", **changes)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ")
    assert response.headers["X-Request-ID"] == "rid-bad"
    assert stack.provider_objects() == 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"{",
        b'{"amount_cents": NaN}',
        b"\xff\xfe\x00",
        b"[" * 5000,
    ],
)
async def test_bodies_that_are_not_json_objects_are_400(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post("/payments", content=content, headers=headers())
    assert response.status_code == 400
    assert response.json()["error"].startswith("request body")


async def test_body_over_the_limit_is_400_announced_or_chunked(client: httpx.AsyncClient) -> None:
    too_big = create_body(metadata={"pad": "x" * TEST_MAX_BODY_BYTES})
    response = await client.post("/payments", json=too_big, headers=headers(request_id="rid-big"))
    assert response.status_code == 400
    assert response.json()["error"].startswith("body: request body too large")
    assert response.headers["X-Request-ID"] == "rid-big"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (TEST_MAX_BODY_BYTES // 2)

    chunked = await client.post("/payments", content=chunks(), headers=headers())
    assert chunked.status_code == 400


async def test_no_malformed_input_gives_a_500(client: httpx.AsyncClient) -> None:
    requests: list[tuple[str, str, Any]] = [
        ("POST", "/payments", {"json": {"metadata": {"k": {"deep": [1]}}}}),
        ("POST", "/payments", {"json": {"amount_cents": "9" * 5000}}),
        ("POST", "/payments", {"json": {"payment_method": None, "payment_type": [None]}}),
        ("POST", "/payments", {"json": {"\u0000": "\u0000", "currency": "\u20ac\u20ac\u20ac"}}),
        ("POST", "/payments", {"content": b'{"a": "\\ud800"}'}),
        ("GET", "/payments/%00", {}),
        ("GET", "/payments/1e3", {}),
        ("GET", "/payments?limit=1e3&offset=-0", {}),
        ("GET", "/payments?status=%FF", {}),
        ("GET", "/payments?resource_id=%00", {}),
        ("POST", "/payments/99999999999999999999999/cancel", {}),
        ("POST", "/payments/1/cancel", {"content": b"[]"}),
        ("POST", "/payments/1/cancel", {"json": {"reason": "x" * 10_000}}),
    ]
    for method, path, options in requests:
        response = await client.request(method, path, headers=headers(), **options)
        assert 400 <= response.status_code < 500, (path, options, response.text)
        assert "error" in response.json()


# --- get and list -----------------------------------------------------------------------


async def test_get_returns_the_payment(client: httpx.AsyncClient) -> None:
    payment = await created(client)
    response = await client.get(f"/payments/{payment['id']}", headers=headers(request_id="g"))
    assert response.status_code == 200
    assert response.json() == {"payment": payment}
    assert response.headers["X-Request-ID"] == "g"


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "1.5", str(2**64), "1%20"])
async def test_ids_that_are_not_positive_integers_are_400(
    client: httpx.AsyncClient, bad: str
) -> None:
    for method, path in (("GET", f"/payments/{bad}"), ("POST", f"/payments/{bad}/cancel")):
        response = await client.request(method, path, headers=headers())
        assert response.status_code == 400
        assert response.json() == {"error": "id: must be a positive integer"}


async def test_unknown_id_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/payments/{2**64 - 1}", headers=headers(request_id="nf"))
    assert (response.status_code, response.json()) == (404, {"error": "payment not found"})
    assert response.headers["X-Request-ID"] == "nf"


async def test_list_filters_and_pages(client: httpx.AsyncClient, stack: Stack) -> None:
    first = await created(client, resource_type="order", resource_id="1")
    second = await created(client, resource_type="order", resource_id="2", payment_method=2)
    third = await created(client, resource_type="invoice", resource_id="1")
    await created(client, key=KEY_B, caller_service="svc-b")  # not visible to svc-a
    await stack.set_status(third["id"], PaymentStatus.PAID)

    async def ids(query: str) -> list[int]:
        response = await client.get(f"/payments{query}", headers=headers())
        assert response.status_code == 200, response.text
        return [p["id"] for p in response.json()["payments"]]

    newest_first = [third["id"], second["id"], first["id"]]
    assert await ids("") == newest_first
    assert await ids("?resource_type=order") == [second["id"], first["id"]]
    assert await ids("?resource_type=order&resource_id=1") == [first["id"]]
    assert await ids(f"?request_id={first['request_id']}") == [first["id"]]
    assert await ids("?caller_service=svc-a&provider=stripe") == newest_first
    assert await ids("?provider=1") == newest_first
    assert await ids("?status=10") == [third["id"]]
    assert await ids("?status=PAYMENT_STATUS_PENDING") == [second["id"], first["id"]]
    assert await ids("?status=pending&limit=1") == [second["id"]]
    assert await ids("?limit=2&offset=1") == [second["id"], first["id"]]
    assert await ids("?offset=3") == []
    forbidden = await client.get("/payments?caller_service=svc-b", headers=headers())
    assert forbidden.status_code == 403


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
        ("status=0", "status"),
        ("status=99", "status"),
        ("status=lost", "status"),
        ("provider=paypal", "provider"),
        ("provider=2", "provider"),
        (f"resource_type={'x' * 200}", "resource_type"),
    ],
)
async def test_bad_list_parameters_name_the_parameter(
    client: httpx.AsyncClient, query: str, name: str
) -> None:
    response = await client.get(f"/payments?{query}", headers=headers(request_id="rid-q"))
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{name}: ")
    assert response.headers["X-Request-ID"] == "rid-q"


# --- idempotency ------------------------------------------------------------------------


async def test_replay_returns_the_same_payment_and_one_stripe_object(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = create_body()
    first = await client.post("/payments", json=body, headers=headers())
    again = await client.post("/payments", json=body, headers=headers(request_id="other"))
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert stack.provider_objects() == 1
    assert stack.sandbox.state.count("POST /v1/checkout/sessions") == 1


async def test_same_request_id_with_other_parameters_is_409(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = create_body()
    assert (await client.post("/payments", json=body, headers=headers())).status_code == 201
    changed = {**body, "amount_cents": 9900}
    response = await client.post("/payments", json=changed, headers=headers(request_id="c"))
    assert response.status_code == 409
    assert "request_id" in response.json()["error"]
    assert response.headers["X-Request-ID"] == "c"
    assert stack.provider_objects() == 1


async def test_concurrent_duplicates_make_one_payment(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = create_body()
    responses: list[httpx.Response] = []

    async def post() -> None:
        responses.append(await client.post("/payments", json=body, headers=headers()))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(post)
    assert [r.status_code for r in responses] == [201] * 10
    assert len({r.json()["payment"]["id"] for r in responses}) == 1
    assert stack.provider_objects() == 1


# --- isolation --------------------------------------------------------------------------


async def test_caller_service_of_another_service_is_403(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    response = await create(client, KEY_A, caller_service="svc-b")
    assert response.status_code == 403
    assert stack.provider_objects() == 0


async def test_another_callers_payment_is_404(client: httpx.AsyncClient, stack: Stack) -> None:
    payment = await created(client, KEY_A)
    for method, path in (("GET", ""), ("POST", "/cancel")):
        response = await client.request(
            method, f"/payments/{payment['id']}{path}", headers=headers(KEY_B)
        )
        assert (response.status_code, response.json()) == (404, {"error": "payment not found"})
    assert (await stack.payment(payment["id"])).status == PaymentStatus.PENDING
    listed = await client.get("/payments", headers=headers(KEY_B))
    assert listed.json() == {"payments": []}


# --- cancel -----------------------------------------------------------------------------


async def test_cancel_pending_session_expires_it_and_twice_is_unchanged(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    payment = await created(client)
    response = await client.post(
        f"/payments/{payment['id']}/cancel", json={"reason": "order abandoned"}, headers=headers()
    )
    assert response.status_code == 200, response.text
    canceled = response.json()["payment"]
    assert canceled["status"] == PaymentStatus.CANCELED
    assert stack.sandbox.state.sessions[payment["provider_payment_id"]]["status"] == "expired"
    again = await client.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert again.status_code == 200
    assert again.json()["payment"] == canceled


async def test_cancel_payment_link_deactivates_it_with_an_empty_body(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    payment = await created(client, payment_method="payment_link")
    response = await client.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert response.status_code == 200
    assert response.json()["payment"]["status"] == PaymentStatus.CANCELED
    assert stack.sandbox.state.payment_links[payment["provider_payment_id"]]["active"] is False


@pytest.mark.parametrize(
    "status", [PaymentStatus.PAID, PaymentStatus.FAILED, PaymentStatus.EXPIRED]
)
async def test_cancel_of_a_finished_payment_is_409(
    client: httpx.AsyncClient, stack: Stack, status: PaymentStatus
) -> None:
    payment = await created(client)
    await stack.set_status(payment["id"], status)
    response = await client.post(f"/payments/{payment['id']}/cancel", headers=headers())
    assert response.status_code == 409
    assert status.name in response.json()["error"]
    assert (await stack.payment(payment["id"])).status == status


async def test_cancel_reason_must_be_a_string(client: httpx.AsyncClient) -> None:
    payment = await created(client)
    response = await client.post(
        f"/payments/{payment['id']}/cancel", json={"reason": 5}, headers=headers()
    )
    assert (response.status_code, response.json()) == (400, {"error": "reason: must be a string"})


@pytest.mark.parametrize("reason", ["line\nbreak", "nul\x00", "esc\x1b[31m", "bidi\u202eflip"])
async def test_cancel_reason_refuses_control_and_bidi_characters(
    client: httpx.AsyncClient, stack: Stack, reason: str
) -> None:
    payment = await created(client)
    response = await client.post(
        f"/payments/{payment['id']}/cancel", json={"reason": reason}, headers=headers()
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("reason: must not contain control")
    assert (await stack.payment(payment["id"])).status == PaymentStatus.PENDING


# --- dependencies failing ---------------------------------------------------------------


async def test_stripe_down_is_502_and_a_retry_makes_one_object(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = create_body()
    stack.sandbox.faults.fail(500, times=None)
    response = await client.post("/payments", json=body, headers=headers(request_id="s"))
    assert (response.status_code, response.json()) == (
        502,
        {"error": "payment provider unavailable"},
    )
    assert response.headers["X-Request-ID"] == "s"
    stack.sandbox.faults.clear()
    retry = await client.post("/payments", json=body, headers=headers())
    assert retry.status_code == 201
    assert retry.json()["payment"]["status"] == PaymentStatus.PENDING
    assert stack.provider_objects() == 1


async def test_stripe_answer_lost_then_retry_finds_the_same_object(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    """Stripe made the session but the answer never came: the retry replays it."""
    body = create_body()
    stack.sandbox.faults.drop(times=1)
    assert (await client.post("/payments", json=body, headers=headers())).status_code == 502
    retry = await client.post("/payments", json=body, headers=headers())
    assert retry.status_code == 201
    assert stack.provider_objects() <= 1


async def test_auth_down_is_503(client: httpx.AsyncClient, stack: Stack) -> None:
    await stack.auth.stop()
    # A key the authenticator has not cached must ask Auth, which is gone.
    stack.auth.grant("fresh-key", "svc-a")
    response = await client.get("/health", headers=headers("fresh-key", "rid-auth-down"))
    assert (response.status_code, response.json()) == (503, {"error": "auth service unavailable"})
    assert response.headers["X-Request-ID"] == "rid-auth-down"


async def test_database_down_is_503(stack: Stack, test_db_dsn: MysqlDsn) -> None:
    dead = Pool(attrs.evolve(test_db_dsn, port=closed_port()), 2, 1, 0, connect_timeout=1)
    service = PaymentService(
        UnitOfWork(dead), ProviderRegistry({}), stack.settings.provider_callback_base_url
    )
    server = await stack.start_http(service=service)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for method, path, options in (
            ("POST", "/payments", {"json": create_body()}),
            ("GET", "/payments/1", {}),
            ("GET", "/payments", {}),
            ("POST", "/payments/1/cancel", {}),
        ):
            response = await http.request(method, path, headers=headers(request_id="db"), **options)
            assert (response.status_code, response.json()) == (
                503,
                {"error": "database unavailable"},
            ), path
            assert response.headers["X-Request-ID"] == "db"
        probe = await http.get("/healthz")
        assert probe.status_code == 503
        assert probe.json()["database"] == "unavailable"
    await dead.aclose()


async def test_graceful_shutdown_lets_a_request_in_flight_finish(stack: Stack) -> None:
    server = await stack.start_http()
    stack.sandbox.faults.delay(0.5, path="/v1/checkout/sessions", times=1)
    result: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:

        async def slow_create() -> None:
            result.append(await http.post("/payments", json=create_body(), headers=headers()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_create)
            # The emulator has no request hook to wait on; poll its request counter.
            while stack.sandbox.state.count("POST /v1/checkout/sessions") == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            started = trio.current_time()
            await server.stop()
            stopped_in = trio.current_time() - started
    assert result[0].status_code == 201
    assert result[0].headers["Connection"] == "close"
    # Done when the last request is, not at the end of the grace period (5 s here).
    assert stopped_in < stack.settings.shutdown_grace_seconds / 2
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=server.url, timeout=2) as http:
            await http.get("/health", headers=headers())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"request_id": "\\ud800"}', "request_id"),
        ('{"customer_ref": "a\\udfffb"}', "customer_ref"),
        ('{"metadata": {"k": "\\ud800"}}', "metadata"),
        ('{"metadata": {"\\ud800": "v"}}', "metadata"),
    ],
)
async def test_lone_surrogates_are_a_400_naming_the_field(
    stack: Stack, body: str, field: str
) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        reply = await client.post(
            "/payments",
            content=body.encode(),
            headers={**stack.headers(), "Content-Type": "application/json"},
        )
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]


async def test_a_callback_url_with_a_bad_port_is_refused_at_create(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as client:
        body = {
            "caller_service": "svc-a",
            "resource_type": "order",
            "resource_id": "1",
            "amount_cents": 100,
            "currency": "eur",
            "payment_method": 1,
            "payment_type": 1,
            "status_callback_url": "https://receiver.internal:99999/cb",
        }
        reply = await client.post("/payments", json=body, headers=stack.headers())
    assert reply.status_code == 400
    assert "status_callback_url" in reply.json()["error"]
