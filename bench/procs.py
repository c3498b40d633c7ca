"""The processes around a benchmark run: each started with an explicit environment and
a scratch working directory (no stray ``.env``), its output in a log file there, and
stopped by its own pid.

* :class:`Announced` - a helper process that prints ``... listening on <where>`` once
  it accepts connections (the Stripe emulator, the Auth server, the receiver, the
  ceiling servers);
* ``payments serve`` itself is started as the e2e tests start it
  (e2e.harness.start_service), on the ports of its environment;
* :func:`memory` - a process's VmRSS / VmHWM from ``/proc/<pid>/status``, and
  :class:`RssSampler`, which follows VmRSS in a thread.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

from e2e.harness import base_env

REPO = Path(__file__).resolve().parent.parent


class ProcessError(RuntimeError):
    """A process did not start, or failed."""


def bench_env(home: Path) -> dict[str, str]:
    """The e2e children's environment, plus the checkout on PYTHONPATH: the helper
    processes run ``python -m bench.<module>`` from a scratch directory."""
    return {**base_env(home), "PYTHONPATH": str(REPO)}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Announced:
    """A process that prints ``<name> listening on <where>`` on stdout when ready."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        workdir: Path,
        *,
        timeout: float = 20,
    ) -> None:
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            list(args),
            env=dict(env),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.where = self._wait_for_line(timeout)

    def _wait_for_line(self, timeout: float) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            found.append(self.proc.stdout.readline().strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        line = found[0] if found else ""
        _, marker, where = line.partition(" listening on ")
        if not marker:
            self.kill()
            raise ProcessError(
                f"{self.name} did not start (first line {line!r}):\n{_tail(self.log_path)}"
            )
        # Drain anything else it prints so a full pipe never blocks it.
        threading.Thread(target=self._drain, daemon=True).start()
        return where

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for _ in self.proc.stdout:
                pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


class RssSampler:
    """Follows a process's VmRSS every ``interval`` seconds in a thread; ``peak_kb``
    is the largest value seen since the last :meth:`reset`."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = memory(self.pid).get("VmRSS", 0)
            except OSError:
                return
            self.peak_kb = max(self.peak_kb, rss)

    def reset(self) -> None:
        self.peak_kb = 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class PoolSampler:
    """Polls ``/healthz`` of ``payments serve`` in a thread and keeps the largest
    ``database_pool`` figures seen (in use, waiting for a connection) and the count of
    connections opened meanwhile: whether the pool, not the CPU, is what limits."""

    def __init__(self, healthz_url: str, interval: float = 0.25) -> None:
        self.url = healthz_url
        self.interval = interval
        self.max_in_use = 0
        self.max_waiting = 0
        self._opened: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    pool = client.get(self.url).json().get("database_pool") or {}
                    self.max_in_use = max(self.max_in_use, int(pool.get("in_use", 0)))
                    self.max_waiting = max(self.max_waiting, int(pool.get("waiting", 0)))
                    if "opened_total" in pool:
                        self._opened.append(int(pool["opened_total"]))
                self._stop.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(10)
        opened = self._opened[-1] - self._opened[0] if len(self._opened) > 1 else 0
        return {
            "max_in_use": self.max_in_use,
            "max_waiting": self.max_waiting,
            "connections_opened": opened,
        }


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # after the command name: state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children so far (a job command's, read
    around its run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_pid(command_name: str) -> int | None:
    """The pid of a running process by its command name (``mariadbd``), if any."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() == command_name:
                    return int(entry)
    return None


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (not idle, not waiting for I/O)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICKS


class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`, as
    shares of the wall-clock time: 1.0 is one core busy the whole time. ``machine`` is
    the whole machine's busy share (2.0 = both cores of a 2-core machine): what it has
    beyond the named processes and the load generator is someone else's."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._start: dict[str, float] = {}
        self._machine = 0.0
        self._began = 0.0

    def start(self) -> CpuMeter:
        self._began = time.monotonic()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy_seconds()
        return self

    def stop(self, **extra_cpu_seconds: float) -> dict[str, float]:
        wall = max(time.monotonic() - self._began, 1e-6)
        used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        used.update(extra_cpu_seconds)
        used["machine"] = machine_busy_seconds() - self._machine
        return {name: round(seconds / wall, 2) for name, seconds in used.items()}


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


__all__ = [
    "REPO",
    "Announced",
    "CpuMeter",
    "PoolSampler",
    "ProcessError",
    "RssSampler",
    "bench_env",
    "children_cpu_seconds",
    "cpu_seconds",
    "find_pid",
    "memory",
    "python_module",
]
