"""Make purerpc 0.8 importable beside h2 >= 4.3.

purerpc 0.8.0 (the latest release) refers to ``h2.events.PingAcknowledged``, which h2 4
renamed ``PingAckReceived``; hypercorn 0.18 needs h2 >= 4.3. Aliasing the old name is
all purerpc needs (tests/test_purerpc_compat.py proves a server and client talk). Import
this module before purerpc; ``payments/__init__.py`` does so for the whole package.
"""

import h2.events

if not hasattr(h2.events, "PingAcknowledged"):
    h2.events.PingAcknowledged = h2.events.PingAckReceived  # type: ignore[attr-defined]

from payments import h2_streams  # after the alias: the wrap patches the same h2

h2_streams.install()
