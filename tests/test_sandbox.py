"""The Stripe emulator, driven through the official SDK and raw HTTP."""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import httpx
import pytest
import stripe
import trio

from payments.sandbox import (
    Sandbox,
    SessionStateError,
    StripeState,
    encode_form,
    open_sandbox,
    parse_form,
)
from payments.sandbox.forms import FormError
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY

pytestmark = [
    pytest.mark.timeout(30),
    # the stripe SDK hands httpx its form body as data=<str>
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


def _session_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 2500,
                    "product_data": {"name": "order-1"},
                },
                "quantity": 1,
            }
        ],
        "client_reference_id": "req-1",
        "metadata": {"request_id": "req-1"},
        "success_url": "https://shop.test/ok",
        "cancel_url": "https://shop.test/cancel",
    }
    params.update(overrides)
    return params


def _auth(key: str = SANDBOX_SECRET_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _raw(
    sandbox: Sandbox,
    method: str,
    path: str,
    form: dict[str, Any] | str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = encode_form(form) if isinstance(form, dict) else form
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as client:
        return await client.request(
            method,
            path,
            content=body,
            headers={
                **_auth(),
                "Content-Type": "application/x-www-form-urlencoded",
                **(headers or {}),
            },
        )


# --- form encoding ----------------------------------------------------------------------


def test_parse_form_nests_brackets_into_dicts_and_lists() -> None:
    body = (
        "mode=payment&line_items[0][price_data][currency]=usd"
        "&line_items[0][price_data][unit_amount]=2500&line_items[0][quantity]=1"
        "&line_items[1][price]=price_1&metadata[k]=v&metadata[other]=w&expand[]=a&expand[]=b"
    )
    assert parse_form(body) == {
        "mode": "payment",
        "line_items": [
            {"price_data": {"currency": "usd", "unit_amount": "2500"}, "quantity": "1"},
            {"price": "price_1"},
        ],
        "metadata": {"k": "v", "other": "w"},
        "expand": ["a", "b"],
    }


def test_parse_form_handles_percent_encoding_and_append_lists_of_hashes() -> None:
    body = "items[][price]=p1&items[][quantity]=1&items[][price]=p2&name=a%20b%5B1%5D"
    assert parse_form(body) == {
        "items": [{"price": "p1", "quantity": "1"}, {"price": "p2"}],
        "name": "a b[1]",
    }


@pytest.mark.parametrize("body", ["a=1&a[b]=2", "a[b]=2&a=1", "a[0]=x&a[2]=y"])
def test_parse_form_refuses_inconsistent_structures(body: str) -> None:
    with pytest.raises(FormError):
        parse_form(body)


def test_encode_form_round_trips() -> None:
    params = {"a": [{"b": "1", "c": {"d": "x y"}}], "flag": True, "skip": None}
    assert parse_form(encode_form(params)) == {
        "a": [{"b": "1", "c": {"d": "x y"}}],
        "flag": "true",
    }


# --- the SDK against the emulator -------------------------------------------------------


async def test_sdk_creates_and_reads_a_checkout_session(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    session = await stripe_client.v1.checkout.sessions.create_async(params=_session_params())
    assert session.id.startswith("cs_test_")
    assert session.object == "checkout.session"
    assert session.livemode is False
    assert session.status == "open" and session.payment_status == "unpaid"
    assert session.url == f"{stripe_sandbox.url}/pay/{session.id}"
    assert session.amount_total == 2500 and session.currency == "usd"
    assert session.metadata.to_dict() == {"request_id": "req-1"}
    assert session.client_reference_id == "req-1"
    assert isinstance(session.created, int)

    again = await stripe_client.v1.checkout.sessions.retrieve_async(session.id)
    assert again.id == session.id
    items = stripe_sandbox.state.line_items[session.id]
    assert items[0]["price"]["unit_amount"] == 2500
    assert items[0]["description"] == "order-1"
    assert stripe_sandbox.state.count("POST /v1/checkout/sessions") == 1
    assert stripe_sandbox.state.count("GET /v1/checkout/sessions/{id}") == 1


async def test_sdk_products_prices_and_payment_links(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    v1 = stripe_client.v1
    product = await v1.products.create_async(params={"name": "plan-9", "metadata": {"a": "b"}})
    assert product.id.startswith("prod_") and product.name == "plan-9"
    price = await v1.prices.create_async(
        params={
            "currency": "eur",
            "unit_amount": 900,
            "product": product.id,
            "recurring": {"interval": "month", "interval_count": 3},
        }
    )
    assert price.id.startswith("price_")
    assert price.type == "recurring"
    assert price.recurring.interval == "month" and price.recurring.interval_count == 3
    link = await v1.payment_links.create_async(
        params={
            "line_items": [{"price": price.id, "quantity": 1}],
            "after_completion": {"type": "redirect", "redirect": {"url": "https://x.test/cb"}},
            "metadata": {"callback_hash": "h"},
        }
    )
    assert link.id.startswith("plink_")
    assert link.url == f"{stripe_sandbox.url}/pay/{link.id}"
    assert link.after_completion.redirect.url == "https://x.test/cb"
    assert link.active is True

    updated = await v1.payment_links.update_async(link.id, params={"active": False})
    assert updated.active is False
    fetched = await v1.payment_links.retrieve_async(link.id)
    assert fetched.active is False and fetched.metadata.to_dict() == {"callback_hash": "h"}

    state = stripe_sandbox.state
    assert list(state.products) == [product.id]
    assert list(state.prices) == [price.id]
    assert state.payment_links[link.id]["active"] is False


async def test_subscription_session_completes_into_a_subscription_that_cancels(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    params = _session_params(mode="subscription", subscription_data={"metadata": {"k": "v"}})
    params["line_items"][0]["price_data"]["recurring"] = {"interval": "week"}
    session = await stripe_client.v1.checkout.sessions.create_async(params=params)
    assert session.mode == "subscription" and session.subscription is None

    stripe_sandbox.state.complete_session(session.id)
    done = await stripe_client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.status == "complete" and done.payment_status == "paid"
    assert done.subscription.startswith("sub_")

    subs = stripe_client.v1.subscriptions
    subscription = await subs.retrieve_async(done.subscription)
    assert subscription.status == "active"
    assert subscription.metadata.to_dict() == {"k": "v"}
    assert subscription["items"].data[0].price.recurring.interval == "week"

    canceled = await subs.cancel_async(done.subscription)
    assert canceled.status == "canceled" and canceled.canceled_at
    with pytest.raises(stripe.InvalidRequestError) as info:
        await subs.cancel_async(done.subscription)  # Stripe: a canceled one is "gone"
    assert info.value.http_status == 404
    types = [e["type"] for e in stripe_sandbox.state.events]
    assert types == [
        "checkout.session.completed",
        "invoice.created",
        "invoice.finalized",
        "customer.subscription.created",
        "invoice.paid",
        "invoice.payment_succeeded",
        "customer.subscription.deleted",
    ]


async def test_expire_refuses_a_session_that_is_not_open(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    sessions = stripe_client.v1.checkout.sessions
    first = await sessions.create_async(params=_session_params())
    expired = await sessions.expire_async(first.id)
    assert expired.status == "expired" and expired.url is None
    with pytest.raises(stripe.InvalidRequestError) as info:
        await sessions.expire_async(first.id)
    assert info.value.http_status == 400
    assert "status of 'expired'" in info.value.user_message

    second = await sessions.create_async(params=_session_params())
    stripe_sandbox.state.complete_session(second.id)
    with pytest.raises(stripe.InvalidRequestError, match="status of 'complete'"):
        await sessions.expire_async(second.id)
    assert [e["type"] for e in stripe_sandbox.state.events] == [
        "checkout.session.expired",
        "checkout.session.completed",
    ]


async def test_list_sessions_filters_by_payment_link(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    v1 = stripe_client.v1
    product = await v1.products.create_async(params={"name": "p"})
    price = await v1.prices.create_async(
        params={"currency": "usd", "unit_amount": 700, "product": product.id}
    )
    links = [
        await v1.payment_links.create_async(
            params={"line_items": [{"price": price.id, "quantity": 1}]}
        )
        for _ in range(2)
    ]
    state = stripe_sandbox.state
    paid = [state.pay_payment_link(links[0].id)["id"] for _ in range(3)]
    state.pay_payment_link(links[1].id)
    await v1.checkout.sessions.create_async(params=_session_params())  # no link

    listed = await v1.checkout.sessions.list_async(params={"payment_link": links[0].id})
    assert [s.id for s in listed.data] == list(reversed(paid))  # newest first
    assert all(s.payment_link == links[0].id and s.status == "complete" for s in listed.data)
    assert listed.has_more is False

    page = await v1.checkout.sessions.list_async(params={"payment_link": links[0].id, "limit": 2})
    assert len(page.data) == 2 and page.has_more is True
    rest = await v1.checkout.sessions.list_async(
        params={"payment_link": links[0].id, "starting_after": page.data[-1].id}
    )
    assert [s.id for s in rest.data] == [paid[0]]
    before = await v1.checkout.sessions.list_async(
        params={"payment_link": links[0].id, "ending_before": paid[0], "limit": 1}
    )
    assert [s.id for s in before.data] == [paid[1]] and before.has_more is True


async def test_session_helpers_record_the_events_stripe_would_send(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    sessions = stripe_client.v1.checkout.sessions
    state = stripe_sandbox.state
    seen: list[str] = []
    state.listeners.append(lambda event: seen.append(event["type"]))

    failed = await sessions.create_async(params=_session_params())
    state.fail_session(failed.id)
    fetched = await sessions.retrieve_async(failed.id)
    assert (fetched.status, fetched.payment_status) == ("complete", "unpaid")

    late = await sessions.create_async(params=_session_params())
    state.complete_session(late.id, payment_status="unpaid")
    state.succeed_async_payment(late.id)
    assert (await sessions.retrieve_async(late.id)).payment_status == "paid"

    assert seen == [
        "checkout.session.completed",
        "checkout.session.async_payment_failed",
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
    ]
    event = state.events_of("checkout.session.async_payment_failed")[0]
    assert event["id"].startswith("evt_") and event["data"]["object"]["id"] == failed.id
    with pytest.raises(SessionStateError):
        state.expire_session(failed.id)


async def test_sessions_expire_when_their_time_is_up() -> None:
    now = [1_700_000_000.0]
    state = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    async with open_sandbox(SANDBOX_SECRET_KEY, state=state) as sandbox:
        response = await _raw(sandbox, "POST", "/v1/checkout/sessions", _session_params())
        session = response.json()
        assert session["expires_at"] == 1_700_000_000 + 24 * 3600
        now[0] += 24 * 3600 - 1
        assert state.expire_due_sessions() == []
        now[0] += 1
        assert [s["id"] for s in state.expire_due_sessions()] == [session["id"]]
        assert state.sessions[session["id"]]["status"] == "expired"


async def test_a_handler_bug_is_a_500_and_the_server_lives_on(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(stripe_sandbox.state, "create_product", broken)
    with pytest.raises(stripe.APIError) as info:
        await stripe_client.v1.products.create_async(params={"name": "x"})
    assert info.value.http_status == 500
    monkeypatch.undo()
    assert (await stripe_client.v1.products.create_async(params={"name": "x"})).id


# --- raw HTTP: parsing, auth, idempotency, error shapes ----------------------------------


async def test_raw_form_body_is_parsed_and_logged(stripe_sandbox: Sandbox) -> None:
    body = (
        "mode=payment&line_items[0][price_data][currency]=usd"
        "&line_items[0][price_data][unit_amount]=1999"
        "&line_items[0][price_data][product_data][name]=book"
        "&line_items[0][quantity]=2&metadata[order]=42&client_reference_id=r-9"
    )
    response = await _raw(stripe_sandbox, "POST", "/v1/checkout/sessions", body)
    assert response.status_code == 200, response.text
    session = response.json()
    assert session["amount_total"] == 3998
    assert session["metadata"] == {"order": "42"}
    assert response.headers["request-id"].startswith("req_")
    record = stripe_sandbox.state.requests[-1]
    assert record.endpoint == "POST /v1/checkout/sessions"
    assert record.params["line_items"][0]["price_data"]["product_data"] == {"name": "book"}
    assert record.status == 200

    listed = await _raw(stripe_sandbox, "GET", "/v1/checkout/sessions?limit=1&status=open")
    assert listed.json()["data"][0]["id"] == session["id"]
    assert stripe_sandbox.state.requests[-1].params == {"limit": "1", "status": "open"}


async def test_missing_or_wrong_key_is_a_stripe_401(stripe_sandbox: Sandbox) -> None:
    async with httpx.AsyncClient(base_url=stripe_sandbox.url) as client:
        response = await client.post("/v1/products", content="name=x")
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "did not provide an API key" in error["message"]

    wrong = "sk_test_wrongwrongwrong9876"
    response = await _raw(stripe_sandbox, "POST", "/v1/products", {"name": "x"}, _auth(wrong))
    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert message.startswith("Invalid API Key provided: sk_test_*")
    assert wrong not in message and message.endswith("9876")
    assert stripe_sandbox.state.products == {}


async def test_sdk_sees_a_wrong_key_as_authentication_error(stripe_sandbox: Sandbox) -> None:
    http = stripe.HTTPXClient(timeout=5)
    client = stripe.StripeClient(
        "sk_test_nope", base_addresses={"api": stripe_sandbox.url}, http_client=http
    )
    try:
        with pytest.raises(stripe.AuthenticationError):
            await client.v1.products.create_async(params={"name": "x"})
    finally:
        await http.close_async()


async def test_basic_auth_is_accepted_like_curl_u(stripe_sandbox: Sandbox) -> None:
    async with httpx.AsyncClient(base_url=stripe_sandbox.url) as client:
        response = await client.post(
            "/v1/products",
            content="name=x",
            auth=(SANDBOX_SECRET_KEY, ""),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 200


async def test_idempotent_replay_returns_the_stored_response(stripe_sandbox: Sandbox) -> None:
    key = {"Idempotency-Key": "key-1"}
    first = await _raw(stripe_sandbox, "POST", "/v1/checkout/sessions", _session_params(), key)
    second = await _raw(stripe_sandbox, "POST", "/v1/checkout/sessions", _session_params(), key)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["original-request"] == first.headers["request-id"]
    assert len(stripe_sandbox.state.sessions) == 1
    log = stripe_sandbox.state.requests_to("POST /v1/checkout/sessions")
    assert [(r.idempotency_key, r.replayed) for r in log] == [("key-1", False), ("key-1", True)]


async def test_idempotency_key_with_other_params_or_endpoint_is_refused(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    sessions = stripe_client.v1.checkout.sessions
    options: Any = {"idempotency_key": "key-2"}
    await sessions.create_async(params=_session_params(), options=options)
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        await sessions.create_async(
            params=_session_params(client_reference_id="other"), options=options
        )
    with pytest.raises(stripe.IdempotencyError, match="same endpoint"):
        await stripe_client.v1.products.create_async(params={"name": "x"}, options=options)
    assert len(stripe_sandbox.state.sessions) == 1
    assert stripe_sandbox.state.products == {}

    # a key that failed validation was not saved: the corrected request goes through
    bad = _session_params()
    del bad["mode"]
    other: Any = {"idempotency_key": "key-3"}
    with pytest.raises(stripe.InvalidRequestError):
        await sessions.create_async(params=bad, options=other)
    await sessions.create_async(params=_session_params(), options=other)
    assert len(stripe_sandbox.state.sessions) == 2


@pytest.mark.parametrize(
    ("params", "status", "param", "message"),
    [
        ({"mode": "payment"}, 400, "line_items", "Missing required param: line_items."),
        ({"line_items": []}, 400, "mode", "Missing required param: mode."),
        (
            _session_params(bogus="1"),
            400,
            "bogus",
            "Received unknown parameter: bogus",
        ),
        (
            _session_params(line_items=[{"price_data": {"currency": "usd"}, "quantity": "1"}]),
            400,
            "line_items[0][price_data][unit_amount]",
            "Missing required param: line_items[0][price_data][unit_amount].",
        ),
        (
            _session_params(line_items=[{"price": "price_missing", "quantity": 1}]),
            404,
            "line_items[0][price]",
            "No such price: 'price_missing'",
        ),
        (
            _session_params(
                line_items=[
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": "12x",
                            "product_data": {"name": "n"},
                        },
                        "quantity": 1,
                    }
                ]
            ),
            400,
            "line_items[0][price_data][unit_amount]",
            "Invalid integer: 12x",
        ),
        (
            _session_params(
                line_items=[
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": 100,
                            "product_data": {"name": "n"},
                            "recurring": {"interval": "month"},
                        },
                        "quantity": 1,
                    }
                ]
            ),
            400,
            "line_items[0]",
            "You specified `payment` mode but passed a recurring price.",
        ),
        (_session_params(success_url="not a url"), 400, "success_url", "Not a valid URL"),
    ],
)
async def test_invalid_requests_get_stripe_shaped_errors(
    stripe_sandbox: Sandbox, params: dict[str, Any], status: int, param: str, message: str
) -> None:
    response = await _raw(stripe_sandbox, "POST", "/v1/checkout/sessions", params)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(message)
    assert stripe_sandbox.state.sessions == {}


async def test_unknown_objects_and_routes_are_404(stripe_sandbox: Sandbox) -> None:
    response = await _raw(stripe_sandbox, "GET", "/v1/checkout/sessions/cs_test_nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "resource_missing"
    assert error["message"] == "No such checkout.session: 'cs_test_nope'"

    response = await _raw(stripe_sandbox, "GET", "/v1/charges")
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith(
        "Unrecognized request URL (GET: /v1/charges)"
    )


# --- fault injection --------------------------------------------------------------------


async def test_injected_errors_answer_for_the_next_k_requests(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    stripe_sandbox.faults.fail(500, path="/v1/checkout", times=2)
    products = await stripe_client.v1.products.create_async(params={"name": "unaffected"})
    assert products.id
    for _ in range(2):
        with pytest.raises(stripe.APIError) as info:
            await stripe_client.v1.checkout.sessions.create_async(params=_session_params())
        assert info.value.http_status == 500
        assert info.value.json_body["error"]["type"] == "api_error"
    await stripe_client.v1.checkout.sessions.create_async(params=_session_params())
    log = stripe_sandbox.state.requests_to("POST /v1/checkout/sessions")
    assert [(r.status, r.fault) for r in log] == [(500, "error"), (500, "error"), (200, "")]
    assert len(stripe_sandbox.state.sessions) == 1  # faulted requests were not handled


async def test_injected_error_status_maps_to_the_sdk_error(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    stripe_sandbox.faults.fail(429, times=None)
    with pytest.raises(stripe.RateLimitError):
        await stripe_client.v1.products.create_async(params={"name": "x"})
    with pytest.raises(stripe.RateLimitError):
        await stripe_client.v1.products.create_async(params={"name": "x"})
    stripe_sandbox.faults.clear()
    await stripe_client.v1.products.create_async(params={"name": "x"})
    assert len(stripe_sandbox.state.products) == 1


async def test_injected_delay_holds_the_answer(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    stripe_sandbox.faults.delay(0.3, method="POST")
    start = trio.current_time()
    await stripe_client.v1.products.create_async(params={"name": "slow"})
    assert trio.current_time() - start >= 0.3
    start = trio.current_time()
    await stripe_client.v1.products.create_async(params={"name": "fast"})
    assert trio.current_time() - start < 0.3
    assert [r.fault for r in stripe_sandbox.state.requests] == ["delay", ""]


async def test_delay_after_handling_models_a_lost_answer(stripe_sandbox: Sandbox) -> None:
    stripe_sandbox.faults.delay(5, after=True)
    async with httpx.AsyncClient(base_url=stripe_sandbox.url, headers=_auth()) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/products",
                content="name=late",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=0.2,
            )
    assert [p["name"] for p in stripe_sandbox.state.products.values()] == ["late"]


async def test_dropped_connection_gets_no_answer(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    stripe_sandbox.faults.drop(times=None)
    for _ in range(2):
        with pytest.raises(stripe.APIConnectionError):
            await stripe_client.v1.products.create_async(params={"name": "x"})
    stripe_sandbox.faults.clear()
    await stripe_client.v1.products.create_async(params={"name": "x"})
    log = stripe_sandbox.state.requests
    assert [(r.status, r.fault) for r in log] == [(None, "drop"), (None, "drop"), (200, "")]
    assert len(stripe_sandbox.state.products) == 1


# --- control API and process entry point ------------------------------------------------


async def test_control_api_drives_a_session(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    session = await stripe_client.v1.checkout.sessions.create_async(params=_session_params())
    async with httpx.AsyncClient(base_url=stripe_sandbox.url, headers=_auth()) as client:
        assert (await client.get("/_sandbox/health")).json() == {"status": "ok"}
        denied = await client.post(
            f"/_sandbox/checkout/sessions/{session.id}/complete", headers={"Authorization": ""}
        )
        assert denied.status_code == 401
        done = await client.post(f"/_sandbox/checkout/sessions/{session.id}/complete")
        assert done.json()["status"] == "complete"
        again = await client.post(f"/_sandbox/checkout/sessions/{session.id}/expire")
        assert again.status_code == 400
        fault = await client.post("/_sandbox/faults", json={"kind": "error", "status": 503})
        assert fault.json()["remaining"] == 1
        log = (await client.get("/_sandbox/requests")).json()["data"]
        assert [r["endpoint"] for r in log] == ["POST /v1/checkout/sessions"]
    with pytest.raises(stripe.APIError):
        await stripe_client.v1.checkout.sessions.retrieve_async(session.id)


async def test_module_entry_point_serves_until_terminated() -> None:
    async with trio.open_nursery() as nursery:
        command = [sys.executable, "-m", "payments.sandbox", "--port", "0"]
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [*command, "--secret-key", "sk_test_p"],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        url = line.decode().split("listening on ")[1].strip()
        http = stripe.HTTPXClient(timeout=5)
        client = stripe.StripeClient("sk_test_p", base_addresses={"api": url}, http_client=http)
        try:
            product = await client.v1.products.create_async(params={"name": "proc"})
            assert product.id.startswith("prod_")
        finally:
            await http.close_async()
        process.terminate()
        with trio.fail_after(10):
            assert await process.wait() == 0


async def test_list_sessions_by_creation_time_pages_after_the_cursor(
    stripe_sandbox: Sandbox, stripe_client: stripe.StripeClient
) -> None:
    sessions = stripe_client.v1.checkout.sessions
    made = [await sessions.create_async(params=_session_params()) for _ in range(5)]
    for at, session in enumerate(made, start=100):  # created 100 .. 104
        stripe_sandbox.state.sessions[session.id]["created"] = at
    window = {"gte": 101, "lte": 103}

    first = await sessions.list_async(params={"created": window, "limit": 2})
    rest = await sessions.list_async(
        params={"created": window, "limit": 2, "starting_after": first.data[-1].id}
    )

    assert [s.id for s in first.data] == [made[3].id, made[2].id] and first.has_more
    assert [s.id for s in rest.data] == [made[1].id] and not rest.has_more
    outside = made[4].id  # not in the window: no cursor for this listing
    with pytest.raises(stripe.InvalidRequestError):
        await sessions.list_async(params={"created": window, "starting_after": outside})
    with pytest.raises(stripe.InvalidRequestError):
        await sessions.list_async(params={"created": {"gte": "soon"}})
