"""A worker program for the PostgreSQL acceptance tests (``tests/test_postgres_*.py``).

Run as ``python tests/pg_app.py URL --identity ID [--lease-duration S]
[--max-activities N] [--ready-file PATH] [--stats-file PATH]``. It serves task queue
``pg`` until SIGTERM/SIGINT (then it shuts down gracefully and writes its counters
to ``--stats-file``), or until a test kills it with SIGKILL. ``TETHER_FAULT_RATE``
in its environment turns on store fault injection.

Every activity attempt appends one line ``workflow_id step attempt key identity pid
unix_time`` to the job's ledger file (one ``O_APPEND`` write, then fsync) halfway
through its work, so the ledger records exactly which attempt ran where.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import time

import worker_process
from tether import activity, workflow

TASK_QUEUE = "pg"
IDENTITY = {"name": "?"}


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
    min_sleep: float = 0.0
    max_sleep: float = 0.0
    signals: int = 0
    """Wait for this many ``note`` signals before returning."""


def append_line(path: str, line: str) -> None:
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def step_result(workflow_id: str, step: int) -> str:
    return f"{workflow_id}:{step}"


@activity.defn
async def step(inp: StepInput) -> str:
    info = activity.info()
    work = random.uniform(inp.min_sleep, inp.max_sleep)
    if work:
        await asyncio.sleep(work / 2)
    append_line(
        inp.ledger,
        f"{info.workflow_id} {inp.step} {info.attempt} {info.idempotency_key} "
        f"{IDENTITY['name']} {os.getpid()} {time.time():.6f}",
    )
    if work:
        await asyncio.sleep(work / 2)
    return step_result(info.workflow_id, inp.step)


@workflow.defn
class Steps:
    """Runs ``job.steps`` activities in order, then waits for ``job.signals`` signals."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.run
    async def run(self, job: Job) -> dict[str, list[str]]:
        results = []
        for n in range(job.steps):
            results.append(
                await workflow.execute_activity(
                    step,
                    StepInput(job.ledger, n, job.min_sleep, job.max_sleep),
                    start_to_close_timeout=60,
                )
            )
        await workflow.wait_condition(lambda: len(self.notes) >= job.signals)
        return {"steps": results, "notes": self.notes}


def _remember_identity(args: argparse.Namespace) -> None:
    IDENTITY["name"] = args.identity


def main(argv: list[str] | None = None) -> None:
    worker_process.main(
        task_queue=TASK_QUEUE,
        workflows=[Steps],
        activities=[step],
        lease_duration=5.0,
        description=__doc__,
        argv=argv,
        before_start=_remember_identity,
    )


if __name__ == "__main__":
    main()
