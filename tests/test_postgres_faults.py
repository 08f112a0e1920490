"""Fault injection on PostgreSQL: 1,000 workflows with 1% of store calls failing.

Two worker processes run with ``TETHER_FAULT_RATE=0.01``, and so does the test's own
client: one store call in 100 fails, most before doing anything, some after their
commit with the result lost. The client repeats what failed (a start with the same
request id); the workers cope on their own (retries, lease tokens, task versions).
Every workflow completes with the right result, once, every activity ran exactly
once, and every history replays cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pg_app import Job, Steps, step_result
from pg_harness import WorkerProcesses, check_ledger, patiently, sql, start_all
from tether import Client
from tether._store.faults import FaultInjector
from tether.testing import replay

pytestmark = pytest.mark.slow

WORKFLOWS = 1000
STEPS = 3
RATE = 0.01  # high enough that each worker sees both kinds of fault (~10 of each)


@pytest.fixture
def workers(tmp_path: Path, fresh_postgres: str) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path, fresh_postgres, env={"TETHER_FAULT_RATE": str(RATE)})
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


async def test_thousand_workflows_complete_despite_store_faults(
    tmp_path: Path, fresh_postgres: str, client: Client, workers: WorkerProcesses
) -> None:
    ledger = tmp_path / "ledger.txt"
    procs = [workers.spawn(f"faulty-{n}", lease_duration=2.0) for n in range(2)]
    await asyncio.gather(*(workers.wait_ready(p) for p in procs))
    faults = FaultInjector(RATE, seed=7)
    client.store.faults = faults  # type: ignore[attr-defined]

    ids = [f"wf-{i:04d}" for i in range(WORKFLOWS)]
    handles = await start_all(client, Job(str(ledger), STEPS), ids)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(patiently(h.result) for h in handles)), 150
        )
    except TimeoutError:
        pytest.fail(f"workflows did not all complete\n{workers.logs()}")
    stats = await workers.stop_all()

    for handle, result in zip(handles, results, strict=True):
        assert result == {"steps": [step_result(handle.id, s) for s in range(STEPS)], "notes": []}
    runs = await sql(fresh_postgres, "SELECT workflow_id, count(*) FROM runs GROUP BY 1")
    assert len(runs) == WORKFLOWS and all(r[1] == 1 for r in runs)
    # Faults never make an activity run twice: a lost claim is retried as a new attempt
    # that runs once, and a lost completion was committed all the same.
    check = check_ledger(ledger, ids, STEPS, kills=[])
    assert check == {"lines": WORKFLOWS * STEPS, "reran": 0}
    for handle in handles:
        replay(Steps, await patiently(handle.history))

    injected = {s["identity"]: s["faults"] for s in stats}
    print(f"faults injected: workers {injected}, client {dict(faults.injected)}")
    for counts in injected.values():
        assert counts.get("before", 0) > 0 and counts.get("after_commit", 0) > 0, injected
    assert faults.injected["before"] > 0
