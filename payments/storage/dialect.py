"""The SQL that differs between MySQL/MariaDB and SQLite, in one place.

The repositories write plain SQL with ``%s`` placeholders (both connections take that
style; SQLite's rewrites it to ``?``) and ask the connection's :class:`Dialect` for the
few pieces whose spelling or meaning differs. Everything else is the common subset both
engines run unchanged; the contract suite (tests/test_storage_contract.py) runs every
repository function on both to keep it so.

Chosen over translating MySQL text inside the SQLite connection: a reader sees at the
call site that a read locks its row and how, and nothing rewrites SQL behind the
repositories' backs (a regex over ``UNION`` branches would be fragile).

Why the SQLite renderings are right for the SQLite profile: it is one process with one
connection, every transaction starts with ``BEGIN IMMEDIATE`` and holds the database's
single write lock to its end. That lock is stronger than any row lock, so
``FOR UPDATE`` has nothing left to add, and ``SKIP LOCKED`` has nothing to skip: no
other writer can be inside a transaction at the same time.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Dialect:
    """How one engine spells the constructs its SQL does not share with the other."""

    name: str
    # Appended to a SELECT that must lock the rows it reads until the transaction ends.
    for_update: str
    # The same for claims: rows another transaction holds are skipped, not waited for.
    for_update_skip_locked: str
    # Whether ``FORCE INDEX (...)`` is understood (index hints for locking reads).
    index_hints: bool
    # Whether a compound SELECT member may be a parenthesized SELECT with its own
    # ORDER BY / LIMIT (MySQL); SQLite needs it wrapped as a subquery instead.
    parenthesized_branches: bool

    def force_index(self, index: str) -> str:
        """`` FORCE INDEX (index)`` after a table name, or nothing where unsupported."""
        return f" FORCE INDEX ({index})" if self.index_hints else ""

    def greatest(self, *expressions: str) -> str:
        """The largest of the expressions (NULL if any is NULL, on both engines)."""
        function = "GREATEST" if self.name == "mysql" else "MAX"
        return f"{function}({', '.join(expressions)})"

    def limited_branch(self, select: str) -> str:
        """One member of a ``UNION ALL`` that has its own ORDER BY and LIMIT."""
        if self.parenthesized_branches:
            return f"({select})"
        return f"SELECT * FROM ({select})"  # noqa: S608 - SQL text, not values


MYSQL = Dialect(
    name="mysql",
    for_update=" FOR UPDATE",
    for_update_skip_locked=" FOR UPDATE SKIP LOCKED",
    index_hints=True,
    parenthesized_branches=True,
)

SQLITE = Dialect(
    name="sqlite",
    for_update="",
    for_update_skip_locked="",
    index_hints=False,
    parenthesized_branches=False,
)
