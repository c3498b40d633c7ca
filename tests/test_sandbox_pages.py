"""The emulator's hosted checkout pages and dashboard, over real HTTP (httpx).

What a customer's browser sees and does at ``/pay/{id}`` (amount, currency, product,
interval; Pay, Decline, Cancel as form POSTs answered 303), the events each button
emits and the webhook delivers signed, what a session that can no longer be paid
shows, Payment Links opening a session, and the dashboard listing sessions and
deliveries (open on loopback only). Also how the emulator runs as a supervised child
(``shutdown_trigger``, ``public_url``, ``state`` kept across restarts).
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio
from quart import Response, request
from quart_trio import QuartTrio

from payments.api.http import serve_http
from payments.model import PaymentStatus
from payments.providers.stripe_events import StripeEventParser, read_event
from payments.sandbox import (
    Sandbox,
    StripeState,
    encode_form,
    open_sandbox,
    sandbox_child,
    serve_sandbox,
)
from payments.sandbox.pages import format_amount, format_interval, is_loopback_host
from supervisor import ChildSpec, ChildState, Supervisor
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY, WEBHOOK_SECRET

pytestmark = [pytest.mark.timeout(30)]

SHOP = "https://shop.test"
Json = dict[str, Any]


@attrs.define
class Hooks:
    """Stands in for the service's webhook route: records each event posted."""

    url: str = ""
    received: list[tuple[str, dict[str, str], bytes]] = attrs.field(factory=list)
    answers: list[int] = attrs.field(factory=list)

    def types(self) -> list[str]:
        return [json.loads(body)["type"] for _, _, body in self.received]


@pytest.fixture
async def hooks(nursery: trio.Nursery) -> Hooks:
    app = QuartTrio("hooks")
    box = Hooks()

    @app.post("/<path:path>")
    async def hook(path: str) -> Response:
        body = await request.get_data(as_text=False)
        box.received.append((f"/{path}", {k.lower(): v for k, v in request.headers.items()}, body))
        status = box.answers.pop(0) if box.answers else 200
        return Response("{}", status=status, content_type="application/json")

    port = await nursery.start(functools.partial(serve_http, app, "127.0.0.1", 0))
    box.url = f"http://127.0.0.1:{port}/webhooks/providers/stripe"
    return box


@pytest.fixture
async def sandbox(hooks: Hooks) -> AsyncIterator[Sandbox]:
    async with open_sandbox(
        SANDBOX_SECRET_KEY, webhook_url=hooks.url, webhook_secret=WEBHOOK_SECRET
    ) as running:
        assert running.state.webhook is not None
        running.state.webhook.retry_delays = ()  # one attempt: the dashboard shows it
        yield running


