"""How an operation speaks to a backend: statements (``Stmt``) and their kinds, the
``Dialect`` a backend's SQL differs by, and the JSON the store's columns hold.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pydantic_core

from tether._store.changes import Change

ONE, ALL, EXEC, WRITE, MANY, TOUCH = "one", "all", "exec", "write", "many", "touch"


@dataclass(frozen=True, slots=True)
class Stmt:
    """One statement. ``kind``: ONE -> a row or None, ALL -> rows, EXEC -> rowcount,
    WRITE and MANY -> nothing (MANY: ``params`` is a list of parameter tuples). The
    operation does not read the outcome of a WRITE or MANY (an INSERT, UPDATE or DELETE),
    so a backend may hold it back and send it with the next ones in one round trip, as
    long as it runs before any other statement and before the operation's value is
    returned (so its errors are the operation's). TOUCH is no statement:
    it tells the driver which kinds of work (``params``, a ``Change``) the commit makes
    available, so that it wakes the right waiters.

    ``alone``: if this is the operation's first statement, a server backend may run it
    by itself, with no BEGIN and COMMIT round trips. The operation promises that if the
    statement changes anything, only reads follow it (the rest, when it changes
    nothing, runs in a transaction of its own), and that the operation is safe to run
    again after it committed: a connection lost while it is out leaves that unknown,
    and the backend runs the operation again."""

    kind: str
    sql: str
    params: Any = ()
    alone: bool = False
    notify: int = 0
    """With ``alone``: the kinds of work (``Change``) the statement makes available
    when it commits by itself. A server backend may announce them from within the
    statement, at ``NOTIFY_MARK`` (which ends its select list), instead of after it."""
    writes: bool = False
    """A SELECT that writes (it calls a function that does): not to be taken for a read."""


NOTIFY_MARK = "/*notify*/"
"""Where a lone statement's wake-up may go (an SQL comment: backends that do not use
it leave it as it is)."""

T = TypeVar("T")

Op = Generator[Stmt, Any, T]
"""An operation: yields statements, receives their results, returns its value."""


def touch(changes: Change) -> Stmt:
    return Stmt(TOUCH, "", int(changes))


class LeaseAndRead:
    """An operation that leases rows (``lease``, under a token made once per call)
    and reads them back (``read``), or does both in one call (``together``, where the
    backend has a function for it: one round trip to a server instead of two). On a
    server the lease commits by itself (``Stmt.alone``), so an attempt repeated after
    a failed read-back first reads what an earlier attempt leased, instead of leasing
    more rows and stranding those until their lease runs out."""

    __slots__ = ("attempts", "lease", "read", "together")

    def __init__(self, lease: Stmt, read: Stmt, together: Stmt | None = None) -> None:
        self.lease = lease
        self.read = read
        self.together = together
        self.attempts = 0

    def __call__(self) -> Op[list[Any]]:
        self.attempts += 1
        rows: list[Any]
        if self.attempts > 1:
            rows = yield self.read
            if rows:
                return rows
        if self.together is not None:
            rows = yield self.together
            return rows
        if not (yield self.lease):
            return []
        rows = yield self.read
        return rows


@dataclass(frozen=True)
class Dialect:
    """What differs between backends' SQL."""

    row_locks: bool
    """Whether claims must lock rows (concurrent writers) or writes are serialized anyway."""
    json_functions: Literal["jsonb", "json1"]
    """How JSON text columns are read: PostgreSQL's ``jsonb`` or SQLite's ``json1``."""
    writes_in_with: bool = False
    """Whether ``WITH`` may hold INSERT/UPDATE/DELETE: dependent writes in one statement
    (one round trip to a server instead of several)."""
    claim_functions: bool = False
    """Whether the schema's functions that lease tasks and read them back in one call
    (``tether_claim_workflow_tasks``, ``tether_claim_activity_tasks``) may be called."""
    completion_functions: bool = False
    """Whether the schema's functions that complete many workflow tasks in one call
    (``tether_close_runs``, ``tether_complete_waiting_tasks``) may be called."""

    def json_field_equals(self, column: str, key: str, value: Any) -> tuple[str, list[Any]]:
        """A condition (and its parameters): the JSON object in text ``column`` has ``key``
        equal to the string, number or boolean ``value`` (numbers compare as numbers)."""
        if self.json_functions == "jsonb":
            return f"({column}::jsonb -> ?) = ?::jsonb", [key, dumps(value)]
        path = "$." + dumps(key)
        if isinstance(value, bool):
            return f"json_type({column}, ?) = ?", [path, "true" if value else "false"]
        kinds = "'text'" if isinstance(value, str) else "'integer', 'real'"
        return (
            f"json_type({column}, ?) IN ({kinds}) AND json_extract({column}, ?) = ?",
            [path, path, value],
        )

    def skip_locked(self, alias: str) -> str:
        """Suffix for a claim query so concurrent claimers take different rows."""
        return f"FOR UPDATE OF {alias} SKIP LOCKED" if self.row_locks else ""

    def for_update(self) -> str:
        """Suffix for a read whose row must not change before the transaction ends."""
        return "FOR UPDATE" if self.row_locks else ""


def dumps(value: Any) -> str:
    # pydantic-core's JSON (Rust) is several times faster than the json module's, and
    # like it keeps big integers, NaN and infinities.
    return pydantic_core.to_json(value, inf_nan_mode="constants").decode()


def parse_json(text: str) -> Any:
    try:
        return pydantic_core.from_json(text, allow_inf_nan=True)
    except ValueError:
        # pydantic-core stops at 200 levels of nesting; what was written must read back.
        return json.loads(text)


def loads(text: str | None) -> Any:
    return None if text is None else parse_json(text)
