"""Tether's driver: runs workloads against worker processes (or an embedded worker).

``python -m bench.tether_driver --workloads ABC --url sqlite:///... --out r.json ...``
(see :mod:`bench.driver_io`). ``--variant embedded`` runs the worker inside the
driver process (A and B only); otherwise every worker is its own process, started
with :mod:`bench.tether_worker`, as a deployment would run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import driver_io, procs, sidefx, stats
from bench.config import Sizes
from bench.driver_io import DriverArgs, Results
from bench.profiling import py_spy
from bench.tether_app import (
    ACTIVITIES,
    SIDE_FILE_ENV,
    STEP_SLEEP_ENV,
    TASK_QUEUE,
    WORKFLOWS,
    One,
    Sleeper,
    Steps,
    Three,
    Waiter,
)
from tether import Client, Worker
from tether.client import WorkflowHandle

PROFILE_ENV = "BENCH_PROFILE_A"
"""If set, py-spy records the worker during workload A into this file."""
PROFILE_IDLE_ENV = "BENCH_PROFILE_IDLE"
"""If set (with ``BENCH_PROFILE_A`` or ``_E``), py-spy records waiting threads too."""
PROFILE_E_ENV = "BENCH_PROFILE_E"
"""If set, py-spy records the worker while E's workflows wake, into this file."""
WORKER_WORKFLOW_TASKS = 300
"""The worker's ``max_concurrent_workflow_tasks`` (the library's default is 100): more
runs in flight keep the store's writer busy while the event loop runs others."""


def _worker_url(args: DriverArgs) -> str:
    """``--variant writer-process``: the worker's SQLite writer in its own process."""
    if args.variant == "writer-process":
        return f"{args.url}?writer=process"
    return args.url


