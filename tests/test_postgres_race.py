"""Two workers racing on the same workflow task on PostgreSQL: only one commits.

Worker A claims the task and, slow, completes it after its lease lapsed; meanwhile
worker B claimed the task too and completes it. A third connection holds the run's
row lock while both completions start, so both are in flight at the same time,
each past its lease check, waiting on that lock. When the lock goes, exactly one commits; the other
is refused (``StaleTaskError``: the run's task version moved on) and history holds
one completion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tether._store.base import (
    ACTIVITY_SCHEDULED,
    WORKFLOW_TASK_COMPLETED,
    NewActivity,
    NewRun,
    WorkflowTask,
    WorkflowTaskCompletion,
)
from tether._store.postgres import PostgresStore
from tether.exceptions import StaleTaskError

NOW = 1_000_000.0
LEASE = 10.0


@pytest.fixture
async def two_workers(fresh_postgres: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on the same database, as two worker processes would have."""
    a = await PostgresStore.open(fresh_postgres)
    b = await PostgresStore.open(fresh_postgres)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def pg_fetchval(url: str, query: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def schedule(task: WorkflowTask, activity: str) -> WorkflowTaskCompletion:
    return WorkflowTaskCompletion(
        task=task,
        events=[(ACTIVITY_SCHEDULED, {"seq": 1, "activity_type": activity})],
        inputs_through=task.history_length,
        activities=[NewActivity(1, activity, "q", [], {"retry_policy": {}})],
    )


async def waiting_on_locks(url: str, count: int) -> None:
    """Wait until ``count`` sessions wait for a lock (asked outside any transaction:
    a transaction sees the activity statistics of its first look only)."""
    deadline = time.monotonic() + 10
    while True:
        waiting = await pg_fetchval(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'",
        )
        if waiting >= count:
            return
        assert time.monotonic() < deadline, f"only {waiting} of {count} completions blocked"
        await asyncio.sleep(0.01)


async def test_racing_workers_only_one_commits(
    fresh_postgres: str, two_workers: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = two_workers
    await a.start_run(NewRun("default", "wf", "run-1", "Flow", "q", [], "req-1", 1, NOW))
    (task_a,) = await a.claim_workflow_tasks("q", "worker-a", 10, NOW + LEASE, NOW)
    later = NOW + LEASE + 1  # by then A's lease has lapsed

    locker = await asyncpg.connect(fresh_postgres)
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM runs WHERE run_id = 'run-1' FOR UPDATE")
            # A, slow, completes: its lease check passes, then it waits on the run's row.
            racing_a = asyncio.ensure_future(
                a.complete_workflow_task(schedule(task_a, "from_a"), "worker-a", later)
            )
            await waiting_on_locks(fresh_postgres, 1)
            # Meanwhile A's lease lapsed: B claims the task, at the same task version...
            (task_b,) = await b.claim_workflow_tasks("q", "worker-b", 10, later + LEASE, later)
            assert (task_b.task_version, task_b.attempt) == (task_a.task_version, 2)
            assert task_b.token != task_a.token
            # ...and completes it too, while A's completion is still in flight.
            racing_b = asyncio.ensure_future(
                b.complete_workflow_task(schedule(task_b, "from_b"), "worker-b", later)
            )
            await waiting_on_locks(fresh_postgres, 2)
        results = await asyncio.gather(racing_a, racing_b, return_exceptions=True)
    finally:
        await locker.close()

    committed = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, StaleTaskError)]
    assert len(committed) == 1 and len(refused) == 1, results
    assert "advanced past task version 0" in str(refused[0])
    history = await a.read_history("run-1")
    assert [e.type for e in history].count(WORKFLOW_TASK_COMPLETED) == 1
    scheduled = [e.data["activity_type"] for e in history if e.type == ACTIVITY_SCHEDULED]
    assert len(scheduled) == 1
    (activity,) = await a.claim_activity_tasks("q", "w", 10, later + LEASE, later)
    assert activity.activity_type == scheduled[0]
