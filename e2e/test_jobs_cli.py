"""The one-off job commands as a deployment runs them: `payments reconcile`,
`payments callbacks dispatch`, `payments expire pending` (summary, exit code), and the
same jobs as `--worker`."""

from __future__ import annotations

import httpx
import trio

from e2e.conftest import Database
from e2e.harness import CallbackReceiver, Isolated, create_body, eventually, headers, run_cli
from payments.model import PaymentStatus


async def _run(isolated: Isolated, args: list[str], **env: str | None) -> tuple[int, str, str]:
    full = dict(isolated.env)
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    done = await trio.to_thread.run_sync(run_cli, args, full, isolated.workdir)
    return done.returncode, done.stdout, done.stderr


async def _create_pending(isolated: Isolated, receiver: CallbackReceiver) -> int:
    service = await isolated.aspawn({"PAYMENTS_PENDING_TIMEOUT_MINUTES": "600"})
    async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as client:
        reply = await client.post(
            "/payments",
            json=create_body(status_callback_url=receiver.url("/callback")),
            headers=headers(),
        )
    assert reply.status_code == 201, reply.text
    service.terminate()
    return int(reply.json()["payment"]["id"])


async def test_expire_pending_then_dispatch_once(
    isolated: Isolated, isolated_db: Database, own_receiver: CallbackReceiver
) -> None:
    payment_id = await _create_pending(isolated, own_receiver)

    code, out, err = await _run(isolated, ["expire", "pending"])
    assert code == 0, err
    assert "checked 0" in out  # not old enough yet

    code, out, err = await _run(
        isolated, ["expire", "pending"], PAYMENTS_PENDING_TIMEOUT_MINUTES="0"
    )
    assert code == 0, err
    assert "changed 1" in out and "EXPIRED 1" in out, out
    assert await isolated_db.status(payment_id) == PaymentStatus.EXPIRED

    code, out, err = await _run(isolated, ["callbacks", "dispatch"])
    assert code == 0, err
    assert "claimed=1 delivered=1" in out, out
    (callback,) = own_receiver.received
    assert callback.json()["payment"]["status"] == 40

    code, out, _ = await _run(isolated, ["callbacks", "dispatch"])
    assert code == 0 and "claimed=0" in out  # delivered once, not again


async def test_reconcile_reports_and_fails_when_stripe_is_down(
    isolated: Isolated, own_receiver: CallbackReceiver
) -> None:
    await _create_pending(isolated, own_receiver)
    code, out, err = await _run(isolated, ["reconcile"], PAYMENTS_RECONCILE_STALE_AFTER_MINUTES="0")
    assert code == 0, err
    assert "checked 1" in out and "errors 0" in out, out
    isolated.sandbox.stop()  # Stripe unreachable: the pass ends with errors, exit 1
    code, out, err = await _run(isolated, ["reconcile"], PAYMENTS_RECONCILE_STALE_AFTER_MINUTES="0")
    assert code == 1, (out, err)
    assert "errors 1" in out, out


async def test_a_job_without_its_database_exits_non_zero(isolated: Isolated) -> None:
    code, out, err = await _run(
        isolated, ["callbacks", "dispatch"], MYSQL_DSN="mysql://root@127.0.0.1:1/nowhere"
    )
    assert code == 1, (out, err)
    assert "database unavailable" in err and "Traceback" not in err


async def test_worker_repeats_until_sigterm(
    isolated: Isolated, isolated_db: Database, own_receiver: CallbackReceiver
) -> None:
    payment_id = await _create_pending(isolated, own_receiver)
    worker = await isolated.aspawn(
        {
            "PAYMENTS_PENDING_TIMEOUT_MINUTES": "0.01",
            "PAYMENTS_EXPIRE_PENDING_INTERVAL_MINUTES": "0.01",
        },
        args=("expire", "pending", "--worker"),
        ready=False,
    )

    async def expired() -> bool:
        return await isolated_db.status(payment_id) == PaymentStatus.EXPIRED

    await eventually(expired, within=20)
    assert await trio.to_thread.run_sync(worker.terminate) == 0