@pytest.fixture
async def browser(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials that does not follow redirects (we check them)."""
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as client:
        yield client


async def api(sandbox: Sandbox, path: str, params: Json) -> Json:
    """A Stripe API call as the service makes it (form-encoded, Bearer key)."""
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as client:
        response = await client.post(
            path,
            content=encode_form(params),
            headers={
                "Authorization": f"Bearer {sandbox.secret_key}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
    assert response.status_code == 200, response.text
    return response.json()


def line(name: str = "order-1042", amount: int = 2500, currency: str = "eur", **extra: Any) -> Json:
    return {
        "price_data": {
            "currency": currency,
            "unit_amount": amount,
            "product_data": {"name": name},
            **extra,
        },
        "quantity": 1,
    }


async def session(sandbox: Sandbox, *, recurring: bool = False, **changes: Any) -> Json:
    params: Json = {
        "mode": "subscription" if recurring else "payment",
        "line_items": [line(recurring={"interval": "month"})] if recurring else [line()],
        "metadata": {"callback_hash": "hash-1", "request_id": "secret-request-id"},
        "success_url": f"{SHOP}/paid?session={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{SHOP}/canceled",
    }
    if recurring:
        params["subscription_data"] = {"metadata": {"callback_hash": "hash-1"}}
    params.update(changes)
    return await api(sandbox, "/v1/checkout/sessions", params)


async def payment_link(sandbox: Sandbox, *, after: Json | None = None) -> Json:
    product = await api(sandbox, "/v1/products", {"name": "plan-7"})
    price = await api(
        sandbox,
        "/v1/prices",
        {
            "currency": "usd",
            "unit_amount": 990,
            "product": product["id"],
            "recurring": {"interval": "month", "interval_count": 3},
        },
    )
    return await api(
        sandbox,
        "/v1/payment_links",
        {
            "line_items": [{"price": price["id"], "quantity": 1}],
            "metadata": {"callback_hash": "hash-link", "request_id": "link-req"},
            "subscription_data": {"metadata": {"callback_hash": "hash-link"}},
            "after_completion": after or {"type": "redirect", "redirect": {"url": f"{SHOP}/l"}},
        },
    )


def path_of(url: str) -> str:
    return httpx.URL(url).raw_path.decode()


def buttons(html: str) -> list[tuple[str, str]]:
    """(form action, button label) of each form on the page."""
    return re.findall(
        r'<form method="post" action="([^"]+)"><button[^>]*>([^<]+)</button></form>', html
    )


async def idle(sandbox: Sandbox) -> None:
    with trio.fail_after(10):
        await sandbox.webhooks.wait_idle()


# --- formatting -------------------------------------------------------------------------


def test_amounts_are_shown_in_the_currency_minor_unit() -> None:
    assert format_amount(2500, "eur") == "EUR 25.00"
    assert format_amount(123456789, "usd") == "USD 1,234,567.89"
    assert format_amount(500, "jpy") == "JPY 500"  # zero-decimal
    assert format_amount(12340, "kwd") == "KWD 12.340"  # three-decimal
    assert format_interval({"interval": "month", "interval_count": 1}) == "every 1 month"
    assert format_interval({"interval": "week", "interval_count": 2}) == "every 2 weeks"
    assert format_interval(None) == ""


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("payments.internal", False),
    ],
)
def test_which_bind_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- the checkout page -------------------------------------------------------------------


async def test_the_page_shows_amount_product_and_interval(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    created = await session(sandbox, recurring=True)
    assert created["url"] == f"{sandbox.url}/pay/{created['id']}"
    page = await browser.get(path_of(created["url"]))  # no key: a browser opens it
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "<script" not in page.text and "http" not in page.text.split("<body>")[1]
    assert "EUR 25.00" in page.text
    assert "every 1 month" in page.text
    assert "<h1>order-1042</h1>" in page.text
    base = f"/pay/{created['id']}"
    assert buttons(page.text) == [
        (f"{base}/pay", "Pay"),
        (f"{base}/decline", "Decline"),
        (f"{base}/cancel", "Cancel"),
    ]
    # what the customer sees at Stripe, never the service's metadata
    assert "secret-request-id" not in page.text and "hash-1" not in page.text

    one_time = await session(sandbox)
    page = await browser.get(f"/pay/{one_time['id']}")
    assert "EUR 25.00" in page.text and "every" not in page.text


async def test_everything_on_the_page_is_escaped(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    name = "<script>alert('x')</script> & \"friends\""
    created = await session(sandbox, line_items=[line(name=name)])
    page = await browser.get(f"/pay/{created['id']}")
    assert name not in page.text
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;friends&quot;" in (
        page.text
    )


async def test_pay_completes_the_session_and_redirects_to_the_success_url(
    sandbox: Sandbox, browser: httpx.AsyncClient, hooks: Hooks
) -> None:
    created = await session(sandbox)
    answer = await browser.post(f"/pay/{created['id']}/pay")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{SHOP}/paid?session={created['id']}"
    done = sandbox.state.sessions[created["id"]]
    assert (done["status"], done["payment_status"]) == ("complete", "paid")
    assert done["payment_intent"].startswith("pi_")
    assert [e["type"] for e in sandbox.state.events] == ["checkout.session.completed"]

    await idle(sandbox)  # delivered signed to the service's route, as in production
    [(path, headers, body)] = hooks.received
    assert path == "/webhooks/providers/stripe/hash-1"
    event = StripeEventParser(WEBHOOK_SECRET).parse(body, headers["stripe-signature"])
    assert event.event_type == "checkout.session.completed"
    assert event.target_status == PaymentStatus.PAID


async def test_pay_for_a_subscription_starts_it_with_a_paid_first_invoice(
    sandbox: Sandbox, browser: httpx.AsyncClient, hooks: Hooks
) -> None:
    created = await session(sandbox, recurring=True)
    answer = await browser.post(f"/pay/{created['id']}/pay")
    assert answer.status_code == 303
    done = sandbox.state.sessions[created["id"]]
    subscription = sandbox.state.subscriptions[done["subscription"]]
    invoice = sandbox.state.invoices[done["invoice"]]
    assert subscription["status"] == "active"
    assert (invoice["status"], invoice["amount_paid"]) == ("paid", 2500)
    # Stripe's order after a subscription checkout (see StripeState._announce_first_invoice)
    assert [e["type"] for e in sandbox.state.events] == [
        "checkout.session.completed",
        "invoice.created",
        "invoice.finalized",
        "customer.subscription.created",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]
    await idle(sandbox)
    assert sorted(hooks.types()) == sorted(e["type"] for e in sandbox.state.events)
    assert {path for path, _, _ in hooks.received} == {"/webhooks/providers/stripe/hash-1"}


async def test_decline_fails_the_payment_so_the_service_ends_failed(
    sandbox: Sandbox, browser: httpx.AsyncClient, hooks: Hooks
) -> None:
    created = await session(sandbox)
    answer = await browser.post(f"/pay/{created['id']}/decline")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{SHOP}/canceled"
    types = [e["type"] for e in sandbox.state.events]
    assert types == ["checkout.session.completed", "checkout.session.async_payment_failed"]
    # the service's mapping: PROCESSING then FAILED (terminal, whatever the arrival order)
    targets = [read_event(json.dumps(e)).target_status for e in sandbox.state.events]
    assert targets == [PaymentStatus.PROCESSING, PaymentStatus.FAILED]
    assert sandbox.state.sessions[created["id"]]["payment_status"] == "unpaid"
    await idle(sandbox)
    assert sorted(hooks.types()) == sorted(types)

    page = await browser.get(f"/pay/{created['id']}")
    assert page.status_code == 200
    assert "Payment failed" in page.text and not buttons(page.text)


async def test_decline_of_a_subscription_fails_its_first_invoice_too(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    created = await session(sandbox, recurring=True)
    assert (await browser.post(f"/pay/{created['id']}/decline")).status_code == 303
    events = sandbox.state.events
    assert [e["type"] for e in events] == [
        "checkout.session.completed",
        "invoice.created",
        "invoice.finalized",
        "customer.subscription.created",
        "checkout.session.async_payment_failed",
        "invoice.payment_failed",
    ]
    assert read_event(json.dumps(events[-1])).target_status == PaymentStatus.FAILED
    subscription_id = sandbox.state.sessions[created["id"]]["subscription"]
    assert sandbox.state.subscriptions[subscription_id]["status"] == "incomplete"


async def test_cancel_leaves_the_session_open_and_goes_to_the_cancel_url(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    created = await session(sandbox)
    answer = await browser.post(f"/pay/{created['id']}/cancel")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{SHOP}/canceled"
    assert sandbox.state.sessions[created["id"]]["status"] == "open"
    assert sandbox.state.events == []
    page = await browser.get(f"/pay/{created['id']}")  # the customer comes back
    assert len(buttons(page.text)) == 3


async def test_a_completed_session_is_never_paid_twice(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    created = await session(sandbox)
    assert (await browser.post(f"/pay/{created['id']}/pay")).status_code == 303
    page = await browser.get(f"/pay/{created['id']}")
    assert page.status_code == 200
    assert "Already paid" in page.text and "EUR 25.00 was paid" in page.text
    assert not buttons(page.text)
    for action in ("pay", "decline", "cancel"):
        again = await browser.post(f"/pay/{created['id']}/{action}")
        assert again.status_code == 409, action
        assert "Already paid" in again.text
    assert [e["type"] for e in sandbox.state.events] == ["checkout.session.completed"]


async def test_an_expired_session_says_so(sandbox: Sandbox, browser: httpx.AsyncClient) -> None:
    created = await session(sandbox)
    sandbox.state.expire_session(created["id"])
    page = await browser.get(f"/pay/{created['id']}")
    assert "Checkout expired" in page.text and not buttons(page.text)
    assert (await browser.post(f"/pay/{created['id']}/pay")).status_code == 409

    # a session past its expires_at is expired when opened, as Stripe would have
    late = await session(sandbox)
    sandbox.state.clock = lambda: time.time() + 2 * 24 * 3600
    page = await browser.get(f"/pay/{late['id']}")
    assert "Checkout expired" in page.text
    assert sandbox.state.sessions[late["id"]]["status"] == "expired"
    assert [e["type"] for e in sandbox.state.events][-1] == "checkout.session.expired"


# --- payment links -------------------------------------------------------------------


async def test_a_payment_link_opens_a_new_session_with_its_metadata(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    link = await payment_link(sandbox)
    assert link["url"] == f"{sandbox.url}/pay/{link['id']}"
    opened = await browser.get(path_of(link["url"]))
    assert opened.status_code == 303
    [first] = sandbox.state.sessions_for_link(link["id"])
    assert opened.headers["location"] == f"/pay/{first['id']}"
    assert first["metadata"] == link["metadata"]
    assert first["mode"] == "subscription" and first["success_url"] == f"{SHOP}/l"

    page = await browser.get(opened.headers["location"])
    assert "USD 9.90" in page.text and "every 3 months" in page.text
    assert "<h1>plan-7</h1>" in page.text and len(buttons(page.text)) == 3
    assert "hash-link" not in page.text

    await browser.get(path_of(link["url"]))  # every visit opens its own, as at Stripe
    assert len(sandbox.state.sessions_for_link(link["id"])) == 2

    paid = await browser.post(f"/pay/{first['id']}/pay")
    assert paid.headers["location"] == f"{SHOP}/l"
    invoice_paid = sandbox.state.events_of("invoice.paid")[0]
    assert read_event(json.dumps(invoice_paid)).callback_hash == "hash-link"


async def test_a_link_without_redirects_comes_back_to_its_own_page(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    after = {"type": "hosted_confirmation", "hosted_confirmation": {"custom_message": "Ta <3"}}
    link = await payment_link(sandbox, after=after)
    location = (await browser.get(f"/pay/{link['id']}")).headers["location"]
    canceled = await browser.post(f"{location}/cancel")  # a link has no cancel_url
    assert (canceled.status_code, canceled.headers["location"]) == (303, location)
    paid = await browser.post(f"{location}/pay")
    assert (paid.status_code, paid.headers["location"]) == (303, location)
    page = await browser.get(location)
    assert "Already paid" in page.text and "Ta &lt;3" in page.text


async def test_an_inactive_link_opens_nothing(sandbox: Sandbox, browser: httpx.AsyncClient) -> None:
    link = await payment_link(sandbox)
    await api(sandbox, f"/v1/payment_links/{link['id']}", {"active": False})
    page = await browser.get(f"/pay/{link['id']}")
    assert page.status_code == 410 and "no longer active" in page.text
    assert sandbox.state.sessions_for_link(link["id"]) == []


async def test_unknown_pages_and_wrong_methods(
    sandbox: Sandbox, browser: httpx.AsyncClient
) -> None:
    link = await payment_link(sandbox)
    for path in ("/pay/cs_test_nope", "/pay/plink_nope", "/pay/", "/pay/x/y/z"):
        page = await browser.get(path)
        assert page.status_code == 404, path
        assert page.headers["content-type"].startswith("text/html")
    assert (await browser.post("/pay/cs_test_nope/pay")).status_code == 404
    created = await session(sandbox)
    assert (await browser.get(f"/pay/{created['id']}/pay")).status_code == 405
    assert (await browser.post(f"/pay/{created['id']}")).status_code == 405
    head = await browser.head(f"/pay/{link['id']}")  # must not open a session
    assert (head.status_code, head.content) == (405, b"")
    assert sandbox.state.sessions_for_link(link["id"]) == []
    # nothing here went through the Stripe API (its log is untouched)
    assert [r.endpoint for r in sandbox.state.requests][-1] == "POST /v1/checkout/sessions"


# --- the dashboard -------------------------------------------------------------------


async def test_the_dashboard_lists_sessions_and_events_with_delivery_codes(
    sandbox: Sandbox, browser: httpx.AsyncClient, hooks: Hooks
) -> None:
    paid = await session(sandbox)
    waiting = await session(sandbox, line_items=[line(name="<b>", amount=9900, currency="jpy")])
    hooks.answers = [500]  # the first delivery is refused
    await browser.post(f"/pay/{paid['id']}/pay")
    await idle(sandbox)

    page = await browser.get("/_sandbox/dashboard")  # loopback: no key needed
    assert page.status_code == 200
    sessions = page.text.split('id="sessions"')[1].split("</table>")[0]
    events = page.text.split('id="events"')[1].split("</table>")[0]
    assert paid["id"] in sessions and waiting["id"] in sessions
    assert "EUR 25.00" in sessions and "JPY 9,900" in sessions
    assert "<td>complete</td><td>paid</td>" in sessions
    assert "<td>open</td><td>unpaid</td>" in sessions
    assert f'href="/pay/{waiting["id"]}"' in sessions
    assert "<b>" not in page.text.split("<body>")[1]
    [event] = sandbox.state.events
    assert event["id"] in events and "checkout.session.completed" in events
    assert '<td class="delivery">500</td>' in events
    assert hooks.url in page.text


async def test_the_dashboard_wants_the_key_off_loopback() -> None:
    async with (
        open_sandbox(SANDBOX_SECRET_KEY, dashboard_open=False) as sandbox,
        httpx.AsyncClient(base_url=sandbox.url, timeout=10) as client,
    ):
        refused = await client.get("/_sandbox/dashboard")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert SANDBOX_SECRET_KEY not in refused.text
        basic = base64.b64encode(f"{SANDBOX_SECRET_KEY}:".encode()).decode()
        for value in (f"Basic {basic}", f"Bearer {SANDBOX_SECRET_KEY}"):
            page = await client.get("/_sandbox/dashboard", headers={"Authorization": value})
            assert page.status_code == 200, value
        wrong = await client.get("/_sandbox/dashboard", headers={"Authorization": "Bearer sk_x"})
        assert wrong.status_code == 401
        # the checkout pages stay open: the customer has no key
        created = await session(sandbox)
        assert (await client.get(f"/pay/{created['id']}")).status_code == 200


async def test_bound_to_every_address_the_dashboard_is_closed_by_default(
    nursery: trio.Nursery,
) -> None:
    running: Sandbox = await nursery.start(
        functools.partial(serve_sandbox, "0.0.0.0", 0, secret_key=SANDBOX_SECRET_KEY)
    )
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
        assert (await client.get("/_sandbox/dashboard")).status_code == 401
    nursery.cancel_scope.cancel()


# --- as a supervised child (the embedded profile) ------------------------------------


async def free_port() -> int:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_serve_sandbox_as_a_child_keeps_state_and_stops_on_its_trigger(
    hooks: Hooks,
) -> None:
    state = StripeState(SANDBOX_SECRET_KEY)
    stopping = trio.Event()
    port = await free_port()
    public = f"http://localhost:{port}"

    async def run_once() -> Sandbox:
        """One run of the child: serve until ``stopping`` is set, then return."""
        async with trio.open_nursery() as nursery:
            running: Sandbox = await nursery.start(
                functools.partial(
                    serve_sandbox,
                    "127.0.0.1",
                    port,
                    secret_key=SANDBOX_SECRET_KEY,
                    state=state,
                    public_url=public,
                    webhook_url=hooks.url,
                    webhook_secret=WEBHOOK_SECRET,
                    gateway_api_key="gw-key",
                    shutdown_trigger=stopping.wait,
                )
            )
            assert running.url == public and running.state is state
            created = await session(running)
            assert created["url"] == f"{public}/pay/{created['id']}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.post(f"/pay/{created['id']}/pay")).status_code == 303
            await idle(running)
            stopping.set()
        return running

    with trio.fail_after(10):
        await run_once()  # returns by itself once stopping is set
        stopping = trio.Event()
        await run_once()  # a restart on the same port and state
    assert len(state.sessions) == 2  # objects survived the restart
    assert [path for path, _, _ in hooks.received] == ["/webhooks/providers/stripe/hash-1"] * 2
    assert {h["x-api-key"] for _, h, _ in hooks.received} == {"gw-key"}


async def test_sandbox_child_runs_under_the_real_supervisor(hooks: Hooks) -> None:
    state = StripeState(SANDBOX_SECRET_KEY)
    port = await free_port()
    seen: list[Sandbox] = []
    start = sandbox_child(
        state,
        port=port,
        webhook_url=hooks.url,
        webhook_secret=WEBHOOK_SECRET,
        gateway_api_key="gw-key",
        on_ready=seen.append,
    )
    tree = Supervisor([ChildSpec(name="stripe-sandbox", start=start, grace=1.0)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(tree.run)
            assert tree.snapshot()["stripe-sandbox"].state is ChildState.RUNNING
            [running] = seen
            assert running.url == f"http://127.0.0.1:{port}"
            created = await session(running)
            async with httpx.AsyncClient(base_url=running.url) as client:
                assert (await client.post(f"/pay/{created['id']}/pay")).status_code == 303
            await idle(running)
            tree.shutdown()  # returns at once: the child stops on ctx.stopping, no grace used
    assert hooks.types() == ["checkout.session.completed"]
    assert tree.snapshot()["stripe-sandbox"].restarts == 0
    with pytest.raises(ValueError, match="fixed port"):
        sandbox_child(state, port=0, webhook_url=hooks.url, webhook_secret=WEBHOOK_SECRET)
