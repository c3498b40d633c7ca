"""The sandbox's write-through store (issue 9, class 7): every change is committed before
the answer, and a change costs the rows it touched, not the account's history."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import stripe
import trio

from payments.sandbox import StripeState, open_sandbox
from payments.sandbox.store import SandboxStore, persistent_state
from tests.fixtures.sandbox import SANDBOX_SECRET_KEY

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


class CountingStore(SandboxStore):
    """The real store, also recording what each write carried."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[int, int]] = []  # (rows + events, bytes)

    def write(self, rows: Any, events: Any) -> None:
        rows, events = list(rows), list(events)
        size = sum(len(text) for _, _, text in rows) + sum(len(text) for text in events)
        self.writes.append((len(rows) + len(events), size))
        super().write(rows, events)


def _session_params(request_id: str) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "eur",
                    "unit_amount": 2500,
                    "product_data": {"name": "order"},
                },
                "quantity": 1,
            }
        ],
        "client_reference_id": request_id,
        "metadata": {"request_id": request_id},
        "success_url": "https://shop.test/ok",
    }


def _client(url: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        SANDBOX_SECRET_KEY, base_addresses={"api": url}, http_client=stripe.HTTPXClient()
    )


def _fill(state: StripeState, count: int) -> None:
    """``count`` paid sessions of history (straight into the state, then flushed)."""
    for n in range(count):
        price = state.create_price({"currency": "eur", "unit_amount": 100 + n}, "prod_x")
        items = [state.line_item(price, 1, "old")]
        session = state.create_session({"mode": "payment"}, items)
        state.complete_session(session["id"])
    state.flush()


async def _cost_of_one_create(tmp_path: Path, history: int) -> tuple[int, int]:
    state = StripeState(SANDBOX_SECRET_KEY)
    store = CountingStore(tmp_path / f"history-{history}.sqlite")
    state.attach(store)
    _fill(state, history)
    async with open_sandbox(SANDBOX_SECRET_KEY, state=state) as sandbox:
        store.writes.clear()
        await _client(sandbox.url).v1.checkout.sessions.create_async(
            params=_session_params("r-1"), options={"idempotency_key": "k-1"}
        )
    assert len(store.writes) == 1, store.writes  # one transaction for the request
    return store.writes[0]


async def test_cost_of_a_change_does_not_grow_with_history(tmp_path: Path) -> None:
    small_rows, small_bytes = await _cost_of_one_create(tmp_path, 10)
    large_rows, large_bytes = await _cost_of_one_create(tmp_path, 2000)
    # The session, its line items, its create params and the idempotency record.
    assert small_rows == large_rows == 4
    # Same rows, same shapes: only ids and the echoed request differ, never the history.
    assert abs(large_bytes - small_bytes) < 0.05 * small_bytes, (small_bytes, large_bytes)


async def test_an_answered_create_is_in_the_file_before_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.sqlite"
    state = persistent_state(path, SANDBOX_SECRET_KEY)
    async with open_sandbox(SANDBOX_SECRET_KEY, state=state) as sandbox:
        session = await _client(sandbox.url).v1.checkout.sessions.create_async(
            params=_session_params("r-2"), options={"idempotency_key": "k-2"}
        )
        # Read by another connection while the server still runs: committed already.
        with sqlite3.connect(path) as db:
            row = db.execute(
                "SELECT body FROM objects WHERE kind = 'sessions' AND id = ?", (session.id,)
            ).fetchone()
    assert row is not None
    assert json.loads(row[0])["url"] == session.url


