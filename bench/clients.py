"""Async clients the benchmark uses for set-up and for the paced parts of a scenario:
creating payments through the service's API, creating and completing Checkout Sessions
at the Stripe emulator, and inserting job backlogs straight into the database."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import trio

from bench.db import insert_rows, naive_utc
from payments.config import MysqlDsn

PENDING = 2  # PaymentStatus numbers (CONTRACT.md)
PAID = 10


def create_body(request_id: str, callback_url: str, amount_cents: int = 2500) -> dict[str, Any]:
    """The body wrk's post.lua sends: a one-time hosted-card payment of ``orders``."""
    return {
        "request_id": request_id,
        "caller_service": "orders",
        "resource_type": "order",
        "resource_id": request_id,
        "customer_ref": "cus-bench",
        "amount_cents": amount_cents,
        "currency": "eur",
        "payment_method": 1,
        "payment_type": 1,
        "status_callback_url": callback_url,
        "metadata": {"order_ref": "bench"},
    }


async def _limited(
    count: int, concurrency: int, one: Any, results: list[Any] | None = None
) -> list[Any]:
    out: list[Any] = [None] * count if results is None else results
    limiter = trio.CapacityLimiter(concurrency)

    async def run(index: int) -> None:
        async with limiter:
            out[index] = await one(index)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(run, index)
    return out


async def create_payments(
    base_url: str,
    api_key: str,
    count: int,
    callback_url: str,
    label: str,
    concurrency: int = 16,
    amount_cents: int = 2500,
) -> list[dict[str, Any]]:
    """Create ``count`` payments through ``POST /payments``; the payments as answered."""
    run = secrets.token_hex(4)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def one(index: int) -> dict[str, Any]:
            request_id = f"bench-{label}-{run}-{index}"
            response = await client.post(
                "/payments",
                json=create_body(request_id, callback_url, amount_cents),
                headers={"X-Request-ID": request_id, "X-API-Key": api_key},
            )
            if response.status_code != 201:
                raise RuntimeError(f"create failed: {response.status_code} {response.text}")
            return response.json()["payment"]

        return await _limited(count, concurrency, one)


def _session_form(key: str, expires_at: int | None = None) -> dict[str, str]:
    extra = {} if expires_at is None else {"expires_at": str(expires_at)}
    return {
        **extra,
        "mode": "payment",
        "line_items[0][price_data][currency]": "eur",
        "line_items[0][price_data][unit_amount]": "2500",
        "line_items[0][price_data][product_data][name]": f"order-{key}",
        "line_items[0][quantity]": "1",
        "client_reference_id": key,
        "metadata[request_id]": key,
        "success_url": "http://127.0.0.1/cb?state=success",
        "cancel_url": "http://127.0.0.1/cb?state=cancel",
    }


async def create_sessions(
    sandbox_url: str,
    secret_key: str,
    count: int,
    concurrency: int = 32,
    expires_at: int | None = None,
) -> list[str]:
    """Open ``count`` Checkout Sessions at the emulator (with ``expires_at`` if given,
    as the service makes them); their ids."""
    run = secrets.token_hex(4)
    headers = {"Authorization": f"Bearer {secret_key}"}
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=30, headers=headers) as client:

        async def one(index: int) -> str:
            response = await client.post(
                "/v1/checkout/sessions", data=_session_form(f"bench-{run}-{index}", expires_at)
            )
            if response.status_code != 200:
                raise RuntimeError(f"session create failed: {response.text}")
            return str(response.json()["id"])

        return await _limited(count, concurrency, one)


