"""MySQL/MariaDB storage: the connection pool, the repository and schema migration.

The service owns transactions (``pool.transaction()``); the repository functions take
the connection they run on and never commit by themselves.
"""

from payments.storage.pool import Connection, DuplicateKey, Pool, PoolStats

__all__ = ["Connection", "DuplicateKey", "Pool", "PoolStats"]
