"""The gRPC ceiling: purerpc (the service's gRPC stack, served by the same
``payments.api.grpc_server.serve_purerpc``, one process) answering a trivial method.

    python -m bench.ceiling_grpc --port 0

prints ``bench-ceiling-grpc listening on <port>``. It serves ``payments.PaymentsService``
so the load generator sends the very request it sends the service, but ``GetPayment``
answers an empty ``PaymentEnvelopeResponse`` at once: no metadata checks, no auth, no
database, no access log.
"""

from __future__ import annotations

import payments.purerpc_compat  # noqa: F401  (before purerpc)

# isort: split
import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from payments.api.grpc_server import serve_purerpc
from payments.gen import payments_pb2 as pb
from payments.gen.payments_grpc import PaymentsServiceServicer


class CeilingServicer(PaymentsServiceServicer):
    async def GetPayment(self, message: pb.GetPaymentRequest) -> pb.PaymentEnvelopeResponse:
        return pb.PaymentEnvelopeResponse()

    async def Health(self, message: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")


async def _run(host: str, port: int) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(serve_purerpc, [CeilingServicer()], host, port, shutdown_trigger=stop.wait)
        )
        print(f"bench-ceiling-grpc listening on {bound}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_grpc")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    trio.run(_run, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
