"""The emulator's webhooks: every emitted event posted, signed as Stripe signs, with the
gateway's headers (or in its envelope), retried, replayable; and the new ways to move
objects (invoices paid or failed, delayed payments) over the control API too."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import stripe
import trio
from quart import Response, request
from quart_trio import QuartTrio

from payments.api.http import serve_http
from payments.model import PaymentStatus
from payments.providers.stripe_events import StripeEventParser, read_event
from payments.sandbox import Sandbox, WebhookEndpoint, open_sandbox
from payments.sandbox.__main__ import main as sandbox_main
from payments.sandbox.webhooks import callback_hash_of, delivery_url
from tests.fixtures.app import closed_port
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY, WEBHOOK_SECRET

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

GATEWAY_KEY = "gw-key-1"


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@attrs.define
class Receiver:
    """A real HTTP server standing in for the service: records requests, answers the
    statuses queued in ``answers`` (then 200)."""

    url: str
    received: list[Received] = attrs.field(factory=list)
    answers: list[int] = attrs.field(factory=list)
    arrived: trio.Event = attrs.field(factory=trio.Event)

    def record(self, got: Received) -> None:
        self.received.append(got)
        self.arrived.set()
        self.arrived = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while len(self.received) < count:
                await self.arrived.wait()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    app = QuartTrio("receiver")
    box = Receiver("")

    @app.post("/<path:path>")
    async def hook(path: str) -> Response:
        body = await request.get_data(as_text=False)
        headers = {name.lower(): value for name, value in request.headers.items()}
        box.record(Received(f"/{path}", headers, body))
        status = box.answers.pop(0) if box.answers else 200
        return Response("{}", status=status, content_type="application/json")

    port = await nursery.start(functools.partial(serve_http, app, "127.0.0.1", 0))
    box.url = f"http://127.0.0.1:{port}/hooks"
    return box


@pytest.fixture
async def sandbox(receiver: Receiver) -> AsyncIterator[Sandbox]:
    async with open_sandbox(
        SANDBOX_SECRET_KEY,
        webhook_url=receiver.url,
        webhook_secret=WEBHOOK_SECRET,
        gateway_api_key=GATEWAY_KEY,
    ) as running:
        assert running.state.webhook is not None
        running.state.webhook.retry_delays = (0.01, 0.02)
        yield running


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[stripe.StripeClient]:
    http = stripe.HTTPXClient(timeout=5)
    yield stripe.StripeClient(
        sandbox.secret_key,
        base_addresses={"api": sandbox.url},
        http_client=http,
        max_network_retries=0,
    )
    await http.close_async()


def session_params(callback_hash: str = "hash-1", **changes: Any) -> dict[str, Any]:
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
        "metadata": {"request_id": "r-1", "callback_hash": callback_hash},
        "success_url": "https://shop.test/ok",
    }
    params.update(changes)
    return params


def recurring_params(callback_hash: str = "hash-sub") -> dict[str, Any]:
    params = session_params(callback_hash, mode="subscription")
    params["line_items"][0]["price_data"]["recurring"] = {"interval": "month"}
    params["subscription_data"] = {"metadata": dict(params["metadata"])}
    return params


async def idle(sandbox: Sandbox) -> None:
    with trio.fail_after(10):
        await sandbox.webhooks.wait_idle()


def control(sandbox: Sandbox) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"{sandbox.url}/_sandbox",
        headers={"Authorization": f"Bearer {sandbox.secret_key}"},
    )


# --- delivery ---------------------------------------------------------------------------


async def test_an_event_is_posted_signed_as_stripe_signs_with_the_gateway_headers(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)

    [event] = sandbox.state.events
    [got] = receiver.received
    assert got.path == "/hooks/hash-1"
    assert json.loads(got.body) == event
    headers = got.headers
    signature = headers["stripe-signature"]
    # Verified independently by the stripe library, and by the service's parser.
    assert stripe.WebhookSignature.verify_header(got.body.decode(), signature, WEBHOOK_SECRET, 300)
    parsed = StripeEventParser(WEBHOOK_SECRET, 300).parse(got.body, signature)
    assert parsed.event_id == event["id"]
    assert parsed.target_status == PaymentStatus.PAID
    assert parsed.callback_hash == "hash-1" and parsed.refs == (session.id,)
    assert headers["x-api-key"] == GATEWAY_KEY
    assert headers["x-request-id"].startswith("gw_req_")
    assert headers["user-agent"].startswith("Stripe/1.0")
    assert headers["content-type"].startswith("application/json")
    [delivery] = sandbox.state.deliveries
    assert (delivery.event_id, delivery.attempt, delivery.status) == (event["id"], 1, 200)
    assert delivery.request_id == headers["x-request-id"]


async def test_the_envelope_form(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sandbox.configure_webhook(receiver.url, WEBHOOK_SECRET, api_key=GATEWAY_KEY, envelope=True)
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.expire_session(session.id)
    await idle(sandbox)
    [got] = receiver.received
    envelope = json.loads(got.body)
    assert set(envelope) == {"payload", "signature"}
    assert "stripe-signature" not in got.headers
    assert got.headers["x-api-key"] == GATEWAY_KEY
    parsed = StripeEventParser(WEBHOOK_SECRET, 300).parse(
        envelope["payload"].encode(), envelope["signature"]
    )
    assert parsed.event_type == "checkout.session.expired"
    assert parsed.target_status == PaymentStatus.EXPIRED


async def test_the_signature_header_can_be_renamed(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sandbox.configure_webhook(receiver.url, WEBHOOK_SECRET, signature_header="X-Provider-Signature")
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    headers = receiver.received[0].headers
    assert "stripe-signature" not in headers and "x-api-key" not in headers
    assert headers["x-provider-signature"].startswith("t=")


async def test_failed_deliveries_are_retried_until_answered(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    receiver.answers = [500, 400]
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    [event] = sandbox.state.events
    deliveries = sandbox.state.deliveries_of(event["id"])
    assert [(d.attempt, d.status) for d in deliveries] == [(1, 500), (2, 400), (3, 200)]
    assert len({d.request_id for d in deliveries}) == 3  # a fresh request id each time
    assert {json.loads(r.body)["id"] for r in receiver.received} == {event["id"]}


async def test_delivery_gives_up_after_its_attempts(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    receiver.answers = [503] * 10
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    assert [d.status for d in sandbox.state.deliveries] == [503, 503, 503]
    assert sandbox.webhooks.pending == 0


async def test_an_unreachable_endpoint_is_recorded_without_a_status(
    sandbox: Sandbox, client: stripe.StripeClient
) -> None:
    sandbox.configure_webhook(
        f"http://127.0.0.1:{closed_port()}/hooks", WEBHOOK_SECRET, retry_delays=()
    )
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    [delivery] = sandbox.state.deliveries
    assert delivery.status is None and delivery.error == "ConnectError" and not delivery.ok


async def test_nothing_is_posted_without_an_endpoint(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sandbox.state.webhook = None
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    assert receiver.received == [] and sandbox.state.deliveries == []
    assert len(sandbox.state.events) == 1
    with pytest.raises(ValueError, match="no webhook endpoint"):
        sandbox.webhooks.resend(sandbox.state.events[0]["id"])


async def test_an_event_can_be_sent_again_with_its_id(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    sandbox.state.complete_session(session.id)
    await idle(sandbox)
    [event] = sandbox.state.events
    sandbox.webhooks.resend(event["id"])
    await idle(sandbox)
    first, second = receiver.received
    assert first.body == second.body  # same id, same body...
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    with pytest.raises(KeyError):
        sandbox.webhooks.resend("evt_nope")


async def test_the_callback_hash_picks_the_url() -> None:
    obj = {"metadata": {"callback_hash": "abc"}}
    event = {"data": {"object": obj}}
    assert delivery_url(WebhookEndpoint("http://svc/hooks/", "s"), event) == "http://svc/hooks/abc"
    templated = WebhookEndpoint("http://svc/w/{callback_hash}?x=1", "s")
    assert delivery_url(templated, event) == "http://svc/w/abc?x=1"
    assert delivery_url(WebhookEndpoint("http://svc/hooks", "s"), {"data": {"object": {}}}) == (
        "http://svc/hooks"
    )
    invoice = {"metadata": {}, "parent": {"subscription_details": {"metadata": obj["metadata"]}}}
    assert callback_hash_of(invoice) == "abc"
    assert callback_hash_of({"lines": {"data": [obj]}}) == "abc"


# --- payment links, invoices ------------------------------------------------------------


async def test_a_payment_link_passes_its_metadata_to_its_sessions(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    v1 = client.v1
    product = await v1.products.create_async(params={"name": "p"})
    price = await v1.prices.create_async(
        params={"currency": "usd", "unit_amount": 900, "product": product.id}
    )
    link = await v1.payment_links.create_async(
        params={
            "line_items": [{"price": price.id, "quantity": 1}],
            "metadata": {"callback_hash": "link-hash"},
        }
    )
    session = sandbox.state.pay_payment_link(link.id)
    assert session["metadata"] == {"callback_hash": "link-hash"}
    await idle(sandbox)
    [got] = receiver.received
    assert got.path == "/hooks/link-hash"
    parsed = read_event(got.body.decode())
    assert parsed.refs == (session["id"], link.id)


async def test_subscription_invoices_are_paid_or_failed_with_their_events(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    session = await client.v1.checkout.sessions.create_async(params=recurring_params())
    done = sandbox.state.complete_session(session.id, payment_status="unpaid")
    subscription_id = done["subscription"]
    first = await client.v1.invoices.retrieve_async(done["invoice"])
    assert first.status == "open" and first.amount_due == 2500
    assert sandbox.state.subscriptions[subscription_id]["status"] == "incomplete"

    failed = sandbox.state.fail_invoice(subscription_id)
    assert failed["id"] == first.id and failed["attempt_count"] == 1
    paid = sandbox.state.pay_invoice(subscription_id)
    assert paid["id"] == first.id and paid["status"] == "paid" and paid["amount_paid"] == 2500
    assert sandbox.state.subscriptions[subscription_id]["status"] == "active"
    renewal = sandbox.state.pay_invoice(subscription_id)  # the next period
    assert renewal["id"] != first.id and renewal["billing_reason"] == "subscription_cycle"
    await idle(sandbox)

    types = [json.loads(r.body)["type"] for r in receiver.received]
    assert sorted(types) == sorted(
        [
            "checkout.session.completed",
            "invoice.created",
            "invoice.finalized",
            "customer.subscription.created",
            "invoice.payment_failed",
            "invoice.paid",
            "invoice.paid",
        ]
    )
    assert {r.path for r in receiver.received} == {"/hooks/hash-sub"}
    for got in receiver.received:
        parsed = read_event(got.body.decode())
        assert parsed.subscription_id == subscription_id
        assert parsed.callback_hash == "hash-sub"
    assert {
        e["type"]: read_event(json.dumps(e)).target_status
        for e in sandbox.state.events
        if e["type"].startswith("invoice.")
    } == {
        "invoice.created": None,
        "invoice.finalized": None,
        "invoice.payment_failed": PaymentStatus.FAILED,
        "invoice.paid": PaymentStatus.PAID,
    }
    sandbox.state.cancel_subscription(subscription_id)
    with pytest.raises(ValueError, match="canceled"):
        sandbox.state.pay_invoice(subscription_id)


# --- control API and CLI ----------------------------------------------------------------


async def test_the_control_api_drives_webhooks(
    sandbox: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sandbox.state.webhook = None
    session = await client.v1.checkout.sessions.create_async(params=recurring_params("h-ctl"))
    async with control(sandbox) as api:
        configured = await api.post(
            "/webhook",
            json={
                "url": receiver.url,
                "secret": WEBHOOK_SECRET,
                "api_key": GATEWAY_KEY,
                "envelope": True,
                "retry_delays": [0.01],
            },
        )
        assert configured.json() == {"url": receiver.url, "envelope": True}
        assert (await api.post("/webhook", json={"url": receiver.url})).status_code == 400

        done = await api.post(
            f"/checkout/sessions/{session.id}/complete", json={"payment_status": "unpaid"}
        )
        assert done.json()["payment_status"] == "unpaid"
        subscription_id = done.json()["subscription"]
        paid = await api.post(f"/subscriptions/{subscription_id}/invoices/pay")
        assert paid.json()["status"] == "paid"
        failed = await api.post(f"/subscriptions/{subscription_id}/invoices/fail")
        assert failed.json()["object"] == "invoice"
        await idle(sandbox)
        event_id = sandbox.state.events_of("invoice.paid")[0]["id"]
        resent = await api.post(f"/events/{event_id}/resend")
        assert resent.json()["id"] == event_id
        assert (await api.post("/events/evt_nope/resend")).status_code == 404
        await idle(sandbox)
        log = (await api.get("/webhook/deliveries")).json()["data"]
        assert [d["event_id"] for d in log].count(event_id) == 2
        assert all(d["status"] == 200 and d["envelope"] for d in log)
        assert (await api.delete("/webhook")).json() == {"deleted": True}
        assert sandbox.state.webhook is None
        unknown = await api.post("/subscriptions/sub_nope/invoices/pay")
        assert unknown.status_code == 404
    # completed, invoice created and finalized, sub created, paid, failed, paid again
    assert len(receiver.received) == 7


def test_the_cli_wants_a_secret_with_a_webhook_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(SystemExit) as info:
        sandbox_main(["--port", "0", "--webhook-url", "http://127.0.0.1:1/hooks"])
    assert info.value.code == 2
    assert "--webhook-secret" in capsys.readouterr().err


async def test_the_cli_posts_events_where_it_is_told(receiver: Receiver) -> None:
    command = [
        *("-m", "payments.sandbox", "--port", "0", "--secret-key", "sk_test_cli"),
        *("--webhook-url", receiver.url, "--webhook-secret", WEBHOOK_SECRET),
        *("--gateway-api-key", GATEWAY_KEY, "--envelope"),
    ]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process, [sys.executable, *command], stdout=subprocess.PIPE, check=False
            )
        )
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        url = line.decode().split("listening on ")[1].strip()
        headers = {"Authorization": "Bearer sk_test_cli"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            created = await http.post(
                "/v1/checkout/sessions",
                data={
                    "mode": "payment",
                    "line_items[0][price_data][currency]": "usd",
                    "line_items[0][price_data][unit_amount]": "700",
                    "line_items[0][price_data][product_data][name]": "cli",
                    "line_items[0][quantity]": "1",
                    "metadata[callback_hash]": "cli-hash",
                },
            )
            session_id = created.json()["id"]
            await http.post(f"/_sandbox/checkout/sessions/{session_id}/expire")
            await receiver.wait_for(1)
        process.terminate()
    [got] = receiver.received
    assert got.path == "/hooks/cli-hash"
    envelope = json.loads(got.body)
    assert (
        StripeEventParser(WEBHOOK_SECRET, 300)
        .parse(envelope["payload"].encode(), envelope["signature"])
        .event_type
        == "checkout.session.expired"
    )
    assert time.time() - json.loads(envelope["payload"])["created"] < 60
