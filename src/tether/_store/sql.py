"""The store's domain logic, written once in portable SQL for every backend.

Each operation is a generator that yields statements and receives their results
("sans-IO"), so the same code runs on a blocking SQLite connection in a thread and
on an async PostgreSQL connection. A backend supplies ``_execute`` (run one
operation in a transaction, usually batched with others) and a ``Dialect`` for the
few places where SQL differs. SQL uses ``?`` placeholders; backends translate.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import pydantic_core

from tether._store.base import (
    ACTIVITY_COMPLETED,
    CHILD_WORKFLOW_COMPLETED,
    CHILD_WORKFLOW_FAILED,
    CLAIM_HISTORY_EVENTS,
    COMPLETED,
    CONTINUED_AS_NEW,
    SIGNAL_RECEIVED,
    TERMINATED,
    TIMED_OUT,
    TIMER_FIRED,
    WORKFLOW_CANCEL_REQUESTED,
    WORKFLOW_STARTED,
    WORKFLOW_TASK_COMPLETED,
    WORKFLOW_TERMINATED,
    WORKFLOW_TIMED_OUT,
    ActivityTask,
    EagerClaim,
    Event,
    NewRun,
    QueryTask,
    RunFilter,
    RunInfo,
    StartOutcome,
    Store,
    UpdateRequest,
    UpdateState,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
)
from tether._store.changes import Change
from tether._store.faults import FaultInjector
from tether.exceptions import (
    StaleTaskError,
    StoreError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)

T = TypeVar("T")

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


NOTIFY_MARK = "/*notify*/"
"""Where a lone statement's wake-up may go (an SQL comment: backends that do not use
it leave it as it is)."""

Op = Generator[Stmt, Any, T]
"""An operation: yields statements, receives their results, returns its value."""


def touch(changes: Change) -> Stmt:
    return Stmt(TOUCH, "", int(changes))


class _LeaseAndRead:
    """An operation that leases rows (``lease``, under a token made once per call)
    and reads them back (``read``). On a server the lease commits by itself
    (``Stmt.alone``), so an attempt repeated after a failed read-back first reads
    what an earlier attempt leased, instead of leasing more rows and stranding
    those until their lease runs out."""

    __slots__ = ("attempts", "lease", "read")

    def __init__(self, lease: Stmt, read: Stmt) -> None:
        self.lease = lease
        self.read = read
        self.attempts = 0

    def __call__(self) -> Op[list[Any]]:
        self.attempts += 1
        rows: list[Any]
        if self.attempts > 1:
            rows = yield self.read
            if rows:
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


def _parse(text: str) -> Any:
    try:
        return pydantic_core.from_json(text, allow_inf_nan=True)
    except ValueError:
        # pydantic-core stops at 200 levels of nesting; what was written must read back.
        return json.loads(text)


def loads(text: str | None) -> Any:
    return None if text is None else _parse(text)


_RUN_COLUMNS = (
    "namespace, workflow_id, run_id, workflow_type, task_queue, status, created_at, "
    "closed_at, result, failure, next_seq, task_failure, memo, search_attributes, parent_run_id, "
    "next_run_id"
)
_ACTIVITY_COLUMNS = (
    "a.run_id, r.workflow_id, r.workflow_type, a.seq, a.activity_type, a.task_queue, a.args, "
    "a.options, a.attempt, a.scheduled_at, a.heartbeat_details, a.token, a.owner, "
    "a.cancel_requested"
)


_OPEN = "closed_at IS NULL"
"""A run is running exactly while it has no ``closed_at`` (every close sets it). The
hot statements that find a run by id say so rather than ``status = 'running'``: that
condition matches the partial index of open runs, and PostgreSQL's cached generic
plans, made while a fresh database was small, then scan that whole index for one run
(milliseconds per statement at 10,000 open runs)."""

_FAMILY = (
    "parent_run_id, parent_seq, EXISTS (SELECT 1 FROM runs c "
    f"WHERE c.parent_run_id = runs.run_id AND c.{_OPEN})"
)
"""A run's parent (id, seq) and whether it has running children."""
_ADVANCED = f"inbound_seq, task_version, {_FAMILY}"
"""What a completion needs back from the UPDATE that advances its run (after the first
seq of its events): the inputs watermark, the new version, and the run's family."""

_NO_FAMILY = (
    " AND parent_run_id IS NULL AND NOT EXISTS (SELECT 1 FROM runs c "
    f"WHERE c.parent_run_id = runs.run_id AND c.{_OPEN})"
)
"""Guard of a closing UPDATE with nothing to follow it: no parent to tell, no running
child to apply the parent-close policy to (``_run_closed`` writes for those)."""

_LEFT_OVER = (
    ", EXISTS (SELECT 1 FROM activity_tasks x WHERE x.run_id = runs.run_id), "
    "EXISTS (SELECT 1 FROM timers x WHERE x.run_id = runs.run_id), "
    "EXISTS (SELECT 1 FROM updates x WHERE x.run_id = runs.run_id "
    "AND x.state IN ('requested', 'accepted'))"
)
"""Appended to ``_ADVANCED`` when the UPDATE closes the run and writes are serialized:
which of the run's activity tasks, timers and open updates are left for the cleanup,
so that it runs only the statements that change something."""

_RUN_WORK_TABLES = ("workflow_tasks", "activity_tasks", "timers")
"""The tables of a run's pending work, which its close empties."""
_REJECT_OPEN_UPDATES = (
    "UPDATE updates SET state = 'rejected', failure = ? WHERE run_id = ? "
    "AND state IN ('requested', 'accepted')"
)
"""How a close answers the run's open updates (params: failure, run id)."""

_CLAIMED_TASK = (
    "t.run_id, r.workflow_id, r.workflow_type, r.namespace, t.attempt, r.task_version, "
    "r.next_seq, EXISTS (SELECT 1 FROM updates u WHERE u.run_id = t.run_id "
    "AND u.state = 'requested')"
)
"""What a worker needs of a claimed workflow task (``t``: the task, ``r``: its run)."""

_INLINE_ROWS = 16
"""Most rows of one kind a completion writes inline (each count is a statement shape)."""


_ID_CHUNK = 64
_ID_LIST = ", ".join(["?"] * _ID_CHUNK)
"""Run ids given to one ``IN (...)`` list, padded with NULLs: one statement shape."""

_INSERT_HISTORY = "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, ?, ?, ?, ?)"

_CLOSE_MANY_ROWS = (4, 16, 64)
"""The row counts of ``_close_many_sql`` statements: a group is cut into these, the last
padded with rows that match nothing, so that a few statement shapes serve all."""


def _padded_chunks(params: list[Any], width: int) -> Generator[list[Any], None, None]:
    """``params`` (rows of ``width`` values) in chunks of ``_CLOSE_MANY_ROWS`` rows,
    the last padded with NULL rows."""
    biggest = _CLOSE_MANY_ROWS[-1] * width
    for i in range(0, len(params), biggest):
        chunk = params[i : i + biggest]
        rows = len(chunk) // width
        size = next(n for n in _CLOSE_MANY_ROWS if n >= rows)
        yield chunk + [None] * ((size - rows) * width)


def _close_many_sql(rows: int) -> str:
    """Close ``rows`` runs, each named with (run id, task version, lease token, events
    to append, status, result, failure, closed at) if its lease holds and it has no
    family to tell. Returns (run id, next seq, task version, ``_LEFT_OVER``) of each
    run it closed. (RETURNING may not name the VALUES, hence the new next seq.)"""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        "WITH v(run_id, task_version, token, events, status, result, failure, closed_at) "
        f"AS (VALUES {values}) "
        "UPDATE runs SET task_version = runs.task_version + 1, task_failure = NULL, "
        "next_seq = runs.next_seq + v.events, status = v.status, result = v.result, "
        "failure = v.failure, closed_at = v.closed_at, next_run_id = NULL FROM v "
        "WHERE runs.run_id = v.run_id AND runs.task_version = v.task_version "
        f"AND runs.{_OPEN} AND EXISTS (SELECT 1 FROM workflow_tasks w "
        f"WHERE w.run_id = runs.run_id AND w.token = v.token){_NO_FAMILY} "
        f"RETURNING run_id, next_seq, task_version{_LEFT_OVER}"
    )


_END_ACTIVITY = (
    "DELETE FROM activity_tasks WHERE run_id = ? AND seq = ? AND token = ? "
    "RETURNING cancel_requested"
)


def _run_info(row: Any) -> RunInfo:
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


def _activity(row: Any) -> ActivityTask:
    return ActivityTask(
        run_id=row[0],
        workflow_id=row[1],
        workflow_type=row[2],
        seq=row[3],
        activity_type=row[4],
        task_queue=row[5],
        args=_parse(row[6]),
        options=_parse(row[7]),
        attempt=row[8],
        scheduled_at=row[9],
        heartbeat_details=loads(row[10]),
        token=row[11],
        owner=row[12],
        cancel_requested=bool(row[13]),
    )


