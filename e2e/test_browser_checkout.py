"""A real browser pays (or declines, or cancels) on the emulator's hosted checkout page.

The whole path a customer takes, with nothing stood in: ``POST /payments`` on the
running ``payments serve`` returns a checkout URL on the emulator process; headless
Chromium (Debian's ``/usr/bin/chromium``, driven by playwright-core through
``e2e/browser/checkout.mjs``) opens it and clicks a button; the page's form POST makes
the emulator emit the event, which its webhook sender posts signed to the service (as
the gateway forwards Stripe's events); the service moves the payment and calls the
caller's status callback (a receiver on loopback); and the browser lands on the
caller's success or cancel page (a small landing server here).

Never skipped: without Chromium or the node modules the tests fail and say to run
``make browser-deps`` (which ``make test`` runs first).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from e2e.harness import (
    CallbackReceiver,
    Received,
    SandboxProcess,
    create_body,
    eventually,
    headers,
    rid,
)
from payments.model import PaymentStatus

BROWSER_DIR = Path(__file__).parent / "browser"
SCRIPT = BROWSER_DIR / "checkout.mjs"
CHROMIUM = Path(os.environ.get("PAYMENTS_CHROMIUM", "/usr/bin/chromium"))
BROWSER_SECONDS = 90


def browser_problems() -> list[str]:
    """What is missing for the browser tests (empty when all is there)."""
    problems = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (the Debian package `chromium`)")
    if shutil.which("node") is None:
        problems.append("no `node` on PATH")
    installed = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    if not installed.is_file():
        problems.append(f"no playwright-core in {BROWSER_DIR}/node_modules (`npm ci` there)")
    else:
        lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
        locked = lock["packages"]["node_modules/playwright-core"]["version"]
        found = json.loads(installed.read_text())["version"]
        if found != locked:
            problems.append(f"playwright-core {found} is installed, the lock says {locked}")
    return problems


@pytest.fixture(scope="module")
def browser() -> None:
    """Fail (never skip) when the browser or its driver is missing."""
    problems = browser_problems()
    if problems:
        pytest.fail(
            "the browser test needs Chromium and playwright-core: run `make browser-deps` "
            "(installs Debian's chromium and runs npm ci in e2e/browser).\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


class Landing:
    """The calling shop's own pages, where checkout sends the browser afterwards:
    answers every GET with a small HTML page and records the paths."""

    def __init__(self) -> None:
        self.visits: list[str] = []
        landing = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                landing.visits.append(self.path)
                body = b"<!doctype html><title>orders</title><h1>Back at the shop</h1>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def landing() -> Iterator[Landing]:
    pages = Landing()
    yield pages
    pages.stop()


async def click(url: str, button: str) -> dict[str, Any]:
    """Open ``url`` in headless Chromium, click ``button``; what the browser saw."""
    with trio.fail_after(BROWSER_SECONDS):
        done = await trio.run_process(
            ["node", str(SCRIPT), url, button],
            cwd=BROWSER_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"checkout.mjs exited {done.returncode}:\n{stderr}"
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


async def create(
    http: httpx.AsyncClient, receiver: CallbackReceiver, landing: Landing
) -> dict[str, Any]:
    """A one-time hosted-card payment whose caller pages are on the landing server."""
    order = rid("order")
    body = create_body(
        status_callback_url=receiver.url(f"/callbacks/{order}"),
        success_url=landing.url(f"/orders/{order}/paid"),
        cancel_url=landing.url(f"/orders/{order}/canceled"),
    )
    response = await http.post("/payments", json=body, headers=headers())
    assert response.status_code == 201, response.text
    payment = response.json()["payment"]
    return {**payment, "_order": order}


async def until_status(
    http: httpx.AsyncClient, payment_id: int, status: PaymentStatus
) -> dict[str, Any]:
    async def check() -> Any:
        response = await http.get(f"/payments/{payment_id}", headers=headers())
        assert response.status_code == 200, response.text
        current = response.json()["payment"]
        return current if current["status"] == status else None

    return await eventually(check)


async def until_callback(
    receiver: CallbackReceiver, path: str, status: PaymentStatus
) -> list[Received]:
    async def check() -> Any:
        found = [r for r in receiver.requests_to(path) if r.json()["payment"]["status"] == status]
        return found or None

    return await eventually(check)


def check_browser(seen: dict[str, Any], payment: dict[str, Any], final_url: str) -> None:
    """The browser opened the service's checkout URL, and its form POST answered 303."""
    assert seen["checkout_url"] == payment["checkout_url"]
    assert seen["final_url"] == final_url
    assert seen["status"] == 200
    assert "Back at the shop" in seen["text"]
    statuses = [visit["status"] for visit in seen["visited"]]
    assert statuses == [200, 303, 200], seen["visited"]


