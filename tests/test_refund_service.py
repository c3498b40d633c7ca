"""Refund rules of the service on both backends, with the Stripe emulator as Stripe
(through the real SDK): amounts, exactly once, Stripe refusing, down, or answering
late, the status machine through the unit of work, and the payment's totals."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import trio

from payments.errors import AlreadyExists, DependencyUnavailable, FailedPrecondition, NotFound
from payments.model import (
    Caller,
    EventKind,
    PaymentStatus,
    PaymentType,
    RefundStatus,
    utcnow,
)
from payments.providers.stripe import StripeProvider
from payments.refunding import record_provider_refund
from payments.sandbox import Sandbox, money
from payments.storage import outbox
from payments.storage import refunds as store
from payments.storage import repository as repo
from payments.storage.database import Database
from tests.refund_support import CALLER, RefundEnv

pytestmark = pytest.mark.timeout(60)
R = RefundStatus


@pytest.fixture
def env(database: Database, stripe_sandbox: Sandbox, stripe_provider: StripeProvider) -> RefundEnv:
    return RefundEnv.over(database, stripe_sandbox, stripe_provider)


async def test_a_full_refund_by_omitting_the_amount(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000, metadata={"order": "7"})
    refund = await env.refund(payment.id, "ref-full", reason="requested_by_customer")
    assert (refund.status, refund.amount_cents, refund.currency) == (R.SUCCEEDED, 1000, "USD")
    assert refund.caller_service == "svc-a" and refund.provider_refund_id.startswith("re_")
    [made] = env.stripe_refunds()
    assert made["id"] == refund.provider_refund_id and made["amount"] == 1000
    assert made["reason"] == "requested_by_customer"
    assert made["metadata"] == {"request_id": "ref-full", "refund_id": str(refund.id)}
    after = await env.payment(payment.id)
    assert (after.status, after.refunded_cents, after.refundable_cents) == (
        PaymentStatus.PAID,
        1000,
        0,
    )
    assert after.provider_payment_intent_id == made["payment_intent"]
    assert after.provider_charge_id == made["charge"]
    async with env.database.connection() as conn:
        events = await store.list_refund_events(conn, refund.id)
        entries = await outbox.entries_for_payment(conn, payment.id)
    assert [(e.kind, e.from_status, e.to_status) for e in events] == [
        (EventKind.CREATED, R.UNSPECIFIED, R.PENDING),
        (EventKind.STATUS_CHANGED, R.PENDING, R.SUCCEEDED),
    ]
    body = json.loads(entries[-1].payload)
    assert body["refund"]["id"] == refund.id and body["refund"]["status"] == int(R.SUCCEEDED)
    assert body["payment"]["refunded_cents"] == 1000
    assert "refundable_cents" not in body["payment"]  # 0: left out like every zero
    assert env.terminal[-1].id == payment.id


async def test_partial_refunds_until_nothing_is_left(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    first = await env.refund(payment.id, amount_cents=300)
    assert (first.status, first.amount_cents) == (R.SUCCEEDED, 300)
    assert (await env.payment(payment.id)).refundable_cents == 700
    with pytest.raises(FailedPrecondition, match="refundable amount 700"):
        await env.refund(payment.id, amount_cents=701)
    rest = await env.refund(payment.id)  # 0: everything still refundable
    assert rest.amount_cents == 700
    with pytest.raises(FailedPrecondition, match="nothing left"):
        await env.refund(payment.id, amount_cents=1)
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (1000, 0)
    assert [r["amount"] for r in env.stripe_refunds()] == [300, 700]


async def test_only_a_paid_payment_of_the_caller_is_refunded(env: RefundEnv) -> None:
    paid = await env.paid()
    with pytest.raises(NotFound):
        await env.refund(paid.id, caller=Caller("svc-b"))
    with pytest.raises(NotFound):
        await env.refund(paid.id + 1000)
    gateway = await env.refund(paid.id, caller=Caller("gateway", trusted=True), amount_cents=5)
    assert gateway.caller_service == "gateway" and gateway.status == R.SUCCEEDED
    with pytest.raises(NotFound):
        await env.service.refunds.get(Caller("svc-b"), gateway.id)
    assert (await env.service.refunds.get(CALLER, gateway.id)).id == gateway.id
    with pytest.raises(NotFound):
        await env.service.refunds.list(Caller("svc-b"), paid.id)
    unpaid = await env.service.get(CALLER, (await env.paid()).id)
    await_set = unpaid.id
    async with env.uow.begin() as work:
        await work.conn.execute(
            "UPDATE payments SET status = %s WHERE id = %s", (int(PaymentStatus.PENDING), await_set)
        )
    with pytest.raises(FailedPrecondition, match="only a PAID payment"):
        await env.refund(await_set)
    assert len(env.stripe_refunds()) == 1


async def test_one_request_id_names_one_refund(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    other = await env.paid(amount_cents=1000)
    first = await env.refund(payment.id, "ref-1", amount_cents=100, metadata={"k": "v"})
    again = await env.refund(payment.id, "ref-1", amount_cents=100, metadata={"k": "v"})
    assert again == first and len(env.stripe_refunds()) == 1
    for changes in (
        {"amount_cents": 101, "metadata": {"k": "v"}},
        {"amount_cents": 100, "metadata": {}},
        {"amount_cents": 100, "metadata": {"k": "v"}, "reason": "duplicate"},
    ):
        with pytest.raises(AlreadyExists):
            await env.refund(payment.id, "ref-1", **changes)
    with pytest.raises(AlreadyExists):
        await env.refund(other.id, "ref-1", amount_cents=100, metadata={"k": "v"})
    # Another caller's request_id space is its own.
    theirs = await env.paid(caller=Caller("svc-b"))
    made = await env.refund(theirs.id, "ref-1", caller=Caller("svc-b"), amount_cents=100)
    assert made.id != first.id and len(env.stripe_refunds()) == 2


async def test_concurrent_duplicates_make_one_refund(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    got: list[int] = []

    async def post() -> None:
        got.append((await env.refund(payment.id, "ref-dup", amount_cents=400)).id)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(post)
    assert len(set(got)) == 1 and len(got) == 5
    assert [r["amount"] for r in env.stripe_refunds()] == [400]
    assert (await env.payment(payment.id)).refundable_cents == 600


async def test_concurrent_partial_refunds_never_exceed_the_amount(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    accepted: list[int] = []
    refused: list[str] = []

    async def post(n: int) -> None:
        try:
            accepted.append((await env.refund(payment.id, f"ref-c{n}", amount_cents=300)).id)
        except FailedPrecondition as exc:
            refused.append(exc.message)

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(post, n)
    assert len(accepted) == 3 and len(refused) == 3
    made = env.stripe_refunds()
    assert sorted(int(r["metadata"]["refund_id"]) for r in made) == sorted(accepted)
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (900, 100)


async def test_stripe_refusing_fails_the_refund_and_gives_the_amount_back(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    state = env.sandbox.state
    charge = money.charge_for(
        state,
        payment_intent=state.sessions[payment.provider_payment_id]["payment_intent"],
        charge=None,
    )
    money.create_refund(state, charge)  # all of it, in Stripe's dashboard (no event here)
    refund = await env.refund(payment.id, "ref-refused", amount_cents=200)
    assert refund.status == R.FAILED and "already been refunded" in refund.failure_reason
    assert refund.provider_refund_id == ""
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (0, 1000)
    replay = await env.refund(payment.id, "ref-refused", amount_cents=200)
    assert replay == refund  # a FAILED refund is final; the request id stays taken
    async with env.database.connection() as conn:
        [entry] = [
            e
            for e in await outbox.entries_for_payment(conn, payment.id)
            if "refund" in json.loads(e.payload)
        ]
    assert json.loads(entry.payload)["refund"]["failure_reason"] == refund.failure_reason


async def test_stripe_down_keeps_the_claim_and_a_retry_completes_it(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    fault = env.sandbox.faults.fail(500, path="/v1/refunds", times=None)
    with pytest.raises(DependencyUnavailable, match="retry"):
        await env.refund(payment.id, "ref-down", amount_cents=400)
    async with env.database.connection() as conn:
        claim = await store.get_refund_by_request(conn, "svc-a", "ref-down")
    assert claim is not None and claim.status == R.PENDING and not claim.provider_refund_id
    held = await env.payment(payment.id)
    assert (held.refunded_cents, held.refundable_cents) == (0, 600)  # pending holds it
    env.sandbox.faults.remove(fault)
    done = await env.refund(payment.id, "ref-down", amount_cents=400)
    assert done.id == claim.id and done.status == R.SUCCEEDED
    assert [r["amount"] for r in env.stripe_refunds()] == [400]


async def test_a_lost_answer_then_a_retry_makes_one_stripe_refund(env: RefundEnv) -> None:
    """The crash between Stripe's refund and the commit: Stripe made it, the service
    never heard. The retry sends the same idempotency key and gets the same refund."""
    payment = await env.paid(amount_cents=1000)
    env.sandbox.faults.delay(3, path="/v1/refunds", method="POST", after=True)
    with pytest.raises(DependencyUnavailable):
        await env.refund(payment.id, "ref-lost", amount_cents=250)
    assert len(env.stripe_refunds()) == 1  # made at Stripe, not recorded here
    done = await env.refund(payment.id, "ref-lost", amount_cents=250)
    assert done.status == R.SUCCEEDED and done.provider_refund_id == env.stripe_refunds()[0]["id"]
    assert len(env.stripe_refunds()) == 1


async def test_a_pending_refund_that_fails_later_gives_the_amount_back(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    env.sandbox.state.refund_hold = True
    refund = await env.refund(payment.id, "ref-held", amount_cents=600)
    assert refund.status == R.PENDING and refund.provider_refund_id
    held = await env.payment(payment.id)
    assert (held.refunded_cents, held.refundable_cents) == (0, 400)
    replay = await env.refund(payment.id, "ref-held", amount_cents=600)
    assert replay == refund and len(env.stripe_refunds()) == 1  # Stripe not asked again
    money.settle_refund(
        env.sandbox.state, refund.provider_refund_id, succeed=False, reason="lost_or_stolen_card"
    )
    found = await env.provider.retrieve_refund(refund.provider_refund_id)
    async with env.uow.begin() as work:
        locked = await repo.get_payment(work.conn, payment.id, for_update=True)
        assert locked is not None
        moved = await record_provider_refund(
            work,
            locked,
            found,
            reason="reconciled",
            provider_event_id="evt_1",
            provider_event_type="refund.failed",
        )
    assert (moved.id, moved.status, moved.failure_reason) == (
        refund.id,
        R.FAILED,
        "lost_or_stolen_card",
    )
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (0, 1000)
    assert env.terminal[-1].refundable_cents == 1000  # the callback's payment is after it


async def test_a_dashboard_refund_is_recorded_once(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    state = env.sandbox.state
    intent = state.sessions[payment.provider_payment_id]["payment_intent"]
    made = money.create_refund(
        state, money.charge_for(state, payment_intent=intent, charge=None), amount=150
    )
    found = await env.provider.retrieve_refund(made["id"])
    for event_id in ("evt_a", "evt_b"):
        async with env.uow.begin() as work:
            locked = await repo.get_payment(work.conn, payment.id, for_update=True)
            assert locked is not None
            recorded = await record_provider_refund(
                work, locked, found, reason="event", provider_event_id=event_id
            )
    assert recorded.request_id == f"stripe:{made['id']}" and recorded.status == R.SUCCEEDED
    assert [r.id for r in await env.service.refunds.list(CALLER, payment.id)] == [recorded.id]
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (150, 850)


async def test_an_unsent_claim_nobody_retries_is_failed_or_found(env: RefundEnv) -> None:
    payment = await env.paid(amount_cents=1000)
    env.sandbox.faults.fail(500, path="/v1/refunds", method="POST", times=1)
    with pytest.raises(DependencyUnavailable):
        await env.refund(payment.id, "ref-never", amount_cents=100)
    env.sandbox.faults.delay(3, path="/v1/refunds", method="POST", after=True)
    with pytest.raises(DependencyUnavailable):
        await env.refund(payment.id, "ref-made", amount_cents=200)
    async with env.database.connection() as conn:
        never = await store.get_refund_by_request(conn, "svc-a", "ref-never")
        made = await store.get_refund_by_request(conn, "svc-a", "ref-made")
    assert never is not None and made is not None
    refunds = env.service.refunds
    # Not stale yet: an attempt may still be under way.
    assert await refunds.resolve_unsent(never.id, never.updated_at) is None
    later = utcnow() + timedelta(seconds=1)
    failed = await refunds.resolve_unsent(never.id, later)
    assert failed is not None and (failed.status, failed.provider_refund_id) == (R.FAILED, "")
    found = await refunds.resolve_unsent(made.id, later)
    assert found is not None and found.status == R.SUCCEEDED
    assert found.provider_refund_id == env.stripe_refunds()[0]["id"]
    assert await refunds.resolve_unsent(found.id, later) is None  # settled: nothing to do
    assert len(env.stripe_refunds()) == 1
    after = await env.payment(payment.id)
    assert (after.refunded_cents, after.refundable_cents) == (200, 800)


@pytest.mark.parametrize(
    ("method", "payment_type"),
    [(2, PaymentType.ONE_TIME), (1, PaymentType.RECURRING), (2, PaymentType.RECURRING)],
)
async def test_links_and_subscriptions_refund_the_payment_intent_that_paid(
    env: RefundEnv, method: int, payment_type: PaymentType
) -> None:
    payment = await env.paid(
        amount_cents=1200, payment_method=method, payment_type=int(payment_type)
    )
    refund = await env.refund(payment.id, amount_cents=200)
    assert refund.status == R.SUCCEEDED
    [made] = env.stripe_refunds()
    intent = env.sandbox.state.payment_intents[made["payment_intent"]]
    assert intent["amount"] == 1200 and intent["status"] == "succeeded"
    assert (await env.payment(payment.id)).provider_payment_intent_id == intent["id"]
