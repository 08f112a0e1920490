"""The SQL store's activity tasks: claims, heartbeats, results (with the workflow task
they wake, in one commit) and retries.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tether._store.base import (
    ACTIVITY_COMPLETED,
    ActivityTask,
    EagerClaim,
    Event,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
)
from tether._store.changes import Change
from tether._store.sql_core import (
    ACTIVITY_COLUMNS,
    ADVANCED,
    CLAIMED_TASK,
    END_ACTIVITY,
    NO_FAMILY,
    OPEN,
    activity_from_row,
)
from tether._store.sql_statements import (
    ALL,
    NOTIFY_MARK,
    ONE,
    WRITE,
    LeaseAndRead,
    Op,
    Stmt,
    dumps,
    parse_json,
    touch,
)
from tether._store.sql_workflow_tasks import SqlWorkflowTasks


class SqlActivities(SqlWorkflowTasks):
    """Claiming activity tasks, heartbeats, and their results."""

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
            f"SELECT {ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
            "ON r.run_id = a.run_id WHERE a.task_queue = ? AND a.visible_at = ? "
            "AND a.token = ? ORDER BY a.scheduled_at",
            (task_queue, lease_until, token),
        )
        together = self._claim_function(
            "tether_claim_activity_tasks", (owner, token, lease_until, task_queue, now, limit)
        )
        rows = await self._execute_lease(LeaseAndRead(lease, read, together))
        return [activity_from_row(row) for row in rows]

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
        deleted = yield Stmt(ONE, END_ACTIVITY, (task.run_id, task.seq, task.token))
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
            f"AND task_version = ? AND next_seq = ? AND {OPEN} "
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
                f"WITH done AS ({END_ACTIVITY}), advanced AS ({advance} "
                "AND EXISTS (SELECT 1 FROM done WHERE cancel_requested = 0) "
                f"RETURNING next_seq - ? AS first, {ADVANCED} AS has_children){ctes} "
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
                f"{advance} RETURNING next_seq - ?, {ADVANCED}{self._left_over(completion)}",
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
        guard = " AND inbound_seq < ?" + (NO_FAMILY if closing else "")
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
            f"RETURNING next_seq - ? AS first, {ADVANCED} AS has_children), "
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
            f"SELECT {CLAIMED_TASK} FROM workflow_tasks t JOIN runs r ON r.run_id = t.run_id "
            "WHERE t.run_id = ?",
            (run_id,),
        )
        rows = yield Stmt(
            ALL,
            "SELECT seq, type, time, data FROM history WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, claim.after_seq),
        )
        workflow_task = self._claimed_tasks(leased[0], token, task)[0]
        return workflow_task, [Event(r[0], r[1], r[2], parse_json(r[3])) for r in rows]

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
                f"SELECT {ACTIVITY_COLUMNS} FROM activity_tasks a JOIN runs r "
                "ON r.run_id = a.run_id WHERE a.owner IS NOT NULL AND a.visible_at <= ? "
                "LIMIT ?",
                (now, limit),
            )
            return [activity_from_row(r) for r in rows]

        return await self._execute(op, writes=False)
