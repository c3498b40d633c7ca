"""Hostile input against the running service (issue 9, class 1): no 5xx, no INTERNAL.

hypothesis generates request bodies, ids, query strings, headers, signed Stripe events
and raw protobuf bytes for every HTTP route and every gRPC method, on both storage
backends (the stack's MySQL and an SQLite service served beside it). Each answer must
be below 500 (gRPC: a status a caller's mistake can explain), and an answer of 4xx
must leave payments, their events and the callback outbox as they were; a refused
provider callback is recorded, never dropped.

The examples run in a worker thread with blocking clients (httpx, grpcio) while trio
serves; database snapshots hop back to trio with ``trio.from_thread.run``. The run is
derandomized, so a failure reproduces, and bounded to a few seconds per backend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import grpc
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from payments.inbound import ProviderEvents
from payments.logs import ACCESS_LOGGER
from payments.model import Caller, CreatePaymentInput, ProviderType
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.service import PaymentService
from payments.storage.database import Database
from payments.storage.sqlite import SqliteDatabase
from payments.unit_of_work import UnitOfWork
from payments.validation import validate_create
from tests.fixtures.app import KEY_A, KEY_B, Stack
from tests.fixtures.sandbox import sign
from tests.test_input_rules import VALID, json_values, stripe_events

HOSTILE = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# A caller's mistake explains these; INTERNAL, UNKNOWN, CANCELLED, UNAVAILABLE... it does not.
CALLER_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
GRPC_METHODS = (
    "Health",
    "CreatePayment",
    "GetPayment",
    "ListPayments",
    "CancelPayment",
    "HandleProviderCallback",
)


@attrs.frozen
class Target:
    """One backend's service as callers see it, and its database to check."""

    name: str
    http_url: str
    grpc_target: str
    db: Database
    callback_hash: str
    payment_id: int
    # Waits until the Stripe emulator's webhook deliveries are done: a cancel that
    # succeeded makes it post checkout.session.expired, which must not land between
    # the snapshots around the next (bad) request.
    settle: Callable[[], Awaitable[None]]


async def _settled_snapshot(target: Target) -> tuple[Any, ...]:
    await target.settle()
    return await _snapshot(target.db)


async def _snapshot(db: Database) -> tuple[Any, ...]:
    """What bad input must not change (provider_callbacks may grow: refusals are kept)."""
    async with db.connection() as conn:
        payments = await conn.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(status), 0), MAX(updated_at) FROM payments"
        )
        events = await conn.fetchone("SELECT COUNT(*) FROM payment_events")
        outbox = await conn.fetchone("SELECT COUNT(*) FROM callback_outbox")
    assert payments is not None and events is not None and outbox is not None
    return (*payments, *events, *outbox)


async def _recorded_callbacks(db: Database) -> int:
    async with db.connection() as conn:
        row = await conn.fetchone("SELECT COUNT(*) FROM provider_callbacks")
    assert row is not None
    return int(row[0])


@pytest.fixture
async def targets(
    stack: Stack, stripe_provider: StripeProvider, tmp_path: Path
) -> AsyncIterator[list[Target]]:
    """The stack (MySQL) and the same service over SQLite, each with one payment."""
    sqlite = await SqliteDatabase.open(tmp_path / "var" / "payments.db")
    try:
        uow = UnitOfWork(sqlite)
        registry = ProviderRegistry({ProviderType.STRIPE: stripe_provider})
        service = PaymentService(uow, registry, stack.settings.provider_callback_base_url)
        inbound = ProviderEvents(uow, registry)
        http = await stack.start_http(service=service, inbound=inbound)
        grpc_port = await stack.start_grpc(service=service, inbound=inbound)
        on_mysql = await stack.create_payment()
        on_sqlite = await service.create(
            Caller("svc-a"), validate_create(CreatePaymentInput(**VALID))
        )
        yield [
            Target(
                "mysql",
                stack.http_url,
                stack.grpc_target,
                stack.pool,
                on_mysql.provider_callback_hash,
                on_mysql.id,
                stack.events_delivered,
            ),
            Target(
                "sqlite",
                http.url,
                f"127.0.0.1:{grpc_port}",
                sqlite,
                on_sqlite.provider_callback_hash,
                on_sqlite.id,
                stack.events_delivered,
            ),
        ]
    finally:
        await sqlite.aclose()


