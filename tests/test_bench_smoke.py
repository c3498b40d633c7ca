"""``make bench-quick``'s code path, end to end: the real ``payments serve`` and every
process around it start, every scenario runs, and every figure of the table comes out.

Only that the figures exist is asserted; how fast they are belongs to the benchmark
(bench/README.md), never to pass/fail. Needs wrk and h2load: the run installs them
(as root) or fails, as ``make bench`` does; it never skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.config import QUICK, TARGETS
from bench.report import table
from bench.run import Options, lookup, run
from tests.fixtures.db import MysqlServer

pytestmark = pytest.mark.timeout(300)

FIGURES = [
    f"{scenario}.{side}.{field}"
    for scenario in ("http_get", "http_post", "http_refund", "grpc_get")
    for side in ("service", "ceiling")
    for field in ("rps", "p50_ms", "p99_ms")
] + [
    "http_get.ratio",
    "http_post.ratio",
    "http_refund.ratio",
    "grpc_get.ratio",
    "propagation.p50_ms",
    "propagation.p99_ms",
    "dispatch.items_per_s",
    "expiry.items_per_s",
    "reconcile.items_per_s",
    "memory.idle_rss_mb",
    "memory.http_load_peak_mb",
]


def test_bench_quick_produces_every_figure(mysql_server: MysqlServer, tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    results = run(Options(QUICK, out))

    missing = [name for name in FIGURES if not isinstance(lookup(results, name), int | float)]
    assert not missing, f"figures not produced: {missing}"
    nonpositive = [name for name in FIGURES if not lookup(results, name) > 0]
    assert not nonpositive, f"figures not above zero: {nonpositive}"
    assert set(results["targets"]) == set(TARGETS)
    assert json.loads(out.read_text()) == results
    printed = table(results)
    for label in (
        "HTTP GET /payments/{id} req/s",
        "HTTP POST /payments req/s",
        "HTTP POST /payments/{id}/refunds req/s",
        "gRPC GetPayment req/s",
        "status propagation p50 ms",
        "status propagation p99 ms",
        "dispatch callbacks/s",
        "expiry payments/s",
        "reconcile payments/s",
        "serve RSS idle MB",
        "serve peak RSS under HTTP load MB",
    ):
        assert label in printed


def test_the_bench_auth_server_runs_without_pytest() -> None:
    """bench/auth_server.py runs from a runtime-only install (issue 9): pytest blocked,
    it still starts, listens and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pytest'] = None; "
        "from bench.auth_server import main; sys.exit(main(['--port', '0']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("bench-auth listening on 127.0.0.1:"), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
