"""Tether workflows and activities for the workloads (the same shapes every peer runs).

In-workflow times come from ``workflow.time()``: the wall-clock time at which the
worker began the workflow task, recorded in history, so a workflow rebuilt by replay
(after eviction from the cache) sees the same values.
"""

from __future__ import annotations

import asyncio
import os
import time

from bench import sidefx
from tether import activity, workflow

TASK_QUEUE = "bench"
SIDE_FILE_ENV = "BENCH_SIDE_FILE"
STEP_SLEEP_ENV = "BENCH_STEP_SLEEP"


@activity.defn
async def noop(i: int) -> int:
    return i


@activity.defn
async def side_effect(workflow_id: str, step: int) -> int:
    await asyncio.sleep(float(os.environ.get(STEP_SLEEP_ENV, "0.2")))
    sidefx.append(os.environ[SIDE_FILE_ENV], workflow_id, step, time.time())
    return step


@workflow.defn
class Three:
    @workflow.run
    async def run(self, x: int) -> int:
        total = x
        for i in (1, 2, 3):
            total += await workflow.execute_activity(noop, i, start_to_close_timeout=30)
        return total


@workflow.defn
class One:
    @workflow.run
    async def run(self, x: int) -> int:
        return x + await workflow.execute_activity(noop, 1, start_to_close_timeout=30)


@workflow.defn
class Sleeper:
    @workflow.run
    async def run(self, seconds: float) -> list[float]:
        """Returns [code start time, lateness of the wake-up in seconds]."""
        began = workflow.time()
        await asyncio.sleep(seconds)
        return [began, workflow.time() - began - seconds]


@workflow.defn
class Steps:
    @workflow.run
    async def run(self, steps: int) -> int:
        wf = workflow.info().workflow_id
        total = 0
        for i in range(steps):
            total += await workflow.execute_activity(side_effect, wf, i, start_to_close_timeout=30)
        return total


@workflow.defn
class Waiter:
    @workflow.run
    async def run(self, due: float) -> float:
        """Sleeps until the wall-clock time ``due``; returns the time it woke."""
        await asyncio.sleep(max(0.0, due - workflow.time()))
        return workflow.time()


WORKFLOWS = [Three, One, Sleeper, Steps, Waiter]
ACTIVITIES = [noop, side_effect]
