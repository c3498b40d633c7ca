"""The production runtime does not load the Stripe emulator: only a profile that runs it
(the embedded sandbox) imports it, when its child starts."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_runtime_leaves_the_sandbox_unloaded() -> None:
    # A fresh interpreter: this test process has imported the sandbox already.
    probe = (
        "import sys, payments.runtime, payments.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('payments.sandbox')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
