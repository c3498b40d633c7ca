"""Optional profiles of the measured processes with py-spy (``--profile-dir``).

py-spy is not a project dependency: install it anywhere (``pip install py-spy`` in any
virtualenv) and put it on PATH, or name it with ``BENCH_PY_SPY``. Profiles are py-spy's
"raw" format (folded stacks, one ``frame;frame;... count`` per line), which
flamegraph.pl or speedscope read, and which ``python -m bench.pyspy FILE`` sums up:
the frames with the most samples of their own, and those on the most stacks.

Sampling pauses the process briefly at each sample (about 1% at 100 Hz), so a profiled
run's figures are flagged ``"profiled": true`` in the results.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RATE_HZ = 100


def py_spy() -> str:
    found = os.environ.get("BENCH_PY_SPY") or shutil.which("py-spy")
    if not found:
        raise RuntimeError(
            "--profile-dir needs py-spy: `pip install py-spy` into any virtualenv and put it "
            "on PATH (or set BENCH_PY_SPY to its path)"
        )
    return found


class Recording:
    """``py-spy record`` attached to ``pid`` until :meth:`finish` (or the process ends,
    or ``seconds`` pass)."""

    def __init__(self, pid: int, out: Path, seconds: float | None = None) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        command = [py_spy(), "record", "-p", str(pid), "-r", str(RATE_HZ), "-f", "raw"]
        command += ["-o", str(out)]
        if seconds is not None:
            command += ["-d", str(max(1, round(seconds)))]
        self._proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def finish(self, timeout: float = 60) -> Path:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(2)  # SIGINT: py-spy writes what it has
            self._proc.wait(10)
        return self.out


# --- reading a profile -----------------------------------------------------------------------

_LINE = re.compile(r":\d+\)$")


def _frame(frame: str) -> str:
    return _LINE.sub(")", frame)


def summarize(path: Path, top: int = 30) -> str:
    """The frames with the most samples of their own (self) and on the most stacks
    (inclusive), as percentages of all samples; line numbers folded away."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples", "", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pyspy", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    for path in args.files:
        print(summarize(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
