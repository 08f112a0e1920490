"""Restate services for the workloads (runs in ``bench/.peers/venv-restate``).

``python -m bench.restate_app`` serves them with hypercorn on 127.0.0.1:9080 (HTTP/2
cleartext), as the SDK deployment the Restate server calls. Steps are journaled
``ctx.run`` calls; the timer is ``ctx.sleep``.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

import restate

from bench import sidefx

SERVICE_PORT = 9080
SIDE_FILE_ENV = "BENCH_SIDE_FILE"
STEP_SLEEP_ENV = "BENCH_STEP_SLEEP"
STEP_LIMIT_ENV = "BENCH_STEP_LIMIT"

three = restate.Workflow("Three")
one = restate.Workflow("One")
sleeper = restate.Workflow("Sleeper")
steps = restate.Workflow("Steps")

_gate: asyncio.Semaphore | None = None


async def _noop(i: int) -> int:
    return i


async def _now() -> float:
    return time.time()


@three.main(name="run")
async def three_run(ctx: restate.WorkflowContext, x: int) -> int:
    for i in (1, 2, 3):
        x += await ctx.run_typed(f"s{i}", _noop, restate.RunOptions(), i)
    return x


@one.main(name="run")
async def one_run(ctx: restate.WorkflowContext, x: int) -> int:
    return x + await ctx.run_typed("s1", _noop, restate.RunOptions(), 1)


@sleeper.main(name="run")
async def sleeper_run(ctx: restate.WorkflowContext, seconds: float) -> list[float]:
    began = await ctx.run_typed("began", _now, restate.RunOptions())  # journaled
    await ctx.sleep(timedelta(seconds=seconds))
    return [began, time.time() - began - seconds]


async def _side_effect(workflow_id: str, step: int) -> int:
    global _gate
    if _gate is None:
        _gate = asyncio.Semaphore(int(os.environ.get(STEP_LIMIT_ENV, "50")))
    async with _gate:
        await asyncio.sleep(float(os.environ.get(STEP_SLEEP_ENV, "0.2")))
        sidefx.append(os.environ[SIDE_FILE_ENV], workflow_id, step, time.time())
    return step


@steps.main(name="run")
async def steps_run(ctx: restate.WorkflowContext, count: int) -> int:
    workflow_id = ctx.key()
    total = 0
    for i in range(count):
        total += await ctx.run_typed(f"s{i}", _side_effect, restate.RunOptions(), workflow_id, i)
    return total


app = restate.app([three, one, sleeper, steps])


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{SERVICE_PORT}"]
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 2**31 - 1
    config.loglevel = "WARNING"
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