async def complete_sessions(
    sandbox_url: str,
    secret_key: str,
    session_ids: Sequence[str],
    *,
    rate: float | None = None,
    concurrency: int = 32,
) -> None:
    """Complete (pay) sessions through the control API: all at once ``concurrency`` at
    a time, or started at a steady ``rate`` per second (each on its own schedule, so a
    slow answer does not delay the next)."""
    headers = {"Authorization": f"Bearer {secret_key}"}
    async with httpx.AsyncClient(
        base_url=sandbox_url,
        timeout=30,
        headers=headers,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    ) as client:

        async def complete(session_id: str) -> None:
            response = await client.post(
                f"/_sandbox/checkout/sessions/{session_id}/complete", json={}
            )
            if response.status_code != 200:
                raise RuntimeError(f"complete failed: {response.text}")

        if rate is None:
            await _limited(
                len(session_ids), concurrency, lambda index: complete(session_ids[index])
            )
            return
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index, session_id in enumerate(session_ids):
                await trio.sleep_until(start + index / rate)
                nursery.start_soon(complete, session_id)


# --- job backlogs, inserted with SQL ---------------------------------------------------

# Rows are dicts keyed by column: each column is named once, beside its value, so a
# column added by a migration (with its default) needs no edit here.
Row = dict[str, Any]


def stale_payment_rows(
    label: str,
    session_ids: Sequence[str],
    callback_base: str,
    status_callback_url: str,
    *,
    created_ago: timedelta,
    updated_ago: timedelta,
) -> list[Row]:
    """PENDING hosted-card payments of ``orders``, one per session, aged as asked."""
    now = datetime.now(UTC)
    created = naive_utc(now - created_ago)
    updated = naive_utc(now - updated_ago)
    rows = []
    for index, session_id in enumerate(session_ids):
        callback_hash = str(uuid.uuid4())
        request_id = f"bench-{label}-{index}-{secrets.token_hex(3)}"
        rows.append(
            {
                "request_id": request_id,
                "caller_service": "orders",
                "resource_type": "order",
                "resource_id": request_id,
                "customer_ref": "cus-bench",
                "amount_cents": 2500,
                "currency": "EUR",
                "status": PENDING,
                "payment_method": 1,
                "payment_type": 1,
                "provider": 1,
                "status_callback_url": status_callback_url,
                "provider_callback_hash": callback_hash,
                "provider_callback_url": f"{callback_base}/{callback_hash}",
                "request_fingerprint": hashlib.sha256(request_id.encode()).hexdigest(),
                "provider_payment_id": session_id,
                "checkout_url": f"https://checkout.stripe.test/pay/{session_id}",
                "metadata": json.dumps({"order_ref": "bench"}),
                "created_at": created,
                "updated_at": updated,
            }
        )
    return rows


async def insert_payments(dsn: MysqlDsn, rows: Sequence[Row]) -> None:
    await insert_rows(dsn, "payments", rows)


def due_outbox_rows(
    count: int, url: str, sample_payment: dict[str, Any], first_payment_id: int
) -> list[Row]:
    """``count`` pending callbacks due now, each announcing PAID for its own payment,
    with the body a real PAID callback has (``{"payment": {...}}``)."""
    now = datetime.now(UTC)
    due = naive_utc(now - timedelta(seconds=1))
    stamp = naive_utc(now)
    rows = []
    for index in range(count):
        payment_id = first_payment_id + index
        payment = {**sample_payment, "id": payment_id, "status": PAID}
        rows.append(
            {
                "payment_id": payment_id,
                "status": PAID,
                "delivery_id": uuid.uuid4().hex,
                "url": url,
                "request_id": str(payment.get("request_id", f"bench-dispatch-{index}")),
                "payload": json.dumps({"payment": payment}, separators=(",", ":")),
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": due,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
    return rows


async def insert_outbox(dsn: MysqlDsn, rows: Sequence[Row]) -> None:
    await insert_rows(dsn, "callback_outbox", rows)


async def wait_paid(base_url: str, api_key: str, payment_ids: Sequence[int], within: float) -> None:
    """Poll ``GET /payments/{id}`` until every payment is PAID (its event went through)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        with trio.fail_after(within):
            for payment_id in payment_ids:
                while True:
                    response = await client.get(
                        f"/payments/{payment_id}",
                        headers={"X-Request-ID": f"bench-wait-{payment_id}", "X-API-Key": api_key},
                    )
                    if response.status_code == 200 and response.json()["payment"]["status"] == PAID:
                        break
                    await trio.sleep(0.1)
