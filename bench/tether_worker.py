"""A Tether worker process: ``python -m bench.tether_worker --url URL --ready-file F``.

Writes ``--ready-file`` once polling, its counters to ``--stats-file`` every 0.2 s,
and shuts down gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

from bench.procs import write_atomically
from bench.tether_app import ACTIVITIES, TASK_QUEUE, WORKFLOWS
from tether import Client, Worker


async def _report_stats(worker: Worker, path: Path) -> None:
    while True:
        write_atomically(path, json.dumps({"time": time.time(), **worker.stats}))
        await asyncio.sleep(0.2)


async def serve(ns: argparse.Namespace) -> None:
    client = await Client.connect(ns.url)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=WORKFLOWS,
        activities=ACTIVITIES,
        max_concurrent_activities=ns.max_activities,
        max_concurrent_workflow_tasks=ns.max_workflow_tasks,
        identity=ns.identity,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    write_atomically(Path(ns.ready_file), str(time.time()))
    reporter = asyncio.create_task(_report_stats(worker, Path(ns.stats_file)))
    await stop.wait()
    reporter.cancel()
    await worker.shutdown()
    await client.close()


def arguments() -> argparse.ArgumentParser:
    """The worker's command line (``bench.timeline`` adds to it for its own worker)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--stats-file", required=True)
    parser.add_argument("--identity", default=None)
    parser.add_argument("--max-activities", type=int, default=100)
    parser.add_argument("--max-workflow-tasks", type=int, default=100)
    return parser


def main() -> None:
    asyncio.run(serve(arguments().parse_args()))


if __name__ == "__main__":
    main()
