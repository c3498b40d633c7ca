"""Run the Stripe emulator as a process: ``python -m payments.sandbox --port N --secret-key K``.

Prints ``payments-sandbox listening on <url>`` (flushed) once it accepts connections, so
a parent process can wait for that line (``--port 0`` picks a free port and the line
tells which). Stops cleanly on SIGINT or SIGTERM.

With ``--webhook-url`` (the service's provider callback base, e.g.
``http://127.0.0.1:8080/webhooks/providers/stripe``) and ``--webhook-secret`` every event
is posted there signed, with the gateway's ``X-Request-ID`` and ``--gateway-api-key``
headers, or in the envelope form with ``--envelope``. The control API
(``POST /_sandbox/webhook``) can set or change that later.

Each session's and payment link's ``url`` is its hosted checkout page (``/pay/<id>``,
Pay / Decline / Cancel in a browser); ``/_sandbox/dashboard`` lists sessions and the
events sent, without the key while bound to a loopback address (payments.sandbox.pages).

``--state FILE`` keeps the account in SQLite (payments.sandbox.store): a restart, even
after ``kill -9``, finds every object and idempotency key it answered with.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence

import trio

from payments.sandbox.server import DEFAULT_SECRET_KEY, Sandbox, serve_sandbox


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m payments.sandbox", description="Stripe API emulator (test mode only)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=12111, help="port (12111; 0 picks one)")
    parser.add_argument(
        "--secret-key",
        default=os.environ.get("STRIPE_SECRET_KEY") or DEFAULT_SECRET_KEY,
        help="the secret key clients must send (default: $STRIPE_SECRET_KEY or "
        f"{DEFAULT_SECRET_KEY})",
    )
    parser.add_argument("--public-url", default=None, help="base URL put in objects' url fields")
    parser.add_argument(
        "--webhook-url",
        default=None,
        help="post every event here (+ /<metadata.callback_hash>, or fill {callback_hash})",
    )
    parser.add_argument(
        "--webhook-secret",
        default=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
        help="signing secret of the events (default: $STRIPE_WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--gateway-api-key",
        default="",
        help="X-API-Key sent with each event, as the forwarding gateway does",
    )
    parser.add_argument(
        "--envelope",
        action="store_true",
        help='post {"payload": <event>, "signature": <header>} as the gateway forwards it',
    )
    parser.add_argument(
        "--state",
        default=None,
        help="SQLite file keeping every object across restarts, each change committed "
        "before its answer (default: memory only)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    state = None
    if args.state:
        from payments.sandbox.store import persistent_state

        state = persistent_state(args.state, args.secret_key)
    async with trio.open_nursery() as nursery:
        sandbox: Sandbox = await nursery.start(
            lambda task_status: serve_sandbox(
                args.host,
                args.port,
                secret_key=args.secret_key,
                state=state,
                public_url=args.public_url,
                webhook_url=args.webhook_url,
                webhook_secret=args.webhook_secret if args.webhook_url else None,
                gateway_api_key=args.gateway_api_key,
                envelope=args.envelope,
                task_status=task_status,
            )
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # Ready only once a stop signal is handled (else an early SIGTERM kills it).
            print(f"payments-sandbox listening on {sandbox.url}", flush=True)
            print(f"payments-sandbox dashboard: {sandbox.url}/_sandbox/dashboard", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret (or $STRIPE_WEBHOOK_SECRET)")
    try:
        trio.run(_run, args)
    except (OSError, sqlite3.Error) as exc:
        print(f"payments-sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
