"""The SQL store's messages to runs and their lifecycle: signals, cancellation,
termination, updates and queries, and what closing a run does to its work and family.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tether._store.base import (
    CHILD_WORKFLOW_COMPLETED,
    CHILD_WORKFLOW_FAILED,
    COMPLETED,
    CONTINUED_AS_NEW,
    SIGNAL_RECEIVED,
    TERMINATED,
    TIMED_OUT,
    WORKFLOW_CANCEL_REQUESTED,
    WORKFLOW_TERMINATED,
    WORKFLOW_TIMED_OUT,
    QueryTask,
    UpdateRequest,
    UpdateState,
    WorkflowTaskCompletion,
)
from tether._store.changes import Change
from tether._store.sql_core import (
    FAMILY,
    INSERT_HISTORY,
    REJECT_OPEN_UPDATES,
    RUN_WORK_TABLES,
    SqlCore,
)
from tether._store.sql_statements import ALL, ONE, WRITE, Op, Stmt, dumps, loads, parse_json, touch
from tether.exceptions import WorkflowNotFoundError


class SqlMessages(SqlCore):
    """Signals, cancellation, termination, updates, queries, and closing a run."""

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
            INSERT_HISTORY,
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
                f"SELECT {FAMILY} FROM runs WHERE run_id = ?",
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
            for table, want in zip(RUN_WORK_TABLES, wanted, strict=True)
            if want
        ]
        params: list[Any] = [run_id] * len(members)
        members.append(REJECT_OPEN_UPDATES + matched)
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
        for table, maybe in zip(RUN_WORK_TABLES, left[:3], strict=True):
            if maybe:
                yield Stmt(WRITE, f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        if not left[3]:
            return
        failure = SqlMessages._closed_failure(why)
        yield Stmt(
            WRITE,
            REJECT_OPEN_UPDATES,
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
            return [UpdateRequest(r[0], r[1], parse_json(r[2])) for r in rows]

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
            tasks.append(
                QueryTask(query_id, run_id, wf_id, wf_type, ns, name, parse_json(args), token)
            )
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
