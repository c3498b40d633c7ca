"""Which backend the settings choose, opened without I/O (the runtime's one call).

Kept out of the contract (database.py) so that importing the contract, as the service
and the repositories do, loads no driver; each backend module is imported only when it
is the one chosen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from payments.config import Settings
from payments.storage.database import Database

# The setting that names the SQLite file when MYSQL_DSN is not set (Settings.sqlite_path).
SQLITE_PATH_VARIABLE = "PAYMENTS_SQLITE_PATH"
DEFAULT_SQLITE_PATH = Path("var") / "payments.db"


def sqlite_path_from(value: str | os.PathLike[str] | None) -> Path:
    """The SQLite file a PAYMENTS_SQLITE_PATH value names ('' or None: the default)."""
    text = os.fspath(value).strip() if value is not None else ""
    return Path(text).expanduser() if text else DEFAULT_SQLITE_PATH


def open_database(
    settings: Settings,
    *,
    sqlite_path: str | os.PathLike[str] | None = None,
    **sqlite_options: Any,
) -> Database:
    """The database the settings choose: MySQL when MYSQL_DSN is set, else SQLite.

    No I/O here (like ``Pool.from_settings``). MySQL: the pool from the MYSQL_*
    settings; sessions connect on demand and the schema is ``payments migrate``'s job.
    SQLite: the file at ``sqlite_path`` if given, else PAYMENTS_SQLITE_PATH
    (``settings.sqlite_path``; default ``./var/payments.db``). Its first checkout opens,
    checks and migrates it, so start with ``await migrate(db)`` (or
    ``await db.start()``): a corrupt, locked or unwritable file then stops the start
    with :class:`~payments.storage.database.DatabaseStartupError`. ``sqlite_options`` go to
    :class:`~payments.storage.sqlite.SqliteDatabase` (busy_timeout, ...).
    """
    if settings.mysql_dsn is not None:
        from payments.storage.pool import Pool

        return Pool.from_settings(settings)
    from payments.storage.sqlite import SqliteDatabase

    path = sqlite_path if sqlite_path is not None else settings.sqlite_path
    sqlite_options.setdefault("query_timeout", settings.db_query_timeout_seconds)
    return SqliteDatabase(sqlite_path_from(path), **sqlite_options)