class WorkerProcess:
    """One ``bench.tether_worker`` process."""

    def __init__(
        self,
        args: DriverArgs,
        name: str,
        identity: str | None = None,
        max_activities: int = 100,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ready_file = args.work_dir / f"{name}.ready"
        self.stats_file = args.work_dir / f"{name}.stats"
        self.ready_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.tether_worker", "--url", _worker_url(args)]
        cmd += ["--ready-file", str(self.ready_file), "--stats-file", str(self.stats_file)]
        cmd += ["--max-activities", str(max_activities)]
        cmd += ["--max-workflow-tasks", str(WORKER_WORKFLOW_TASKS)]
        if identity:
            cmd += ["--identity", identity]
        self.proc: subprocess.Popen[bytes] = procs.spawn(cmd, args.work_dir / f"{name}.log", env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self) -> None:
        await asyncio.to_thread(procs.wait_for_file, self.ready_file, self.proc)

    def stats(self) -> dict[str, float]:
        try:
            data: dict[str, float] = json.loads(self.stats_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def stop(self) -> None:
        procs.stop(self.proc)


@dataclass(frozen=True)
class RunningWorker:
    pid: int

    def peak_rss_mib(self) -> float:
        return procs.peak_rss_mib(self.pid)


async def _start_all(
    client: Client, workflow: type, args: list[Any], prefix: str, window: int = 0
) -> list[WorkflowHandle]:
    """Start one workflow per argument at once (or ``window`` at a time)."""
    gate = asyncio.Semaphore(window or len(args))

    async def start(i: int, arg: Any) -> WorkflowHandle:
        async with gate:
            return await client.start_workflow(
                workflow, arg, id=f"{prefix}{i}", task_queue=TASK_QUEUE
            )

    return await asyncio.gather(*(start(i, a) for i, a in enumerate(args)))


async def _results(handles: list[WorkflowHandle], window: int = 2000) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(handles), window):
        out += await asyncio.gather(*(h.result() for h in handles[i : i + window]))
    return out


# -- A, B, C -------------------------------------------------------------------------
async def workload_a(client: Client, n: int, worker: RunningWorker) -> dict[str, float]:
    cpu = _cpu_meter(worker.pid)
    t0 = time.perf_counter()
    handles = await _start_all(client, Three, list(range(n)), "a")
    results = await _results(handles, window=n)
    wall = time.perf_counter() - t0
    if results != [i + 6 for i in range(n)]:
        raise AssertionError("workload A: wrong results")
    return {
        "wf_per_s": round(n / wall, 1),
        "steps_per_s": round(3 * n / wall, 1),
        "worker_rss_mib": worker.peak_rss_mib(),
        "wall_s": round(wall, 3),
        **cpu(),
    }


def _cpu_meter(worker_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds used by the worker and by this driver from now until called."""
    me = os.getpid()
    w0, d0 = procs.cpu_seconds(worker_pid), procs.cpu_seconds(me)

    def used() -> dict[str, float]:
        if worker_pid == me:
            return {"worker_cpu_s": round(procs.cpu_seconds(me) - d0, 2)}
        return {
            "worker_cpu_s": round(procs.cpu_seconds(worker_pid) - w0, 2),
            "driver_cpu_s": round(procs.cpu_seconds(me) - d0, 2),
        }

    return used


async def workload_b(client: Client, n: int, prefix: str = "b") -> dict[str, float]:
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        handle = await client.start_workflow(One, i, id=f"{prefix}{i}", task_queue=TASK_QUEUE)
        if await handle.result() != i + 1:
            raise AssertionError("workload B: wrong result")
        latencies.append((time.perf_counter() - t0) * 1000)
    return stats.latency_metrics(latencies)


async def workload_c(client: Client, sizes: Sizes) -> dict[str, float]:
    batch_start, t0 = time.time(), time.perf_counter()
    handles = await _start_all(client, Sleeper, [sizes.c_sleep_s] * sizes.c_workflows, "c")
    samples = await _results(handles, window=len(handles))
    all_done = time.perf_counter() - t0
    return stats.timer_metrics(batch_start, [(s[0], s[1]) for s in samples], all_done)


@contextlib.asynccontextmanager
async def _worker(args: DriverArgs, client: Client) -> AsyncIterator[RunningWorker]:
    """A worker process, or with ``--variant embedded`` a worker in this process."""
    if args.variant == "embedded":
        async with Worker(
            client, task_queue=TASK_QUEUE, workflows=WORKFLOWS, activities=ACTIVITIES
        ):
            yield RunningWorker(os.getpid())
        return
    worker = WorkerProcess(args, "abc-worker")
    try:
        await worker.ready()
        yield RunningWorker(worker.pid)
    finally:
        worker.stop()


async def run_abc(args: DriverArgs) -> Results:
    client = await Client.connect(args.url)
    out: Results = {}
    profile = os.environ.get(PROFILE_ENV)
    async with _worker(args, client) as worker:
        await workload_b(client, args.sizes.warmup_workflows, prefix="warmup")
        if "A" in args.workloads:
            idle = bool(os.environ.get(PROFILE_IDLE_ENV))
            with py_spy(worker.pid, Path(profile) if profile else None, idle):
                out["A"] = await workload_a(client, args.sizes.a_workflows, worker)
        if "B" in args.workloads:
            out["B"] = await workload_b(client, args.sizes.b_workflows)
        if "C" in args.workloads:
            out["C"] = await workload_c(client, args.sizes)
    await client.close()
    return out


# -- D ---------------------------------------------------------------------------------
D_LIMIT_S = 120.0
"""D: give up waiting for results this long after the restart."""


async def run_d(args: DriverArgs) -> Results:
    sizes = args.sizes
    side_file = args.work_dir / "side_effects.txt"
    side_file.unlink(missing_ok=True)
    env = {SIDE_FILE_ENV: str(side_file), STEP_SLEEP_ENV: str(sizes.d_step_s)}

    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(args, name, "bench-d", sizes.d_concurrency, env)

    first = worker("d-worker1")
    await first.ready()
    client = await Client.connect(args.url)
    t_first = time.time()
    # The kill comes 2 s after the first start even if starting is still going on.
    starting = asyncio.create_task(
        _start_all(client, Steps, [sizes.d_steps] * sizes.d_workflows, "d")
    )
    await asyncio.sleep(max(0.0, t_first + sizes.d_kill_after_s - time.time()))
    procs.kill9(first.proc)
    t_kill = time.time()
    steps_at_kill = len(sidefx.read(side_file))
    t_restart = time.time()
    second = worker("d-worker2")
    handles = await starting
    try:
        results = await asyncio.wait_for(_results(handles, window=len(handles)), D_LIMIT_S)
        t_done = time.time()
        rss = procs.peak_rss_mib(second.pid)
    finally:
        second.stop()
    await client.close()
    lines = sidefx.read(side_file)
    after = [line.time for line in lines if line.time > t_restart]
    wf_ids = [f"d{i}" for i in range(sizes.d_workflows)]
    return {
        "D": {
            "recover_s": round(t_done - t_restart, 3),
            "first_step_after_restart_s": round(min(after) - t_restart, 3) if after else -1,
            **sidefx.check(lines, wf_ids, sizes.d_steps),
            "total_s": round(t_done - t_first, 3),
            "steps_done_at_kill": steps_at_kill,
            "kill_after_start_s": round(t_kill - t_first, 3),
            "results_ok": sum(1 for r in results if r == sum(range(sizes.d_steps))),
            "worker_rss_mib": rss,
        }
    }


# -- E ---------------------------------------------------------------------------------
E_MARGIN_ENV = "BENCH_E_MARGIN"
"""Seconds from the first start to the common due time (default: from the count)."""
E_ASLEEP_RATE = {"sqlite": 1000.0, "postgres": 250.0}
"""Conservative workflows/s from first start to asleep, to choose the due time."""


async def _until(check: Callable[[], bool], deadline: float, poll: float = 0.1) -> float:
    """Wait until ``check()`` or the wall-clock ``deadline``; return the time it held."""
    while not check() and time.time() < deadline:
        await asyncio.sleep(poll)
    return time.time()


async def run_e(args: DriverArgs, store_size: Callable[[], Awaitable[float]]) -> Results:
    kind = "sqlite" if args.url.startswith("sqlite:") else "postgres"
    n = args.sizes.e_workflows if kind == "sqlite" else args.sizes.e_workflows_postgres
    margin = float(os.environ.get(E_MARGIN_ENV, 5 + n / E_ASLEEP_RATE[kind]))
    worker = WorkerProcess(args, "e-worker")
    try:
        await worker.ready()
        client = await Client.connect(args.url)
        t0 = time.time()
        due = t0 + margin
        handles = await _start_all(client, Waiter, [due] * n, "e", window=500)
        started = time.time()

        def tasks() -> float:
            return worker.stats().get("workflow_tasks", 0)

        asleep = await _until(lambda: tasks() >= n, due)
        await asyncio.sleep(max(0.0, min(1.0, (due - time.time()) / 2)))
        rss_asleep = procs.rss_mib(worker.pid)
        store_mib = await store_size()
        profile = os.environ.get(PROFILE_E_ENV)
        idle = bool(os.environ.get(PROFILE_IDLE_ENV))
        cpu = _cpu_meter(worker.pid)
        with py_spy(worker.pid, Path(profile) if profile else None, idle):
            await _until(lambda: tasks() >= 2 * n, due + 900, poll=0.05)
        wake_cpu = cpu()
        wakes = await _results(handles)
        rss_peak = procs.peak_rss_mib(worker.pid)
        await client.close()
    finally:
        worker.stop()
    late_ms = [(w - due) * 1000 for w in wakes]
    return {
        "E": {
            "workflows": n,
            "worker_rss_mib": rss_asleep,
            "store_mib": store_mib,
            "wake_all_s": round(max(late_ms) / 1000, 3),
            "late_p99_ms": round(stats.percentile(late_ms, 99), 1),
            "late_p50_ms": round(stats.percentile(late_ms, 50), 1),
            "start_all_s": round(started - t0, 2),
            "asleep_all_s": round(asleep - t0, 2),
            "slack_s": round(due - asleep, 2),
            "worker_rss_peak_mib": rss_peak,
            "results_ok": len(wakes),
            # CPU of the worker's processes from just before the due time until every
            # sleeper had run: steadier than the wall time on a VM that others share.
            "wake_cpu_s": wake_cpu["worker_cpu_s"],
            "wake_cpu_us_per_wf": round(wake_cpu["worker_cpu_s"] / n * 1e6, 1),
        }
    }


async def _store_size(url: str) -> float:
    if url.startswith("sqlite:"):
        directory = Path(url[len("sqlite:///") :]).parent
        total = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        return round(total / 2**20, 1)
    import asyncpg  # a Tether dependency, so present in this venv

    conn = await asyncpg.connect(url)
    try:
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    return round(size / 2**20, 1)


async def main_async(args: DriverArgs) -> Results:
    out: Results = {}
    if any(w in args.workloads for w in "ABC"):
        out.update(await run_abc(args))
    if "D" in args.workloads:
        out.update(await run_d(args))
    if "E" in args.workloads:
        out.update(await run_e(args, lambda: _store_size(args.url)))
    return out


def main() -> None:
    procs.exit_on_sigterm()
    args = driver_io.parse()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        driver_io.write(args.out, asyncio.run(main_async(args)))
    finally:
        procs.cleanup()


if __name__ == "__main__":
    main()
