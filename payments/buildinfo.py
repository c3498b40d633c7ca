"""What `payments version` prints: version, git commit and build time.

`make install`/`make install-dev` write payments/_build.json from git; a checkout
without it falls back to asking git now, and says "unknown" when that fails too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from payments import __version__

_BUILD_FILE = Path(__file__).with_name("_build.json")


def build_info() -> dict[str, str]:
    info = {"version": __version__, "commit": "unknown", "build_time": "unknown"}
    try:
        info.update(json.loads(_BUILD_FILE.read_text()))
    except (OSError, ValueError):
        info["commit"] = _git_commit()
    info["version"] = __version__
    return info


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607  (git from PATH, fixed arguments)
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"
