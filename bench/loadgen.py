"""Runs the load generators as separate processes and reads their results.

* HTTP: ``wrk`` with a Lua script of bench/wrk/ (unique request ids, the service's
  headers); the scripts print one ``BENCH_JSON {...}`` line with the latency
  percentiles wrk measured.
* gRPC: ``h2load`` posting a framed ``GetPaymentRequest`` with the gRPC headers; its
  per-request log (``--log-file``) gives the latency percentiles.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

WRK_DIR = Path(__file__).resolve().parent / "wrk"


class LoadError(RuntimeError):
    """A load generator failed or its output did not parse."""


@attrs.frozen
class Load:
    """What one load run measured."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # transport errors plus answers that were not 2xx

    def as_dict(self) -> dict[str, float | int]:
        return attrs.asdict(self)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def wrk(
    url: str,
    script: str,
    script_args: Sequence[str],
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 10,
) -> Load:
    """Run wrk for ``seconds`` with ``connections`` open connections."""
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(WRK_DIR / script),
        url,
        "--",
        *script_args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next(
        (ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")),
        None,
    )
    if done.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds_run = data["duration_us"] / 1e6
    errors = sum(data["errors"].values())
    return Load(
        requests=data["requests"],
        seconds=round(seconds_run, 3),
        rps=round(data["requests"] / seconds_run, 1),
        p50_ms=round(data["latency_us"]["p50"] / 1000, 2),
        p99_ms=round(data["latency_us"]["p99"] / 1000, 2),
        errors=errors,
    )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def h2load_grpc(
    url: str,
    message: bytes,
    headers: Sequence[tuple[str, str]],
    *,
    seconds: float,
    clients: int,
    streams: int,
) -> Load:
    """POST the framed ``message`` to ``url`` (``http://host:port/pkg.Service/Method``)
    for ``seconds`` from ``clients`` HTTP/2 connections, ``streams`` calls in flight on
    each. Latencies come from h2load's per-request log."""
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(grpc_frame(message))
        log = Path(tmp) / "requests.tsv"
        command = [
            "h2load",
            f"-c{clients}",
            f"-m{streams}",
            f"-D{max(1, round(seconds))}",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            *(item for name, value in headers for item in ("-H", f"{name}: {value}")),
            f"--log-file={log}",
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        finished = _FINISHED.search(done.stdout)
        counts = _REQUESTS.search(done.stdout)
        statuses = _STATUS.search(done.stdout)
        if done.returncode != 0 or not (finished and counts and statuses):
            raise LoadError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        latencies = sorted(
            int(fields[2]) / 1000
            for fields in (line.split("\t") for line in log.read_text().splitlines())
            if len(fields) >= 3 and fields[1] == "200"
        )
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    succeeded = int(statuses.group(1))
    failed = int(counts.group(5)) + int(counts.group(6)) + int(counts.group(7))
    non_2xx = int(statuses.group(2)) + int(statuses.group(3)) + int(statuses.group(4))
    return Load(
        requests=succeeded,
        seconds=round(elapsed, 3),
        rps=round(succeeded / elapsed, 1) if elapsed else 0.0,
        p50_ms=round(percentile(latencies, 50), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        errors=failed + non_2xx,
    )
