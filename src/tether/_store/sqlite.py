"""SQLite store: the embedded default.

One thread owns the connection and commits in groups: callers queue operations,
the thread runs every queued operation inside one transaction (each in its own
savepoint, so one failing operation does not undo the others), commits once, and
only then resolves the callers' futures. Many state transitions share one fsync;
none is acknowledged before its commit is durable (WAL, ``synchronous=FULL``).

Other processes' commits are noticed through ``PRAGMA data_version`` and wake
this process's waiters, so cross-process dispatch does not wait for a poll.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tether._store.base import (
    COMPLETED,
    TIMER_FIRED,
    WORKFLOW_STARTED,
    WORKFLOW_TASK_COMPLETED,
    ActivityTask,
    Event,
    NewRun,
    RunInfo,
    StartOutcome,
    Store,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
)
from tether.exceptions import (
    StaleTaskError,
    StoreError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    workflow_type TEXT NOT NULL,
    task_queue TEXT NOT NULL,
    status TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    closed_at REAL,
    result TEXT,
    failure TEXT,
    next_seq INTEGER NOT NULL,
    inbound_seq INTEGER NOT NULL,
    task_version INTEGER NOT NULL DEFAULT 0,
    task_failure TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS runs_open_workflow_id
    ON runs(namespace, workflow_id) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS runs_by_workflow_id ON runs(namespace, workflow_id, created_at);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs(namespace, created_at);
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workflow_tasks (
    run_id TEXT PRIMARY KEY,
    task_queue TEXT NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    token TEXT,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workflow_tasks_ready ON workflow_tasks(task_queue, visible_at);
CREATE TABLE IF NOT EXISTS activity_tasks (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    task_queue TEXT NOT NULL,
    activity_type TEXT NOT NULL,
    args TEXT NOT NULL,
    options TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    scheduled_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    token TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    heartbeat_details TEXT,
    last_failure TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS activity_tasks_ready ON activity_tasks(task_queue, visible_at);
CREATE INDEX IF NOT EXISTS activity_tasks_leases ON activity_tasks(owner, visible_at);
CREATE TABLE IF NOT EXISTS timers (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fire_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers(fire_at);
CREATE TABLE IF NOT EXISTS workers (
    task_queue TEXT NOT NULL,
    identity TEXT NOT NULL,
    workflow_types TEXT NOT NULL,
    activity_types TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (task_queue, identity)
);
"""

