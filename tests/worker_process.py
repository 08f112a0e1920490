"""Runs a Worker as a real process, for the tests that kill workers with SIGKILL.

The test apps (recovery_app, lifecycle_app, pg_app) define workflows and call
``main``. Command line: ``STORE --identity ID [--lease-duration S] [--max-activities N]
[--ready-file F] [--stats-file F]``; STORE is a URL or a SQLite file path. The ready
file is written once the worker has registered and taken back its old leases;
SIGTERM/SIGINT shut it down gracefully (writing the stats file, if asked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tether import Client, Worker


def store_url(store: str) -> str:
    return store if "://" in store else f"sqlite:///{os.path.abspath(store)}"


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def serve(
    args: argparse.Namespace,
    task_queue: str,
    workflows: Sequence[type],
    activities: Sequence[Callable[..., Any]],
) -> None:
    client = await Client.connect(store_url(args.store))
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=workflows,
        activities=activities,
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
        _write_atomically(args.ready_file, f"{time.time()!r}\n")
    try:
        await stop.wait()
    finally:
        await worker.shutdown()
        if args.stats_file:
            faults = getattr(client.store, "faults", None)
            stats = {
                "identity": args.identity,
                "worker": worker.stats,
                "store": getattr(client.store, "stats", {}),
                "faults": dict(faults.injected) if faults is not None else {},
            }
            _write_atomically(args.stats_file, json.dumps(stats))
        await client.close()


def main(
    *,
    task_queue: str,
    workflows: Sequence[type],
    activities: Sequence[Callable[..., Any]],
    lease_duration: float,
    description: str | None = None,
    argv: list[str] | None = None,
    before_start: Callable[[argparse.Namespace], None] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("store", help="store URL or SQLite file path")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--lease-duration", type=float, default=lease_duration)
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
    if before_start is not None:
        before_start(args)
    asyncio.run(serve(args, task_queue, workflows, activities))
