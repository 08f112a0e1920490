"""Scale-out on PostgreSQL: four worker processes share 2,000 workflows x 3 activities.

Every workflow completes with the right result, every activity ran exactly once
(nothing was killed), and each worker did a fair share of the activities (counted
from the ledger, which names the worker of each attempt) and of the workflow tasks
(counted by the workers themselves).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pg_app import Job, step_result
from pg_harness import WorkerProcesses, check_ledger, read_ledger, start_all
from tether import Client

pytestmark = pytest.mark.slow

WORKERS = 4
WORKFLOWS = 2000
STEPS = 3


@pytest.fixture
def workers(tmp_path: Path, fresh_postgres: str) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path, fresh_postgres)
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture
async def client(fresh_postgres: str) -> AsyncIterator[Client]:
    c = await Client.connect(fresh_postgres)
    try:
        yield c
    finally:
        await c.close()


async def test_four_workers_share_two_thousand_workflows(
    tmp_path: Path, client: Client, workers: WorkerProcesses
) -> None:
    ledger = tmp_path / "ledger.txt"
    procs = [workers.spawn(f"scale-{n}") for n in range(WORKERS)]
    await asyncio.gather(*(workers.wait_ready(p) for p in procs))

    started = time.monotonic()
    ids = [f"wf-{i:05d}" for i in range(WORKFLOWS)]
    handles = await start_all(client, Job(str(ledger), STEPS), ids)
    try:
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 150)
    except TimeoutError:
        pytest.fail(f"workflows did not all complete\n{workers.logs()}")
    elapsed = time.monotonic() - started
    stats = await workers.stop_all()

    for handle, result in zip(handles, results, strict=True):
        assert result == {"steps": [step_result(handle.id, s) for s in range(STEPS)], "notes": []}
    check = check_ledger(ledger, ids, STEPS, kills=[])
    assert check["lines"] == WORKFLOWS * STEPS and check["reran"] == 0

    fair = WORKFLOWS * STEPS / WORKERS
    activities = Counter(line.identity for line in read_ledger(ledger))
    tasks = {s["identity"]: s["worker"].get("workflow_tasks", 0) for s in stats}
    report = (
        f"{WORKFLOWS} workflows in {elapsed:.1f} s ({WORKFLOWS / elapsed:.0f}/s); "
        f"activities per worker {dict(activities)}, workflow tasks per worker {tasks}"
    )
    print(report)
    assert sum(tasks.values()) >= WORKFLOWS * (STEPS + 1), report
    for proc in procs:
        # A fair share: no worker idle or starved, none doing most of the work.
        assert 0.5 * fair <= activities[proc.identity] <= 1.6 * fair, report
        assert tasks[proc.identity] >= 0.5 * WORKFLOWS * (STEPS + 1) / WORKERS, report
