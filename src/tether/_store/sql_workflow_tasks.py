"""The SQL store's workflow tasks: claims, and completions that record a task's
commands (activities, timers, children, updates, the run's close) in one transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Any

from tether._store.base import (
    CHILD_WORKFLOW_FAILED,
    CLAIM_HISTORY_EVENTS,
    COMPLETED,
    SIGNAL_RECEIVED,
    WORKFLOW_CANCEL_REQUESTED,
    WORKFLOW_TASK_COMPLETED,
    ActivityTask,
    Event,
    NewRun,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
)
from tether._store.changes import Change
from tether._store.sql_core import (
    ADVANCED,
    CLAIMED_TASK,
    INLINE_ROWS,
    INSERT_HISTORY,
    LEFT_OVER,
    NO_FAMILY,
    OPEN,
    close_many_sql,
    padded_chunks,
)
from tether._store.sql_runs import SqlRuns
from tether._store.sql_statements import (
    ALL,
    EXEC,
    MANY,
    NOTIFY_MARK,
    ONE,
    WRITE,
    LeaseAndRead,
    Op,
    Stmt,
    dumps,
    loads,
    parse_json,
    touch,
)
from tether.exceptions import StaleTaskError, WorkflowAlreadyStartedError

_HISTORY = int(Change.HISTORY)
_TIMER = int(Change.TIMER)
_ACTIVITY_TASK = int(Change.ACTIVITY_TASK)
_CLOSED = int(Change.RUN_CLOSED | Change.UPDATE)

_Calls = list[tuple[WorkflowTaskCompletion, float, int]]
"""The completions of a group: (completion, its time, its index in the group)."""


class SqlWorkflowTasks(SqlRuns):
    """Claiming workflow tasks and recording their completions."""

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
            f"SELECT {CLAIMED_TASK}, h.seq, h.type, h.time, h.data FROM workflow_tasks t "
            "JOIN runs r ON r.run_id = t.run_id LEFT JOIN history h "
            "ON h.run_id = t.run_id AND r.next_seq <= ? "
            "WHERE t.task_queue = ? AND t.visible_at = ? AND t.token = ? "
            "ORDER BY r.created_at, t.run_id, h.seq",
            (CLAIM_HISTORY_EVENTS + 1, task_queue, lease_until, token),
        )
        together = self._claim_function(
            "tether_claim_workflow_tasks",
            (owner, token, lease_until, task_queue, now, limit, CLAIM_HISTORY_EVENTS + 1),
        )
        rows = await self._execute_lease(LeaseAndRead(lease, read, together))
        return self._claimed_tasks(task_queue, token, rows)

    @staticmethod
    def _claimed_tasks(task_queue: str, token: str, rows: list[Any]) -> list[WorkflowTask]:
        """Workflow tasks from rows of ``CLAIMED_TASK`` columns, each optionally followed
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
                event = Event(row[8], row[9], row[10], parse_json(row[11]))
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
                f"AND {OPEN} AND EXISTS (SELECT 1 FROM workflow_tasks w "
                f"WHERE w.run_id = runs.run_id AND w.token = ?){guard} "
                f"RETURNING next_seq - ? AS first, {ADVANCED} AS has_children"
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
                guard = " AND inbound_seq <= ?" + (NO_FAMILY if closing else "")
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
            and len(c.events) < INLINE_ROWS
            and self._nothing_after(c)
        )

    def _waits_alone(self, c: WorkflowTaskCompletion) -> bool:
        """Whether ``c`` leaves its run waiting (on the timers it starts, or for input)
        with no other write than its events and timers: ``_complete_waiting_tasks`` can
        take it (``together`` checks that the schema's function may be called)."""
        return c.close is None and c.record and not c.activities and self._nothing_after(c)

    def _complete_closing_tasks(
        self, makes: list[partial[Op[WorkflowTaskResult]]]
    ) -> Op[list[WorkflowTaskResult | None]]:
        """``_complete_workflow_task`` of many runs that ``_closes_alone``, as a few
        set-based statements instead of three or more each: one UPDATE closes them all,
        one INSERT adds their events, one DELETE drops their task rows. A run the UPDATE
        does not match (a lost lease, a parent or running children to tell) gets None:
        its own completion, run after these, does what is left or raises. These runs
        touch no other run, so doing them first changes nothing for the others."""
        if self.dialect.row_locks:
            return (yield from self._close_runs_in_one_call(self._calls(makes), len(makes)))
        calls = {c.task.run_id: (c, now, i) for c, now, i in self._calls(makes)}
        params: list[Any] = []
        for c, now, _ in calls.values():
            _, columns = self._close_columns(c, now)
            status, result, failure, closed_at, _next_run = columns
            params += [c.task.run_id, c.task.task_version, c.task.token, len(c.events) + 1]
            params += [status, result, failure, closed_at]
        rows: list[Any] = []
        width = len(params) // len(calls)
        for chunk in padded_chunks(params, width):
            rows += yield Stmt(ALL, close_many_sql(len(chunk) // width), chunk)
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
        yield Stmt(MANY, INSERT_HISTORY, history)
        yield Stmt(MANY, "DELETE FROM workflow_tasks WHERE run_id = ?", [(r[0],) for r in rows])
        for run_id, _, _, activities, timers, updates in rows:
            if activities or timers or updates:
                close = calls[run_id][0].close
                assert close is not None
                left = (False, bool(activities), bool(timers), bool(updates))
                why = f"the workflow closed ({close.status})"
                yield from self._drop_run_work(run_id, why, left)
        return results

    def _close_runs_in_one_call(
        self, calls: _Calls, count: int
    ) -> Op[list[WorkflowTaskResult | None]]:
        """``_complete_closing_tasks`` where other transactions write meanwhile: one call
        of the schema's ``tether_close_runs`` (the cleanup sees what committed while the
        close waited). ``calls``: (completion, now, its index among ``count`` results)."""
        own: list[tuple[Any, ...]] = []
        for c, now, _ in calls:
            status, result, failure, _closed_at, _next_run = self._close_columns(c, now)[1]
            rejection = dumps(self._closed_failure(f"the workflow closed ({status})"))
            own.append((status, result, failure, rejection))
        columns = self._task_columns(calls) + _transposed(own, 4)
        changes = Change.HISTORY | Change.RUN_CLOSED | Change.UPDATE
        return (
            yield from self._complete_in_one_call(
                "tether_close_runs", columns, calls, count, changes
            )
        )

    def _complete_waiting_tasks(
        self, makes: list[partial[Op[WorkflowTaskResult]]]
    ) -> Op[list[WorkflowTaskResult | None]]:
        """``_complete_workflow_task`` of many runs that ``_waits_alone``, in one call of
        the schema's ``tether_complete_waiting_tasks`` (where it has one). A run that got
        input since its task read it (or lost its lease) gets None: its own completion,
        run after, queues its next task or raises."""
        calls = self._calls(makes)
        own: list[tuple[Any, ...]] = []
        timer_seqs: list[int] = []
        timer_fire_at: list[float] = []
        for c, _now, _ in calls:
            own.append((c.inputs_through, len(c.timers)))
            timer_seqs += [seq for seq, _ in c.timers]
            timer_fire_at += [fire_at for _, fire_at in c.timers]
        columns = [*self._task_columns(calls), *_transposed(own, 2), timer_seqs, timer_fire_at]
        changes = Change.HISTORY | (Change.TIMER if timer_seqs else Change(0))
        function = "tether_complete_waiting_tasks"
        return (
            yield from self._complete_in_one_call(function, columns, calls, len(makes), changes)
        )

    @staticmethod
    def _calls(
        makes: list[partial[Op[WorkflowTaskResult]]],
    ) -> _Calls:
        """The completions a group of ``_complete_workflow_task`` operations record, with
        their time and index; a second one of the same run is left out (it runs alone,
        after the group)."""
        calls: dict[str, tuple[WorkflowTaskCompletion, float, int]] = {}
        for i, make in enumerate(makes):
            c, _owner, now = make.args
            calls.setdefault(c.task.run_id, (c, now, i))
        return list(calls.values())

    def _task_columns(self, calls: _Calls) -> list[list[Any]]:
        """The arguments every function of migration 0004 begins with: per run its id,
        task version, lease token, count of events and time; then the events' types
        and data, run after run."""
        runs: list[tuple[Any, ...]] = []
        event_types: list[str] = []
        event_data: list[str] = []
        for c, now, _ in calls:
            task = c.task
            events = self._task_events(c)
            runs.append((task.run_id, task.task_version, task.token, len(events), now))
            event_types += [event_type for event_type, _ in events]
            event_data += [dumps(data) for _, data in events]
        return [*_transposed(runs, 5), event_types, event_data]

    @staticmethod
    def _complete_in_one_call(
        function: str,
        columns: list[list[Any]],
        calls: _Calls,
        count: int,
        changes: Change,
    ) -> Op[list[WorkflowTaskResult | None]]:
        """Call ``function`` of migration 0004 with ``columns``: the result of each run it
        completed at its index among ``count`` (None for the others)."""
        marks = ", ".join("?" * len(columns))
        rows = yield Stmt(ALL, f"SELECT * FROM {function}({marks})", columns, writes=True)
        results: list[WorkflowTaskResult | None] = [None] * count
        if rows:
            yield touch(changes)
        for position, next_seq, task_version in rows:
            results[calls[position][2]] = WorkflowTaskResult(
                task_version, next_seq - 1, [], more_work=False
            )
        return results

    @staticmethod
    def _lone_changes(c: WorkflowTaskCompletion, events: int, eager: int) -> int:
        """The kinds of work ``_record_task`` touches for ``c`` when one lone statement
        did all of it (``events`` history events, ``eager`` activities leased)."""
        # (In ints: an ``IntFlag`` operation costs about 1.7 µs, an int's 0.06.)
        changes = _HISTORY if events else 0
        if c.timers:
            changes |= _TIMER
        if eager < len(c.activities):
            changes |= _ACTIVITY_TASK
        if c.close is not None:
            changes |= _CLOSED
        return changes

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
        """``LEFT_OVER`` if ``c`` closes its run and the transaction sees all there is:
        with serialized writes nothing can commit between the UPDATE and the cleanup."""
        return LEFT_OVER if c.close is not None and not self.dialect.row_locks else ""

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
        it (``advanced``: the first seq for ``events``, then ``ADVANCED``);
        ``task_queued``: the run has a task row; ``inline``: not None if the advancing
        statement made the writes of ``_inline_writes`` already, and then the activity
        tasks it leased to ``owner``. ``LEFT_OVER`` may follow ``ADVANCED``.
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
                INSERT_HISTORY,
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
            or max(len(events), len(c.timers), len(c.activities)) > INLINE_ROWS
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
            yield from self._append_inbound(run.run_id, SIGNAL_RECEIVED, parse_json(data), time)
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


def _transposed(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of ``width`` values as ``width`` columns (lists), also when there are none."""
    return [[row[k] for row in rows] for k in range(width)]
