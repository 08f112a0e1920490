"""The SQL store's runs: starting them (with signal- and update-with-start) and
reading, listing and counting them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tether._store.base import (
    COMPLETED,
    SIGNAL_RECEIVED,
    WORKFLOW_STARTED,
    Event,
    NewRun,
    RunFilter,
    RunInfo,
    StartOutcome,
)
from tether._store.changes import Change
from tether._store.sql_core import RUN_COLUMNS, run_info_from_row
from tether._store.sql_messages import SqlMessages
from tether._store.sql_statements import (
    ALL,
    EXEC,
    NOTIFY_MARK,
    ONE,
    WRITE,
    Op,
    Stmt,
    dumps,
    parse_json,
    touch,
)
from tether.exceptions import WorkflowAlreadyStartedError, WorkflowNotFoundError


class SqlRuns(SqlMessages):
    """Starting runs and reading them."""

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
        yield touch(Change.WORKFLOW_TASK | Change.TIMER if deadlines else Change.WORKFLOW_TASK)
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
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE namespace = ? AND workflow_id = ? "
                    "ORDER BY created_at DESC LIMIT 1",
                    (namespace, workflow_id),
                )
            else:
                row = yield Stmt(
                    ONE,
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ? AND namespace = ? "
                    "AND workflow_id = ?",
                    (run_id, namespace, workflow_id),
                )
            if row is None:
                which = f"run {run_id!r} of " if run_id else ""
                raise WorkflowNotFoundError(
                    f"no {which}workflow {workflow_id!r} in namespace {namespace!r}"
                )
            return run_info_from_row(row)

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
                f"SELECT {RUN_COLUMNS} FROM runs WHERE {sql} "
                "ORDER BY created_at DESC, run_id DESC LIMIT ?",
                (*params, limit),
            )
            return [run_info_from_row(r) for r in rows]

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
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id IN ({marks}) "
                    "AND status != 'running'",
                    chunk,
                )
                closed += [run_info_from_row(r) for r in rows]
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
            return [Event(r[0], r[1], r[2], parse_json(r[3])) for r in rows]

        return await self._execute(op, writes=False)