# --- strategies ----------------------------------------------------------------------------

header_values = st.one_of(
    st.just("rid-1"), st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)
)
api_keys = st.sampled_from([KEY_A, KEY_A, KEY_A, KEY_B, "wrong-key"])
printable = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFF), max_size=24)
ids = st.one_of(
    st.integers(-(2**65), 2**65).map(str),
    st.sampled_from([str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), "0", "01"]),
    printable,
)
urls = st.one_of(
    st.sampled_from(
        [
            "http://[::1",
            "http://127.0.0.1:8080/payments",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://169.254.169.254/latest/meta-data/",
            "http://user:pw@svc-a.internal/cb",
            "http://svc a.internal/cb",
            "http://svc-a.internal:99999/cb",
            "https://svc-a.internal/cb",
        ]
    ),
    printable,
)
identifiers = st.one_of(st.just("r-1"), printable, st.sampled_from(["a\u202eb", "a\x85b", " "]))


def _odd(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, json_values)


CREATE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": _odd(identifiers),
    "caller_service": _odd(st.sampled_from(["svc-a", "svc-b", "svc-a\u202e"])),
    "resource_type": _odd(identifiers),
    "resource_id": _odd(identifiers),
    "customer_ref": _odd(identifiers),
    "amount_cents": _odd(st.integers(-(2**64), 2**64)),
    "currency": _odd(st.sampled_from(["usd", "EUR", "us", "€€€"])),
    "payment_method": _odd(st.sampled_from([1, 2, 7, "hosted_card", "nope"])),
    "payment_type": _odd(st.sampled_from([1, 2, -1, "RECURRING"])),
    "provider": _odd(st.sampled_from([0, 1, 5, "stripe"])),
    "recurring_interval": _odd(st.sampled_from(["month", "fortnight"])),
    "recurring_interval_count": _odd(st.integers(-(2**40), 2**40)),
    "status_callback_url": _odd(urls),
    "success_url": _odd(urls),
    "cancel_url": _odd(urls),
    "metadata": _odd(st.dictionaries(printable, printable, max_size=3)),
}


def _one_change(name: str) -> st.SearchStrategy[dict[str, Any]]:
    return CREATE_FIELDS[name].map(lambda value: {name: value})


def _merged(changes: list[dict[str, Any]]) -> dict[str, Any]:
    body = dict(VALID)
    for change in changes:
        body.update(change)
    return body


# A valid body with one or two fields made odd (so every field's check is reached), or
# any mixture of fields.
url_bodies = st.fixed_dictionaries(
    {name: urls for name in ("status_callback_url", "success_url", "cancel_url")}
).map(lambda changes: {**VALID, **changes})
create_bodies = st.one_of(
    url_bodies,
    st.lists(
        st.sampled_from(sorted(CREATE_FIELDS)).flatmap(_one_change), min_size=1, max_size=2
    ).map(_merged),
    st.fixed_dictionaries({}, optional=CREATE_FIELDS),
)
raw_bodies = st.one_of(
    create_bodies.map(lambda body: json.dumps(body).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b'{"a":NaN}', b"[" * 5000, b'"\\ud800"']),
)
query_params = st.dictionaries(
    st.sampled_from(
        [
            *("request_id", "caller_service", "resource_type", "resource_id", "status"),
            *("provider", "limit", "offset", "other"),
        ]
    ),
    st.one_of(printable, ids),
    max_size=4,
)


def _signed_event(event: Any, callback_hash: str) -> tuple[bytes, str]:
    """The event about the target's payment (the template's ``h-1``), signed."""
    body = json.dumps(event).replace('"h-1"', json.dumps(callback_hash)).encode()
    return body, sign(body, int(time.time()))


# --- HTTP ----------------------------------------------------------------------------------

Route = Callable[[st.DataObject, Target, httpx.Client, dict[str, str]], httpx.Response]


