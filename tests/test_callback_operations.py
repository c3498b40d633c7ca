"""Callback operations (issue 11): the delivery log and resend on HTTP and gRPC, and
``payments callbacks list | retry | prune`` as processes against the real database.

The whole service runs on loopback (tests/fixtures/app.py); callbacks go to a real
receiver (tests/callback_support.py) through a real dispatcher.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import trio

from payments.callbacks import CallbackOperations
from payments.gen import payments_pb2 as pb
from payments.jobs.dispatcher import Dispatcher, PassResult, open_notice_channel
from payments.model import Caller, OutboxState, Payment, PaymentStatus, utcnow
from payments.storage import deliveries, outbox
from payments.storage import repository as repo
from payments.storage.deliveries import DeliveryFilter
from payments.storage.pool import Pool
from payments.unit_of_work import UnitOfWork
from tests.callback_support import (
    Answer,
    MakeDispatcher,
    Receiver,
    settings,
    start_actor,
)
from tests.callback_support import dispatchers as dispatchers
from tests.callback_support import receiver as receiver
from tests.fixtures.app import KEY_A, KEY_B, Stack
from tests.storage_support import fetch, queue_callbacks
from tests.test_grpc_api import Client

PAYMENTS = Path(sys.executable).parent / "payments"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=10) as client:
        yield client


@pytest.fixture
def grpc_client(stack: Stack) -> AsyncIterator[Client]:
    client = Client(stack.grpc_target)
    yield client
    client.channel.close()


def headers(key: str = KEY_A) -> dict[str, str]:
    return {"X-Request-ID": "rid-cb", "X-API-Key": key}


async def paid(uow: UnitOfWork, stack: Stack, url: str) -> Payment:
    """A payment of svc-a made through the service and moved to PAID."""
    made = await stack.create_payment("svc-a", status_callback_url=url)
    async with uow.begin() as work:
        payment = await repo.get_payment(work.conn, made.id, for_update=True)
        assert payment is not None
        assert await work.change_status(payment, PaymentStatus.PAID, reason="test")
    return payment


# -- the delivery log -----------------------------------------------------------------


async def test_the_delivery_log_shows_every_attempt_to_its_owner_only(
    stack: Stack,
    http: httpx.AsyncClient,
    grpc_client: Client,
    receiver: Receiver,
    dispatchers: MakeDispatcher,
) -> None:
    payment = await paid(stack.service.unit_of_work, stack, receiver.url())
    receiver.script = [Answer(500), Answer(200)]
    dispatcher = dispatchers(stack.pool, callback_retry_interval_minutes=0)
    assert await dispatcher.drain() == PassResult(claimed=2, retried=1, delivered=1)

    response = await http.get(f"/payments/{payment.id}/callbacks", headers=headers())
    assert response.status_code == 200, response.text
    (delivery,) = response.json()["deliveries"]
    (entry,) = (await stack.history(payment.id)).outbox
    assert delivery["id"] == entry.id
    assert delivery["webhook_id"] == entry.delivery_id == receiver.requests[0].headers["webhook-id"]
    assert (delivery["kind"], delivery["state"], delivery["attempt_count"]) == (
        "payment",
        "delivered",
        2,
    )
    first, second = delivery["attempts"]
    assert (first["status_code"], first["error"]) == (500, "HTTP 500")
    assert second["status_code"] == 200 and "error" not in second
    for attempt in (first, second):
        assert attempt["at"].endswith("Z")
        # Zero values are left out (CONTRACT.md): an attempt under 1 ms has no duration_ms.
        assert attempt.get("duration_ms", 1) > 0, attempt

    reply = await grpc_client.call(
        "ListCallbackDeliveries", pb.ListCallbackDeliveriesRequest(payment_id=payment.id)
    )
    assert reply.code.name == "OK", reply.details
    (proto,) = reply.response.deliveries
    assert (proto.webhook_id, proto.state, proto.attempt_count) == (
        entry.delivery_id,
        "delivered",
        2,
    )
    assert [a.status_code for a in proto.attempts] == [500, 200]

    # Another caller, an unknown id and a bad id.
    other = await http.get(f"/payments/{payment.id}/callbacks", headers=headers(KEY_B))
    assert (other.status_code, other.json()) == (404, {"error": "payment not found"})
    assert (await http.get("/payments/999999/callbacks", headers=headers())).status_code == 404
    bad = await http.get("/payments/abc/callbacks", headers=headers())
    assert bad.status_code == 400 and "id" in bad.json()["error"]
    hidden = await grpc_client.call(
        "ListCallbackDeliveries", pb.ListCallbackDeliveriesRequest(payment_id=payment.id), KEY_B
    )
    assert hidden.code.name == "NOT_FOUND"
    zero = await grpc_client.call(
        "ListCallbackDeliveries", pb.ListCallbackDeliveriesRequest(payment_id=0)
    )
    assert zero.code.name == "INVALID_ARGUMENT" and "payment_id" in zero.details


async def test_an_unanswered_attempt_has_status_code_0(
    stack: Stack, grpc_client: Client, dispatchers: MakeDispatcher
) -> None:
    payment = await paid(stack.service.unit_of_work, stack, "http://127.0.0.1:9/nothing")
    await dispatchers(stack.pool).run_pass()
    reply = await grpc_client.call(
        "ListCallbackDeliveries", pb.ListCallbackDeliveriesRequest(payment_id=payment.id)
    )
    ((attempt,),) = [d.attempts for d in reply.response.deliveries]
    assert attempt.status_code == 0 and attempt.error.startswith("ConnectError")
    assert reply.response.deliveries[0].state == "pending"


# -- resend ---------------------------------------------------------------------------


async def test_resend_over_http_and_grpc_queues_a_new_delivery_and_wakes_the_dispatcher(
    stack: Stack, http: httpx.AsyncClient, grpc_client: Client, receiver: Receiver
) -> None:
    payment = await paid(stack.service.unit_of_work, stack, receiver.url())
    stack.terminal.clear()

    response = await http.post(f"/payments/{payment.id}/callbacks/resend", headers=headers())
    assert response.status_code == 202, response.text
    delivery = response.json()["delivery"]
    assert delivery["state"] == "pending" and delivery["kind"] == "payment"
    reply = await grpc_client.call(
        "ResendCallback", pb.ResendCallbackRequest(payment_id=payment.id)
    )
    assert reply.code.name == "OK", reply.details

    history = (await stack.history(payment.id)).outbox
    assert [e.resend for e in history] == [0, 1, 2]
    ids = [e.delivery_id for e in history]
    assert len(set(ids)) == 3 and delivery["webhook_id"] == ids[1]
    assert reply.response.delivery.webhook_id == ids[2]
    assert all(e.payload == history[0].payload for e in history)  # the same (current) state
    # Each resend woke the dispatcher through the unit of work's post-commit notice.
    assert [p.id for p in stack.terminal] == [payment.id, payment.id]

    other = await http.post(f"/payments/{payment.id}/callbacks/resend", headers=headers(KEY_B))
    assert other.status_code == 404
    assert len((await stack.history(payment.id)).outbox) == 3


async def test_resend_of_an_unfinished_payment_is_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    payment = await stack.create_payment("svc-a")
    response = await http.post(f"/payments/{payment.id}/callbacks/resend", headers=headers())
    assert response.status_code == 409
    assert "PENDING" in response.json()["error"]
    assert (await stack.history(payment.id)).outbox == []


async def test_a_resend_goes_out_at_once(
    stack: Stack, receiver: Receiver, nursery: trio.Nursery
) -> None:
    notifier, notices = open_notice_channel()
    uow = UnitOfWork(stack.pool, notifier)
    payment = await paid(uow, stack, receiver.url())
    dispatcher = Dispatcher(stack.pool, settings(callback_dispatch_interval_minutes=60))
    await start_actor(nursery, dispatcher, notices)
    with trio.fail_after(5):
        await receiver.wait_for(1)
        while dispatcher.stats.totals.delivered < 1:  # noqa: ASYNC110
            await trio.sleep(0.01)

    started = trio.current_time()
    delivery = await CallbackOperations(uow).resend(Caller("svc-a"), payment.id)
    with trio.fail_after(5):
        second = (await receiver.wait_for(2))[1]
    assert second.at - started < 1.0  # the sweep is an hour away: the notice did it
    assert second.headers["webhook-id"] == delivery.webhook_id
    assert receiver.requests[0].headers["webhook-id"] != delivery.webhook_id
    await dispatcher.aclose()


# -- the CLI --------------------------------------------------------------------------


async def cli(db_url: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``payments <args>`` as a process against the test database."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MYSQL_DSN": db_url}
    done = await trio.run_process(
        [str(PAYMENTS), *args],
        env=env,
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def fail_all(db_pool: Pool, count: int, url: str) -> list[outbox.OutboxEntry]:
    """``count`` deliveries failed after one attempt each (max attempts 1)."""
    entries = await queue_callbacks(db_pool, count, url=url)
    dispatcher = Dispatcher(db_pool, settings(callback_max_attempts=1, job_batch_size=500))
    try:
        assert (await dispatcher.drain()).failed == count
    finally:
        await dispatcher.aclose()
    return entries


async def test_callbacks_list_as_table_and_json_with_filters(
    db_pool: Pool, receiver: Receiver, test_db_url: str, tmp_path: Path
) -> None:
    receiver.default = Answer(500)
    failed = await fail_all(db_pool, 2, receiver.url())
    await queue_callbacks(db_pool, 1, url=receiver.url())  # pending

    code, out, err = await cli(test_db_url, tmp_path, "callbacks", "list", "--state", "failed")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == [
        "id",
        "payment",
        "caller",
        "kind",
        "state",
        "tries",
        "created",
        "webhook_id",
    ]
    assert [row.split()[0] for row in rows] == [str(e.id) for e in failed]
    assert all(row.split()[4] == "failed" for row in rows)

    code, out, err = await cli(test_db_url, tmp_path, "callbacks", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)["deliveries"]
    assert [d["state"] for d in listed] == ["failed", "failed", "pending"]
    assert listed[0]["webhook_id"] == failed[0].delivery_id
    assert listed[0]["attempts"][0]["status_code"] == 500
    assert listed[0]["caller_service"] == "orders" and listed[0]["last_error"] == "HTTP 500"
    mine = ["--json", "--caller", "orders"]
    code, out, _ = await cli(test_db_url, tmp_path, "callbacks", "list", *mine)
    assert len(json.loads(out)["deliveries"]) == 3
    code, out, _ = await cli(
        test_db_url, tmp_path, "callbacks", "list", "--json", "--caller", "orders"
    )
    assert len(json.loads(out)["deliveries"]) == 3

    future = (utcnow() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out, _ = await cli(
        test_db_url, tmp_path, "callbacks", "list", "--json", "--since", future
    )
    assert json.loads(out) == {"deliveries": []}
    code, out, _ = await cli(test_db_url, tmp_path, "callbacks", "list", "--json", "--caller", "x")
    assert json.loads(out) == {"deliveries": []}

    for bad, named in (
        (["--state", "lost"], "--state"),
        (["--since", "yesterday"], "--since"),
        (["--since", "2026-11-28T09:00:00"], "--since"),
    ):
        code, out, err = await cli(test_db_url, tmp_path, "callbacks", "list", *bad)
        assert code == 2 and named in err and out == ""


async def test_callbacks_retry_requeues_failed_with_the_same_webhook_id(
    db_pool: Pool, receiver: Receiver, test_db_url: str, tmp_path: Path
) -> None:
    receiver.default = Answer(500)
    failed = await fail_all(db_pool, 3, receiver.url())
    delivered = await queue_callbacks(db_pool, 1, url=receiver.url())
    receiver.default = Answer(200)
    dispatcher = Dispatcher(db_pool, settings())
    await dispatcher.run_pass()

    code, _, err = await cli(test_db_url, tmp_path, "callbacks", "retry", "--state", "pending")
    assert code == 2 and "only failed" in err
    code, out, err = await cli(test_db_url, tmp_path, "callbacks", "retry", "--state", "failed")
    assert (code, out.strip()) == (0, "requeued 3 deliveries"), err

    before = len(receiver.requests)
    assert await dispatcher.drain() == PassResult(claimed=3, delivered=3)
    await dispatcher.aclose()
    again = [r.headers["webhook-id"] for r in receiver.requests[before:]]
    assert sorted(again) == sorted(e.delivery_id for e in failed)  # receivers deduplicate
    stored = await fetch(db_pool, failed[0].id)
    assert (stored.state, stored.attempts) == (OutboxState.DELIVERED, 1)
    async with db_pool.connection() as conn:
        history = await outbox.attempts_for(conn, failed[0].id)
    assert [a.status_code for a in history] == [500, 200]  # the old attempt is kept
    assert (await fetch(db_pool, delivered[0].id)).attempts == 1  # untouched
    code, out, _ = await cli(test_db_url, tmp_path, "callbacks", "retry", "--state", "failed")
    assert out.strip() == "requeued 0 deliveries"


async def test_two_retry_processes_at_once_requeue_each_failed_delivery_once(
    db_pool: Pool, test_db_url: str, tmp_path: Path
) -> None:
    failed = await fail_all(db_pool, 400, "http://127.0.0.1:9/nothing")
    outputs: list[str] = []

    async def retry() -> None:
        code, out, err = await cli(test_db_url, tmp_path, "callbacks", "retry", "--state", "failed")
        assert code == 0, err
        outputs.append(out.strip())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(retry)
        nursery.start_soon(retry)

    counts = sorted(int(line.split()[1]) for line in outputs)
    assert sum(counts) == 400, outputs
    async with db_pool.connection() as conn:
        rows = await conn.fetchall(
            "SELECT state, attempts, COUNT(*) FROM callback_outbox GROUP BY 1, 2"
        )
    assert rows == [("pending", 0, 400)]
    assert len({e.delivery_id for e in failed}) == 400


async def test_concurrent_requeues_in_process_never_count_a_row_twice(
    db_pool: Pool, second_pool: Pool
) -> None:
    await fail_all(db_pool, 200, "http://127.0.0.1:9/nothing")
    counts: list[int] = []

    async def requeue(pool: Pool) -> None:
        counts.append(await deliveries.requeue_failed(pool, DeliveryFilter(), utcnow()))

    async with trio.open_nursery() as nursery:
        for pool in (db_pool, second_pool) * 3:
            nursery.start_soon(requeue, pool)
    assert sum(counts) == 200


async def test_callbacks_prune_deletes_finished_deliveries_past_the_retention(
    db_pool: Pool, receiver: Receiver, test_db_url: str, tmp_path: Path
) -> None:
    # Delivered, failed (one attempt allowed), delivered: one pass each, so which row
    # meets which answer does not hang on the order the deliveries' tasks run in.
    dispatcher = Dispatcher(db_pool, settings(callback_max_attempts=1), concurrency=1)
    finished = []
    for answer, result in (
        (Answer(200), PassResult(claimed=1, delivered=1)),
        (Answer(500), PassResult(claimed=1, failed=1)),
        (Answer(200), PassResult(claimed=1, delivered=1)),
    ):
        (entry,) = await queue_callbacks(db_pool, 1, url=receiver.url())
        receiver.script = [answer]
        assert await dispatcher.run_pass() == result
        finished.append(entry)
    await dispatcher.aclose()
    old_done, old_failed, recent = finished
    (old_pending,) = await queue_callbacks(db_pool, 1, url=receiver.url())
    ids = [e.id for e in (old_done, old_failed, old_pending)]
    async with db_pool.connection() as conn:
        await conn.execute(
            "UPDATE callback_outbox SET updated_at = updated_at - INTERVAL 31 DAY"
            " WHERE id IN (%s, %s, %s)",
            ids,
        )

    code, out, err = await cli(test_db_url, tmp_path, "callbacks", "prune")
    assert (code, out.strip()) == (0, "pruned 2 deliveries"), err

    async with db_pool.connection() as conn:
        left = await conn.fetchall("SELECT id, state FROM callback_outbox ORDER BY id")
        (orphans,) = await conn.fetchone(
            "SELECT COUNT(*) FROM callback_attempts WHERE outbox_id NOT IN"
            " (SELECT id FROM callback_outbox)"
        )
    assert left == [(recent.id, "delivered"), (old_pending.id, "pending")]
    assert orphans == 0
    code, out, _ = await cli(test_db_url, tmp_path, "callbacks", "prune", "--older-than-days", "0")
    assert out.strip() == "pruned 1 deliveries"