_MAX_BATCH = 512
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(value: Any) -> str:
    return _DUMPS(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class _Op:
    __slots__ = ("fn", "fut", "loop", "writes")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        writes: bool,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.fut = fut
        self.writes = writes


def _resolve_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _deliver(results: list[tuple[_Op, bool, Any]]) -> None:
    """Hand results back with one wake-up per event loop, not one per operation."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for op, ok, value in results:
        if not ok and isinstance(value, sqlite3.Error):
            value = StoreError(f"SQLite error: {value}", retryable=True)
        by_loop.setdefault(op.loop, []).append((op.fut, ok, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:
            pass  # the caller's loop has closed; nobody is waiting


class SqliteStore(Store):
    """A store in one SQLite file, shared safely by any number of local processes.

    Two threads own one connection each: the writer commits in groups, the reader
    serves reads from WAL snapshots without waiting behind the writer's fsync.
    """

    def __init__(self, path: str, *, poll_interval: float = 0.01) -> None:
        self.path = path
        self._poll_interval = poll_interval
        self._writes: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        in_memory = path == ":memory:"
        self._reads = self._writes if in_memory else queue.SimpleQueue()
        self._waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self._waiters_lock = threading.Lock()
        self._closed = False
        self._token_prefix = secrets.token_hex(6)
        self._token_counter = itertools.count()
        self._threads: list[threading.Thread] = []
        self._open_thread(self._run_writer, "writer")
        if not in_memory:
            self._open_thread(self._run_reader, "reader")

    def _open_thread(self, target: Callable[[sqlite3.Connection], None], role: str) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                conn = self._connect()
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            try:
                target(conn)
            finally:
                conn.close()

        thread = threading.Thread(target=main, name=f"tether-sqlite-{role}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            self._shutdown_threads()
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: {failure[0]}", retryable=False
            )
        self._threads.append(thread)

    def _token(self) -> str:
        """A lease token unique across processes (random prefix) without a syscall each."""
        return f"{self._token_prefix}{next(self._token_counter):x}"

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return conn

    # -- the threads -------------------------------------------------------------
    @staticmethod
    def _drain(q: queue.SimpleQueue[_Op | None], first: _Op) -> tuple[list[_Op], bool]:
        batch = [first]
        while len(batch) < _MAX_BATCH:
            try:
                op = q.get_nowait()
            except queue.Empty:
                break
            if op is None:
                return batch, True
            batch.append(op)
        return batch, False

    def _run_reader(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._reads.get()
            if first is None:
                return
            batch, stop = self._drain(self._reads, first)
            results: list[tuple[_Op, bool, Any]] = []
            for op in batch:
                try:
                    results.append((op, True, op.fn(conn)))
                except BaseException as e:
                    results.append((op, False, e))
            _deliver(results)
            if stop:
                return

    def _run_writer(self, conn: sqlite3.Connection) -> None:
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        while True:
            try:
                first = self._writes.get(timeout=self._poll_interval)
            except queue.Empty:
                # Another process committed? Wake our waiters without polling the tables.
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != data_version:
                    data_version = version
                    self._notify()
                continue
            if first is None:
                return
            batch, stop = self._drain(self._writes, first)
            changed = self._run_batch(conn, batch)
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if changed or version != data_version:
                data_version = version
                self._notify()
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> bool:
        writes = any(op.writes for op in batch)
        before = conn.total_changes
        results: list[tuple[_Op, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
            for op in batch:
                if len(batch) > 1 and op.writes:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op.fn(conn)
                    except BaseException as e:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((op, False, e))
                        continue
                    conn.execute("RELEASE op")
                    results.append((op, True, value))
                else:
                    try:
                        results.append((op, True, op.fn(conn)))
                    except BaseException as e:
                        if len(batch) == 1:
                            conn.execute("ROLLBACK")
                        results.append((op, False, e))
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = StoreError(f"SQLite transaction failed: {e}", retryable=True)
            results = [(op, False, error) for op in batch]
        # Only now, after COMMIT returned (fsync done), are callers told.
        _deliver(results)
        return conn.total_changes != before

    def _notify(self) -> None:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, {}
        for loop, futs in waiters.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, [(f, True, None) for f in futs])
            except RuntimeError:
                pass

    async def _call(self, fn: Callable[[sqlite3.Connection], T], writes: bool = True) -> T:
        if self._closed:
            raise StoreError("the store is closed", retryable=False)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        (self._writes if writes else self._reads).put(_Op(fn, loop, fut, writes))
        return await fut

    def change_waiter(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._waiters_lock:
            self._waiters.setdefault(loop, []).append(fut)
        return fut

    def _shutdown_threads(self) -> None:
        self._writes.put(None)
        if self._reads is not self._writes:
            self._reads.put(None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shutdown_threads()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join)

    # -- runs --------------------------------------------------------------------
    async def start_run(self, run: NewRun) -> StartOutcome:
        def op(conn: sqlite3.Connection) -> StartOutcome:
            # A repeated request (a client retrying after a lost reply) gets the run it
            # created, even if that run has closed since: never start the work twice.
            same_request = conn.execute(
                "SELECT run_id FROM runs WHERE namespace = ? AND workflow_id = ? "
                "AND request_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (run.namespace, run.workflow_id, run.request_id),
            ).fetchone()
            if same_request is not None:
                return StartOutcome(run_id=same_request[0], created=False)
            row = conn.execute(
                "SELECT run_id, request_id FROM runs "
                "WHERE namespace = ? AND workflow_id = ? AND status = 'running'",
                (run.namespace, run.workflow_id),
            ).fetchone()
            if row is not None:
                if row[1] == run.request_id:
                    return StartOutcome(run_id=row[0], created=False)
                raise WorkflowAlreadyStartedError(
                    f"workflow id {run.workflow_id!r} is already running (run {row[0]}); "
                    "wait for it to close, or start with another id",
                    workflow_id=run.workflow_id,
                    run_id=row[0],
                )
            conn.execute(
                "INSERT INTO runs (run_id, namespace, workflow_id, workflow_type, task_queue, "
                "status, request_id, created_at, next_seq, inbound_seq) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, ?, 2, 1)",
                (
                    run.run_id,
                    run.namespace,
                    run.workflow_id,
                    run.workflow_type,
                    run.task_queue,
                    run.request_id,
                    run.now,
                ),
            )
            data = {
                "workflow_id": run.workflow_id,
                "workflow_type": run.workflow_type,
                "task_queue": run.task_queue,
                "args": run.args,
                "seed": run.seed,
                "namespace": run.namespace,
            }
            conn.execute(
                "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, 1, ?, ?, ?)",
                (run.run_id, WORKFLOW_STARTED, run.now, _dumps(data)),
            )
            conn.execute(
                "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?)",
                (run.run_id, run.task_queue, run.now),
            )
            return StartOutcome(run_id=run.run_id, created=True)

        return await self._call(op)

    _RUN_COLUMNS = (
        "namespace, workflow_id, run_id, workflow_type, task_queue, status, created_at, "
        "closed_at, result, failure, next_seq, task_failure"
    )

    @staticmethod
    def _run_info(row: tuple[Any, ...]) -> RunInfo:
        return RunInfo(
            namespace=row[0],
            workflow_id=row[1],
            run_id=row[2],
            workflow_type=row[3],
            task_queue=row[4],
            status=row[5],
            created_at=row[6],
            closed_at=row[7],
            result=_loads(row[8]),
            failure=_loads(row[9]),
            history_length=row[10] - 1,
            task_failure=_loads(row[11]),
        )

    async def get_run(self, namespace: str, workflow_id: str, run_id: str | None) -> RunInfo:
        def op(conn: sqlite3.Connection) -> RunInfo:
            if run_id is None:
                row = conn.execute(
                    f"SELECT {self._RUN_COLUMNS} FROM runs WHERE namespace = ? AND "
                    "workflow_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
                    (namespace, workflow_id),
                ).fetchone()
            else:
                row = conn.execute(
                    f"SELECT {self._RUN_COLUMNS} FROM runs WHERE run_id = ? AND namespace = ? "
                    "AND workflow_id = ?",
                    (run_id, namespace, workflow_id),
                ).fetchone()
            if row is None:
                which = f"run {run_id!r} of " if run_id else ""
                raise WorkflowNotFoundError(
                    f"no {which}workflow {workflow_id!r} in namespace {namespace!r}"
                )
            return self._run_info(row)

        return await self._call(op, writes=False)

    async def list_runs(
        self,
        namespace: str,
        *,
        status: str | None = None,
        workflow_type: str | None = None,
        limit: int = 1000,
    ) -> list[RunInfo]:
        def op(conn: sqlite3.Connection) -> list[RunInfo]:
            sql = f"SELECT {self._RUN_COLUMNS} FROM runs WHERE namespace = ?"
            params: list[Any] = [namespace]
            if status is not None:
                sql += " AND status = ?"
                params.append(status)
            if workflow_type is not None:
                sql += " AND workflow_type = ?"
                params.append(workflow_type)
            sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
            params.append(limit)
            return [self._run_info(r) for r in conn.execute(sql, params)]

        return await self._call(op, writes=False)

    async def closed_runs(self, run_ids: list[str]) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            closed: list[str] = []
            for i in range(0, len(run_ids), 500):
                chunk = run_ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                closed += [
                    r[0]
                    for r in conn.execute(
                        f"SELECT run_id FROM runs WHERE run_id IN ({marks}) "
                        "AND status != 'running'",
                        chunk,
                    )
                ]
            return closed

        return await self._call(op, writes=False)

    async def read_history(self, run_id: str, after_seq: int = 0) -> list[Event]:
        def op(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, type, time, data FROM history WHERE run_id = ? AND seq > ? "
                "ORDER BY seq",
                (run_id, after_seq),
            ).fetchall()
            return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

        return await self._call(op, writes=False)

    # -- helpers used inside transactions ------------------------------------------
    @staticmethod
    def _append_inbound(
        conn: sqlite3.Connection, run_id: str, event_type: str, data: dict[str, Any], now: float
    ) -> bool:
        """Append an inbound event to an open run and make sure a workflow task is queued."""
        row = conn.execute(
            "UPDATE runs SET next_seq = next_seq + 1, inbound_seq = next_seq "
            "WHERE run_id = ? AND status = 'running' RETURNING next_seq - 1, task_queue",
            (run_id,),
        ).fetchone()
        if row is None:
            return False
        seq, task_queue = row
        conn.execute(
            "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, ?, ?, ?, ?)",
            (run_id, seq, event_type, now, _dumps(data)),
        )
        conn.execute(
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, task_queue, now),
        )
        return True

    # -- workflow tasks ---------------------------------------------------------------
    async def claim_workflow_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[WorkflowTask]:
        def op(conn: sqlite3.Connection) -> list[WorkflowTask]:
            rows = conn.execute(
                "SELECT t.run_id, r.workflow_id, r.workflow_type, r.namespace, t.attempt, "
                "r.task_version, r.next_seq FROM workflow_tasks t JOIN runs r "
                "ON r.run_id = t.run_id WHERE t.task_queue = ? AND t.visible_at <= ? "
                "ORDER BY t.visible_at LIMIT ?",
                (task_queue, now, limit),
            ).fetchall()
            tasks = []
            for run_id, wf_id, wf_type, ns, attempt, version, next_seq in rows:
                token = self._token()
                conn.execute(
                    "UPDATE workflow_tasks SET owner = ?, token = ?, visible_at = ?, "
                    "attempt = attempt + 1 WHERE run_id = ?",
                    (owner, token, lease_until, run_id),
                )
                tasks.append(
                    WorkflowTask(
                        run_id=run_id,
                        workflow_id=wf_id,
                        workflow_type=wf_type,
                        task_queue=task_queue,
                        namespace=ns,
                        token=token,
                        attempt=attempt + 1,
                        task_version=version,
                        history_length=next_seq - 1,
                    )
                )
            return tasks

        return await self._call(op)

    async def complete_workflow_task(
        self, completion: WorkflowTaskCompletion, owner: str, now: float
    ) -> WorkflowTaskResult:
        c = completion
        task = c.task

        def op(conn: sqlite3.Connection) -> WorkflowTaskResult:
            held = conn.execute(
                "SELECT token FROM workflow_tasks WHERE run_id = ?", (task.run_id,)
            ).fetchone()
            if held is None or held[0] != task.token:
                raise StaleTaskError(
                    f"workflow task of run {task.run_id} is no longer leased by this worker"
                )
            row = conn.execute(
                "UPDATE runs SET task_version = task_version + 1, task_failure = NULL "
                "WHERE run_id = ? AND task_version = ? AND status = 'running' "
                "RETURNING next_seq, inbound_seq, task_version",
                (task.run_id, task.task_version),
            ).fetchone()
            if row is None:
                raise StaleTaskError(
                    f"run {task.run_id} advanced past task version {task.task_version}"
                )
            next_seq, inbound_seq, task_version = row
            events = [*c.events, (WORKFLOW_TASK_COMPLETED, {"inputs_through": c.inputs_through})]
            conn.executemany(
                "INSERT INTO history (run_id, seq, type, time, data) VALUES (?, ?, ?, ?, ?)",
                [
                    (task.run_id, next_seq + i, etype, now, _dumps(data))
                    for i, (etype, data) in enumerate(events)
                ],
            )
            next_seq += len(events)
            if c.timers:
                conn.executemany(
                    "INSERT INTO timers (run_id, seq, fire_at) VALUES (?, ?, ?)",
                    [(task.run_id, seq, fire_at) for seq, fire_at in c.timers],
                )
            if c.cancel_timers:
                conn.executemany(
                    "DELETE FROM timers WHERE run_id = ? AND seq = ?",
                    [(task.run_id, seq) for seq in c.cancel_timers],
                )
            eager: list[ActivityTask] = []
            for act in c.activities:
                leased = len(eager) < c.eager_activity_limit
                token = self._token() if leased else None
                args_text = _dumps(act.args)
                options_text = _dumps(act.options)
                conn.execute(
                    "INSERT INTO activity_tasks (run_id, seq, task_queue, activity_type, args, "
                    "options, attempt, scheduled_at, visible_at, owner, token) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task.run_id,
                        act.seq,
                        act.task_queue,
                        act.activity_type,
                        args_text,
                        options_text,
                        1 if leased else 0,
                        now,
                        c.activity_lease_until if leased else now,
                        owner if leased else None,
                        token,
                    ),
                )
                if token is not None:
                    eager.append(
                        ActivityTask(
                            run_id=task.run_id,
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
            for seq in c.cancel_activities:
                conn.execute(
                    "DELETE FROM activity_tasks WHERE run_id = ? AND seq = ? AND owner IS NULL",
                    (task.run_id, seq),
                )
                conn.execute(
                    "UPDATE activity_tasks SET cancel_requested = 1 WHERE run_id = ? AND seq = ?",
                    (task.run_id, seq),
                )
            more_work = False
            if c.close is not None:
                conn.execute(
                    "UPDATE runs SET status = ?, result = ?, failure = ?, closed_at = ?, "
                    "next_seq = ? WHERE run_id = ?",
                    (
                        c.close.status,
                        _dumps(c.close.result) if c.close.status == COMPLETED else None,
                        _dumps(c.close.failure) if c.close.failure is not None else None,
                        now,
                        next_seq,
                        task.run_id,
                    ),
                )
                for table in ("workflow_tasks", "activity_tasks", "timers"):
                    conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (task.run_id,))
            else:
                conn.execute(
                    "UPDATE runs SET next_seq = ? WHERE run_id = ?", (next_seq, task.run_id)
                )
                more_work = inbound_seq > c.inputs_through
                if more_work:
                    conn.execute(
                        "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ?, "
                        "attempt = 0 WHERE run_id = ?",
                        (now, task.run_id),
                    )
                else:
                    conn.execute("DELETE FROM workflow_tasks WHERE run_id = ?", (task.run_id,))
            return WorkflowTaskResult(
                task_version=task_version,
                history_length=next_seq - 1,
                eager_activities=eager,
                more_work=more_work,
            )

        return await self._call(op)

    async def fail_workflow_task(
        self, task: WorkflowTask, failure: dict[str, Any], retry_at: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ? "
                "WHERE run_id = ? AND token = ?",
                (retry_at, task.run_id, task.token),
            ).rowcount
            if updated:
                conn.execute(
                    "UPDATE runs SET task_failure = ? WHERE run_id = ?",
                    (_dumps(failure), task.run_id),
                )

        await self._call(op)

    # -- activities -------------------------------------------------------------------
    _ACTIVITY_COLUMNS = (
        "a.run_id, r.workflow_id, r.workflow_type, a.seq, a.activity_type, a.task_queue, a.args, "
        "a.options, a.attempt, a.scheduled_at, a.heartbeat_details, a.token, a.owner, "
        "a.cancel_requested"
    )

    @staticmethod
    def _activity(row: tuple[Any, ...]) -> ActivityTask:
        return ActivityTask(
            run_id=row[0],
            workflow_id=row[1],
            workflow_type=row[2],
            seq=row[3],
            activity_type=row[4],
            task_queue=row[5],
            args=json.loads(row[6]),
            options=json.loads(row[7]),
            attempt=row[8],
            scheduled_at=row[9],
            heartbeat_details=_loads(row[10]),
            token=row[11],
            owner=row[12],
            cancel_requested=bool(row[13]),
        )

    async def claim_activity_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[ActivityTask]:
        def op(conn: sqlite3.Connection) -> list[ActivityTask]:
            keys = conn.execute(
                "SELECT run_id, seq FROM activity_tasks WHERE task_queue = ? AND visible_at <= ? "
                "AND owner IS NULL ORDER BY visible_at LIMIT ?",
                (task_queue, now, limit),
            ).fetchall()
            tasks = []
            for run_id, seq in keys:
                conn.execute(
                    "UPDATE activity_tasks SET owner = ?, token = ?, visible_at = ?, "
                    "attempt = attempt + 1 WHERE run_id = ? AND seq = ?",
                    (owner, self._token(), lease_until, run_id, seq),
                )
                row = conn.execute(
                    f"SELECT {self._ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
                    "ON r.run_id = a.run_id WHERE a.run_id = ? AND a.seq = ?",
                    (run_id, seq),
                ).fetchone()
                tasks.append(self._activity(row))
            return tasks

        return await self._call(op)

    @staticmethod
    def _check_lease(conn: sqlite3.Connection, task: ActivityTask) -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT token, cancel_requested FROM activity_tasks WHERE run_id = ? AND seq = ?",
            (task.run_id, task.seq),
        ).fetchone()
        if row is None or row[0] != task.token:
            raise StaleTaskError(
                f"activity {task.activity_type} (#{task.seq}) of run {task.run_id}, "
                f"attempt {task.attempt}, is no longer leased by this worker"
            )
        return tuple(row)

    async def heartbeat_activity(
        self, task: ActivityTask, details: Any, lease_until: float
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            _, cancel_requested = self._check_lease(conn, task)
            conn.execute(
                "UPDATE activity_tasks SET heartbeat_details = ?, visible_at = ? "
                "WHERE run_id = ? AND seq = ?",
                (_dumps(details), lease_until, task.run_id, task.seq),
            )
            return bool(cancel_requested)

        return await self._call(op)

    async def finish_activity(
        self, task: ActivityTask, event_type: str, data: dict[str, Any], now: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _, cancel_requested = self._check_lease(conn, task)
            conn.execute(
                "DELETE FROM activity_tasks WHERE run_id = ? AND seq = ?", (task.run_id, task.seq)
            )
            if not cancel_requested:
                self._append_inbound(conn, task.run_id, event_type, data, now)

        await self._call(op)

    async def retry_activity(
        self,
        task: ActivityTask,
        failure: dict[str, Any],
        retry_at: float,
        heartbeat_details: Any,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            self._check_lease(conn, task)
            conn.execute(
                "UPDATE activity_tasks SET owner = NULL, token = NULL, visible_at = ?, "
                "last_failure = ?, heartbeat_details = ? WHERE run_id = ? AND seq = ?",
                (retry_at, _dumps(failure), _dumps(heartbeat_details), task.run_id, task.seq),
            )

        await self._call(op)

    async def expired_activity_tasks(self, now: float, limit: int) -> list[ActivityTask]:
        def op(conn: sqlite3.Connection) -> list[ActivityTask]:
            rows = conn.execute(
                f"SELECT {self._ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
                "ON r.run_id = a.run_id WHERE a.owner IS NOT NULL AND a.visible_at <= ? "
                "LIMIT ?",
                (now, limit),
            ).fetchall()
            return [self._activity(r) for r in rows]

        return await self._call(op, writes=False)

    # -- timers, leases, housekeeping -----------------------------------------------
    async def fire_due_timers(self, now: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            due = conn.execute(
                "SELECT run_id, seq FROM timers WHERE fire_at <= ? ORDER BY fire_at LIMIT ?",
                (now, limit),
            ).fetchall()
            for run_id, seq in due:
                conn.execute("DELETE FROM timers WHERE run_id = ? AND seq = ?", (run_id, seq))
                self._append_inbound(conn, run_id, TIMER_FIRED, {"seq": seq}, now)
            return len(due)

        return await self._call(op)

    async def next_due_time(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT min(t) FROM ("
                "SELECT min(fire_at) AS t FROM timers "
                "UNION ALL SELECT min(visible_at) FROM activity_tasks WHERE owner IS NULL "
                "UNION ALL SELECT min(visible_at) FROM workflow_tasks WHERE owner IS NULL)"
            ).fetchone()
            return None if row is None else row[0]

        return await self._call(op, writes=False)

    async def leased_task_count(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "SELECT (SELECT count(*) FROM activity_tasks WHERE owner IS NOT NULL) + "
                    "(SELECT count(*) FROM workflow_tasks WHERE owner IS NOT NULL)"
                ).fetchone()[0]
            )

        return await self._call(op, writes=False)

    async def renew_leases(
        self,
        workflow_tasks: list[WorkflowTask],
        activity_tasks: list[ActivityTask],
        lease_until: float,
        now: float,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE workflow_tasks SET visible_at = ? WHERE run_id = ? AND token = ? "
                "AND visible_at > ?",
                [(lease_until, t.run_id, t.token, now) for t in workflow_tasks],
            )
            conn.executemany(
                "UPDATE activity_tasks SET visible_at = ? WHERE run_id = ? AND seq = ? "
                "AND token = ? AND visible_at > ?",
                [(lease_until, t.run_id, t.seq, t.token, now) for t in activity_tasks],
            )

        await self._call(op)

    async def release_leases(self, owner: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE workflow_tasks SET owner = NULL, token = NULL, visible_at = ? "
                "WHERE owner = ? AND token IS NOT NULL",
                (now, owner),
            )
            # Activities may have run partly: expire the lease so the attempt is counted.
            conn.execute(
                "UPDATE activity_tasks SET visible_at = ? WHERE owner = ? AND token IS NOT NULL",
                (now, owner),
            )

        await self._call(op)

    async def register_worker(
        self,
        task_queue: str,
        identity: str,
        workflow_types: list[str],
        activity_types: list[str],
        now: float,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO workers (task_queue, identity, workflow_types, activity_types, "
                "last_seen) VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_queue, identity) DO UPDATE "
                "SET workflow_types = excluded.workflow_types, "
                "activity_types = excluded.activity_types, last_seen = excluded.last_seen",
                (task_queue, identity, _dumps(workflow_types), _dumps(activity_types), now),
            )

        await self._call(op)

    async def workflow_types_served(self, task_queue: str, since: float) -> set[str] | None:
        def op(conn: sqlite3.Connection) -> set[str] | None:
            rows = conn.execute(
                "SELECT workflow_types FROM workers WHERE task_queue = ? AND last_seen >= ?",
                (task_queue, since),
            ).fetchall()
            if not rows:
                return None
            return {t for (types,) in rows for t in json.loads(types)}

        return await self._call(op, writes=False)
