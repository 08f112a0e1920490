"""A worker program for the crash-recovery tests (``tests/test_recovery.py``).

Run as ``python tests/recovery_app.py DB_PATH --identity ID [--lease-duration S]
[--max-activities N] [--ready-file PATH]``. It runs one worker on task queue
``recovery`` until it gets SIGTERM/SIGINT, or until the test kills it with SIGKILL.

Every activity attempt appends one line ``workflow_id step attempt idempotency_key
unix_time`` to a ledger file (one ``O_APPEND`` write, then fsync) halfway through
its work, so the ledger is an exact record of which attempts did their side effect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

import worker_process
from tether import activity, workflow

TASK_QUEUE = "recovery"


@dataclasses.dataclass
class StepInput:
    ledger: str
    step: int
    min_sleep: float
    max_sleep: float


@dataclasses.dataclass
class Job:
    ledger: str
    steps: int
    min_sleep: float
    max_sleep: float


def append_line(path: str, line: str) -> None:
    """Append one line atomically (a single O_APPEND write) and make it durable."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        assert written == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@activity.defn
async def side_effect(inp: StepInput) -> str:
    """Work a little, record the attempt in the ledger, work a little more, return.

    The side effect lands mid-attempt, so a kill finds some attempts that have done it
    but whose completion is not recorded: those must run again, as a new attempt with
    the same idempotency key.
    """
    info = activity.info()
    work = random.uniform(inp.min_sleep, inp.max_sleep)
    await asyncio.sleep(work / 2)
    append_line(
        inp.ledger,
        f"{info.workflow_id} {inp.step} {info.attempt} {info.idempotency_key} {time.time():.6f}",
    )
    await asyncio.sleep(work / 2)
    return step_result(info.workflow_id, inp.step)


def step_result(workflow_id: str, step: int) -> str:
    return f"{workflow_id}:{step}:done"


@workflow.defn
class StepsWorkflow:
    """Runs ``job.steps`` activities one after another and returns their results."""

    @workflow.run
    async def run(self, job: Job) -> list[str]:
        results: list[str] = []
        for step in range(job.steps):
            results.append(
                await workflow.execute_activity(
                    side_effect,
                    StepInput(job.ledger, step, job.min_sleep, job.max_sleep),
                    start_to_close_timeout=30,
                )
            )
        return results


@workflow.defn
class SleepyWorkflow:
    """Sleeps durably and reports the sleep as workflow time saw it."""

    @workflow.run
    async def run(self, seconds: float) -> dict[str, float]:
        before = workflow.time()
        await asyncio.sleep(seconds)
        after = workflow.time()
        return {"before": before, "after": after, "slept": after - before}


def main(argv: list[str] | None = None) -> None:
    worker_process.main(
        task_queue=TASK_QUEUE,
        workflows=[StepsWorkflow, SleepyWorkflow],
        activities=[side_effect],
        lease_duration=2.0,
        description=__doc__,
        argv=argv,
    )


if __name__ == "__main__":
    main()
