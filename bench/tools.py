"""The load generators: wrk (HTTP/1.1) and h2load (HTTP/2, package nghttp2-client),
both from Debian. :func:`ensure_tools` installs whichever is missing (as root, with
apt-get) and fails loudly when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess

# executable -> Debian package
TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client"}
# Seconds apt-get waits for the dpkg lock held by another apt process.
APT_LOCK_TIMEOUT_S = 300


class ToolError(RuntimeError):
    """A load generator is missing and could not be installed."""


def missing_tools() -> list[str]:
    return [name for name in TOOLS if shutil.which(name) is None]


def apt_command(args: list[str]) -> list[str]:
    """apt-get with ``args``, waiting for the dpkg lock: another process on a shared
    machine may be installing something, and that is no reason to fail."""
    return ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}", *args]


def _apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    command = apt_command(args)
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolError(
                f"{', '.join(missing_tools())} missing; install them as root: "
                f"apt-get install -y {' '.join(TOOLS.values())}"
            )
        command = ["sudo", "-n", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False)


def ensure_tools() -> None:
    """Install wrk and nghttp2-client if missing; raise ToolError when that fails."""
    missing = missing_tools()
    if not missing:
        return
    packages = sorted({TOOLS[name] for name in missing})
    done = _apt(["install", "-y", "-q", *packages])
    if done.returncode != 0:
        _apt(["update", "-q"])
        done = _apt(["install", "-y", "-q", *packages])
    still = missing_tools()
    if still:
        raise ToolError(
            f"could not install {' '.join(packages)} (apt-get exited {done.returncode}):\n"
            f"{done.stderr[-2000:]}"
        )