class SqlStore(Store):
    """The ``Store`` contract implemented once over any SQL backend."""

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

    # -- runs --------------------------------------------------------------------
    async def start_run(self, run: NewRun) -> StartOutcome:
        return await self._execute(partial(self._start_run, run), writes=True)

    def _start_run(self, run: NewRun) -> Op[StartOutcome]:
        if run.reuse_policy == "allow_duplicate" and (yield from self._insert_run(run, True)):
            # The common case, in one statement where the dialect allows: no run of this
            # workflow id is running and this request created none (unique indexes).
            yield from self._deliver_with_start(run.run_id, run)
            return StartOutcome(run_id=run.run_id, created=True)
        # A repeated request (a client retrying after a lost reply) gets the run it
        # created, even if that run has closed since: never start the work twice.
        # (One statement: this request's runs, newest first, and the running run.)
        rows = yield Stmt(
            ALL,
            "SELECT run_id, request_id = ?, status FROM runs WHERE namespace = ? "
            "AND workflow_id = ? AND (request_id = ? OR status = 'running') "
            f"ORDER BY created_at DESC {self.dialect.for_update()}",
            (run.request_id, run.namespace, run.workflow_id, run.request_id),
        )
        for run_id, same_request, _ in rows:
            if same_request:
                return StartOutcome(run_id=run_id, created=False)
        running = next((row for row in rows if row[2] == "running"), None)
        if running is not None:
            if run.conflict_policy == "use_existing":
                yield from self._deliver_with_start(running[0], run)
                return StartOutcome(run_id=running[0], created=False)
            if run.conflict_policy != "terminate_existing":
                raise WorkflowAlreadyStartedError(
                    f"workflow id {run.workflow_id!r} is already running (run {running[0]}); "
                    "wait for it to close, start with another id, or choose a conflict policy",
                    workflow_id=run.workflow_id,
                    run_id=running[0],
                )
            yield from self._terminate(
                running[0], f"terminated by a new start of {run.workflow_id!r}", run.now
            )
        elif run.reuse_policy != "allow_duplicate":
            last = yield Stmt(
                ONE,
                "SELECT run_id, status FROM runs WHERE namespace = ? AND workflow_id = ? "
                "ORDER BY created_at DESC LIMIT 1",
                (run.namespace, run.workflow_id),
            )
            if last is not None and (
                run.reuse_policy == "reject_duplicate" or last[1] == COMPLETED
            ):
                raise WorkflowAlreadyStartedError(
                    f"workflow id {run.workflow_id!r} was already used (run {last[0]}, "
                    f"{last[1]}) and its reuse policy {run.reuse_policy!r} forbids another run",
                    workflow_id=run.workflow_id,
                    run_id=last[0],
                )
        yield from self._insert_run(run)
        yield from self._deliver_with_start(run.run_id, run)
        return StartOutcome(run_id=run.run_id, created=True)

    def _insert_run(self, run: NewRun, unless_conflict: bool = False) -> Op[bool]:
        """Insert a new run with its first event and task; whether it was inserted.

        ``unless_conflict``: insert nothing, instead of failing, if the workflow id has a
        running run (its unique index) or a run of this start request."""
        columns = (
            "run_id, namespace, workflow_id, workflow_type, task_queue, status, request_id, "
            "created_at, next_seq, inbound_seq, memo, search_attributes, execution_deadline, "
            "run_timeout, parent_run_id, parent_seq, parent_close_policy"
        )
        values = "?, ?, ?, ?, ?, 'running', ?, ?, 2, 1, ?, ?, ?, ?, ?, ?, ?"
        row: tuple[Any, ...] = (
            run.run_id,
            run.namespace,
            run.workflow_id,
            run.workflow_type,
            run.task_queue,
            run.request_id,
            run.now,
            None if run.memo is None else dumps(run.memo),
            None if run.search_attributes is None else dumps(run.search_attributes),
            run.execution_deadline,
            run.run_timeout,
            run.parent_run_id,
            run.parent_seq,
            run.parent_close_policy,
        )
        deadlines = [d for d in (run.execution_deadline,) if d is not None]
        if run.run_timeout is not None:
            deadlines.append(run.now + run.run_timeout)
        started = dumps(
            {
                "workflow_id": run.workflow_id,
                "workflow_type": run.workflow_type,
                "task_queue": run.task_queue,
                "args": run.args,
                "seed": run.seed,
                "namespace": run.namespace,
                "memo": run.memo,
                "search_attributes": run.search_attributes,
                "parent_run_id": run.parent_run_id,
            }
        )
        insert = f"INSERT INTO runs ({columns}) VALUES ({values})"
        if unless_conflict:
            insert = (
                f"INSERT INTO runs ({columns}) SELECT {values} WHERE NOT EXISTS (SELECT 1 "
                "FROM runs WHERE namespace = ? AND workflow_id = ? AND request_id = ?) "
                "ON CONFLICT DO NOTHING"
            )
            row = (*row, run.namespace, run.workflow_id, run.request_id)
        if unless_conflict and self.dialect.writes_in_with and not deadlines:
            # One round trip: the dependent inserts take the run's row only if it went in.
            # A run with nothing to deliver with its start is complete by itself.
            inserted = yield Stmt(
                ONE,
                f"WITH r AS ({insert} RETURNING run_id), h AS (INSERT INTO history "
                "(run_id, seq, type, time, data) SELECT run_id, 1, ?, ?, ? FROM r), "
                "t AS (INSERT INTO workflow_tasks (run_id, task_queue, visible_at) "
                f"SELECT run_id, ?, ? FROM r) SELECT count(*){NOTIFY_MARK} FROM r",
                (*row, WORKFLOW_STARTED, run.now, started, run.task_queue, run.now),
                alone=run.signal is None and run.update is None,
                notify=Change.WORKFLOW_TASK,
            )
            if not inserted[0]:
                return False
            yield touch(Change.WORKFLOW_TASK)
            return True
        if not (yield Stmt(EXEC, insert, row)):
            return False
        yield touch(Change.WORKFLOW_TASK | (Change.TIMER if deadlines else 0))
        if deadlines:
            # Timer seq 0 is the run's own deadline: firing it closes the run as timed out.
            yield Stmt(
                WRITE,
                "INSERT INTO timers (run_id, seq, fire_at) VALUES (?, 0, ?)",
                (run.run_id, min(deadlines)),
            )
        yield Stmt(
            WRITE,
            "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, 1, ?, ?, ?)",
            (run.run_id, WORKFLOW_STARTED, run.now, started),
        )
        yield Stmt(
            WRITE,
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?)",
            (run.run_id, run.task_queue, run.now),
        )
        return True

    def _deliver_with_start(self, run_id: str, run: NewRun) -> Op[None]:
        if run.signal is not None:
            name, args = run.signal
            yield from self._append_inbound(
                run_id, SIGNAL_RECEIVED, {"name": name, "args": args}, run.now
            )
        if run.update is not None:
            existing = yield from self._update_state(run_id, run.update.update_id)
            if existing is None or existing.state == "rejected":  # else: a repeat, deduplicated
                yield from self._request_update(run_id, run.update, run.now)

    async def get_run(self, namespace: str, workflow_id: str, run_id: str | None) -> RunInfo:
        def op() -> Op[RunInfo]:
            if run_id is None:
                row = yield Stmt(
                    ONE,
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE namespace = ? AND workflow_id = ? "
                    "ORDER BY created_at DESC LIMIT 1",
                    (namespace, workflow_id),
                )
            else:
                row = yield Stmt(
                    ONE,
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ? AND namespace = ? "
                    "AND workflow_id = ?",
                    (run_id, namespace, workflow_id),
                )
            if row is None:
                which = f"run {run_id!r} of " if run_id else ""
                raise WorkflowNotFoundError(
                    f"no {which}workflow {workflow_id!r} in namespace {namespace!r}"
                )
            return _run_info(row)

        return await self._execute(op, writes=False)

    async def list_runs(
        self,
        namespace: str,
        *,
        status: str | None = None,
        workflow_type: str | None = None,
        limit: int = 1000,
        where: RunFilter | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        def op() -> Op[list[RunInfo]]:
            sql, params = self._run_filter(namespace, where)
            if status is not None:
                sql += " AND status = ?"
                params.append(status)
            if workflow_type is not None:
                sql += " AND workflow_type = ?"
                params.append(workflow_type)
            if after is not None:
                sql += " AND (created_at < ? OR (created_at = ? AND run_id < ?))"
                params += [after[0], after[0], after[1]]
            rows = yield Stmt(
                ALL,
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE {sql} "
                "ORDER BY created_at DESC, run_id DESC LIMIT ?",
                (*params, limit),
            )
            return [_run_info(r) for r in rows]

        return await self._execute(op, writes=False)

    async def count_runs(self, namespace: str, where: RunFilter | None = None) -> int:
        def op() -> Op[int]:
            sql, params = self._run_filter(namespace, where)
            row = yield Stmt(ONE, f"SELECT count(*) FROM runs WHERE {sql}", tuple(params))
            return int(row[0])

        return await self._execute(op, writes=False)

    def _run_filter(self, namespace: str, where: RunFilter | None) -> tuple[str, list[Any]]:
        """The WHERE clause (without the keyword) selecting ``where``'s runs of ``namespace``."""
        sql = "namespace = ?"
        params: list[Any] = [namespace]
        if where is None:
            return sql, params
        if where.statuses:
            sql += f" AND status IN ({','.join('?' * len(where.statuses))})"
            params += where.statuses
        if where.workflow_type is not None:
            sql += " AND workflow_type = ?"
            params.append(where.workflow_type)
        if where.workflow_id_prefix:
            # substr, not LIKE: case-sensitive on both backends and nothing to escape.
            sql += " AND substr(workflow_id, 1, ?) = ?"
            params += [len(where.workflow_id_prefix), where.workflow_id_prefix]
        for column, op, bound in (
            ("created_at", ">=", where.started_after),
            ("created_at", "<", where.started_before),
            ("closed_at", ">=", where.closed_after),
            ("closed_at", "<", where.closed_before),
        ):
            if bound is not None:
                sql += f" AND {column} {op} ?"
                params.append(float(bound))
        for key, value in where.search_attributes.items():
            condition, values = self.dialect.json_field_equals("search_attributes", key, value)
            sql += f" AND {condition}"
            params += values
        return sql, params

    async def task_queue_backlog(self, task_queue: str, now: float) -> int:
        def op() -> Op[int]:
            row = yield Stmt(
                ONE,
                "SELECT (SELECT count(*) FROM workflow_tasks WHERE task_queue = ? "
                "AND (owner IS NOT NULL OR visible_at <= ?)) + "
                "(SELECT count(*) FROM activity_tasks WHERE task_queue = ? "
                "AND (owner IS NOT NULL OR visible_at <= ?)) + "
                "(SELECT count(*) FROM queries WHERE task_queue = ? AND answered = 0) + "
                "(SELECT count(*) FROM timers t JOIN runs r ON r.run_id = t.run_id "
                "WHERE r.task_queue = ? AND t.fire_at <= ?)",
                (task_queue, now, task_queue, now, task_queue, task_queue, now),
            )
            return int(row[0])

        return await self._execute(op, writes=False)

    async def closed_runs(self, run_ids: list[str]) -> list[RunInfo]:
        def op() -> Op[list[RunInfo]]:
            closed: list[RunInfo] = []
            for i in range(0, len(run_ids), 500):
                chunk = tuple(run_ids[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = yield Stmt(
                    ALL,
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id IN ({marks}) "
                    "AND status != 'running'",
                    chunk,
                )
                closed += [_run_info(r) for r in rows]
            return closed

        return await self._execute(op, writes=False)

    async def read_history(self, run_id: str, after_seq: int = 0) -> list[Event]:
        def op() -> Op[list[Event]]:
            rows = yield Stmt(
                ALL,
                "SELECT seq, type, time, data FROM history WHERE run_id = ? AND seq > ? "
                "ORDER BY seq",
                (run_id, after_seq),
            )
            return [Event(r[0], r[1], r[2], _parse(r[3])) for r in rows]

        return await self._execute(op, writes=False)

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
            f"WHERE run_id = ? AND {_OPEN} RETURNING next_seq - 1, task_queue",
            (run_id,),
        )
        if row is None:
            return None
        seq, task_queue = row
        yield touch(Change.WORKFLOW_TASK)
        yield Stmt(
            WRITE,
            _INSERT_HISTORY,
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
            raise SqlStore._stale(task)
        return bool(row[1])

    @staticmethod
    def _stale(task: ActivityTask) -> StaleTaskError:
        return StaleTaskError(
            f"activity {task.activity_type} (#{task.seq}) of run {task.run_id}, "
            f"attempt {task.attempt}, is no longer leased by this worker"
        )

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

    # -- workflow tasks ---------------------------------------------------------------
    async def claim_workflow_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[WorkflowTask]:
        token = self._token()
        lease = self._lease_ready(
            "workflow_tasks", "run_id", "", (owner, token, lease_until, task_queue, now, limit)
        )
        # Read back after leasing, in a statement of its own: on PostgreSQL a newer
        # snapshot than the lease's, so a run that another worker advanced just before
        # the lease is read as it is now. Short histories come along: a worker without
        # the run in its cache (new, evicted) needs no other read.
        read = Stmt(
            ALL,
            f"SELECT {_CLAIMED_TASK}, h.seq, h.type, h.time, h.data FROM workflow_tasks t "
            "JOIN runs r ON r.run_id = t.run_id LEFT JOIN history h "
            "ON h.run_id = t.run_id AND r.next_seq <= ? "
            "WHERE t.task_queue = ? AND t.visible_at = ? AND t.token = ? "
            "ORDER BY r.created_at, t.run_id, h.seq",
            (CLAIM_HISTORY_EVENTS + 1, task_queue, lease_until, token),
        )
        rows = await self._execute_lease(_LeaseAndRead(lease, read))
        return self._claimed_tasks(task_queue, token, rows)

    @staticmethod
    def _claimed_tasks(task_queue: str, token: str, rows: list[Any]) -> list[WorkflowTask]:
        """Workflow tasks from rows of ``_CLAIMED_TASK`` columns, each optionally followed
        by one history event's (seq, type, time, data); rows of a task are adjacent."""
        tasks: list[WorkflowTask] = []
        for row in rows:
            run_id = row[0]
            if not tasks or tasks[-1].run_id != run_id:
                tasks.append(
                    WorkflowTask(
                        run_id=run_id,
                        workflow_id=row[1],
                        workflow_type=row[2],
                        task_queue=task_queue,
                        namespace=row[3],
                        token=token,
                        attempt=row[4],
                        task_version=row[5],
                        history_length=row[6] - 1,
                        has_updates=bool(row[7]),
                    )
                )
            if len(row) > 8 and row[8] is not None:
                event = Event(row[8], row[9], row[10], _parse(row[11]))
                task = tasks[-1]
                if task.history is None:
                    task.history = [event]
                else:
                    task.history.append(event)
        return tasks

    async def complete_workflow_task(
        self, completion: WorkflowTaskCompletion, owner: str, now: float
    ) -> WorkflowTaskResult:
        return await self._execute(
            partial(self._complete_workflow_task, completion, owner, now),
            writes=True,
            durable=completion.acknowledged,
        )

    def complete_workflow_tasks(
        self, completions: Iterable[tuple[WorkflowTaskCompletion, float]], owner: str
    ) -> AsyncIterator[WorkflowTaskResult | Exception]:
        return self._execute_each(
            (partial(self._complete_workflow_task, c, owner, now), c.acknowledged)
            for c, now in completions
        )

    def _complete_workflow_task(
        self, c: WorkflowTaskCompletion, owner: str, now: float
    ) -> Op[WorkflowTaskResult]:
        """Record a workflow task's outcome if its lease (token) still holds and the run is
        still at ``c.task.task_version``: checked and advanced in one statement."""
        task = c.task
        events = self._task_events(c)
        close_sql, close_params = self._close_columns(c, now)
        params = (len(events), *close_params, task.run_id, task.task_version, task.token)

        def advance(guard: str = "") -> str:
            return (
                "UPDATE runs SET task_version = task_version + 1, task_failure = NULL, "
                f"next_seq = next_seq + ?{close_sql} WHERE run_id = ? AND task_version = ? "
                f"AND {_OPEN} AND EXISTS (SELECT 1 FROM workflow_tasks w "
                f"WHERE w.run_id = runs.run_id AND w.token = ?){guard} "
                f"RETURNING next_seq - ? AS first, {_ADVANCED} AS has_children"
                f"{self._left_over(c)}"
            )

        inline = self._inline_writes(c, owner, now, events, "a", task_queued=True)
        row = None
        if inline is not None:  # one statement for the whole completion
            ctes, inline_params, done = inline
            columns = (
                " SELECT first, inbound_seq, task_version, parent_run_id, parent_seq, has_children"
            )
            returning = f"{columns} FROM a"
            if self._nothing_after(c):
                # By itself when no input came in meanwhile (and a run it closes has no
                # family to tell): then nothing follows it, a close's cleanup is in it.
                # Else it writes nothing, and the statement below does it all.
                closing = c.close is not None
                guard = " AND inbound_seq <= ?" + (_NO_FAMILY if closing else "")
                cleanup, cleanup_params = (
                    self._cleanup_ctes(c, "a", task_row=True) if closing else ("", [])
                )
                row = yield Stmt(
                    ONE,
                    f"WITH a AS ({advance(guard)}){ctes}{cleanup}{columns}{NOTIFY_MARK} FROM a",
                    (*params, c.inputs_through, len(events), *inline_params, *cleanup_params),
                    alone=True,
                    notify=self._lone_changes(c, len(events), len(done)),
                )
                if row is not None and c.close is not None:
                    return (
                        yield from self._record_task(
                            c, owner, now, events, row, True, done, cleaned=True
                        )
                    )
            if row is None:
                row = yield Stmt(
                    ONE,
                    f"WITH a AS ({advance()}){ctes}{returning}",
                    (*params, len(events), *inline_params),
                )
        else:
            done = None
            row = yield Stmt(ONE, advance(), (*params, len(events)))
        if row is None:
            raise StaleTaskError(
                f"workflow task of run {task.run_id} is no longer leased by this worker "
                f"(or the run advanced past task version {task.task_version})"
            )
        return (yield from self._record_task(c, owner, now, events, row, True, done))

    def _closes_alone(self, c: WorkflowTaskCompletion) -> bool:
        """Whether ``c`` closes its run with no other write than its events (the common
        last task: the workflow returned): ``_complete_closing_tasks`` can take it."""
        return (
            c.close is not None
            and c.record
            and c.continue_as_new is None
            and not (c.timers or c.activities)
            and len(c.events) < _INLINE_ROWS
            and self._nothing_after(c)
        )

    def _complete_closing_tasks(
        self, makes: list[partial[Op[WorkflowTaskResult]]]
    ) -> Op[list[WorkflowTaskResult | None]]:
        """``_complete_workflow_task`` of many runs that ``_closes_alone``, as a few
        set-based statements instead of three or more each: one UPDATE closes them all,
        one INSERT adds their events, one DELETE drops their task rows. A run the UPDATE
        does not match (a lost lease, a parent or running children to tell) gets None:
        its own completion, run after these, does what is left or raises. These runs
        touch no other run, so doing them first changes nothing for the others."""
        calls: dict[str, tuple[WorkflowTaskCompletion, float, int]] = {}
        for i, make in enumerate(makes):
            c, _owner, now = make.args
            calls.setdefault(c.task.run_id, (c, now, i))  # a repeat runs alone, after
        params: list[Any] = []
        for c, now, _ in calls.values():
            _, columns = self._close_columns(c, now)
            status, result, failure, closed_at, _next_run = columns
            params += [c.task.run_id, c.task.task_version, c.task.token, len(c.events) + 1]
            params += [status, result, failure, closed_at]
        rows: list[Any] = []
        width = len(params) // len(calls)
        for chunk in _padded_chunks(params, width):
            rows += yield Stmt(ALL, _close_many_sql(len(chunk) // width), chunk)
        results: list[WorkflowTaskResult | None] = [None] * len(makes)
        if not rows:
            return results
        yield touch(Change.HISTORY | Change.RUN_CLOSED | Change.UPDATE)
        history: list[tuple[Any, ...]] = []
        for run_id, next_seq, task_version, *_left in rows:
            c, now, i = calls[run_id]
            events = self._task_events(c)
            first = next_seq - len(events)
            history += [(run_id, first + k, t, now, dumps(d)) for k, (t, d) in enumerate(events)]
            results[i] = WorkflowTaskResult(task_version, next_seq - 1, [], more_work=False)
        yield Stmt(MANY, _INSERT_HISTORY, history)
        yield Stmt(MANY, "DELETE FROM workflow_tasks WHERE run_id = ?", [(r[0],) for r in rows])
        for run_id, _, _, activities, timers, updates in rows:
            if activities or timers or updates:
                close = calls[run_id][0].close
                assert close is not None
                left = (False, bool(activities), bool(timers), bool(updates))
                why = f"the workflow closed ({close.status})"
                yield from self._drop_run_work(run_id, why, left)
        return results

    @staticmethod
    def _lone_changes(c: WorkflowTaskCompletion, events: int, eager: int) -> int:
        """The kinds of work ``_record_task`` touches for ``c`` when one lone statement
        did all of it (``events`` history events, ``eager`` activities leased)."""
        changes = Change.HISTORY if events else 0
        changes |= Change.TIMER if c.timers else 0
        changes |= Change.ACTIVITY_TASK if eager < len(c.activities) else 0
        changes |= (Change.RUN_CLOSED | Change.UPDATE) if c.close is not None else 0
        return int(changes)

    @staticmethod
    def _nothing_after(c: WorkflowTaskCompletion) -> bool:
        """Whether ``c`` has none of the writes that ``_record_task`` makes after the
        advancing statement whatever the run's state (a close has its own)."""
        return c.continue_as_new is None and not (
            c.cancel_timers
            or c.cancel_activities
            or c.updates
            or c.search_attributes
            or c.children
            or c.cancel_children
        )

    def _left_over(self, c: WorkflowTaskCompletion) -> str:
        """``_LEFT_OVER`` if ``c`` closes its run and the transaction sees all there is:
        with serialized writes nothing can commit between the UPDATE and the cleanup."""
        return _LEFT_OVER if c.close is not None and not self.dialect.row_locks else ""

    @staticmethod
    def _close_columns(c: WorkflowTaskCompletion, now: float) -> tuple[str, tuple[Any, ...]]:
        """What a completion that closes its run adds to the UPDATE advancing the run (so
        closing takes no statement of its own)."""
        close = c.close
        if close is None:
            return "", ()
        return ", status = ?, result = ?, failure = ?, closed_at = ?, next_run_id = ?", (
            close.status,
            dumps(close.result) if close.status == COMPLETED else None,
            dumps(close.failure) if close.failure is not None else None,
            now,
            c.continue_as_new.run_id if c.continue_as_new is not None else None,
        )

    @staticmethod
    def _task_events(c: WorkflowTaskCompletion) -> list[tuple[str, dict[str, Any]]]:
        if not c.record:
            return []
        return [*c.events, (WORKFLOW_TASK_COMPLETED, {"inputs_through": c.inputs_through})]

    def _record_task(
        self,
        c: WorkflowTaskCompletion,
        owner: str,
        now: float,
        events: list[tuple[str, dict[str, Any]]],
        advanced: Any,
        task_queued: bool,
        inline: list[ActivityTask] | None = None,
        cleaned: bool = False,
    ) -> Op[WorkflowTaskResult]:
        """The rest of a completion once the run has advanced, and closed if ``c`` closes
        it (``advanced``: the first seq for ``events``, then ``_ADVANCED``);
        ``task_queued``: the run has a task row; ``inline``: not None if the advancing
        statement made the writes of ``_inline_writes`` already, and then the activity
        tasks it leased to ``owner``. ``_LEFT_OVER`` may follow ``_ADVANCED``.
        ``cleaned``: the advancing statement closed a run with no family and removed
        its work too (a lone statement; its row may end with a ``pg_notify`` column)."""
        task = c.task
        run_id = task.run_id
        next_seq, inbound_seq, task_version, *rest = advanced
        family, left_over = rest[:3], rest[3:]
        if events:
            yield touch(Change.HISTORY)
        if events and inline is None:
            yield Stmt(
                MANY,
                _INSERT_HISTORY,
                [(run_id, next_seq + i, t, now, dumps(d)) for i, (t, d) in enumerate(events)],
            )
        read_until = next_seq  # no event has this seq yet: only update requests raise to it
        next_seq += len(events)
        if c.timers:
            yield touch(Change.TIMER)
        if c.timers and inline is None:
            yield Stmt(
                MANY,
                "INSERT INTO timers (run_id, seq, fire_at) VALUES (?, ?, ?)",
                [(run_id, seq, fire_at) for seq, fire_at in c.timers],
            )
        if c.cancel_timers:
            yield Stmt(
                MANY,
                "DELETE FROM timers WHERE run_id = ? AND seq = ?",
                [(run_id, seq) for seq in c.cancel_timers],
            )
        eager, rows = (inline, []) if inline is not None else self._activity_rows(c, owner, now)
        if len(eager) < len(c.activities):
            yield touch(Change.ACTIVITY_TASK)
        if rows:
            yield Stmt(
                MANY,
                "INSERT INTO activity_tasks (run_id, seq, task_queue, activity_type, args, "
                "options, attempt, scheduled_at, visible_at, owner, token) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        for seq in c.cancel_activities:
            # Not started: drop it. Running: flag it; the next heartbeat delivers the cancel.
            yield Stmt(
                WRITE,
                "DELETE FROM activity_tasks WHERE run_id = ? AND seq = ? AND owner IS NULL",
                (run_id, seq),
            )
            yield Stmt(
                WRITE,
                "UPDATE activity_tasks SET cancel_requested = 1 WHERE run_id = ? AND seq = ?",
                (run_id, seq),
            )
        if c.updates:
            yield touch(Change.UPDATE)
            yield Stmt(
                MANY,
                "UPDATE updates SET state = ?, result = ?, failure = ? "
                "WHERE run_id = ? AND update_id = ?",
                [
                    (
                        u.state,
                        dumps(u.result),
                        dumps(u.failure) if u.failure else None,
                        run_id,
                        u.update_id,
                    )
                    for u in c.updates
                ],
            )
        more_work = False
        if c.close is not None:  # the UPDATE that advanced the run closed it
            yield touch(Change.RUN_CLOSED | Change.UPDATE)
            new_run = c.continue_as_new
            if new_run is not None:
                yield from self._continue_as_new(run_id, new_run, c.inputs_through)
            else:
                yield from self._run_closed(
                    run_id, c.close.status, c.close.result, c.close.failure, now, family
                )
            # Not inline: the cleanup must see what committed meanwhile (an update
            # request, its task row), and follow this completion's own update states.
            if not cleaned:
                left: tuple[bool, bool, bool, bool] | None = None
                if left_over:  # known before this completion's own writes: add those
                    activities, timers, updates = left_over
                    left = (
                        task_queued,
                        bool(activities or c.activities),
                        bool(timers or c.timers),
                        bool(updates or c.updates),
                    )
                why = f"the workflow closed ({c.close.status})"
                yield from self._drop_run_work(run_id, why, left)
        else:
            # inbound_seq is a watermark that every new input (event or update request)
            # raises: past what this task read means the workflow has more to do.
            more_work = inbound_seq > c.inputs_through
            if more_work and inbound_seq >= read_until:
                # Raised by an update request, not an event: this task may have handled
                # it. Only a request still waiting is more work.
                waiting = yield Stmt(
                    ONE,
                    "SELECT 1 FROM updates WHERE run_id = ? AND state = 'requested' LIMIT 1",
                    (run_id,),
                )
                more_work = waiting is not None
            if more_work:
                yield touch(Change.WORKFLOW_TASK)
                yield Stmt(
                    WRITE,
                    "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ?, "
                    "attempt = 0 WHERE run_id = ?",
                    (now, run_id),
                )
            elif task_queued and (inline is None or inbound_seq > c.inputs_through):
                yield Stmt(WRITE, "DELETE FROM workflow_tasks WHERE run_id = ?", (run_id,))
        if c.search_attributes:
            current = yield Stmt(
                ONE, "SELECT search_attributes FROM runs WHERE run_id = ?", (run_id,)
            )
            merged = {**(loads(current[0]) or {}), **c.search_attributes}
            yield Stmt(
                WRITE,
                "UPDATE runs SET search_attributes = ? WHERE run_id = ?",
                (dumps(merged), run_id),
            )
        # Last: these may append inbound events to this run (and re-queue its task).
        for child in c.children:
            yield from self._start_child(run_id, child)
        for seq in c.cancel_children:
            child_row = yield Stmt(
                ONE,
                "SELECT run_id FROM runs WHERE parent_run_id = ? AND parent_seq = ? "
                "AND status = 'running'",
                (run_id, seq),
            )
            if child_row is not None:
                yield from self._append_inbound(
                    child_row[0], WORKFLOW_CANCEL_REQUESTED, {"reason": "parent cancelled it"}, now
                )
        return WorkflowTaskResult(
            task_version=task_version,
            history_length=next_seq - 1,
            eager_activities=eager,
            more_work=more_work,
        )

    def _inline_writes(
        self,
        c: WorkflowTaskCompletion,
        owner: str,
        now: float,
        events: list[tuple[str, dict[str, Any]]],
        source: str,
        task_queued: bool,
    ) -> tuple[str, list[Any], list[ActivityTask]] | None:
        """The common writes of a completion as data-modifying CTEs that follow the CTE
        ``source`` (the run's advancing UPDATE, returning ``first`` and ``inbound_seq``)
        and act only if it matched: one round trip for the whole completion. None when
        the dialect cannot, or the completion is unusual (the general path does it).
        A closing task's cleanup is not among them (``_record_task`` does it after)."""
        closing = c.close is not None
        if (
            not self.dialect.writes_in_with
            or c.continue_as_new is not None
            or (closing and (c.timers or c.activities))
            or max(len(events), len(c.timers), len(c.activities)) > _INLINE_ROWS
        ):
            return None
        run_id = c.task.run_id
        members: list[str] = []
        params: list[Any] = []
        if events:
            rows = ", ".join(f"({i}, ?, ?)" for i in range(len(events)))
            members.append(
                "INSERT INTO history (run_id, seq, type, time, data) SELECT ?, "
                f"{source}.first + e.i, e.t, ?, e.d FROM {source} CROSS JOIN (VALUES {rows}) "
                "AS e(i, t, d)"
            )
            params += [run_id, now]
            for event_type, data in events:
                params += [event_type, dumps(data)]
        if c.timers:
            rows = ", ".join(["(?::bigint, ?::float8)"] * len(c.timers))
            members.append(
                "INSERT INTO timers (run_id, seq, fire_at) SELECT ?, e.s, e.f "
                f"FROM {source} CROSS JOIN (VALUES {rows}) AS e(s, f)"
            )
            params.append(run_id)
            for seq, fire_at in c.timers:
                params += [seq, fire_at]
        eager, activity_rows = self._activity_rows(c, owner, now)
        if activity_rows:
            row = "(?::text, ?::bigint, ?::text, ?::text, ?::text, ?::text, ?::bigint, " + (
                "?::float8, ?::float8, ?::text, ?::text)"
            )
            members.append(
                "INSERT INTO activity_tasks (run_id, seq, task_queue, activity_type, args, "
                "options, attempt, scheduled_at, visible_at, owner, token) SELECT e.* "
                f"FROM {source} CROSS JOIN (VALUES {', '.join([row] * len(activity_rows))}) "
                "AS e(r, s, q, a, g, o, n, c, v, w, k)"
            )
            for values in activity_rows:
                params += values
        if task_queued and not closing:
            # No input past what the task read: the run has no more work (else the
            # general path decides, from inbound_seq).
            members.append(
                "DELETE FROM workflow_tasks WHERE run_id = ? AND EXISTS "
                f"(SELECT 1 FROM {source} WHERE inbound_seq <= ?)"
            )
            params += [run_id, c.inputs_through]
        ctes = "".join(f", i{i} AS ({sql})" for i, sql in enumerate(members))
        return ctes, params, eager

    def _activity_rows(
        self, c: WorkflowTaskCompletion, owner: str, now: float
    ) -> tuple[list[ActivityTask], list[tuple[Any, ...]]]:
        """The activity tasks a completion schedules: those leased to ``owner`` at once
        (eager), and every row to insert."""
        task = c.task
        run_id = task.run_id
        eager: list[ActivityTask] = []
        rows: list[tuple[Any, ...]] = []
        for act in c.activities:
            token = self._token() if len(eager) < c.eager_activity_limit else None
            rows.append(
                (
                    run_id,
                    act.seq,
                    act.task_queue,
                    act.activity_type,
                    dumps(act.args),
                    dumps(act.options),
                    0 if token is None else 1,
                    now,
                    now if token is None else c.activity_lease_until,
                    None if token is None else owner,
                    token,
                )
            )
            if token is not None:
                eager.append(
                    ActivityTask(
                        run_id=run_id,
                        workflow_id=task.workflow_id,
                        workflow_type=task.workflow_type,
                        seq=act.seq,
                        activity_type=act.activity_type,
                        task_queue=act.task_queue,
                        args=act.args,
                        options=act.options,
                        attempt=1,
                        scheduled_at=now,
                        heartbeat_details=None,
                        token=token,
                        owner=owner,
                    )
                )
        return eager, rows

    def _start_child(self, parent_run_id: str, child: NewRun) -> Op[None]:
        try:
            yield from self._start_run(child)
        except WorkflowAlreadyStartedError as e:
            failure = {
                "kind": "application",
                "type": "WorkflowAlreadyStartedError",
                "message": f"child workflow could not start: {e}",
            }
            yield from self._append_inbound(
                parent_run_id,
                CHILD_WORKFLOW_FAILED,
                {"seq": child.parent_seq, "status": "start_failed", "failure": failure},
                child.now,
            )

    def _continue_as_new(self, old_run_id: str, run: NewRun, inputs_through: int) -> Op[None]:
        """Start the next run; signals and updates the old run had not handled move over.

        The new run keeps the workflow's memo, search attributes, deadlines and parent.
        """
        old = yield Stmt(
            ONE,
            "SELECT memo, search_attributes, execution_deadline, run_timeout, parent_run_id, "
            "parent_seq, parent_close_policy FROM runs WHERE run_id = ?",
            (old_run_id,),
        )
        run.memo, run.search_attributes = loads(old[0]), loads(old[1])
        run.execution_deadline, run.run_timeout = old[2], old[3]
        run.parent_run_id, run.parent_seq, run.parent_close_policy = old[4], old[5], old[6]
        yield from self._insert_run(run)
        signals = yield Stmt(
            ALL,
            "SELECT data, time FROM history WHERE run_id = ? AND seq > ? AND type = ? ORDER BY seq",
            (old_run_id, inputs_through, SIGNAL_RECEIVED),
        )
        for data, time in signals:
            yield from self._append_inbound(run.run_id, SIGNAL_RECEIVED, _parse(data), time)
        yield Stmt(
            WRITE,
            "UPDATE updates SET run_id = ? WHERE run_id = ? AND state = 'requested'",
            (run.run_id, old_run_id),
        )

    async def fail_workflow_task(
        self, task: WorkflowTask, failure: dict[str, Any], retry_at: float
    ) -> None:
        await self._execute(partial(self._fail_workflow_task, task, failure, retry_at), writes=True)

    def _fail_workflow_task(
        self, task: WorkflowTask, failure: dict[str, Any], retry_at: float
    ) -> Op[None]:
        updated = yield Stmt(
            EXEC,
            "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ? "
            "WHERE run_id = ? AND token = ?",
            (retry_at, task.run_id, task.token),
        )
        if updated:
            yield touch(Change.WORKFLOW_TASK | Change.TIMER)  # ready at retry_at
            yield Stmt(
                WRITE,
                "UPDATE runs SET task_failure = ? WHERE run_id = ?",
                (dumps(failure), task.run_id),
            )

    # -- activities -------------------------------------------------------------------
    async def claim_activity_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[ActivityTask]:
        token = self._token()
        lease = self._lease_ready(
            "activity_tasks",
            "run_id, seq",
            "AND owner IS NULL ",  # expired leases: expired_activity_tasks
            (owner, token, lease_until, task_queue, now, limit),
        )
        read = Stmt(
            ALL,
            f"SELECT {_ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
            "ON r.run_id = a.run_id WHERE a.task_queue = ? AND a.visible_at = ? "
            "AND a.token = ? ORDER BY a.scheduled_at",
            (task_queue, lease_until, token),
        )
        rows = await self._execute_lease(_LeaseAndRead(lease, read))
        return [_activity(row) for row in rows]

    async def heartbeat_activity(
        self, task: ActivityTask, details: Any, lease_until: float
    ) -> bool:
        return await self._execute(
            partial(self._heartbeat_activity, task, details, lease_until), writes=True
        )

    def _heartbeat_activity(self, task: ActivityTask, details: Any, lease_until: float) -> Op[bool]:
        cancel_requested = yield from self._check_lease(task)
        yield Stmt(
            WRITE,
            "UPDATE activity_tasks SET heartbeat_details = ?, visible_at = ? "
            "WHERE run_id = ? AND seq = ?",
            (dumps(details), lease_until, task.run_id, task.seq),
        )
        return cancel_requested

    def _end_activity(self, task: ActivityTask) -> Op[bool]:
        """Remove the finished activity ``task`` (``StaleTaskError`` unless it still holds
        its lease); return whether the workflow still waits for its result."""
        deleted = yield Stmt(ONE, _END_ACTIVITY, (task.run_id, task.seq, task.token))
        if deleted is None:
            raise self._stale(task)
        return not deleted[0]

    async def finish_activity(
        self,
        task: ActivityTask,
        event_type: str,
        data: dict[str, Any],
        now: float,
        claim: EagerClaim | None = None,
    ) -> tuple[WorkflowTask, list[Event]] | None:
        return await self._execute(
            partial(self._finish_activity, task, event_type, data, now, claim), writes=True
        )

    def _finish_activity(
        self,
        task: ActivityTask,
        event_type: str,
        data: dict[str, Any],
        now: float,
        claim: EagerClaim | None,
    ) -> Op[tuple[WorkflowTask, list[Event]] | None]:
        if not (yield from self._end_activity(task)):
            return None  # the workflow no longer waits for this result
        appended = yield from self._append_inbound(task.run_id, event_type, data, now)
        if not appended or claim is None:
            return None
        return (yield from self._claim_woken_task(task.run_id, claim, now))

    async def finish_activity_and_continue(
        self,
        task: ActivityTask,
        data: dict[str, Any],
        now: float,
        completion: WorkflowTaskCompletion,
        expected_seq: int,
        owner: str,
    ) -> WorkflowTaskResult | None:
        return await self._execute(
            partial(
                self._finish_activity_and_continue, task, data, now, completion, expected_seq, owner
            ),
            writes=True,
        )

    def _finish_activity_and_continue(
        self,
        task: ActivityTask,
        data: dict[str, Any],
        now: float,
        completion: WorkflowTaskCompletion,
        expected_seq: int,
        owner: str,
    ) -> Op[WorkflowTaskResult | None]:
        task_version = completion.task.task_version
        events = [(ACTIVITY_COMPLETED, data), *self._task_events(completion)]
        # Only if the cached instance has seen every input: no other event took
        # expected_seq, and no workflow task is queued (for inputs that came while
        # the run's last task ran, below expected_seq) or running elsewhere.
        close_sql, close_params = self._close_columns(completion, now)
        advance = (
            "UPDATE runs SET task_version = task_version + 1, task_failure = NULL, "
            f"next_seq = next_seq + ?, inbound_seq = next_seq{close_sql} WHERE run_id = ? "
            f"AND task_version = ? AND next_seq = ? AND {_OPEN} "
            "AND NOT EXISTS (SELECT 1 FROM workflow_tasks w WHERE w.run_id = runs.run_id)"
        )
        advance_params = (len(events), *close_params, task.run_id, task_version, expected_seq)
        row: Any
        inline = self._inline_writes(completion, owner, now, events, "advanced", False)
        if self.dialect.writes_in_with:  # both steps in one round trip
            ctes, inline_params, done = inline or ("", [], None)
            if inline is not None and self._nothing_after(completion):
                row = yield self._lone_continue(
                    task,
                    completion,
                    (advance, advance_params),
                    expected_seq,
                    len(events),
                    (ctes, inline_params, len(done or ())),
                )
                if row is not None:  # it did it all (else it changed nothing)
                    return (
                        yield from self._record_task(
                            completion, owner, now, events, row, False, done, cleaned=True
                        )
                    )
            both = yield Stmt(
                ONE,
                f"WITH done AS ({_END_ACTIVITY}), advanced AS ({advance} "
                "AND EXISTS (SELECT 1 FROM done WHERE cancel_requested = 0) "
                f"RETURNING next_seq - ? AS first, {_ADVANCED} AS has_children){ctes} "
                "SELECT d.cancel_requested, a.first, a.inbound_seq, a.task_version, "
                "a.parent_run_id, a.parent_seq, a.has_children "
                "FROM done d LEFT JOIN advanced a ON TRUE",
                (
                    task.run_id,
                    task.seq,
                    task.token,
                    *advance_params,
                    len(events),
                    *inline_params,
                ),
            )
            if both is None:
                raise self._stale(task)
            if both[0]:
                return None  # the workflow no longer waits for this result
            row = None if both[1] is None else both[1:]
        else:
            done = None
            if not (yield from self._end_activity(task)):
                return None  # the workflow no longer waits for this result
            row = yield Stmt(
                ONE,
                f"{advance} RETURNING next_seq - ?, {_ADVANCED}{self._left_over(completion)}",
                (*advance_params, len(events)),
            )
        if row is None:  # the queued workflow task takes the result
            yield from self._append_inbound(task.run_id, ACTIVITY_COMPLETED, data, now)
            return None
        return (yield from self._record_task(completion, owner, now, events, row, False, done))

    def _lone_continue(
        self,
        task: ActivityTask,
        c: WorkflowTaskCompletion,
        advance: tuple[str, tuple[Any, ...]],
        expected_seq: int,
        events: int,
        inline: tuple[str, list[Any], int],
    ) -> Stmt:
        """``finish_activity_and_continue`` as one statement that needs no transaction
        around it (``Stmt.alone``): it changes nothing unless it can do all of it.

        That is when the activity still holds its lease and nobody cancelled it, no
        input came in since the cached instance's last task (``inbound_seq`` below the
        result's seq: every input raises it, and the UPDATE re-checks it against the
        newest row version), and, if the run closes, it has no parent or running child
        to tell. The run's other work goes in the same statement: with no input since,
        only the run's own earlier tasks made any, and the snapshot holds it all."""
        closing = c.close is not None
        guard = " AND inbound_seq < ?" + (_NO_FAMILY if closing else "")
        (advance_sql, advance_params), (ctes, inline_params, eager) = advance, inline
        params = [task.run_id, task.seq, task.token, *advance_params, expected_seq, events]
        # Closing: all of the run's activity tasks go (this one among them).
        which = "" if closing else " AND seq = ?"
        params += [task.run_id] if closing else [task.run_id, task.seq]
        params += inline_params
        cleanup = ""
        if closing:
            cleanup, cleanup_params = self._cleanup_ctes(
                c, "advanced", task_row=False, activities=False
            )
            params += cleanup_params
        sql = (
            "WITH lease AS (SELECT 1 FROM activity_tasks WHERE run_id = ? AND seq = ? "
            "AND token = ? AND cancel_requested = 0 FOR UPDATE), "
            f"advanced AS ({advance_sql}{guard} AND EXISTS (SELECT 1 FROM lease) "
            f"RETURNING next_seq - ? AS first, {_ADVANCED} AS has_children), "
            f"done AS (DELETE FROM activity_tasks WHERE run_id = ?{which} "
            f"AND EXISTS (SELECT 1 FROM advanced)){ctes}{cleanup} "
            "SELECT first, inbound_seq, task_version, parent_run_id, parent_seq, "
            f"has_children{NOTIFY_MARK} FROM advanced"
        )
        return Stmt(ONE, sql, params, alone=True, notify=self._lone_changes(c, 1, eager))

    def _claim_woken_task(
        self, run_id: str, claim: EagerClaim, now: float
    ) -> Op[tuple[WorkflowTask, list[Event]] | None]:
        token = self._token()
        leased = yield Stmt(
            ONE,
            "UPDATE workflow_tasks SET owner = ?, token = ?, visible_at = ?, "
            "attempt = attempt + 1 WHERE run_id = ? AND owner IS NULL AND visible_at <= ? "
            "RETURNING task_queue",
            (claim.owner, token, claim.lease_until, run_id, now),
        )
        if leased is None:
            return None
        task = yield Stmt(
            ALL,
            f"SELECT {_CLAIMED_TASK} FROM workflow_tasks t JOIN runs r ON r.run_id = t.run_id "
            "WHERE t.run_id = ?",
            (run_id,),
        )
        rows = yield Stmt(
            ALL,
            "SELECT seq, type, time, data FROM history WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, claim.after_seq),
        )
        workflow_task = self._claimed_tasks(leased[0], token, task)[0]
        return workflow_task, [Event(r[0], r[1], r[2], _parse(r[3])) for r in rows]

    async def retry_activity(
        self,
        task: ActivityTask,
        failure: dict[str, Any],
        retry_at: float,
        heartbeat_details: Any,
    ) -> None:
        await self._execute(
            partial(self._retry_activity, task, failure, retry_at, heartbeat_details), writes=True
        )

    def _retry_activity(
        self, task: ActivityTask, failure: dict[str, Any], retry_at: float, heartbeat_details: Any
    ) -> Op[None]:
        yield from self._check_lease(task)
        yield touch(Change.ACTIVITY_TASK | Change.TIMER)  # ready at retry_at
        yield Stmt(
            WRITE,
            "UPDATE activity_tasks SET owner = NULL, token = NULL, visible_at = ?, "
            "last_failure = ?, heartbeat_details = ? WHERE run_id = ? AND seq = ?",
            (retry_at, dumps(failure), dumps(heartbeat_details), task.run_id, task.seq),
        )

    async def expired_activity_tasks(self, now: float, limit: int) -> list[ActivityTask]:
        def op() -> Op[list[ActivityTask]]:
            rows = yield Stmt(
                ALL,
                f"SELECT {_ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
                "ON r.run_id = a.run_id WHERE a.owner IS NOT NULL AND a.visible_at <= ? "
                "LIMIT ?",
                (now, limit),
            )
            return [_activity(r) for r in rows]

        return await self._execute(op, writes=False)

    # -- timers, leases, housekeeping -----------------------------------------------
    async def fire_due_timers(self, now: float, limit: int) -> int:
        return await self._execute(partial(self._fire_due_timers, now, limit), writes=True)

    def _fire_due_timers(self, now: float, limit: int) -> Op[int]:
        due = yield Stmt(
            ALL,
            "SELECT run_id, seq FROM timers WHERE fire_at <= ? ORDER BY fire_at LIMIT ? "
            f"{self.dialect.skip_locked('timers')}",
            (now, limit),
        )
        if not due:
            return 0
        yield Stmt(MANY, "DELETE FROM timers WHERE run_id = ? AND seq = ?", due)
        timers = dict(due)
        if len(timers) == len(due) and 0 not in timers.values():
            # The common case, set-based: one timer per run, and none is a run's
            # deadline (whose firing closes the run and tells its parent).
            yield from self._fire_timers(timers, now)
            return len(due)
        for run_id, seq in due:  # one by one, in firing order
            if seq == 0:
                yield from self._time_out(run_id, now)
            else:
                yield from self._append_inbound(run_id, TIMER_FIRED, {"seq": seq}, now)
        return len(due)

    def _fire_timers(self, timers: dict[str, int], now: float) -> Op[None]:
        """``_append_inbound`` of a ``TimerFired`` for many runs (one timer each), as a few
        set-based statements instead of three per timer."""
        run_ids = list(timers)
        appended: list[Any] = []
        for i in range(0, len(run_ids), _ID_CHUNK):
            chunk = run_ids[i : i + _ID_CHUNK]
            appended += yield Stmt(
                ALL,
                "UPDATE runs SET next_seq = next_seq + 1, inbound_seq = next_seq "
                f"WHERE run_id IN ({_ID_LIST}) AND {_OPEN} "
                "RETURNING run_id, next_seq - 1, task_queue",
                (*chunk, *[None] * (_ID_CHUNK - len(chunk))),
            )
        if not appended:
            return
        yield touch(Change.WORKFLOW_TASK)
        yield Stmt(
            MANY,
            _INSERT_HISTORY,
            [
                (run_id, seq, TIMER_FIRED, now, dumps({"seq": timers[run_id]}))
                for run_id, seq, _ in appended
            ],
        )
        yield Stmt(
            MANY,
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            [(run_id, task_queue, now) for run_id, _, task_queue in appended],
        )

    async def next_due_times(self, after: float | None = None) -> tuple[float | None, float | None]:
        def op() -> Op[tuple[float | None, float | None]]:
            since = float("-inf") if after is None else after
            row = yield Stmt(
                ONE,
                "SELECT (SELECT min(fire_at) FROM timers), (SELECT min(t) FROM ("
                "SELECT min(visible_at) AS t FROM activity_tasks WHERE owner IS NULL "
                "AND visible_at > ? "
                "UNION ALL SELECT min(visible_at) FROM workflow_tasks WHERE owner IS NULL "
                "AND visible_at > ?) due)",
                (since, since),
            )
            return (None, None) if row is None else (row[0], row[1])

        return await self._execute(op, writes=False)

    async def leased_task_count(self) -> int:
        def op() -> Op[int]:
            row = yield Stmt(
                ONE,
                "SELECT (SELECT count(*) FROM activity_tasks WHERE owner IS NOT NULL) + "
                "(SELECT count(*) FROM workflow_tasks WHERE owner IS NOT NULL)",
            )
            return int(row[0])

        return await self._execute(op, writes=False)

    async def renew_leases(
        self,
        workflow_tasks: list[WorkflowTask],
        activity_tasks: list[ActivityTask],
        lease_until: float,
        now: float,
    ) -> None:
        await self._execute_lease(
            partial(self._renew_leases, workflow_tasks, activity_tasks, lease_until, now)
        )

    def _renew_leases(
        self,
        workflow_tasks: list[WorkflowTask],
        activity_tasks: list[ActivityTask],
        lease_until: float,
        now: float,
    ) -> Op[None]:
        if workflow_tasks:
            yield Stmt(
                MANY,
                "UPDATE workflow_tasks SET visible_at = ? WHERE run_id = ? AND token = ? "
                "AND visible_at > ?",
                [(lease_until, t.run_id, t.token, now) for t in workflow_tasks],
            )
        if activity_tasks:
            yield Stmt(
                MANY,
                "UPDATE activity_tasks SET visible_at = ? WHERE run_id = ? AND seq = ? "
                "AND token = ? AND visible_at > ?",
                [(lease_until, t.run_id, t.seq, t.token, now) for t in activity_tasks],
            )

    async def release_leases(self, owner: str, now: float) -> None:
        await self._execute(partial(self._release_leases, owner, now), writes=True)

    def _release_leases(self, owner: str, now: float) -> Op[None]:
        yield touch(Change.WORKFLOW_TASK | Change.ACTIVITY_TASK)
        yield Stmt(
            WRITE,
            "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ? "
            "WHERE owner = ? AND token IS NOT NULL",
            (now, owner),
        )
        # Activities may have run partly: expire the lease so the attempt is counted.
        yield Stmt(
            WRITE,
            "UPDATE activity_tasks SET visible_at = ? WHERE owner = ? AND token IS NOT NULL",
            (now, owner),
        )

    async def register_worker(
        self,
        task_queue: str,
        identity: str,
        workflow_types: dict[str, dict[str, list[str]]],
        activity_types: list[str],
        now: float,
    ) -> None:
        await self._execute(
            partial(
                self._register_worker, task_queue, identity, workflow_types, activity_types, now
            ),
            writes=True,
        )

    def _register_worker(
        self,
        task_queue: str,
        identity: str,
        workflow_types: dict[str, dict[str, list[str]]],
        activity_types: list[str],
        now: float,
    ) -> Op[None]:
        yield Stmt(
            WRITE,
            "INSERT INTO workers (task_queue, identity, workflow_types, activity_types, "
            "last_seen) VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_queue, identity) DO UPDATE "
            "SET workflow_types = excluded.workflow_types, "
            "activity_types = excluded.activity_types, last_seen = excluded.last_seen",
            (task_queue, identity, dumps(workflow_types), dumps(activity_types), now),
        )

    async def workflows_served(
        self, task_queue: str, since: float
    ) -> dict[str, dict[str, list[str]]] | None:
        def op() -> Op[dict[str, dict[str, list[str]]] | None]:
            rows = yield Stmt(
                ALL,
                "SELECT workflow_types FROM workers WHERE task_queue = ? AND last_seen >= ?",
                (task_queue, since),
            )
            if not rows:
                return None
            served: dict[str, dict[str, list[str]]] = {}
            for (types,) in rows:
                for name, handlers in _parse(types).items():
                    merged = served.setdefault(name, {})
                    for kind, names in handlers.items():
                        merged[kind] = sorted(set(merged.get(kind, [])) | set(names))
            return served

        return await self._execute(op, writes=False)

    # -- messages and lifecycle -------------------------------------------------
    def _find_run(
        self, namespace: str, workflow_id: str, run_id: str | None, running: bool
    ) -> Op[tuple[str, str, str]]:
        """(run_id, status, task_queue) of the given or latest run; must be running if asked.

        The row stays locked (concurrent backends) so that the run cannot close before
        the caller's signal, cancel or update is recorded.
        """
        lock = self.dialect.for_update()
        if run_id is None:
            latest = (
                "SELECT run_id, status, task_queue FROM runs WHERE namespace = ? "
                f"AND workflow_id = ? ORDER BY created_at DESC LIMIT 1 {lock}"
            )
            row = yield Stmt(ONE, latest, (namespace, workflow_id))
            # Locking waited for a transaction that closed the run? It may have started
            # its successor (continue-as-new): look again.
            for _ in range(3 if lock else 0):
                if row is None or row[1] == "running":
                    break
                again = yield Stmt(ONE, latest, (namespace, workflow_id))
                if again is None or again[0] == row[0]:
                    break
                row = again
        else:
            row = yield Stmt(
                ONE,
                "SELECT run_id, status, task_queue, next_run_id FROM runs WHERE run_id = ? "
                f"AND namespace = ? AND workflow_id = ? {lock}",
                (run_id, namespace, workflow_id),
            )
            # A run that continued as new stands for its chain: follow it to the run
            # that carries it on now (never to an unrelated later run of the same id).
            while row is not None and row[1] == CONTINUED_AS_NEW and row[3] is not None:
                row = yield Stmt(
                    ONE,
                    "SELECT run_id, status, task_queue, next_run_id FROM runs "
                    f"WHERE run_id = ? {lock}",
                    (row[3],),
                )
        which = f"run {run_id!r} of " if run_id else ""
        if row is None:
            raise WorkflowNotFoundError(
                f"no {which}workflow {workflow_id!r} in namespace {namespace!r}"
            )
        if running and row[1] != "running":
            raise WorkflowNotFoundError(
                f"{which}workflow {workflow_id!r} is not running (it is {row[1]})"
            )
        return row[0], row[1], row[2]

    async def signal_run(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        name: str,
        args: list[Any],
        now: float,
    ) -> str:
        return await self._execute(
            partial(self._signal_run, namespace, workflow_id, run_id, name, args, now), writes=True
        )

    def _signal_run(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        name: str,
        args: list[Any],
        now: float,
    ) -> Op[str]:
        target, _, _ = yield from self._find_run(namespace, workflow_id, run_id, True)
        yield from self._append_inbound(target, SIGNAL_RECEIVED, {"name": name, "args": args}, now)
        return target

    async def request_cancel(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> str:
        return await self._execute(
            partial(self._request_cancel, namespace, workflow_id, run_id, reason, now), writes=True
        )

    def _request_cancel(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> Op[str]:
        target, _, _ = yield from self._find_run(namespace, workflow_id, run_id, True)
        yield from self._append_inbound(target, WORKFLOW_CANCEL_REQUESTED, {"reason": reason}, now)
        return target

    async def terminate_run(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> str:
        return await self._execute(
            partial(self._terminate_run, namespace, workflow_id, run_id, reason, now), writes=True
        )

    def _terminate_run(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> Op[str]:
        target, _, _ = yield from self._find_run(namespace, workflow_id, run_id, True)
        yield from self._terminate(target, reason, now)
        return target

    def _terminate(self, run_id: str, reason: str, now: float) -> Op[None]:
        failure = {"kind": "terminated", "type": "Terminated", "message": reason}
        yield from self._close_from_outside(
            run_id, TERMINATED, WORKFLOW_TERMINATED, {"reason": reason}, failure, now
        )

    def _time_out(self, run_id: str, now: float) -> Op[None]:
        failure = {
            "kind": "timeout",
            "type": "TimeoutFailure",
            "timeout_type": "workflow",
            "message": "the workflow ran past its run or execution timeout",
        }
        yield from self._close_from_outside(run_id, TIMED_OUT, WORKFLOW_TIMED_OUT, {}, failure, now)

    def _close_from_outside(
        self,
        run_id: str,
        status: str,
        event_type: str,
        data: dict[str, Any],
        failure: dict[str, Any],
        now: float,
    ) -> Op[None]:
        """Close a running run without its code (terminate, timeout): history says why."""
        row = yield Stmt(
            ONE,
            "UPDATE runs SET next_seq = next_seq + 1, status = ?, closed_at = ?, failure = ? "
            "WHERE run_id = ? AND status = 'running' RETURNING next_seq - 1",
            (status, now, dumps(failure), run_id),
        )
        if row is None:
            return
        yield Stmt(
            WRITE,
            _INSERT_HISTORY,
            (run_id, row[0], event_type, now, dumps(data)),
        )
        yield from self._run_closed(run_id, status, None, failure, now)
        yield from self._drop_run_work(run_id, f"the workflow closed ({status})")

    def _run_closed(
        self,
        run_id: str,
        status: str,
        result: Any,
        failure: dict[str, Any] | None,
        now: float,
        family: Any = None,
    ) -> Op[None]:
        """Tell the parent (if any) and apply this run's parent-close policy to its children.

        ``family``: (parent run id, parent seq, has running children) if known already."""
        yield touch(Change.RUN_CLOSED | Change.UPDATE)
        parent = family or (
            yield Stmt(
                ONE,
                f"SELECT {_FAMILY} FROM runs WHERE run_id = ?",
                (run_id,),
            )
        )
        if parent is not None and parent[0] is not None:
            if status == COMPLETED:
                event = (CHILD_WORKFLOW_COMPLETED, {"seq": parent[1], "result": result})
            else:
                event = (
                    CHILD_WORKFLOW_FAILED,
                    {"seq": parent[1], "status": status, "failure": failure},
                )
            yield from self._append_inbound(parent[0], event[0], event[1], now)
        if parent is None or not parent[2]:
            return  # no running children
        children = yield Stmt(
            ALL,
            "SELECT run_id, parent_close_policy FROM runs WHERE parent_run_id = ? "
            "AND status = 'running'",
            (run_id,),
        )
        for child_id, policy in children:
            if policy == "terminate":
                yield from self._terminate(child_id, "its parent workflow closed", now)
            elif policy == "request_cancel":
                yield from self._append_inbound(
                    child_id, WORKFLOW_CANCEL_REQUESTED, {"reason": "its parent closed"}, now
                )

    def _cleanup_ctes(
        self, c: WorkflowTaskCompletion, source: str, *, task_row: bool, activities: bool = True
    ) -> tuple[str, list[Any]]:
        """``_drop_run_work`` for the run ``c`` closes, as CTEs that act only if the CTE
        ``source`` (the closing UPDATE) matched: for a statement whose guard makes sure
        nothing of the run committed since its snapshot (no input came in)."""
        assert c.close is not None
        run_id = c.task.run_id
        matched = f" AND EXISTS (SELECT 1 FROM {source})"
        wanted = (task_row, activities, True)
        members = [
            f"DELETE FROM {table} WHERE run_id = ?{matched}"
            for table, want in zip(_RUN_WORK_TABLES, wanted, strict=True)
            if want
        ]
        params: list[Any] = [run_id] * len(members)
        members.append(_REJECT_OPEN_UPDATES + matched)
        failure = self._closed_failure(f"the workflow closed ({c.close.status})")
        params += [dumps(failure), run_id]
        return "".join(f", c{i} AS ({sql})" for i, sql in enumerate(members)), params

    @staticmethod
    def _closed_failure(why: str) -> dict[str, Any]:
        """How the open updates of a run that closed are answered."""
        return {"kind": "application", "type": "WorkflowClosed", "message": why}

    @staticmethod
    def _drop_run_work(
        run_id: str, why: str, left: tuple[bool, bool, bool, bool] | None = None
    ) -> Op[None]:
        """A closed run has no pending work; its open updates are answered with ``why``.

        ``left``: whether it may still have a workflow task, activity tasks, timers and
        open updates, if known; only those are cleaned up (None: all)."""
        left = left or (True, True, True, True)
        for table, maybe in zip(_RUN_WORK_TABLES, left[:3], strict=True):
            if maybe:
                yield Stmt(WRITE, f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        if not left[3]:
            return
        failure = SqlStore._closed_failure(why)
        yield Stmt(
            WRITE,
            _REJECT_OPEN_UPDATES,
            (dumps(failure), run_id),
        )

    async def request_update(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        request: UpdateRequest,
        now: float,
    ) -> UpdateState:
        return await self._execute(
            partial(self._request_update_op, namespace, workflow_id, run_id, request, now),
            writes=True,
        )

    def _request_update_op(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        request: UpdateRequest,
        now: float,
    ) -> Op[UpdateState]:
        target, status, _ = yield from self._find_run(namespace, workflow_id, run_id, False)
        existing = yield from self._update_state(target, request.update_id)
        if existing is None:
            # Handled by a run that has continued as new since: same id, same result.
            row = yield Stmt(
                ONE,
                "SELECT u.run_id, u.state, u.result, u.failure FROM runs r JOIN updates u "
                "ON u.run_id = r.run_id AND u.update_id = ? WHERE r.namespace = ? "
                "AND r.workflow_id = ? AND r.status = ? ORDER BY r.created_at DESC LIMIT 1",
                (request.update_id, namespace, workflow_id, CONTINUED_AS_NEW),
            )
            if row is not None:
                run, state, result, failure = row
                existing = UpdateState(run, request.update_id, state, loads(result), loads(failure))
        if existing is not None and existing.state != "rejected":
            return existing  # the same update id: deduplicated
        if status != "running":
            raise WorkflowNotFoundError(
                f"workflow {workflow_id!r} is not running (it is {status}); "
                "updates need a running workflow"
            )
        return (yield from self._request_update(target, request, now))

    def _request_update(self, run_id: str, request: UpdateRequest, now: float) -> Op[UpdateState]:
        yield touch(Change.WORKFLOW_TASK)
        yield Stmt(
            WRITE,
            "INSERT INTO updates (run_id, update_id, name, args, state, created_at) "
            "VALUES (?, ?, ?, ?, 'requested', ?) ON CONFLICT (run_id, update_id) DO UPDATE "
            "SET name = excluded.name, args = excluded.args, state = 'requested', "
            "failure = NULL, created_at = excluded.created_at",
            (run_id, request.update_id, request.name, dumps(request.args), now),
        )
        # Raise the inputs watermark so a workflow task running right now stays queued.
        task_queue = yield Stmt(
            ONE,
            "UPDATE runs SET inbound_seq = next_seq WHERE run_id = ? RETURNING task_queue",
            (run_id,),
        )
        yield Stmt(
            WRITE,
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, task_queue[0], now),
        )
        return UpdateState(run_id=run_id, update_id=request.update_id, state="requested")

    @staticmethod
    def _update_state(run_id: str, update_id: str) -> Op[UpdateState | None]:
        row = yield Stmt(
            ONE,
            "SELECT state, result, failure FROM updates WHERE run_id = ? AND update_id = ?",
            (run_id, update_id),
        )
        if row is None:
            return None
        return UpdateState(run_id, update_id, row[0], loads(row[1]), loads(row[2]))

    async def get_update(self, run_id: str, update_id: str) -> UpdateState | None:
        return await self._execute(lambda: self._update_state(run_id, update_id), writes=False)

    async def pending_updates(self, run_id: str) -> list[UpdateRequest]:
        def op() -> Op[list[UpdateRequest]]:
            rows = yield Stmt(
                ALL,
                "SELECT update_id, name, args FROM updates WHERE run_id = ? "
                "AND state = 'requested' ORDER BY created_at",
                (run_id,),
            )
            return [UpdateRequest(r[0], r[1], _parse(r[2])) for r in rows]

        return await self._execute(op, writes=False)

    async def create_query(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        query_id: str,
        name: str,
        args: list[Any],
        now: float,
    ) -> None:
        await self._execute(
            partial(self._create_query, namespace, workflow_id, run_id, query_id, name, args, now),
            writes=True,
        )

    def _create_query(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        query_id: str,
        name: str,
        args: list[Any],
        now: float,
    ) -> Op[None]:
        target, _, task_queue = yield from self._find_run(namespace, workflow_id, run_id, False)
        yield touch(Change.QUERY)
        yield Stmt(
            WRITE,
            "INSERT INTO queries (query_id, run_id, task_queue, name, args, created_at, "
            "visible_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (query_id, target, task_queue, name, dumps(args), now, now),
        )

    async def claim_queries(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[QueryTask]:
        return await self._execute_lease(
            partial(self._claim_queries, task_queue, owner, limit, lease_until, now)
        )

    def _claim_queries(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> Op[list[QueryTask]]:
        rows = yield Stmt(
            ALL,
            "SELECT q.query_id, q.run_id, r.workflow_id, r.workflow_type, r.namespace, "
            "q.name, q.args FROM queries q JOIN runs r ON r.run_id = q.run_id "
            "WHERE q.task_queue = ? AND q.answered = 0 AND q.visible_at <= ? "
            f"ORDER BY q.visible_at LIMIT ? {self.dialect.skip_locked('q')}",
            (task_queue, now, limit),
        )
        tasks = []
        for query_id, run_id, wf_id, wf_type, ns, name, args in rows:
            token = self._token()
            yield Stmt(
                WRITE,
                "UPDATE queries SET owner = ?, token = ?, visible_at = ? WHERE query_id = ?",
                (owner, token, lease_until, query_id),
            )
            tasks.append(QueryTask(query_id, run_id, wf_id, wf_type, ns, name, _parse(args), token))
        return tasks

    async def answer_query(
        self, query: QueryTask, result: Any, failure: dict[str, Any] | None
    ) -> None:
        await self._execute(partial(self._answer_query, query, result, failure), writes=True)

    def _answer_query(
        self, query: QueryTask, result: Any, failure: dict[str, Any] | None
    ) -> Op[None]:
        yield touch(Change.QUERY)
        yield Stmt(
            WRITE,
            "UPDATE queries SET answered = 1, result = ?, failure = ? "
            "WHERE query_id = ? AND token = ?",
            (dumps(result), dumps(failure) if failure else None, query.query_id, query.token),
        )

    async def take_query_answer(self, query_id: str) -> tuple[bool, Any, dict[str, Any] | None]:
        return await self._execute(partial(self._take_query_answer, query_id), writes=True)

    def _take_query_answer(self, query_id: str) -> Op[tuple[bool, Any, dict[str, Any] | None]]:
        row = yield Stmt(
            ONE,
            "SELECT answered, result, failure FROM queries WHERE query_id = ?",
            (query_id,),
        )
        if row is None or not row[0]:
            return False, None, None
        yield Stmt(WRITE, "DELETE FROM queries WHERE query_id = ?", (query_id,))
        return True, loads(row[1]), loads(row[2])

    async def drop_query(self, query_id: str) -> None:
        await self._execute(partial(self._drop_query, query_id), writes=True)

    def _drop_query(self, query_id: str) -> Op[None]:
        yield Stmt(WRITE, "DELETE FROM queries WHERE query_id = ?", (query_id,))


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
