"""The SQL store's timers (firing them, set-based), lease renewal and release, and the
registry of workers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tether._store.base import TIMER_FIRED, ActivityTask, WorkflowTask
from tether._store.changes import Change
from tether._store.sql_activities import SqlActivities
from tether._store.sql_core import ID_CHUNK, ID_LIST, INSERT_HISTORY, OPEN
from tether._store.sql_statements import ALL, MANY, ONE, WRITE, Op, Stmt, dumps, parse_json, touch


class SqlTimers(SqlActivities):
    """Timers, leases, workers and housekeeping."""

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
        for i in range(0, len(run_ids), ID_CHUNK):
            chunk = run_ids[i : i + ID_CHUNK]
            appended += yield Stmt(
                ALL,
                "UPDATE runs SET next_seq = next_seq + 1, inbound_seq = next_seq "
                f"WHERE run_id IN ({ID_LIST}) AND {OPEN} "
                "RETURNING run_id, next_seq - 1, task_queue",
                (*chunk, *[None] * (ID_CHUNK - len(chunk))),
            )
        if not appended:
            return
        yield touch(Change.WORKFLOW_TASK)
        yield Stmt(
            MANY,
            INSERT_HISTORY,
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
                for name, handlers in parse_json(types).items():
                    merged = served.setdefault(name, {})
                    for kind, names in handlers.items():
                        merged[kind] = sorted(set(merged.get(kind, [])) | set(names))
            return served

        return await self._execute(op, writes=False)
