"""Write-through persistence of the emulator's account: one SQLite row per object.

Why: the embedded profile hands out checkout URLs and object ids that must outlive the
process, including a ``kill -9``. Rewriting a whole snapshot costs time in proportion to
history and loses whatever changed since the last write; instead every request's
changes (the objects it touched, the events it emitted, its idempotency record) are
upserted in one transaction that commits before the answer is sent
(:meth:`payments.sandbox.state.StripeState.flush`). The cost of a change is the rows it
touched, whatever the size of the account.

WAL with ``synchronous=NORMAL``: a committed transaction is in the operating system's
hands, so it survives the process being killed (not a power cut, which a development
sandbox does not need to survive).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from payments.sandbox.state import StripeState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq  INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);
"""


class SandboxStore:
    """The rows behind one :class:`~payments.sandbox.state.StripeState`."""

    def __init__(self, path: Path | str, *, busy_timeout_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are opened explicitly in write().
        self._db = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout_seconds,
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def objects(self) -> Iterator[tuple[str, str, Any]]:
        """Every stored object as ``(kind, id, value)``."""
        for kind, key, body in self._db.execute("SELECT kind, id, body FROM objects"):
            yield kind, key, json.loads(body)

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, oldest first."""
        rows = self._db.execute("SELECT body FROM events ORDER BY seq")
        return [json.loads(body) for (body,) in rows]

    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM objects LIMIT 1").fetchone() is None

    def write(self, rows: Iterable[tuple[str, str, str]], events: Iterable[str]) -> None:
        """Upsert ``(kind, id, json)`` rows and append events, all or nothing."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO objects (kind, id, body) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                rows,
            )
            db.executemany("INSERT INTO events (body) VALUES (?)", ((e,) for e in events))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def clear(self) -> None:
        """Forget everything (the control API's reset)."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM objects")
        self._db.execute("DELETE FROM events")
        self._db.execute("COMMIT")


def persistent_state(
    path: Path | str, secret_key: str, *, legacy: Path | None = None
) -> StripeState:
    """A :class:`~payments.sandbox.state.StripeState` backed by the SQLite file ``path``.

    ``legacy``: a ``sandbox.json`` snapshot written by earlier versions, imported once
    into an empty store and then renamed ``*.imported`` so it is not read again.
    """
    state = StripeState(secret_key)
    store = SandboxStore(path)
    if legacy is not None and legacy.exists() and store.is_empty():
        state.restore(json.loads(legacy.read_text()))
        state.attach(store)
        legacy.replace(legacy.with_name(legacy.name + ".imported"))
    else:
        state.attach(store)
    return state
