"""DBOS Transact's driver (runs in ``bench/.peers/venv-dbos``).

A-C run in this process, which is DBOS's application process (DBOS is a library:
the process that starts workflows also runs them). ``--variant async`` uses async
workflows and ``DBOS.start_workflow_async``; ``--variant sync`` uses sync workflows,
one thread each. D kills and restarts :mod:`bench.dbos_worker` processes and polls
for results with ``DBOSClient``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from dbos import DBOS, DBOSClient

from bench import dbos_app, driver_io, procs, sidefx, stats
from bench.config import Sizes
from bench.driver_io import DriverArgs, Results

D_LIMIT_S = 120.0
"""D: give up waiting for results this long after the restart."""


def _throughput(n: int, wall: float, results: list[Any], cpu0: float) -> dict[str, float]:
    if results != [i + 6 for i in range(n)]:
        raise AssertionError("workload A: wrong results")
    return {
        "wf_per_s": round(n / wall, 1),
        "steps_per_s": round(3 * n / wall, 1),
        "worker_rss_mib": procs.peak_rss_mib(os.getpid()),
        "wall_s": round(wall, 3),
        "worker_cpu_s": round(procs.cpu_seconds(os.getpid()) - cpu0, 2),
    }


# -- async API -------------------------------------------------------------------------
async def a_async(n: int) -> dict[str, float]:
    cpu0, t0 = procs.cpu_seconds(os.getpid()), time.perf_counter()
    handles = await asyncio.gather(
        *(DBOS.start_workflow_async(dbos_app.three, i) for i in range(n))
    )
    results = await asyncio.gather(*(h.get_result() for h in handles))
    return _throughput(n, time.perf_counter() - t0, list(results), cpu0)


async def b_async(n: int) -> dict[str, float]:
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        handle = await DBOS.start_workflow_async(dbos_app.one, i)
        if await handle.get_result() != i + 1:
            raise AssertionError("workload B: wrong result")
        latencies.append((time.perf_counter() - t0) * 1000)
    return stats.latency_metrics(latencies)


async def c_async(sizes: Sizes) -> dict[str, float]:
    batch_start, t0 = time.time(), time.perf_counter()
    handles = await asyncio.gather(
        *(
            DBOS.start_workflow_async(dbos_app.sleeper, sizes.c_sleep_s)
            for _ in range(sizes.c_workflows)
        )
    )
    samples = await asyncio.gather(*(h.get_result() for h in handles))
    return stats.timer_metrics(
        batch_start, [(s[0], s[1]) for s in samples], time.perf_counter() - t0
    )


async def abc_async(args: DriverArgs) -> Results:
    await b_async(args.sizes.warmup_workflows)
    out: Results = {}
    if "A" in args.workloads:
        out["A"] = await a_async(args.sizes.a_workflows)
    if "B" in args.workloads:
        out["B"] = await b_async(args.sizes.b_workflows)
    if "C" in args.workloads:
        out["C"] = await c_async(args.sizes)
    return out


# -- sync API --------------------------------------------------------------------------
def a_sync(n: int) -> dict[str, float]:
    cpu0, t0 = procs.cpu_seconds(os.getpid()), time.perf_counter()
    handles = [DBOS.start_workflow(dbos_app.three_sync, i) for i in range(n)]
    results = [h.get_result() for h in handles]
    return _throughput(n, time.perf_counter() - t0, results, cpu0)


def b_sync(n: int) -> dict[str, float]:
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        if dbos_app.one_sync(i) != i + 1:  # a direct call runs it durably in this thread
            raise AssertionError("workload B: wrong result")
        latencies.append((time.perf_counter() - t0) * 1000)
    return stats.latency_metrics(latencies)


def c_sync(sizes: Sizes) -> dict[str, float]:
    batch_start, t0 = time.time(), time.perf_counter()
    handles = [
        DBOS.start_workflow(dbos_app.sleeper_sync, sizes.c_sleep_s)
        for _ in range(sizes.c_workflows)
    ]
    samples = [h.get_result() for h in handles]
    return stats.timer_metrics(
        batch_start, [(s[0], s[1]) for s in samples], time.perf_counter() - t0
    )


def abc_sync(args: DriverArgs) -> Results:
    b_sync(args.sizes.warmup_workflows)
    out: Results = {}
    if "A" in args.workloads:
        out["A"] = a_sync(args.sizes.a_workflows)
    if "B" in args.workloads:
        out["B"] = b_sync(args.sizes.b_workflows)
    if "C" in args.workloads:
        out["C"] = c_sync(args.sizes)
    return out


# -- D ---------------------------------------------------------------------------------
def run_d(args: DriverArgs) -> Results:
    sizes = args.sizes
    side_file = args.work_dir / "side_effects.txt"
    marker = args.work_dir / "d.first-start"
    side_file.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    env = {
        dbos_app.SIDE_FILE_ENV: str(side_file),
        dbos_app.STEP_SLEEP_ENV: str(sizes.d_step_s),
        dbos_app.STEP_LIMIT_ENV: str(sizes.d_concurrency),
    }
    cmd = [sys.executable, "-m", "bench.dbos_worker", "--url", args.url]
    start = ["--start", str(sizes.d_workflows), "--steps", str(sizes.d_steps)]
    first = procs.spawn(
        [*cmd, *start, "--marker", str(marker)], args.work_dir / "d-worker1.log", env
    )
    t_first, t_all_started = map(float, procs.wait_for_file(marker, first, 120).split())
    time.sleep(max(0.0, t_first + sizes.d_kill_after_s - time.time()))
    procs.kill9(first)
    t_kill = time.time()
    steps_at_kill = len(sidefx.read(side_file))
    t_restart = time.time()
    second = procs.spawn(cmd, args.work_dir / "d-worker2.log", env)
    client = DBOSClient(system_database_url=args.url)
    try:
        deadline = t_restart + D_LIMIT_S
        while True:
            done = client.list_workflows(status="SUCCESS", load_input=False)
            if len(done) >= sizes.d_workflows or time.time() > deadline:
                break
            time.sleep(0.1)
        t_done = time.time()
        rss = procs.peak_rss_mib(second.pid)
    finally:
        procs.stop(second)
        client.destroy()
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
            "start_all_s": round(t_all_started - t_first, 3),
            "results_ok": sum(1 for w in done if w.output == sum(range(sizes.d_steps))),
            "worker_rss_mib": rss,
        }
    }


def main() -> None:
    procs.exit_on_sigterm()
    args = driver_io.parse()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out: Results = {}
    try:
        if "D" in args.workloads:
            out.update(run_d(args))
        if any(w in args.workloads for w in "ABC"):
            dbos_app.launch(args.url)
            if args.variant == "sync":
                out.update(abc_sync(args))
            else:
                out.update(asyncio.run(abc_async(args)))
        driver_io.write(args.out, out)
    finally:
        procs.cleanup()
    sys.stdout.flush()
    os._exit(0)  # DBOS's background threads can keep a clean exit waiting


if __name__ == "__main__":
    main()
