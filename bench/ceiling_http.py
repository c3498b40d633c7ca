"""The HTTP ceiling: the service's stack (quart-trio on hypercorn, served by the same
``payments.api.http.serve_http``, one process) answering a trivial route.

    python -m bench.ceiling_http --port 0

prints ``bench-ceiling-http listening on <port>`` once it accepts connections. ``GET
/trivial/<item>`` answers ``{"status":"ok"}`` (a route with one path parameter, like
``/payments/<id>``): no auth, no database, no access log, so the ratio of the service's
``GET /payments/{id}`` to it is what the service's own work costs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio
from quart import Response
from quart_trio import QuartTrio

from payments.api.http import serve_http

BODY = b'{"status":"ok"}'


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)
    app.config.update(PROVIDE_AUTOMATIC_OPTIONS=False)

    @app.get("/trivial/<item>")
    async def trivial(item: str) -> Response:
        return Response(BODY, status=200, content_type="application/json")

    return app


async def _run(host: str, port: int) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(serve_http, create_app(), host, port, shutdown_trigger=stop.wait)
        )
        print(f"bench-ceiling-http listening on {bound}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_http")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    trio.run(_run, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
