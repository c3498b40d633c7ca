"""The Auth service for the benchmark, as its own process: the purerpc FakeAuthServer of
tests/fixtures/auth_service.py on loopback
(which needs no pytest: this runs from a runtime-only install).

    python -m bench.auth_server --port 0

prints ``bench-auth listening on <host:port>``. Keys: ``test-key-orders`` (service
``orders``) and ``test-key-gateway`` (``gateway``, the forwarder of Stripe events), both
allowed to call ``payments-service``.
"""

from __future__ import annotations

import payments.purerpc_compat  # noqa: F401  (before purerpc)

# isort: split
import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from tests.fixtures.auth_service import FakeAuthServer


async def _run(port: int) -> None:
    async with trio.open_nursery() as nursery:
        server = FakeAuthServer(nursery)
        server.port = port
        await server.start()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # Ready only once a stop signal is handled (else an early SIGTERM kills it).
            print(f"bench-auth listening on {server.addr}", flush=True)
            async for _ in signals:
                break
        await server.stop()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_server")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    trio.run(_run, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
