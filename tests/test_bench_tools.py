"""bench/tools.py: installing the load generators waits for another apt's dpkg lock."""

from __future__ import annotations

import subprocess

from bench.tools import APT_LOCK_TIMEOUT_S, apt_command


def test_apt_waits_for_the_dpkg_lock_and_apt_accepts_the_option() -> None:
    command = apt_command(["-s", "install", "wrk"])
    assert command[:3] == ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"]
    assert APT_LOCK_TIMEOUT_S >= 60
    # A simulated install takes no lock and parses the option like the real one.
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
