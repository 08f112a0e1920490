"""A worker program for the crash-recovery tests (``tests/test_recovery.py``).

Run as ``python tests/recovery_app.py DB_PATH --identity ID [--lease-duration S]
[--max-activities N] [--ready-file PATH]``. It runs one worker on task queue
``recovery`` until it gets SIGTERM/SIGINT, or until the test kills it with SIGKILL.

Every activity attempt appends one line ``workflow_id step attempt idempotency_key
unix_time`` to a ledger file (one ``O_APPEND`` write, then fsync) halfway through
its work, so the ledger is an exact record of which attempts did their side effect.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import signal
import sys
import time

from tether import Client, Worker, activity, workflow

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


async def serve(args: argparse.Namespace) -> None:
    client = await Client.connect(f"sqlite:///{os.path.abspath(args.db)}")
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[StepsWorkflow, SleepyWorkflow],
        activities=[side_effect],
        identity=args.identity,
        lease_duration=args.lease_duration,
        max_concurrent_activities=args.max_activities,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    if args.ready_file:
        # Written after the worker has registered and taken back its old leases.
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{time.time()!r}\n")
        os.replace(tmp, args.ready_file)
    try:
        await stop.wait()
    finally:
        await worker.shutdown()
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease-duration", type=float, default=2.0)
    parser.add_argument("--max-activities", type=int, default=100)
    parser.add_argument("--ready-file", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s [{args.identity} pid {os.getpid()}] %(name)s %(levelname)s "
        "%(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
