"""Where one sequential workflow's latency goes (workload B), across both processes.

Runs B's workflow (``One``: one no-op activity) one at a time against a worker process
on a fresh SQLite store, as ``tether-sqlite`` does in B. Both processes stamp the
monotonic clock (shared by processes on Linux) around every SQLite batch they commit
and at every cross-process wake-up they send or take; the client also stamps its start
call and the result's return. Prints each step's median duration over the cycles, in
order, and the median cycle::

    .venv/bin/python -m bench.timeline            # against the installed tether
    PYTHONPATH=/path/to/other/src:. .venv/bin/python -m bench.timeline   # another tree

The stamps wrap private functions of the SQLite store (a diagnostic, not an API):
each costs about a microsecond, so the cycle is a little longer than B's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs

Stamp = tuple[float, str]


def install_stamps(stamps: list[Stamp]) -> None:
    """Record into ``stamps`` around each SQLite batch and each wake-up sent or taken."""
    from tether._store import sqlite_batches, sqlite_wakeup

    def op_name(op: Any) -> str:
        make = getattr(op.make, "func", op.make)  # a functools.partial, or a callable
        name = getattr(make, "__name__", type(make).__name__)
        return str(name).lstrip("_")

    def wrap(cls: type, name: str, label: Callable[..., str], after: str | None) -> None:
        original = getattr(cls, name)

        def stamped(*args: Any, **kwargs: Any) -> Any:
            stamps.append((time.perf_counter(), label(*args)))
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    stamps.append((time.perf_counter(), after))

        setattr(cls, name, stamped)

    wrap(
        sqlite_batches.BatchWriter,
        "_run_batch",
        lambda _self, batch, *_: "commit " + "+".join(sorted({op_name(o) for o in batch})),
        "committed",
    )
    wrap(sqlite_wakeup.CommitWakeup, "_send", lambda *_: "send wake-up", None)
    wrap(sqlite_wakeup.CommitWakeup, "_take", lambda *_: "take wake-up", None)


def _write(path: Path, who: str, stamps: list[Stamp]) -> None:
    path.write_text("".join(f"{t:.7f}\t{who}\t{label}\n" for t, label in stamps))


def _worker(argv: list[str]) -> None:
    """``bench.tether_worker``, stamped; its stamps go to ``--stamps-file``."""
    from bench import tether_worker

    parser = tether_worker.arguments()
    parser.add_argument("--stamps-file", required=True)
    ns = parser.parse_args(argv)
    stamps: list[Stamp] = []
    install_stamps(stamps)
    try:
        asyncio.run(tether_worker.serve(ns))
    finally:
        _write(Path(ns.stamps_file), "worker", stamps)


async def _client(url: str, n: int, warmup: int, stamps: list[Stamp]) -> None:
    from bench.tether_app import TASK_QUEUE, One
    from tether import Client

    client = await Client.connect(url)
    try:
        for i in range(warmup + n):
            if i == warmup:
                # As in B, which follows A: past the 2 s after the processes' sockets
                # appeared, during which each wake-up sent lists their directory.
                await asyncio.sleep(2.1)
                stamps.clear()
            stamps.append((time.perf_counter(), "start_workflow called"))
            handle = await client.start_workflow(One, i, id=f"t{i}", task_queue=TASK_QUEUE)
            stamps.append((time.perf_counter(), "start_workflow returned"))
            if await handle.result() != i + 1:
                raise AssertionError("wrong result")
            stamps.append((time.perf_counter(), "result returned"))
    finally:
        await client.close()


def _timeline(rows: list[tuple[float, str, str]]) -> tuple[list[tuple[str, float]], float]:
    """Split the merged stamps into cycles (one per workflow) and take the median of
    each step; steps are named by the stamp they end at."""
    cycles: list[list[tuple[float, str]]] = []
    for t, who, label in sorted(rows):
        if label == "start_workflow called":
            cycles.append([])
        if cycles:
            cycles[-1].append((t, f"{who}: {label}"))
    # The usual sequence of steps; cycles that differ (a lease renewal or a poll fell
    # inside) are left out of the medians.
    shapes = collections.Counter(tuple(label for _, label in c) for c in cycles)
    shape, _ = shapes.most_common(1)[0]
    usual = [c for c in cycles if tuple(label for _, label in c) == shape]
    steps = []
    for i in range(1, len(shape)):
        steps.append((shape[i], statistics.median((c[i][0] - c[i - 1][0]) * 1e6 for c in usual)))
    total = statistics.median((c[-1][0] - c[0][0]) * 1e6 for c in usual)
    print(f"{len(usual)} of {len(cycles)} cycles have the usual sequence of steps")
    return steps, total


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # the worker process this starts
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="workflows measured")
    parser.add_argument("--warmup", type=int, default=100)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-timeline-") as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work / 'store.db'}"
        ready, stamps_file = work / "ready", work / "worker-stamps"
        cmd = [sys.executable, "-m", "bench.timeline", "--worker", "--url", url]
        cmd += ["--ready-file", str(ready), "--stats-file", str(work / "stats")]
        cmd += ["--stamps-file", str(stamps_file)]
        worker = procs.spawn(cmd, work / "worker.log")
        try:
            procs.wait_for_file(ready, worker)
            client_stamps: list[Stamp] = []
            install_stamps(client_stamps)
            asyncio.run(_client(url, ns.n, ns.warmup, client_stamps))
        finally:
            procs.stop(worker)
        first = min(t for t, _ in client_stamps)
        rows = [(t, "client", label) for t, label in client_stamps]
        for line in stamps_file.read_text().splitlines():
            t, who, label = line.split("\t")
            if float(t) >= first:
                rows.append((float(t), who, label))
    steps, total = _timeline(rows)
    for label, micros in steps:
        print(f"{micros:8.0f} us  until {label}")
    print(f"{total:8.0f} us  the cycle: start_workflow called -> result returned")


if __name__ == "__main__":
    main()
