"""Sizes of a benchmark run: ``FULL`` for ``make bench``, ``QUICK`` for ``make bench-quick``
(the same code with tiny sizes, a smoke test for CI), and the targets (issue 5; the
dispatch and propagation p99 ones: issue 11)."""

from __future__ import annotations

import attrs


@attrs.frozen
class Sizes:
    name: str
    # HTTP GET and gRPC GetPayment: ``rounds`` pairs of (ceiling, service) runs of
    # ``load_seconds`` each, alternating so that a noisy neighbour hits both sides.
    rounds: int
    load_seconds: float
    warmup_seconds: float
    connections: int  # wrk connections; h2load clients x streams gives the same total
    grpc_clients: int
    grpc_streams: int
    # HTTP POST /payments (each request a new payment and a Stripe call)
    post_seconds: float
    post_connections: int
    seed_payments: int  # payments GET / GetPayment cycle through
    # HTTP POST /payments/{id}/refunds: 1-cent refunds cycling over this many PAID
    # payments (refunds of one payment queue on its row lock; spread like real traffic)
    refund_payments: int
    # status propagation: payments completed at the emulator at ``propagation_rate`` / s
    propagation_payments: int
    propagation_rate: float
    # jobs
    dispatch_items: int
    expiry_items: int
    reconcile_items: int


FULL = Sizes(
    name="full",
    rounds=3,
    load_seconds=10,
    warmup_seconds=3,
    connections=32,
    grpc_clients=4,
    grpc_streams=8,
    post_seconds=10,
    post_connections=16,
    seed_payments=200,
    refund_payments=50,
    propagation_payments=1000,
    propagation_rate=50,
    dispatch_items=10_000,
    expiry_items=10_000,
    reconcile_items=1000,
)

QUICK = Sizes(
    name="quick",
    rounds=1,
    load_seconds=1,
    warmup_seconds=1,
    connections=8,
    grpc_clients=2,
    grpc_streams=4,
    post_seconds=1,
    post_connections=4,
    seed_payments=10,
    refund_payments=4,
    propagation_payments=30,
    propagation_rate=60,
    dispatch_items=200,
    expiry_items=100,
    reconcile_items=40,
)

SIZES = {sizes.name: sizes for sizes in (FULL, QUICK)}


@attrs.frozen
class Target:
    """``value <op> bound`` must hold; ``op`` is ">=", "<=" or "<"."""

    op: str
    bound: float

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.bound
        return value <= self.bound if self.op == "<=" else value < self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


TARGETS: dict[str, Target] = {
    "http_get.ratio": Target(">=", 0.6),
    "grpc_get.ratio": Target(">=", 0.6),
    "propagation.p50_ms": Target("<", 50),
    "propagation.p99_ms": Target("<=", 9.9),  # issue 11
    "dispatch.items_per_s": Target(">=", 937),  # issue 11
    "expiry.items_per_s": Target(">=", 2000),
    "reconcile.items_per_s": Target(">=", 200),
    "memory.http_load_peak_mb": Target("<", 150),
}