async def test_pay_in_the_browser_makes_the_payment_paid(
    browser: None,
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    landing: Landing,
    webhooks: None,
) -> None:
    payment = await create(http, receiver, landing)
    assert payment["status"] == PaymentStatus.PENDING
    assert payment["checkout_url"].startswith(f"{sandbox.url}/pay/cs_")

    seen = await click(payment["checkout_url"], "pay")

    success = landing.url(f"/orders/{payment['_order']}/paid")
    check_browser(seen, payment, success)
    assert f"/orders/{payment['_order']}/paid" in landing.visits
    paid = await until_status(http, payment["id"], PaymentStatus.PAID)
    [callback] = await until_callback(
        receiver, f"/callbacks/{payment['_order']}", PaymentStatus.PAID
    )
    assert callback.json()["payment"]["id"] == paid["id"]

    session_id = payment["provider_payment_id"]
    events = [e for e in await sandbox.events() if e["data"]["object"]["id"] == session_id]
    assert [e["type"] for e in events] == ["checkout.session.completed"]
    assert events[0]["data"]["object"]["payment_status"] == "paid"
    delivered = [d for d in await sandbox.deliveries() if d["event_id"] == events[0]["id"]]
    assert [d["status"] for d in delivered] == [200]


async def test_decline_in_the_browser_makes_the_payment_failed(
    browser: None,
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    landing: Landing,
    webhooks: None,
) -> None:
    payment = await create(http, receiver, landing)

    seen = await click(payment["checkout_url"], "decline")

    check_browser(seen, payment, landing.url(f"/orders/{payment['_order']}/canceled"))
    failed = await until_status(http, payment["id"], PaymentStatus.FAILED)
    [callback] = await until_callback(
        receiver, f"/callbacks/{payment['_order']}", PaymentStatus.FAILED
    )
    assert callback.json()["payment"]["id"] == failed["id"]
    session_id = payment["provider_payment_id"]
    types = {e["type"] for e in await sandbox.events() if e["data"]["object"]["id"] == session_id}
    assert "checkout.session.async_payment_failed" in types

    # The session can no longer be paid: its page says so, and Pay answers 409.
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(payment["checkout_url"])
        assert page.status_code == 200 and "Payment failed" in page.text
        again = await client.post(f"{payment['checkout_url']}/pay")
        assert again.status_code == 409
    got = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert got.json()["payment"]["status"] == PaymentStatus.FAILED


async def test_cancel_in_the_browser_leaves_the_payment_pending(
    browser: None,
    http: httpx.AsyncClient,
    sandbox: SandboxProcess,
    receiver: CallbackReceiver,
    landing: Landing,
    webhooks: None,
) -> None:
    payment = await create(http, receiver, landing)

    seen = await click(payment["checkout_url"], "cancel")

    check_browser(seen, payment, landing.url(f"/orders/{payment['_order']}/canceled"))
    session_id = payment["provider_payment_id"]
    session = (await sandbox.objects())["checkout_sessions"][session_id]
    assert session["status"] == "open"  # the customer may come back and pay
    assert not [e for e in await sandbox.events() if e["data"]["object"]["id"] == session_id]
    got = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert got.json()["payment"]["status"] == PaymentStatus.PENDING
    assert not receiver.requests_to(f"/callbacks/{payment['_order']}")
