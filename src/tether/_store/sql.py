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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tether._store.sql_statements import Op
from tether._store.sql_timers import SqlTimers

__all__ = ["SqlStore", "spans", "together"]


GroupRun = Callable[..., Op[list[Any]]]
"""What ``together`` returns: runs a group's operations as one, a value for each."""


class SqlStore(SqlTimers):
    """The ``Store`` contract implemented once over any SQL backend."""


def together(make: Callable[[], Op[Any]]) -> GroupRun | None:
    """If the operation ``make`` creates may run as one operation with its neighbours in
    a transaction that return the same function: that function, which takes their
    ``make``s and gives each a value, or None for one it left to run alone. None for
    most operations, and where it cannot tell (malformed input fails in the operation
    itself, alone, not in the group around it)."""
    func = getattr(make, "func", None)
    store = getattr(func, "__self__", None)
    if not (
        isinstance(store, SqlStore)
        and getattr(func, "__func__", None) is SqlStore._complete_workflow_task
    ):
        return None
    dialect = store.dialect
    if dialect.row_locks and not dialect.completion_functions:
        return None  # (with other writers, a group is a call of a function of the schema)
    try:
        completion = make.args[0]  # type: ignore[attr-defined]
        if store._closes_alone(completion):
            return store._complete_closing_tasks
        if dialect.row_locks and store._waits_alone(completion):
            return store._complete_waiting_tasks
    except Exception:
        pass
    return None


def spans(
    makes: Sequence[Callable[[], Op[Any]]], grouped: bool = True
) -> Iterator[tuple[GroupRun | None, int, int]]:
    """How to run the operations ``makes`` of one transaction, in order: spans
    ``[start, end)`` with the function that runs them as one (``together``, for two or
    more neighbours), or None for one operation on its own. ``grouped`` off: each on
    its own (to isolate a failure)."""
    groups = [together(make) for make in makes] if grouped else [None] * len(makes)
    start = 0
    while start < len(makes):
        run_group, end = groups[start], start + 1
        while run_group is not None and end < len(makes) and groups[end] == run_group:
            end += 1
        yield (run_group if end - start > 1 else None), start, end
        start = end
