"""The callers' status-callback endpoint for the benchmark, as its own process.

    python -m bench.receiver --port 0

prints ``bench-receiver listening on <port>``. A minimal HTTP/1.1 server on asyncio
(keep-alive, pipelining, Content-Length bodies) so that it costs the machine as little
as possible: the figures are the service's, not the receiver's.

Every ``POST`` to a path other than the control routes is answered ``200`` and recorded
as ``[arrival unix time, payment id, payment status]`` (the time is taken when the
whole request has arrived, before the body is parsed). Control routes:

    GET  /_stats        {"count": N, "records": [[t, id, status], ...]}
    GET  /_count        {"count": N}
    POST /_reset        forget the records
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def _answer(document: Any) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Records:
    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def add(self, at: float, body: bytes) -> None:
        payment_id: int = 0
        status: int = 0
        try:
            payment = json.loads(body).get("payment") or {}
            payment_id = int(payment.get("id") or 0)
            status = int(payment.get("status") or 0)
        except (ValueError, AttributeError, TypeError):
            pass
        self.rows.append([at, payment_id, status])


class Connection(asyncio.Protocol):
    def __init__(self, records: Records) -> None:
        self.records = records
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = self.buffer[head_end + 4 : end]
            self.buffer = self.buffer[end:]
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if path == "/_stats":
            rows = self.records.rows
            self.transport.write(_answer({"count": len(rows), "records": rows}))
        elif path == "/_count":
            self.transport.write(_answer({"count": len(self.records.rows)}))
        elif path == "/_reset":
            self.records.rows = []
            self.transport.write(_answer({"reset": True}))
        else:
            self.records.add(time.time(), body)
            self.transport.write(OK)


async def _run(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    records = Records()
    server = await loop.create_server(lambda: Connection(records), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"bench-receiver listening on {bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