async def test_a_new_state_on_the_file_has_objects_events_and_idempotency(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sandbox.sqlite"
    first = persistent_state(path, SANDBOX_SECRET_KEY)
    async with open_sandbox(SANDBOX_SECRET_KEY, state=first) as sandbox:
        client = _client(sandbox.url)
        created = await client.v1.checkout.sessions.create_async(
            params=_session_params("r-3"), options={"idempotency_key": "k-3"}
        )
        first.pay_session(created.id)  # in-process, as a test would: flushed next request
        await client.v1.checkout.sessions.retrieve_async(created.id)

    second = persistent_state(path, SANDBOX_SECRET_KEY)  # as after kill -9: no close
    assert second.sessions[created.id]["status"] == "complete"
    assert [e["type"] for e in second.events] == ["checkout.session.completed"]
    async with open_sandbox(SANDBOX_SECRET_KEY, state=second) as sandbox:
        replay = await _client(sandbox.url).v1.checkout.sessions.create_async(
            params=_session_params("r-3"), options={"idempotency_key": "k-3"}
        )
    assert replay.id == created.id  # Stripe keeps idempotency keys for 24 hours
    assert second.requests[-1].replayed


def test_reset_empties_the_store(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.sqlite"
    state = persistent_state(path, SANDBOX_SECRET_KEY)
    _fill(state, 3)
    state.reset()
    again = persistent_state(path, SANDBOX_SECRET_KEY)
    assert (len(again.sessions), again.events) == (0, [])


def test_an_old_json_snapshot_is_imported_once(tmp_path: Path) -> None:
    old = StripeState(SANDBOX_SECRET_KEY)
    _fill(old, 2)
    legacy = tmp_path / "sandbox.json"
    legacy.write_text(json.dumps(old.snapshot()))

    state = persistent_state(tmp_path / "sandbox.sqlite", SANDBOX_SECRET_KEY, legacy=legacy)
    assert set(state.sessions) == set(old.sessions)
    assert not legacy.exists()
    assert (tmp_path / "sandbox.json.imported").exists()
    again = persistent_state(tmp_path / "sandbox.sqlite", SANDBOX_SECRET_KEY, legacy=legacy)
    assert set(again.sessions) == set(old.sessions)
    assert len(again.events) == len(old.events)


def _start(path: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "payments.sandbox", "--port", "0", "--state", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "STRIPE_SECRET_KEY": SANDBOX_SECRET_KEY},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("payments-sandbox listening on "), proc.stderr and proc.stderr.read()
    return proc, line.split()[-1]


async def test_the_sandbox_process_with_state_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.sqlite"
    proc, url = await trio.to_thread.run_sync(_start, path)
    try:
        created = await _client(url).v1.checkout.sessions.create_async(
            params=_session_params("r-9"), options={"idempotency_key": "k-9"}
        )
    finally:
        proc.kill()  # straight after the answer
        await trio.to_thread.run_sync(proc.wait)
    assert proc.returncode == -signal.SIGKILL

    proc, url = await trio.to_thread.run_sync(_start, path)
    try:
        found = await _client(url).v1.checkout.sessions.retrieve_async(created.id)
        assert (found.id, found.status) == (created.id, "open")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait) == 0


def test_a_failed_write_keeps_the_changes_for_the_next_flush(tmp_path: Path) -> None:
    """The server drops the connection unanswered when a flush fails; nothing the state
    holds is forgotten: the next flush writes it."""
    path = tmp_path / "sandbox.sqlite"
    state = StripeState(SANDBOX_SECRET_KEY)
    state.attach(SandboxStore(path, busy_timeout_seconds=0))
    with sqlite3.connect(path, isolation_level=None) as blocker:
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
        _fill_unflushed(state)
        with pytest.raises(sqlite3.OperationalError):
            state.flush()
        blocker.execute("ROLLBACK")
    assert state.flush() > 0
    again = persistent_state(path, SANDBOX_SECRET_KEY)
    assert set(again.sessions) == set(state.sessions) != set()


def _fill_unflushed(state: StripeState) -> None:
    price = state.create_price({"currency": "eur", "unit_amount": 100}, "prod_x")
    session = state.create_session({"mode": "payment"}, [state.line_item(price, 1, "x")])
    state.complete_session(session["id"])


class _NoScan(dict[str, Any]):
    """A sessions table that refuses to be scanned (the expiry tick must not)."""

    def values(self) -> Any:
        raise AssertionError("the expiry tick scanned every session")


def _open_sessions(state: StripeState, count: int, expires_at: int) -> list[str]:
    price = state.create_price({"currency": "eur", "unit_amount": 100}, "prod_x")
    return [
        state.create_session(
            {"mode": "payment", "expires_at": expires_at}, [state.line_item(price, 1, "x")]
        )["id"]
        for _ in range(count)
    ]


def test_the_expiry_tick_pops_what_is_due_and_survives_a_restart(tmp_path: Path) -> None:
    """The emulator closes sessions at their expires_at from a heap: a tick costs what
    is due, not the account's history (it scanned every session once a second), and
    sessions loaded from the store after a restart still expire."""
    now = [1_700_000_000.0]
    path = tmp_path / "expiry.sqlite"
    state = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    state.attach(SandboxStore(path))
    soon = _open_sessions(state, 3, 1_700_000_100)
    later = _open_sessions(state, 2, 1_700_000_200)
    state.complete_session(soon[0])  # paid before its time: never expired
    state.flush()

    again = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    again.attach(SandboxStore(path))  # a restart: the heap is rebuilt from the store
    scanning = again.sessions
    again.sessions = _NoScan(scanning)  # type: ignore[assignment]
    assert again.expire_due_sessions() == []
    now[0] = 1_700_000_100
    assert sorted(s["id"] for s in again.expire_due_sessions()) == sorted(soon[1:])
    assert again.expire_due_sessions() == []
    now[0] = 1_700_000_500
    assert sorted(s["id"] for s in again.expire_due_sessions()) == sorted(later)
    assert [again.sessions[i]["status"] for i in soon] == ["complete", "expired", "expired"]


def test_a_restored_snapshot_expires_its_open_sessions() -> None:
    now = [1_700_000_000.0]
    old = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    ids = _open_sessions(old, 2, 1_700_000_100)
    state = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    state.restore(old.snapshot())
    now[0] = 1_700_000_100
    assert sorted(s["id"] for s in state.expire_due_sessions()) == sorted(ids)


def test_a_session_moved_later_expires_at_its_new_time() -> None:
    now = [1_700_000_000.0]
    state = StripeState(SANDBOX_SECRET_KEY, clock=lambda: now[0])
    (session_id,) = _open_sessions(state, 1, 1_700_000_100)
    state.sessions[session_id]["expires_at"] = 1_700_000_300  # extended after creation
    now[0] = 1_700_000_200
    assert state.expire_due_sessions() == []
    assert state.sessions[session_id]["status"] == "open"
    now[0] = 1_700_000_300
    assert [s["id"] for s in state.expire_due_sessions()] == [session_id]
