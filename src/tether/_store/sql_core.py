"""The core every part of the SQL store builds on: running operations (``_execute``),
lease tokens, the steps several parts share, and the columns and statements they
have in common.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any, TypeVar

from tether._store.base import ActivityTask, RunInfo, Store
from tether._store.changes import Change
from tether._store.faults import FaultInjector
from tether._store.sql_statements import (
    ALL,
    EXEC,
    ONE,
    WRITE,
    Dialect,
    Op,
    Stmt,
    dumps,
    loads,
    parse_json,
    touch,
)
from tether.exceptions import StaleTaskError, StoreError

T = TypeVar("T")


RUN_COLUMNS = (
    "namespace, workflow_id, run_id, workflow_type, task_queue, status, created_at, "
    "closed_at, result, failure, next_seq, task_failure, memo, search_attributes, parent_run_id, "
    "next_run_id"
)
ACTIVITY_COLUMNS = (
    "a.run_id, r.workflow_id, r.workflow_type, a.seq, a.activity_type, a.task_queue, a.args, "
    "a.options, a.attempt, a.scheduled_at, a.heartbeat_details, a.token, a.owner, "
    "a.cancel_requested"
)


OPEN = "closed_at IS NULL"
"""A run is running exactly while it has no ``closed_at`` (every close sets it). The
hot statements that find a run by id say so rather than ``status = 'running'``: that
condition matches the partial index of open runs, and PostgreSQL's cached generic
plans, made while a fresh database was small, then scan that whole index for one run
(milliseconds per statement at 10,000 open runs)."""

FAMILY = (
    "parent_run_id, parent_seq, EXISTS (SELECT 1 FROM runs c "
    f"WHERE c.parent_run_id = runs.run_id AND c.{OPEN})"
)
"""A run's parent (id, seq) and whether it has running children."""
ADVANCED = f"inbound_seq, task_version, {FAMILY}"
"""What a completion needs back from the UPDATE that advances its run (after the first
seq of its events): the inputs watermark, the new version, and the run's family."""

NO_FAMILY = (
    " AND parent_run_id IS NULL AND NOT EXISTS (SELECT 1 FROM runs c "
    f"WHERE c.parent_run_id = runs.run_id AND c.{OPEN})"
)
"""Guard of a closing UPDATE with nothing to follow it: no parent to tell, no running
child to apply the parent-close policy to (``_run_closed`` writes for those)."""

LEFT_OVER = (
    ", EXISTS (SELECT 1 FROM activity_tasks x WHERE x.run_id = runs.run_id), "
    "EXISTS (SELECT 1 FROM timers x WHERE x.run_id = runs.run_id), "
    "EXISTS (SELECT 1 FROM updates x WHERE x.run_id = runs.run_id "
    "AND x.state IN ('requested', 'accepted'))"
)
"""Appended to ``ADVANCED`` when the UPDATE closes the run and writes are serialized:
which of the run's activity tasks, timers and open updates are left for the cleanup,
so that it runs only the statements that change something."""

RUN_WORK_TABLES = ("workflow_tasks", "activity_tasks", "timers")
"""The tables of a run's pending work, which its close empties."""
REJECT_OPEN_UPDATES = (
    "UPDATE updates SET state = 'rejected', failure = ? WHERE run_id = ? "
    "AND state IN ('requested', 'accepted')"
)
"""How a close answers the run's open updates (params: failure, run id)."""

CLAIMED_TASK = (
    "t.run_id, r.workflow_id, r.workflow_type, r.namespace, t.attempt, r.task_version, "
    "r.next_seq, EXISTS (SELECT 1 FROM updates u WHERE u.run_id = t.run_id "
    "AND u.state = 'requested')"
)
"""What a worker needs of a claimed workflow task (``t``: the task, ``r``: its run)."""

INLINE_ROWS = 16
"""Most rows of one kind a completion writes inline (each count is a statement shape)."""


ID_CHUNK = 64
ID_LIST = ", ".join(["?"] * ID_CHUNK)
"""Run ids given to one ``IN (...)`` list, padded with NULLs: one statement shape."""

INSERT_HISTORY = "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, ?, ?, ?, ?)"

CLOSE_MANY_ROWS = (4, 16, 64)
"""The row counts of ``close_many_sql`` statements: a group is cut into these, the last
padded with rows that match nothing, so that a few statement shapes serve all."""


