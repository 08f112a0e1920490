"""DBOS Transact workflows for the workloads (runs in ``bench/.peers/venv-dbos``).

DBOS is a library: the process that launches it runs the workflows. Async and sync
(thread-per-workflow) variants of each workflow, with the same shapes as Tether's.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from dbos import DBOS

from bench import sidefx

SIDE_FILE_ENV = "BENCH_SIDE_FILE"
STEP_SLEEP_ENV = "BENCH_STEP_SLEEP"
STEP_LIMIT_ENV = "BENCH_STEP_LIMIT"

_step_gate: asyncio.Semaphore | None = None
_gate_lock = threading.Lock()


def launch(url: str) -> None:
    DBOS(
        config={
            "name": "bench",
            "system_database_url": url,
            "log_level": "WARNING",
            "executor_id": "local",
        }
    )
    DBOS.launch()


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.workflow()
async def three(x: int) -> int:
    return x + await noop(1) + await noop(2) + await noop(3)


@DBOS.workflow()
async def one(x: int) -> int:
    return x + await noop(1)


@DBOS.workflow()
async def sleeper(seconds: float) -> list[float]:
    began = time.time()
    await DBOS.sleep_async(seconds)
    return [began, time.time() - began - seconds]


@DBOS.step()
def noop_sync(i: int) -> int:
    return i


@DBOS.workflow()
def three_sync(x: int) -> int:
    return x + noop_sync(1) + noop_sync(2) + noop_sync(3)


@DBOS.workflow()
def one_sync(x: int) -> int:
    return x + noop_sync(1)


@DBOS.workflow()
def sleeper_sync(seconds: float) -> list[float]:
    began = time.time()
    DBOS.sleep(seconds)
    return [began, time.time() - began - seconds]


def _gate() -> asyncio.Semaphore:
    """At most ``BENCH_STEP_LIMIT`` side-effect steps at once in this process."""
    global _step_gate
    with _gate_lock:
        if _step_gate is None:
            _step_gate = asyncio.Semaphore(int(os.environ.get(STEP_LIMIT_ENV, "50")))
        return _step_gate


@DBOS.step()
async def side_effect(workflow_id: str, step: int) -> int:
    async with _gate():
        await asyncio.sleep(float(os.environ.get(STEP_SLEEP_ENV, "0.2")))
        sidefx.append(os.environ[SIDE_FILE_ENV], workflow_id, step, time.time())
    return step


@DBOS.workflow()
async def steps(workflow_id: str, count: int) -> int:
    total = 0
    for i in range(count):
        total += await side_effect(workflow_id, i)
    return total