def _create(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    return client.post("/payments", content=data.draw(raw_bodies), headers=headers)


def _get(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    return client.get(f"/payments/{quote(data.draw(ids), safe='')}", headers=headers)


def _list(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    return client.get("/payments", params=data.draw(query_params), headers=headers)


def _cancel(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    number = data.draw(st.one_of(ids, st.just(str(target.payment_id))))
    body = data.draw(st.one_of(raw_bodies, st.just(b'{"reason": "x"}')))
    return client.post(f"/payments/{quote(number, safe='')}/cancel", content=body, headers=headers)


def _open(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    path = data.draw(
        st.sampled_from(
            ["/health", "/healthz", f"/webhooks/providers/stripe/{target.callback_hash}"]
        )
    )
    return client.get(path, params=data.draw(query_params), headers=headers)


HTTP_ROUTES: list[Route] = [_create, _get, _list, _cancel, _open]


def _webhook(data: st.DataObject, target: Target, client: httpx.Client, headers: Any) -> Any:
    body, signature = _signed_event(data.draw(stripe_events), target.callback_hash)
    provider = data.draw(st.sampled_from(["stripe", "stripe", "paypal"]))
    callback_hash = data.draw(st.sampled_from([target.callback_hash, "no-such-hash"]))
    return client.post(
        f"/webhooks/providers/{provider}/{callback_hash}",
        content=body,
        headers={**headers, "Stripe-Signature": signature},
    )


def _run_http(target: Target) -> None:
    snapshot = lambda: trio.from_thread.run(_snapshot, target.db)  # noqa: E731
    settled = lambda: trio.from_thread.run(_settled_snapshot, target)  # noqa: E731
    recorded = lambda: trio.from_thread.run(_recorded_callbacks, target.db)  # noqa: E731

    with httpx.Client(base_url=target.http_url, timeout=15) as client:

        @HOSTILE
        @given(st.data())
        def routes(data: st.DataObject) -> None:
            headers = {"X-Request-ID": data.draw(header_values), "X-API-Key": data.draw(api_keys)}
            route = data.draw(st.sampled_from(HTTP_ROUTES))
            before = settled()
            reply = route(data, target, client, headers)
            assert reply.status_code < 500, (target.name, reply.request.url, reply.text)
            if reply.status_code >= 400:
                assert snapshot() == before, (target.name, reply.request.url, reply.text)

        @settings(HOSTILE, max_examples=200)  # 400s, cheap: room for every field's checks
        @given(create_bodies, header_values)
        def creates(body: dict[str, Any], request_id: str) -> None:
            before = settled()
            headers = {"X-Request-ID": request_id, "X-API-Key": KEY_A}
            reply = client.post("/payments", content=json.dumps(body).encode(), headers=headers)
            assert reply.status_code < 500, (target.name, body, reply.text)
            if reply.status_code >= 400:
                assert snapshot() == before, (target.name, body, reply.text)

        @HOSTILE
        @given(st.data())
        def webhooks(data: st.DataObject) -> None:
            headers = {"X-Request-ID": data.draw(header_values), "X-API-Key": KEY_A}
            before, kept = settled(), recorded()
            reply = _webhook(data, target, client, headers)
            assert reply.status_code < 500, (target.name, reply.text)
            if reply.status_code >= 400:
                assert snapshot() == before, (target.name, reply.text)
                assert recorded() == kept + 1, "a refused event must be recorded"

        creates()
        routes()
        webhooks()


@pytest.mark.timeout(120)
async def test_http_answers_no_5xx_and_bad_input_changes_nothing(targets: list[Target]) -> None:
    for target in targets:
        await trio.to_thread.run_sync(_run_http, target)


# --- gRPC ----------------------------------------------------------------------------------

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
text = st.one_of(printable, identifiers, urls)
PROTO_TEXT_FIELDS = [name for name, value in VALID.items() if isinstance(value, str)]
_random_create = st.builds(
    pb.CreatePaymentRequest,
    request_id=text,
    caller_service=st.sampled_from(["svc-a", "svc-b", "", "svc-a\x85"]),
    resource_type=text,
    resource_id=text,
    customer_ref=text,
    amount_cents=int64,
    currency=st.sampled_from(["usd", "EU", "€€€"]),
    payment_method=int32,
    payment_type=int32,
    provider=int32,
    recurring_interval=text,
    recurring_interval_count=int32,
    status_callback_url=urls,
    success_url=urls,
    cancel_url=urls,
    metadata=st.dictionaries(printable, printable, max_size=3),
)

messages: dict[str, st.SearchStrategy[Any]] = {
    "Health": st.just(pb.HealthRequest()),
    "CreatePayment": st.one_of(
        st.tuples(st.sampled_from(PROTO_TEXT_FIELDS), st.one_of(text, urls)).map(
            lambda change: pb.CreatePaymentRequest(**{**VALID, change[0]: change[1]})
        ),
        _random_create,
    ),
    "GetPayment": st.builds(pb.GetPaymentRequest, id=uint64),
    "ListPayments": st.builds(
        pb.ListPaymentsRequest,
        request_id=text,
        caller_service=text,
        resource_type=text,
        resource_id=text,
        has_status=st.booleans(),
        status=int32,
        provider=int32,
        limit=int32,
        offset=int32,
    ),
    "CancelPayment": st.builds(pb.CancelPaymentRequest, id=uint64, reason=text),
    "HandleProviderCallback": st.builds(
        pb.HandleProviderCallbackRequest,
        request_id=text,
        provider=st.sampled_from(["stripe", "STRIPE", "", "paypal"]),
        callback_hash=text,
        signature=text,
        payload=text,
    ),
}


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def _run_grpc(target: Target) -> None:
    snapshot = lambda: trio.from_thread.run(_snapshot, target.db)  # noqa: E731
    settled = lambda: trio.from_thread.run(_settled_snapshot, target)  # noqa: E731
    with grpc.insecure_channel(target.grpc_target) as channel:
        stub = pb_grpc.PaymentsServiceStub(channel)

        def raw(method: str) -> Callable[..., Any]:
            return channel.unary_unary(f"/payments.PaymentsService/{method}")

        @HOSTILE
        @given(st.data())
        def methods(data: st.DataObject) -> None:
            method = data.draw(st.sampled_from(GRPC_METHODS))
            metadata = (
                ("x-request-id", data.draw(header_values)),
                ("x-api-key", data.draw(api_keys)),
            )
            if data.draw(st.booleans()):
                message = data.draw(messages[method])
                if method == "HandleProviderCallback" and data.draw(st.booleans()):
                    body, signature = _signed_event(data.draw(stripe_events), target.callback_hash)
                    message = pb.HandleProviderCallbackRequest(
                        provider="stripe",
                        callback_hash=target.callback_hash,
                        signature=signature,
                        payload=body.decode(),
                    )
                call = partial_call(getattr(stub, method), message, metadata)
            else:  # bytes that may not parse as the request message at all
                call = partial_call(raw(method), data.draw(st.binary(max_size=48)), metadata)
            before = settled()
            code = _code(call)
            assert code in CALLER_CODES, (target.name, method, code)
            if code != grpc.StatusCode.OK:
                assert snapshot() == before, (target.name, method, code)

        methods()


def partial_call(fn: Callable[..., Any], request: Any, metadata: Any) -> Callable[[], Any]:
    return lambda: fn(request, metadata=metadata, timeout=15)


@pytest.mark.timeout(120)
async def test_grpc_answers_no_internal_and_bad_input_changes_nothing(
    targets: list[Target],
) -> None:
    for target in targets:
        await trio.to_thread.run_sync(_run_grpc, target)


# --- the examples of the issue, on both backends and transports --------------------------------


async def test_ids_beyond_int64_are_not_found_everywhere(targets: list[Target]) -> None:
    def check(target: Target) -> None:
        headers = {"X-Request-ID": "r-big", "X-API-Key": KEY_A}
        with httpx.Client(base_url=target.http_url, timeout=10) as client:
            for number in (2**63, 2**64 - 1):
                assert client.get(f"/payments/{number}", headers=headers).status_code == 404
                cancel = client.post(f"/payments/{number}/cancel", headers=headers)
                assert cancel.status_code == 404
        with grpc.insecure_channel(target.grpc_target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            metadata = (("x-request-id", "r-big"), ("x-api-key", KEY_A))
            for number in (2**63, 2**64 - 1):
                get = partial_call(stub.GetPayment, pb.GetPaymentRequest(id=number), metadata)
                assert _code(get) == grpc.StatusCode.NOT_FOUND
                request = pb.CancelPaymentRequest(id=number)
                assert _code(partial_call(stub.CancelPayment, request, metadata)) == (
                    grpc.StatusCode.NOT_FOUND
                )

    for target in targets:
        await trio.to_thread.run_sync(check, target)


async def test_a_malformed_protobuf_is_invalid_argument_with_an_access_line(
    targets: list[Target], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)

    def check(target: Target) -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(target.grpc_target) as channel:
            call = channel.unary_unary("/payments.PaymentsService/GetPayment")
            try:
                call(b"\xff\xff\xff", metadata=(("x-request-id", "r-junk"),), timeout=10)
            except grpc.RpcError as error:
                return error.code(), error.details()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""

    for target in targets:
        caplog.clear()
        code, details = await trio.to_thread.run_sync(check, target)
        assert (code, details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "request message does not parse",
        )
        lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
        assert [(getattr(r, "status", None), getattr(r, "request_id", None)) for r in lines] == [
            ("INVALID_ARGUMENT", "r-junk")
        ]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_unary_call_with_zero_or_two_messages_is_invalid_argument(
    targets: list[Target],
) -> None:
    def check(target: Target, count: int) -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(target.grpc_target) as channel:
            call = channel.stream_unary("/payments.PaymentsService/GetPayment")
            request = pb.GetPaymentRequest(id=target.payment_id).SerializeToString()
            try:
                call(iter([request] * count), metadata=(("x-request-id", "r-n"),), timeout=10)
            except grpc.RpcError as error:
                return error.code(), error.details()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""

    for target in targets:
        for count in (0, 2):
            code, details = await trio.to_thread.run_sync(check, target, count)
            assert (code, details) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "request message must be exactly one",
            )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status_callback_url", "http://[::1"),
        ("success_url", "http://[::1"),
        ("cancel_url", "http://[::1"),
        ("status_callback_url", "http://127.0.0.1:8080/payments"),
        ("status_callback_url", "http://169.254.169.254/latest/meta-data/"),
        ("status_callback_url", "http://0x7f000001/"),
        ("status_callback_url", "http://user:pw@svc-a.internal/cb"),
        ("status_callback_url", "http://svc a.internal/cb"),
        ("resource_id", "10\u202e42"),
        ("request_id", "r\x851"),
    ],
)
async def test_create_refuses_the_issues_examples_naming_the_field(
    targets: list[Target], field: str, value: str
) -> None:
    def check(target: Target) -> list[tuple[int | grpc.StatusCode, str]]:
        body = {**VALID, field: value}
        with httpx.Client(base_url=target.http_url, timeout=10) as client:
            reply = client.post(
                "/payments", json=body, headers={"X-Request-ID": "r-x", "X-API-Key": KEY_A}
            )
        with grpc.insecure_channel(target.grpc_target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            try:
                stub.CreatePayment(
                    pb.CreatePaymentRequest(**body),
                    metadata=(("x-request-id", "r-x"), ("x-api-key", KEY_A)),
                    timeout=10,
                )
                answer: tuple[grpc.StatusCode, str] = (grpc.StatusCode.OK, "")
            except grpc.RpcError as error:
                answer = (error.code(), error.details())  # type: ignore[attr-defined]
        return [(reply.status_code, reply.json()["error"]), answer]

    for target in targets:
        before = await _snapshot(target.db)
        (status, message), (code, details) = await trio.to_thread.run_sync(check, target)
        assert status == 400 and message.startswith(f"{field}: "), message
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: ")
        assert await _snapshot(target.db) == before