def padded_chunks(params: list[Any], width: int) -> Generator[list[Any], None, None]:
    """``params`` (rows of ``width`` values) in chunks of ``CLOSE_MANY_ROWS`` rows,
    the last padded with NULL rows."""
    biggest = CLOSE_MANY_ROWS[-1] * width
    for i in range(0, len(params), biggest):
        chunk = params[i : i + biggest]
        rows = len(chunk) // width
        size = next(n for n in CLOSE_MANY_ROWS if n >= rows)
        yield chunk + [None] * ((size - rows) * width)


def close_many_sql(rows: int) -> str:
    """Close ``rows`` runs, each named with (run id, task version, lease token, events
    to append, status, result, failure, closed at) if its lease holds and it has no
    family to tell. Returns (run id, next seq, task version, ``LEFT_OVER``) of each
    run it closed. (RETURNING may not name the VALUES, hence the new next seq.)"""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        "WITH v(run_id, task_version, token, events, status, result, failure, closed_at) "
        f"AS (VALUES {values}) "
        "UPDATE runs SET task_version = runs.task_version + 1, task_failure = NULL, "
        "next_seq = runs.next_seq + v.events, status = v.status, result = v.result, "
        "failure = v.failure, closed_at = v.closed_at, next_run_id = NULL FROM v "
        "WHERE runs.run_id = v.run_id AND runs.task_version = v.task_version "
        f"AND runs.{OPEN} AND EXISTS (SELECT 1 FROM workflow_tasks w "
        f"WHERE w.run_id = runs.run_id AND w.token = v.token){NO_FAMILY} "
        f"RETURNING run_id, next_seq, task_version{LEFT_OVER}"
    )


END_ACTIVITY = (
    "DELETE FROM activity_tasks WHERE run_id = ? AND seq = ? AND token = ? "
    "RETURNING cancel_requested"
)


def run_info_from_row(row: Any) -> RunInfo:
    return RunInfo(
        namespace=row[0],
        workflow_id=row[1],
        run_id=row[2],
        workflow_type=row[3],
        task_queue=row[4],
        status=row[5],
        created_at=row[6],
        closed_at=row[7],
        result=loads(row[8]),
        failure=loads(row[9]),
        history_length=row[10] - 1,
        task_failure=loads(row[11]),
        memo=loads(row[12]),
        search_attributes=loads(row[13]),
        parent_run_id=row[14],
        next_run_id=row[15],
    )


def activity_from_row(row: Any) -> ActivityTask:
    return ActivityTask(
        run_id=row[0],
        workflow_id=row[1],
        workflow_type=row[2],
        seq=row[3],
        activity_type=row[4],
        task_queue=row[5],
        args=parse_json(row[6]),
        options=parse_json(row[7]),
        attempt=row[8],
        scheduled_at=row[9],
        heartbeat_details=loads(row[10]),
        token=row[11],
        owner=row[12],
        cancel_requested=bool(row[13]),
    )


