"""The one table a run prints (and bench/README.md shows): each figure, its ceiling
measured in the same run, their ratio, the target and whether it was met."""

from __future__ import annotations

from typing import Any

from bench.config import TARGETS


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _target(name: str, results: dict[str, Any]) -> tuple[str, str]:
    entry = results.get("targets", {}).get(name)
    if entry is None:
        return (str(TARGETS[name]) if name in TARGETS else "", "")
    return entry["target"], "met" if entry["met"] else "MISSED"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """[figure, value, ceiling, ratio, target, verdict] per line."""
    out: list[list[str]] = []

    def load_rows(key: str, label: str, ceiling_label: str) -> None:
        figure = results.get(key)
        if not figure:
            return
        service, ceiling = figure["service"], figure["ceiling"]
        target, verdict = _target(f"{key}.ratio", results)
        out.append(
            [
                f"{label} req/s",
                _fmt(service["rps"]),
                f"{_fmt(ceiling['rps'])} ({ceiling_label})",
                _fmt(figure["ratio"], 2),
                target,
                verdict,
            ]
        )
        out.append(
            [
                f"{label} p50 / p99 ms",
                f"{_fmt(service['p50_ms'], 1)} / {_fmt(service['p99_ms'], 1)}",
                f"{_fmt(ceiling['p50_ms'], 1)} / {_fmt(ceiling['p99_ms'], 1)}",
                "",
                "",
                "",
            ]
        )

    load_rows("http_get", "HTTP GET /payments/{id}", "trivial route")
    load_rows("http_post", "HTTP POST /payments", "emulator create alone")
    load_rows("http_refund", "HTTP POST /payments/{id}/refunds", "emulator refund alone")
    load_rows("grpc_get", "gRPC GetPayment", "trivial purerpc method")
    prop = results.get("propagation")
    if prop:
        for pct in ("p50", "p99"):
            target, verdict = _target(f"propagation.{pct}_ms", results)
            out.append(
                [
                    f"status propagation {pct} ms",
                    _fmt(prop[f"{pct}_ms"], 1),
                    "",
                    "",
                    target,
                    verdict,
                ]
            )
    for key, label in (
        ("dispatch", "dispatch callbacks/s"),
        ("expiry", "expiry payments/s"),
        ("reconcile", "reconcile payments/s"),
    ):
        job = results.get(key)
        if job:
            target, verdict = _target(f"{key}.items_per_s", results)
            out.append(
                [
                    f"{label} ({_fmt(job['items'])})",
                    _fmt(job["items_per_s"]),
                    "",
                    "",
                    target,
                    verdict,
                ]
            )
    mem = results.get("memory")
    if mem:
        out.append(["serve RSS idle MB", _fmt(mem["idle_rss_mb"], 1), "", "", "", ""])
        target, verdict = _target("memory.http_load_peak_mb", results)
        out.append(
            [
                "serve peak RSS under HTTP load MB",
                _fmt(mem.get("http_load_peak_mb"), 1),
                "",
                "",
                target,
                verdict,
            ]
        )
    return out


HEADER = ["figure", "value", "ceiling (same run)", "ratio", "target", ""]


def table(results: dict[str, Any]) -> str:
    """A Markdown table (readable as plain text too)."""
    body = rows(results)
    widths = [max(len(row[i]) for row in [HEADER, *body]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), rule, *(line(row) for row in body)])


def notes(results: dict[str, Any]) -> str:
    """The conditions of the run, under the table."""
    parts = [f"{results.get('mode', '?')} run of {results.get('date', '?')}"]
    machine = results.get("machine", {})
    parts.append(f"{machine.get('cpus')} CPUs, Python {machine.get('python')}")
    if "http_get" in results:
        parts.append(f"wrk {results['http_get']['connections']} connections")
    if "grpc_get" in results:
        grpc = results["grpc_get"]
        parts.append(f"h2load {grpc['clients']} x {grpc['streams_per_client']} streams")
    if "propagation" in results:
        prop = results["propagation"]
        parts.append(f"propagation {prop['payments']} payments at {prop['rate_per_s']:g}/s")
    if "seconds" in results:
        parts.append(f"{results['seconds']:.0f} s in all")
    lines = ["; ".join(parts)]
    cpu = cpu_line(results)
    if cpu:
        lines.append(cpu)
    return "\n".join(lines)


def cpu_line(results: dict[str, Any]) -> str:
    """Whose CPU each figure used (1.0 = one core busy): CPU-bound or waiting?"""
    parts = []
    for key, label, process in (
        ("http_get", "GET", "serve"),
        ("http_post", "POST", "serve"),
        ("http_refund", "refund", "serve"),
        ("grpc_get", "gRPC", "serve"),
        ("propagation", "propagation", "serve"),
        ("dispatch", "dispatch", "job"),
        ("expiry", "expiry", "job"),
        ("reconcile", "reconcile", "job"),
    ):
        cpu = (results.get(key) or {}).get("cpu") or {}
        if "service" in cpu:
            ceiling = cpu.get("ceiling", {}).get("ceiling")
            text = f"{label} {process} {cpu['service'].get(process, 0):.2f}"
            if ceiling is not None:
                text += f" (ceiling {ceiling:.2f})"
            parts.append(text)
        elif process in cpu:
            parts.append(f"{label} {process} {cpu[process]:.2f}")
    return "CPU, 1.0 = one core: " + ", ".join(parts) if parts else ""
