"""Make purerpc 0.8 importable beside h2 >= 4.3.

purerpc 0.8.0 (the latest release) refers to ``h2.events.PingAcknowledged``, which h2 4
renamed ``PingAckReceived``; hypercorn 0.18 needs h2 >= 4.3. Aliasing the old name is
all purerpc needs (tests/test_purerpc_compat.py proves a server and client talk). Import
this module before purerpc; ``payments/__init__.py`` does so for the whole package.
Also here: keeping hpack's header logging quiet, for every module that speaks HTTP/2.
"""

import logging

import h2.events

if not hasattr(h2.events, "PingAcknowledged"):
    h2.events.PingAcknowledged = h2.events.PingAckReceived  # type: ignore[attr-defined]


def quiet_header_logging() -> None:
    """Keep hpack's DEBUG lines out of the log whatever LOG_LEVEL says: hpack logs every
    header it encodes or decodes, value included, so ``x-api-key`` (ours and callers')
    would reach the log verbatim. Called on import by the modules that speak HTTP/2."""
    hpack_log = logging.getLogger("hpack")
    if hpack_log.level < logging.INFO:  # NOTSET (0) would follow the root down to DEBUG
        hpack_log.setLevel(logging.INFO)