class SqlCore(Store):
    """What every part of ``SqlStore`` uses: running an operation on the backend, lease
    tokens, and the steps several parts share (appending input to a run, leases)."""

    dialect: Dialect

    def __init__(self) -> None:
        self._token_prefix = secrets.token_hex(6)
        self._token_counter = itertools.count()
        self.faults: FaultInjector | None = FaultInjector.from_env()
        """Fails a fraction of calls on purpose when set (testing; see ``faults.py``)."""
        self._closed = False
        """Set by the backend's ``close``: no operation starts after it."""

    async def _execute(self, make: Callable[[], Op[T]], writes: bool, durable: bool = True) -> T:
        """Run the operation ``make()`` creates, in a transaction (writes) or on a snapshot
        (reads), and return its value. A backend may call ``make`` again to re-run the
        operation after rolling back a batch. ``durable=False``: a write that tells no
        one anything (see ``_execute_lease``), which the backend may commit without
        waiting for the disk."""
        self._starting(writes)
        value = await (self._submit_write(make, durable) if writes else self._read(make))
        if self.faults is not None:
            self.faults.after(writes)
        return value

    def _starting(self, writes: bool) -> None:
        """Before an operation starts: none once the store is closed, and injected
        faults may fail it."""
        if self._closed:
            raise StoreError("the store is closed", retryable=False)
        if self.faults is not None:
            self.faults.before(writes)

    @abc.abstractmethod
    def _read(self, make: Callable[[], Op[T]]) -> Awaitable[T]:
        """Run the read ``make()`` creates on a snapshot (no fault injection or look at
        ``_closed``: ``_execute`` does those)."""

    @abc.abstractmethod
    def _submit_write(self, make: Callable[[], Op[T]], durable: bool) -> asyncio.Future[T]:
        """Queue the write ``make()`` creates (on the running event loop, without fault
        injection or a look at ``_closed``); the future gets its value once committed
        (durably, if ``durable``)."""

    async def _execute_each(
        self, makes: Iterable[tuple[Callable[[], Op[T]], bool]]
    ) -> AsyncIterator[T | Exception]:
        """``_execute`` independent ``(make, durable)`` writes together: each queued as
        ``makes`` yields it, all before any is awaited (so they share group commits), and
        awaited in one coroutine, not a task each. Yields each outcome in order as soon
        as it is known: the write's value or the exception it raised."""
        submitted: list[asyncio.Future[T] | Exception] = []
        for make, durable in makes:
            try:
                self._starting(True)
                submitted.append(self._submit_write(make, durable))
            except Exception as e:
                submitted.append(e)
        for fut in submitted:
            if isinstance(fut, Exception):
                yield fut
                continue
            try:
                value = await fut
                if self.faults is not None:
                    self.faults.after(True)
            except Exception as e:
                yield e
                continue
            yield value

    async def _execute_lease(self, make: Callable[[], Op[T]]) -> T:
        """``_execute`` a write that only takes or extends leases. Losing it in a crash
        is the same as the lease running out (the work is claimed again, at-least-once
        as ever; only the claim's attempt count is not kept), so a backend may commit it
        without waiting for the disk; any later durable commit makes it durable too.
        Never for anything a caller is told has been recorded."""
        return await self._execute(make, writes=True, durable=False)

    def _token(self) -> str:
        """A lease token unique across processes (random prefix) without a syscall each."""
        return f"{self._token_prefix}{next(self._token_counter):x}"

    # -- shared steps -----------------------------------------------------------------
    @staticmethod
    def _append_inbound(
        run_id: str, event_type: str, data: dict[str, Any], now: float
    ) -> Op[int | None]:
        """Append an inbound event to an open run and make sure a workflow task is queued.

        Returns the event's seq, or None if the run has closed."""
        row = yield Stmt(
            ONE,
            "UPDATE runs SET next_seq = next_seq + 1, inbound_seq = next_seq "
            f"WHERE run_id = ? AND {OPEN} RETURNING next_seq - 1, task_queue",
            (run_id,),
        )
        if row is None:
            return None
        seq, task_queue = row
        yield touch(Change.WORKFLOW_TASK)
        yield Stmt(
            WRITE,
            INSERT_HISTORY,
            (run_id, seq, event_type, now, dumps(data)),
        )
        yield Stmt(
            WRITE,
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, task_queue, now),
        )
        return int(seq)

    def _check_lease(self, task: ActivityTask) -> Op[bool]:
        """Fail unless ``task`` still holds its lease; return whether cancel was requested."""
        row = yield Stmt(
            ONE,
            "SELECT token, cancel_requested FROM activity_tasks WHERE run_id = ? AND seq = ? "
            f"{self.dialect.for_update()}",
            (task.run_id, task.seq),
        )
        if row is None or row[0] != task.token:
            raise SqlCore._stale(task)
        return bool(row[1])

    @staticmethod
    def _stale(task: ActivityTask) -> StaleTaskError:
        return StaleTaskError(
            f"activity {task.activity_type} (#{task.seq}) of run {task.run_id}, "
            f"attempt {task.attempt}, is no longer leased by this worker"
        )

    def _claim_function(self, name: str, params: tuple[Any, ...]) -> Stmt | None:
        """A call of the schema's function ``name`` that leases tasks and reads them
        back in one statement (``LeaseAndRead.together``); None if the backend has none."""
        if not self.dialect.claim_functions:
            return None
        marks = ", ".join("?" * len(params))
        return Stmt(ALL, f"SELECT * FROM {name}({marks})", params, alone=True, writes=True)

    def _lease_ready(self, table: str, key: str, condition: str, params: tuple[Any, ...]) -> Stmt:
        """Lease up to ``limit`` ready rows of a task table, oldest first: params (owner,
        token, lease_until, task_queue, now, limit). One token for the whole claim: a
        lease is (row, token), and no other lease of these rows can have it; the caller
        reads the leased rows back by (task_queue, visible_at = lease_until, token)."""
        return Stmt(
            EXEC,
            f"UPDATE {table} SET owner = ?, token = ?, visible_at = ?, attempt = attempt + 1 "
            f"WHERE ({key}) IN (SELECT {key} FROM {table} x WHERE task_queue = ? "
            f"AND visible_at <= ? {condition}ORDER BY visible_at LIMIT ? "
            f"{self.dialect.skip_locked('x')})",
            params,
            alone=True,  # only the read-back follows
        )
