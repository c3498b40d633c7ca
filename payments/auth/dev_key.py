"""The dev API key of the loopback-only profiles: one key, kept in a file beside the
SQLite database, so curl examples keep working across restarts.

It lives with the other key sources because it is one: checked by local_keys like any
local key, for the caller service :data:`DEV_SERVICE`. payments.profile decides when it
is used (only with stand-ins, which bind loopback only).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from payments.auth.local_keys import KeyEntry
from payments.config import ConfigError

DEV_SERVICE = "dev"
DEV_KEY_FILE = "dev-api-key"


def dev_key_path(sqlite_path: str) -> Path:
    """Where the dev key is kept: beside the SQLite database, so one ``var/`` holds all
    of a developer's state."""
    return Path(sqlite_path).parent / DEV_KEY_FILE


def load_or_create_dev_key(path: Path) -> str:
    """The dev API key: made once and kept (mode 0600). Raises ConfigError naming the
    file when it can be neither read nor written."""
    try:
        key = path.read_text().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the dev API key ({exc.strerror})") from None
    key = "dev_" + secrets.token_urlsafe(24)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the dev API key ({exc.strerror})") from None
    return key


def dev_key_entry(key: str, access: Sequence[str]) -> KeyEntry:
    """The dev key as a local key of :data:`DEV_SERVICE`, allowed ``access``."""
    return KeyEntry.from_key(key, DEV_SERVICE, access, "dev key")
