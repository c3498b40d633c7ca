"""One benchmark run: start the stack, measure every figure beside its ceiling, report.

Scenarios, in order (``payments serve`` runs for the first four, then is stopped so the
one-off job commands have the database to themselves):

1. ``http_get``: HTTP ``GET /payments/{id}`` against the trivial route of
   bench/ceiling_http.py; wrk, same connections, alternating rounds. Memory at idle is
   read before it;
2. ``http_post``: HTTP ``POST /payments`` (a new payment and a Stripe call per request)
   against the emulator's own ``POST /v1/checkout/sessions`` with the same parameters;
   then the peak RSS of ``payments serve`` under that HTTP load;
3. ``grpc_get``: gRPC ``GetPayment`` against the trivial purerpc method of
   bench/ceiling_grpc.py; h2load, same streams, alternating rounds;
4. ``propagation``: payments completed at the emulator at a steady rate; from the moment
   the emulator sends each signed event to the moment the caller's callback reaches
   the receiver;
5. ``dispatch``, ``expiry``, ``reconcile``: each a one-off command run as a process
   against a backlog inserted with SQL (``payments callbacks dispatch``, ``payments
   expire pending``, ``payments reconcile``); items / wall-clock seconds of the process.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import grpc
import trio

from bench import clients, loadgen
from bench.config import TARGETS, Sizes
from bench.procs import (
    CpuMeter,
    PoolSampler,
    RssSampler,
    children_cpu_seconds,
    find_pid,
    memory,
)
from bench.pyspy import Recording
from bench.stack import CALLER_KEY, STRIPE_KEY, STRIPE_WEBHOOK_SECRET, Stack
from bench.tools import ensure_tools
from payments.gen import payments_pb2 as pb
from payments.gen import payments_pb2_grpc as pb_grpc
from tests.fixtures.auth import GATEWAY_KEY

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = (
    "http_get",
    "http_post",
    "http_refund",
    "grpc_get",
    "propagation",
    "dispatch",
    "expiry",
    "reconcile",
)
# A load run with more failed requests than this is not a measurement.
MAX_ERROR_SHARE = 0.01
# Stripe's own limit is a setting (PAYMENTS_RECONCILE_RATE_PER_SECOND, 20/s by default);
# the job figures measure the service, so the bench lifts it far above any rate reached.
JOB_RATE_LIMIT = "100000"


class BenchError(RuntimeError):
    """A scenario could not produce a valid figure."""


@attrs.frozen
class Options:
    sizes: Sizes
    out: Path | None = None
    keep: bool = False
    only: frozenset[str] = frozenset(SCENARIOS)
    # added to the environment of ``payments serve`` and of the job commands
    overrides: Mapping[str, str] = attrs.field(factory=dict)
    profile_dir: Path | None = None


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _checked(load: loadgen.Load, what: str) -> loadgen.Load:
    if load.requests == 0 or load.errors > MAX_ERROR_SHARE * (load.requests + load.errors):
        raise BenchError(f"{what}: {load.errors} errors in {load.requests} requests")
    return load


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _side(loads: list[loadgen.Load]) -> dict[str, Any]:
    return {
        "rps": _median([load.rps for load in loads]),
        "p50_ms": _median([load.p50_ms for load in loads]),
        "p99_ms": _median([load.p99_ms for load in loads]),
        "rounds": [load.as_dict() for load in loads],
    }


def paired(
    rounds: int,
    ceiling: Callable[[], loadgen.Load],
    service: Callable[[], loadgen.Load],
    what: str,
) -> dict[str, Any]:
    """Alternate ceiling and service runs (the order flips each round); medians of the
    rounds and the median of the per-round ratios."""
    ceilings: list[loadgen.Load] = []
    services: list[loadgen.Load] = []
    for index in range(rounds):
        order = [("ceiling", ceiling), ("service", service)]
        if index % 2:
            order.reverse()
        for side, run_one in order:
            load = _checked(run_one(), f"{what} ({side}, round {index + 1})")
            (ceilings if side == "ceiling" else services).append(load)
            say(f"  {what} {side} round {index + 1}: {load.rps:.0f} req/s, p99 {load.p99_ms} ms")
    ratios = [s.rps / c.rps for s, c in zip(services, ceilings, strict=True)]
    return {
        "service": _side(services),
        "ceiling": _side(ceilings),
        "ratio": round(statistics.median(ratios), 3),
    }


def _summary_number(summary: str, name: str) -> int:
    match = re.search(rf"\b{name}[= ](\d+)", summary)
    return int(match[1]) if match else -1


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


class Bench:
    """The scenarios of one run over one :class:`Stack`."""

    def __init__(self, stack: Stack, options: Options) -> None:
        self.stack = stack
        self.options = options
        self.sizes = options.sizes
        self.profiles: dict[str, str] = {}
        self._profiled: set[str] = set()
        self.mariadb_pid = find_pid("mariadbd") or find_pid("mysqld")
        # scenario -> CPU shares of the processes during its last measured service run
        self.cpu: dict[str, dict[str, float]] = {}
        # scenario -> the service's database pool during its last measured run
        self.pool: dict[str, dict[str, int]] = {}

    # --- helpers -------------------------------------------------------------------------

    @property
    def service_pid(self) -> int:
        assert self.stack.service is not None
        return self.stack.service.proc.pid

    @property
    def service_url(self) -> str:
        assert self.stack.service is not None
        return self.stack.service.http_url

    def _profile_start(self, name: str, pid: int, seconds: float | None) -> Recording | None:
        """Attach py-spy to ``pid`` once per scenario, when profiling."""
        directory = self.options.profile_dir
        if directory is None or name in self._profiled:
            return None
        self._profiled.add(name)
        recording = Recording(pid, directory / f"{name}.folded", seconds)
        self.profiles[name] = str(recording.out)
        return recording

    def _meter(self, **pids: int | None) -> CpuMeter:
        return CpuMeter(
            {**pids, "emulator": self.stack.sandbox.pid, "mariadb": self.mariadb_pid}
        ).start()

    def _serve_measured(self, name: str, seconds: float, load: Callable[[], Any]) -> Any:
        """Run one service-side load: its CPU shares recorded, py-spy attached the first
        time when profiling."""
        recording = self._profile_start(name, self.service_pid, max(1.0, seconds - 0.5))
        pool = PoolSampler(f"{self.service_url}/healthz")
        meter = self._meter(serve=self.service_pid)
        try:
            return load()
        finally:
            self.cpu[name] = meter.stop()
            self.pool[name] = pool.stop()
            if recording is not None:
                recording.finish()

    def _ceiling_measured(
        self, name: str, pid: int, seconds: float, load: Callable[[], Any]
    ) -> Any:
        recording = self._profile_start(f"{name}_ceiling", pid, max(1.0, seconds - 0.5))
        meter = CpuMeter({"ceiling": pid}).start()
        try:
            return load()
        finally:
            self.cpu[f"{name}_ceiling"] = meter.stop()
            if recording is not None:
                recording.finish()

    # --- HTTP ------------------------------------------------------------------------------

    def http_get(self, ids: list[int]) -> dict[str, Any]:
        sizes = self.sizes
        id_list = ",".join(str(i) for i in ids)

        def wrk(url: str, prefix: str, seconds: float) -> loadgen.Load:
            return loadgen.wrk(
                url,
                "get.lua",
                [CALLER_KEY, id_list, prefix, f"bench-get-{time.time_ns()}"],
                seconds=seconds,
                connections=sizes.connections,
            )

        def service(seconds: float) -> loadgen.Load:
            return wrk(self.service_url, "/payments/", seconds)

        def ceiling(seconds: float) -> loadgen.Load:
            return wrk(self.stack.ceiling_http_url, "/trivial/", seconds)

        ceiling(sizes.warmup_seconds)
        service(sizes.warmup_seconds)
        seconds = sizes.load_seconds
        result = paired(
            sizes.rounds,
            lambda: self._ceiling_measured(
                "http_get", self.stack.ceiling_http.pid, seconds, lambda: ceiling(seconds)
            ),
            lambda: self._serve_measured("http_get", seconds, lambda: service(seconds)),
            "GET /payments/{id}",
        )
        result["connections"] = sizes.connections
        result["cpu"] = {"service": self.cpu["http_get"], "ceiling": self.cpu["http_get_ceiling"]}
        result["database_pool"] = self.pool["http_get"]
        return result

    def http_post(self) -> dict[str, Any]:
        sizes = self.sizes
        callback = f"{self.stack.receiver_url}/cb/post"

        def service(seconds: float) -> loadgen.Load:
            return loadgen.wrk(
                self.service_url,
                "post.lua",
                [CALLER_KEY, callback, f"bench-post-{time.time_ns()}"],
                seconds=seconds,
                connections=sizes.post_connections,
            )

        def ceiling(seconds: float) -> loadgen.Load:
            return loadgen.wrk(
                self.stack.sandbox_url,
                "stripe_create.lua",
                [STRIPE_KEY, f"bench-stripe-{time.time_ns()}"],
                seconds=seconds,
                connections=sizes.post_connections,
            )

        service(sizes.warmup_seconds)
        return self._dependency_pair("http_post", "POST /payments", service, ceiling)

    def http_refund(self) -> dict[str, Any]:
        """1-cent refunds of PAID payments (each a new refund and a Stripe call) against
        the emulator's own ``POST /v1/refunds`` with the parameters the service sends."""
        sizes, stack = self.sizes, self.stack
        # Room for every 1-cent refund. Each side refunds its own charges: a charge's
        # refunds made by the ceiling would be refunds made outside the service (as in
        # Stripe's dashboard), which the service must record when its events list them,
        # so sharing charges measured that instead.
        payments = trio.run(
            lambda: clients.create_payments(
                self.service_url,
                CALLER_KEY,
                2 * sizes.refund_payments,
                f"{stack.receiver_url}/cb/refund",
                "refund",
                amount_cents=99_999_999,
            )
        )
        sessions = [str(p["provider_payment_id"]) for p in payments]
        trio.run(clients.complete_sessions, stack.sandbox_url, STRIPE_KEY, sessions)
        ids = [int(p["id"]) for p in payments]
        trio.run(clients.wait_paid, self.service_url, CALLER_KEY, ids, 60.0)
        objects = stack.sandbox_control("GET", "objects")["checkout_sessions"]
        ids, ceiling_sessions = ids[: sizes.refund_payments], sessions[sizes.refund_payments :]
        intents = ",".join(str(objects[s]["payment_intent"]) for s in ceiling_sessions)

        def wrk(url: str, key: str, items: str, path: tuple[str, str], seconds: float) -> Any:
            return loadgen.wrk(
                url,
                "refund.lua",
                [key, items, *path, f"bench-refund-{time.time_ns()}"],
                seconds=seconds,
                connections=sizes.post_connections,
            )

        def service(seconds: float) -> loadgen.Load:
            ids_text = ",".join(str(i) for i in ids)
            return wrk(self.service_url, CALLER_KEY, ids_text, ("/payments/", "/refunds"), seconds)

        def ceiling(seconds: float) -> loadgen.Load:
            # Events of the ceiling's refunds would reach the service (thousands, during
            # the next measurement): the emulator keeps them while it runs.
            stack.sandbox_control("DELETE", "webhook")
            try:
                key = f"stripe:{STRIPE_KEY}"
                return wrk(stack.sandbox_url, key, intents, ("/v1/refunds", ""), seconds)
            finally:
                webhook = {"url": f"{self.service_url}/webhooks/providers/stripe"}
                stack.sandbox_control(
                    "POST",
                    "webhook",
                    {**webhook, "secret": STRIPE_WEBHOOK_SECRET, "api_key": GATEWAY_KEY},
                )

        service(sizes.warmup_seconds)
        return self._dependency_pair("http_refund", "POST /payments/{id}/refunds", service, ceiling)

    def _dependency_pair(
        self,
        name: str,
        label: str,
        service: Callable[[float], loadgen.Load],
        ceiling: Callable[[float], loadgen.Load],
    ) -> dict[str, Any]:
        """One run of the emulator's own call (the ceiling), then one of the service."""
        seconds = self.sizes.post_seconds
        ceiling_load = _checked(
            self._ceiling_measured(name, self.stack.sandbox.pid, seconds, lambda: ceiling(seconds)),
            f"Stripe emulator ({label})",
        )
        say(f"  emulator alone: {ceiling_load.rps:.0f} req/s")
        service_load = _checked(
            self._serve_measured(name, seconds, lambda: service(seconds)), label
        )
        say(f"  {label}: {service_load.rps:.0f} req/s, p99 {service_load.p99_ms} ms")
        return {
            "service": service_load.as_dict(),
            "ceiling": ceiling_load.as_dict(),
            "ratio": round(service_load.rps / ceiling_load.rps, 3),
            "connections": self.sizes.post_connections,
            "cpu": {"service": self.cpu[name], "ceiling": self.cpu[f"{name}_ceiling"]},
            "database_pool": self.pool[name],
        }

    # --- gRPC ------------------------------------------------------------------------------

    @staticmethod
    def _grpc_check(target: str, payment_id: int, *, service: bool) -> None:
        """One GetPayment through the official grpcio client: the path h2load will load
        answers, and answers the right payment."""
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.PaymentsServiceStub(channel)
            reply = stub.GetPayment(
                pb.GetPaymentRequest(id=payment_id),
                metadata=[("x-request-id", "bench-grpc-check"), ("x-api-key", CALLER_KEY)],
                timeout=10,
            )
        if service and reply.payment.id != payment_id:
            raise BenchError(f"GetPayment answered payment {reply.payment.id}, not {payment_id}")

    def _grpc_outcomes(self, offset: int) -> tuple[int, int]:
        """(calls, calls that failed) of GetPayment in the service's access log after
        ``offset``. CANCELLED is no failure: h2load cuts the calls in flight when its
        time is up."""
        assert self.stack.service is not None
        with open(self.stack.service.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        route = "grpc /payments.PaymentsService/GetPayment "
        calls = text.count(route)
        fine = text.count(route + "OK") + text.count(route + "CANCELLED")
        return calls, calls - fine

    def grpc_get(self, payment_id: int) -> dict[str, Any]:
        sizes = self.sizes
        assert self.stack.service is not None
        service_log = self.stack.service.log_path
        service_target = self.stack.service.grpc_target
        self._grpc_check(service_target, payment_id, service=True)
        self._grpc_check(
            self.stack.ceiling_grpc_url.removeprefix("http://"), payment_id, service=False
        )
        message = pb.GetPaymentRequest(id=payment_id).SerializeToString()
        headers = [("x-api-key", CALLER_KEY), ("x-request-id", "bench-h2load")]
        path = "/payments.PaymentsService/GetPayment"

        def h2load(url: str, seconds: float) -> loadgen.Load:
            return loadgen.h2load_grpc(
                url + path,
                message,
                headers,
                seconds=seconds,
                clients=sizes.grpc_clients,
                streams=sizes.grpc_streams,
            )

        access_lines = self.stack.service_env.get("LOG_LEVEL", "info") in ("info", "debug")

        def service(seconds: float) -> loadgen.Load:
            offset = service_log.stat().st_size
            load = h2load(f"http://{service_target}", seconds)
            if access_lines:  # h2load sees HTTP 200 only: the gRPC status is in the log
                # A busy service writes the last access lines a while after h2load ends:
                # read until they are all there (a fixed 0.2 s was too short under load).
                deadline = time.monotonic() + 15
                calls, failed = self._grpc_outcomes(offset)
                while calls < load.requests and time.monotonic() < deadline:
                    time.sleep(0.1)
                    calls, failed = self._grpc_outcomes(offset)
                if calls < load.requests or failed:
                    raise BenchError(f"GetPayment: {failed} of {calls} calls failed (log)")
            return load

        def ceiling(seconds: float) -> loadgen.Load:
            return h2load(self.stack.ceiling_grpc_url, seconds)

        ceiling(sizes.warmup_seconds)
        service(sizes.warmup_seconds)
        seconds = sizes.load_seconds
        result = paired(
            sizes.rounds,
            lambda: self._ceiling_measured(
                "grpc_get", self.stack.ceiling_grpc.pid, seconds, lambda: ceiling(seconds)
            ),
            lambda: self._serve_measured("grpc_get", seconds, lambda: service(seconds)),
            "gRPC GetPayment",
        )
        result["clients"] = sizes.grpc_clients
        result["streams_per_client"] = sizes.grpc_streams
        result["cpu"] = {"service": self.cpu["grpc_get"], "ceiling": self.cpu["grpc_get_ceiling"]}
        result["database_pool"] = self.pool["grpc_get"]
        return result

    # --- status propagation ----------------------------------------------------------------

    def propagation(self) -> dict[str, Any]:
        """Payments completed at the emulator at a steady rate; per payment, from the
        first send of its signed ``checkout.session.completed`` to the arrival of its
        PAID callback."""
        sizes, stack = self.sizes, self.stack
        count = sizes.propagation_payments
        callback = f"{stack.receiver_url}/cb/propagation"
        payments = trio.run(
            clients.create_payments, self.service_url, CALLER_KEY, count, callback, "propagation"
        )
        by_hash = {p["provider_callback_hash"]: int(p["id"]) for p in payments}
        sessions = [str(p["provider_payment_id"]) for p in payments]
        stack.receiver_reset()
        deliveries_before = len(stack.sandbox_control("GET", "webhook/deliveries")["data"])
        say(f"  completing {count} checkouts at {sizes.propagation_rate:g}/s")
        started = time.monotonic()
        recording = self._profile_start(
            "propagation", self.service_pid, count / sizes.propagation_rate
        )
        meter = self._meter(serve=self.service_pid)
        trio.run(
            lambda: clients.complete_sessions(
                stack.sandbox_url, STRIPE_KEY, sessions, rate=sizes.propagation_rate
            )
        )
        # Until every one of these payments' PAID callbacks is in: the receiver's plain
        # count also takes late callbacks of earlier phases (the refunds' own), which
        # ended this wait before the last PAID ones came.
        ids = set(by_hash.values())

        def paid_arrived() -> int:
            records = stack.receiver_stats()["records"]
            return len({pid for _, pid, status in records if status == 10 and pid in ids})

        deadline = time.monotonic() + 30
        while paid_arrived() < count and time.monotonic() < deadline:
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        if recording is not None:
            recording.finish()
        deliveries = stack.sandbox_control("GET", "webhook/deliveries")["data"][deliveries_before:]
        sent: dict[int, float] = {}
        webhook_failures = 0
        for delivery in deliveries:
            if delivery["event_type"] != "checkout.session.completed":
                continue
            payment_id = by_hash.get(delivery["url"].rsplit("/", 1)[-1])
            if payment_id is None:
                continue
            if not (delivery["status"] and 200 <= delivery["status"] < 300):
                webhook_failures += 1
            sent[payment_id] = min(sent.get(payment_id, delivery["at"]), delivery["at"])
        arrived: dict[int, float] = {}
        for at, payment_id, status in stack.receiver_stats()["records"]:
            if status == 10 and payment_id in sent:
                arrived[payment_id] = min(arrived.get(payment_id, at), at)
        by_payment = {i: (arrived[i] - sent[i]) * 1000 for i in arrived}
        latencies = sorted(by_payment.values())
        first_sent = min(sent.values(), default=0.0)
        slowest = sorted(by_payment, key=by_payment.__getitem__, reverse=True)[:10]
        missing = count - len(latencies)
        if missing > 0:
            raise BenchError(f"status propagation: {missing} of {count} callbacks never arrived")
        return {
            "payments": count,
            "rate_per_s": sizes.propagation_rate,
            "seconds": round(elapsed, 2),
            "p50_ms": round(loadgen.percentile(latencies, 50), 2),
            "p90_ms": round(loadgen.percentile(latencies, 90), 2),
            "p99_ms": round(loadgen.percentile(latencies, 99), 2),
            "max_ms": round(latencies[-1], 2),
            "webhook_failures": webhook_failures,
            "cpu": cpu,
            # [payment id, seconds into the run its event was sent, latency ms]
            "slowest": [
                [i, round(sent[i] - first_sent, 3), round(by_payment[i], 1)] for i in slowest
            ],
        }

    # --- jobs ------------------------------------------------------------------------------

    def _timed_cli(self, args: list[str], profile: str | None = None) -> tuple[float, str]:
        """Run ``payments <args>`` as a deployment would; (wall seconds, its stdout).
        With ``profile``, its CPU shares go to ``self.cpu[profile]``."""
        env = self.stack.job_env(PAYMENTS_RECONCILE_RATE_PER_SECOND=JOB_RATE_LIMIT)
        meter = self._meter()
        job_cpu = children_cpu_seconds()
        started = time.monotonic()
        proc = self.stack.start_cli(args, env)
        recording = self._profile_start(profile, proc.pid, None) if profile else None
        stdout, stderr = proc.communicate(timeout=900)
        elapsed = time.monotonic() - started
        if recording is not None:
            recording.finish()
        if profile:
            # py-spy, when attached, is a child too: its share is in "job" then.
            self.cpu[profile] = meter.stop(job=children_cpu_seconds() - job_cpu)
        if proc.returncode != 0:
            raise BenchError(f"payments {' '.join(args)} exited {proc.returncode}:\n{stderr}")
        return elapsed, stdout.strip()

    def _job_result(
        self, name: str, items: int, wall: float, startup: float, summary: str
    ) -> dict[str, Any]:
        return {
            "items": items,
            "seconds": round(wall, 3),
            "items_per_s": round(items / wall, 1),
            "startup_s": round(startup, 3),
            "work_items_per_s": round(items / max(wall - startup, 1e-6), 1),
            "summary": summary,
            "cpu": self.cpu.get(name, {}),
        }

    def dispatch(self, sample: dict[str, Any]) -> dict[str, Any]:
        stack, count = self.stack, self.sizes.dispatch_items
        startup, _ = self._timed_cli(["callbacks", "dispatch"])  # nothing due: start-up cost
        url = f"{stack.receiver_url}/cb/dispatch"
        rows = clients.due_outbox_rows(count, url, sample, first_payment_id=10**9)
        trio.run(clients.insert_outbox, stack.db, rows)
        stack.receiver_reset()
        wall, summary = self._timed_cli(["callbacks", "dispatch"], "dispatch")
        received = stack.receiver_count()
        # At least ``count``: callbacks other phases left due (refunds' own, say) go out
        # in the same run; the rate below counts only the backlog's, so it errs low.
        if _summary_number(summary, "delivered") < count or received < count:
            raise BenchError(f"dispatch: {summary!r}; the receiver got {received} of {count}")
        return self._job_result("dispatch", count, wall, startup, summary)

    def _expired_sessions(self, count: int, age: timedelta) -> list[str]:
        """``count`` sessions made ``age`` ago with the service's ``expires_at`` (created +
        the 60 min pending timeout), which the emulator then closes on its own clock, as
        Stripe does: the emulator's clock is moved back while they are made."""
        stack = self.stack
        made_at = stack.sandbox_control("POST", "clock", {"offset_seconds": -age.total_seconds()})
        try:
            sessions = trio.run(
                lambda: clients.create_sessions(
                    stack.sandbox_url, STRIPE_KEY, count, expires_at=made_at["now"] + 3600
                )
            )
        finally:
            stack.sandbox_control("POST", "clock", {"offset_seconds": 0})
        deadline, wanted = time.monotonic() + 60, set(sessions)

        def closed() -> int:
            events = stack.sandbox_control("GET", "events")["data"]
            return sum(
                1
                for e in events
                if e["type"] == "checkout.session.expired" and e["data"]["object"]["id"] in wanted
            )

        while closed() < count:
            if time.monotonic() > deadline:
                raise BenchError("expiry: the emulator did not close the sessions")
            time.sleep(0.5)
        return sessions

    def expiry(self) -> dict[str, Any]:
        """Stale PENDING payments whose sessions Stripe already closed (expires_at), their
        events lost (webhooks off): the expirer concludes them in bulk."""
        stack, count = self.stack, self.sizes.expiry_items
        startup, _ = self._timed_cli(["expire", "pending"])
        sessions = self._expired_sessions(count, timedelta(hours=2))
        rows = clients.stale_payment_rows(
            "expiry",
            sessions,
            stack.service_env["PAYMENTS_PROVIDER_CALLBACK_BASE_URL"],
            f"{stack.receiver_url}/cb/expiry",
            created_ago=timedelta(hours=2),
            updated_ago=timedelta(hours=2),
        )
        trio.run(clients.insert_payments, stack.db, rows)
        wall, summary = self._timed_cli(["expire", "pending"], "expiry")
        if f"EXPIRED {count}" not in summary:
            raise BenchError(f"expiry: expected {count} expired: {summary!r}")
        return self._job_result("expiry", count, wall, startup, summary)

    def reconcile(self) -> dict[str, Any]:
        """Stale PENDING payments, half of them paid at the emulator while their event
        was lost (webhooks off): the reconciler moves those to PAID, touches the rest."""
        stack, count = self.stack, self.sizes.reconcile_items
        startup, _ = self._timed_cli(["reconcile"])
        sessions = trio.run(clients.create_sessions, stack.sandbox_url, STRIPE_KEY, count)
        paid = sessions[: count // 2]
        trio.run(lambda: clients.complete_sessions(stack.sandbox_url, STRIPE_KEY, paid))
        rows = clients.stale_payment_rows(
            "reconcile",
            sessions,
            stack.service_env["PAYMENTS_PROVIDER_CALLBACK_BASE_URL"],
            f"{stack.receiver_url}/cb/reconcile",
            created_ago=timedelta(minutes=30),
            updated_ago=timedelta(hours=1),
        )
        trio.run(clients.insert_payments, stack.db, rows)
        wall, summary = self._timed_cli(["reconcile"], "reconcile")
        if f"checked {count}," not in summary or f"PAID {len(paid)}" not in summary:
            raise BenchError(f"reconcile: expected {count} checked, {len(paid)} PAID: {summary!r}")
        return self._job_result("reconcile", count, wall, startup, summary)

    # --- the whole run ---------------------------------------------------------------------

    def all(self, results: dict[str, Any]) -> None:
        only, sizes, stack = self.options.only, self.sizes, self.stack
        pid = self.service_pid
        time.sleep(2 if sizes.name == "full" else 0.5)
        idle = memory(pid)
        mem: dict[str, Any] = {
            "idle_rss_mb": _mb(idle["VmRSS"]),
            "idle_peak_mb": _mb(idle["VmHWM"]),
        }
        results["memory"] = mem
        sampler = RssSampler(pid)
        try:
            say("seeding payments")
            seeded = trio.run(
                clients.create_payments,
                self.service_url,
                CALLER_KEY,
                sizes.seed_payments,
                f"{stack.receiver_url}/cb/seed",
                "seed",
            )
            ids = [int(p["id"]) for p in seeded]
            if "http_get" in only:
                say("HTTP GET /payments/{id} vs the trivial route")
                results["http_get"] = self.http_get(ids)
            if "http_post" in only:
                say("HTTP POST /payments vs the emulator's create")
                results["http_post"] = self.http_post()
            if "http_refund" in only:
                say("HTTP POST /payments/{id}/refunds vs the emulator's create-refund")
                results["http_refund"] = self.http_refund()
            if only & {"http_get", "http_post", "http_refund"}:
                mem["http_load_peak_mb"] = _mb(memory(pid)["VmHWM"])
                mem["http_load_sampled_peak_mb"] = _mb(sampler.peak_kb)
            if "grpc_get" in only:
                say("gRPC GetPayment vs the trivial purerpc method")
                results["grpc_get"] = self.grpc_get(ids[0])
            if "propagation" in only:
                say("status propagation")
                results["propagation"] = self.propagation()
            mem["end_peak_mb"] = _mb(memory(pid)["VmHWM"])
        finally:
            sampler.stop()
        code = stack.stop_service()
        if code != 0:
            raise BenchError(f"payments serve exited {code} on SIGTERM")
        stack.sandbox_control("DELETE", "webhook")  # the jobs' Stripe calls emit events
        if "dispatch" in only:
            say(f"jobs: dispatch {sizes.dispatch_items} callbacks")
            results["dispatch"] = self.dispatch(seeded[0])
        if "expiry" in only:
            say(f"jobs: expire {sizes.expiry_items} stale payments")
            results["expiry"] = self.expiry()
        if "reconcile" in only:
            say(f"jobs: reconcile {sizes.reconcile_items} payments")
            results["reconcile"] = self.reconcile()


def lookup(results: Mapping[str, Any], dotted: str) -> Any:
    """``results["a"]["b"]`` for ``"a.b"``; None when absent."""
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def run(options: Options) -> dict[str, Any]:
    """Run the scenarios; the results (also written to ``options.out`` as JSON)."""
    ensure_tools()
    began = time.monotonic()
    sizes = options.sizes
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": sizes.name,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_start": round(os.getloadavg()[0], 2),
        },
        "sizes": attrs.asdict(sizes),
        "overrides": dict(options.overrides),
        "job_rate_limit_per_s": float(JOB_RATE_LIMIT),
    }
    if results["machine"]["loadavg_start"] > 1.0:
        say(
            f"warning: the machine is busy (load average {results['machine']['loadavg_start']}"
            "): the ratios hold up, the absolute figures will be noisy"
        )
    say(f"starting the stack ({sizes.name} run)")
    with Stack.open(keep=options.keep, overrides=options.overrides) as stack:
        bench = Bench(stack, options)
        try:
            bench.all(results)
        finally:
            if bench.profiles:
                results["profiled"] = True
                results["profiles"] = bench.profiles
    results["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["seconds"] = round(time.monotonic() - began, 1)
    results["targets"] = {
        name: {"target": str(target), "value": value, "met": target.met(value)}
        for name, target in TARGETS.items()
        if (value := lookup(results, name)) is not None
    }
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def default_out(sizes: Sizes) -> Path:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    prefix = "" if sizes.name == "full" else f"{sizes.name}-"
    return RESULTS_DIR / f"{prefix}{day}.json"
