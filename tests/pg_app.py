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
import json
import logging
import os
import random
import signal
import sys
import time

from tether import Client, Worker, activity, workflow

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


async def serve(args: argparse.Namespace) -> None:
    IDENTITY["name"] = args.identity
    client = await Client.connect(args.url)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[Steps],
        activities=[step],
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
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{time.time()!r}\n")
        os.replace(tmp, args.ready_file)
    try:
        await stop.wait()
    finally:
        await worker.shutdown()
        faults = client.store.faults  # type: ignore[attr-defined]
        if args.stats_file:
            with open(args.stats_file, "w") as f:
                json.dump(
                    {
                        "identity": args.identity,
                        "worker": worker.stats,
                        "store": getattr(client.store, "stats", {}),
                        "faults": dict(faults.injected) if faults is not None else {},
                    },
                    f,
                )
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease-duration", type=float, default=5.0)
    parser.add_argument("--max-activities", type=int, default=100)
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--stats-file", default=None)
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
