"""The store's domain logic, written once in portable SQL for every backend.

Each operation is a generator that yields statements and receives their results
("sans-IO"), so the same code runs on a blocking SQLite connection in a thread and
on an async PostgreSQL connection. A backend supplies ``_execute`` (run one
operation in a transaction, usually batched with others) and a ``Dialect`` for the
few places where SQL differs. SQL uses ``?`` placeholders; backends translate.

The store is layered, each part using only those below it: ``sql_statements`` (the
statement vocabulary) -> ``sql_core`` (running operations, shared steps) ->
``sql_messages`` (signals, updates, queries, closing) -> ``sql_runs`` ->
``sql_workflow_tasks`` -> ``sql_activities`` -> ``sql_timers`` -> ``SqlStore`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tether._store.sql_statements import Op
from tether._store.sql_timers import SqlTimers

__all__ = ["SqlStore", "together"]


class SqlStore(SqlTimers):
    """The ``Store`` contract implemented once over any SQL backend."""


def together(make: Callable[[], Op[Any]]) -> Callable[..., Op[list[Any]]] | None:
    """If the operation ``make`` creates may run as one operation with its neighbours in
    a transaction that return the same function: that function, which takes their
    ``make``s and gives each a value, or None for one it left to run alone. Only where
    writes are serialized (one transaction at a time); None for most operations."""
    func = getattr(make, "func", None)
    store = getattr(func, "__self__", None)
    if (
        isinstance(store, SqlStore)
        and getattr(func, "__func__", None) is SqlStore._complete_workflow_task
        and not store.dialect.row_locks
        and store._closes_alone(make.args[0])  # type: ignore[attr-defined]
    ):
        return store._complete_closing_tasks
    return None
