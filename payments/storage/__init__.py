"""Storage: one repository contract, two backends (MySQL/MariaDB and SQLite).

The service owns transactions (``db.transaction()``); the repository functions take
the connection they run on and never commit by themselves. ``open_database`` picks the
backend from the settings (see database.py).
"""

from payments.storage.database import (
    Connection,
    Database,
    DatabaseStartupError,
    DuplicateKey,
    PoolStats,
    open_database,
)
from payments.storage.pool import Pool
from payments.storage.sqlite import SqliteDatabase

__all__ = [
    "Connection",
    "Database",
    "DatabaseStartupError",
    "DuplicateKey",
    "Pool",
    "PoolStats",
    "SqliteDatabase",
    "open_database",
]
