"""The workflow cache under pressure, and durable timers in the time-skipping environment."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tether import Worker, activity, workflow
from tether._runtime.definitions import workflow_definition
from tether._runtime.instance import WorkflowInfo, WorkflowInstance, WorkflowTaskFailure
from tether._store.base import WORKFLOW_STARTED, Event
from tether.converter import PayloadConverter
from tether.testing import WorkflowEnvironment


@activity.defn
async def increment(x: int) -> int:
    await asyncio.sleep(0.001)
    return x + 1


@workflow.defn
class Counter:
    @workflow.run
    async def run(self, start: int) -> int:
        value = start
        for _ in range(4):
            value = await workflow.execute_activity(increment, value, start_to_close_timeout=5)
            await asyncio.sleep(0.01)
        return value


async def test_tiny_cache_with_many_concurrent_workflows(env: WorkflowEnvironment) -> None:
    async with Worker(
        env.client,
        task_queue="test",
        workflows=[Counter],
        activities=[increment],
        max_cached_workflows=1,
    ) as worker:
        handles = [
            await env.client.start_workflow(Counter, i, id=f"c{i}", task_queue="test")
            for i in range(60)
        ]
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        stats = worker.stats
    assert results == [i + 4 for i in range(60)]
    # Runs were evicted and rebuilt by replay many times over.
    assert stats["evictions"] > 100
    assert stats["replays"] > 200


@workflow.defn
class SleepsAndCalls:
    @workflow.run
    async def run(self, start: int) -> int:
        napping = asyncio.ensure_future(asyncio.sleep(3600))
        value = await workflow.execute_activity(increment, start, start_to_close_timeout=5)
        await napping
        return value


@workflow.defn
class Returns:
    @workflow.run
    async def run(self, start: int) -> int:
        return start


@pytest.mark.parametrize(
    ("workflow_class", "args"),
    [
        (Counter, [1]),
        (SleepsAndCalls, [1]),
        (Returns, [1]),
        (Returns, ["three"]),  # does not decode: the run fails
        (Returns, [1, 2]),  # does not bind: the task fails
    ],
)
def test_an_evicted_run_is_freed_without_the_cycle_collector(
    workflow_class: type, args: list[Any]
) -> None:
    """The worker evicts runs all the time (cache full, closed, failed): each must go at
    once, not pile up as cyclic garbage whose collection costs more the more is alive."""
    started = {"workflow_id": "w", "workflow_type": "t", "task_queue": "q", "args": args}
    info = WorkflowInfo.from_started("run", 0.0, started)
    instance = WorkflowInstance(workflow_definition(workflow_class), info, PayloadConverter())  # type: ignore[abstract]
    try:
        commands = instance.apply([Event(1, WORKFLOW_STARTED, 0.0, {**started, "seed": 7})], 0.0)
        assert commands  # waiting on an activity (and a timer), or closing
    except WorkflowTaskFailure as e:
        assert len(args) == 2, e  # only the arguments that do not bind
        del e
    freed = weakref.ref(instance)
    gc.collect()
    gc.disable()
    try:
        instance.evict()
        del instance
        assert freed() is None
    finally:
        gc.enable()


@workflow.defn
class GathersRounds:
    @workflow.run
    async def run(self, rounds: int) -> int:
        async def one(i: int) -> int:
            await asyncio.sleep(0)
            return i

        total = 0
        for _ in range(rounds):
            total += sum(await asyncio.gather(*(one(i) for i in range(50))))
        return total


def _started(workflow_class: type, arg: Any) -> tuple[WorkflowInstance, Event]:
    started = {"workflow_id": "w", "workflow_type": "t", "task_queue": "q", "args": [arg]}
    info = WorkflowInfo.from_started("run", 0.0, started)
    instance = WorkflowInstance(workflow_definition(workflow_class), info, PayloadConverter())  # type: ignore[abstract]
    return instance, Event(1, WORKFLOW_STARTED, 0.0, {**started, "seed": 7})


def test_finished_tasks_do_not_pile_up_in_a_run() -> None:
    """A run keeps its tasks to close them at eviction; finished ones are dropped by
    the end of each activation, so a long-lived run that spawns many keeps none."""
    instance, started = _started(GathersRounds, 40)
    commands = instance.apply([started], 0.0)
    assert commands == [("WorkflowCompleted", {"result": 40 * sum(range(50))})]
    assert len(instance._tasks) <= 1  # of 2,001 created: the finished main task at most
    instance.evict()


def test_workflow_info_from_started_sets_every_field() -> None:
    """``from_started`` fills the frozen dataclass directly (it runs for every replay):
    it must set each field, as the constructor would."""
    started = {
        "namespace": "ns",
        "workflow_id": "w",
        "workflow_type": "t",
        "task_queue": "q",
        "memo": {"m": 1},
        "search_attributes": {"s": 2},
        "parent_run_id": "parent",
    }
    info = WorkflowInfo.from_started("run", 5.0, started)
    expected = WorkflowInfo("ns", "w", "run", "t", "q", 5.0, {"m": 1}, {"s": 2}, "parent")
    assert info == expected
    assert vars(info) == vars(expected)  # every field, none extra
    assert info.memo is not started["memo"]  # a copy: upserts do not touch the event
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.workflow_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("arg", "outcome"),
    [
        (3, ("WorkflowCompleted", {"result": 3})),
        ("three", "WorkflowFailed"),  # a value that does not decode fails the run
    ],
)
def test_workflow_arguments_decode_into_run(arg: Any, outcome: Any) -> None:
    instance, started = _started(Returns, arg)
    commands = instance.apply([started], 0.0)
    if isinstance(outcome, str):
        [(event_type, data)] = commands
        assert event_type == outcome
        assert "workflow argument 1" in data["failure"]["message"]
    else:
        assert commands == [outcome]
    instance.evict()


def test_workflow_arguments_that_do_not_bind_fail_the_task_not_the_run() -> None:
    """Too many arguments for ``run`` is a code/deploy mismatch (TypeError): the task is
    retried, as when ``run`` itself raises a TypeError, rather than the run failing."""
    instance, started = _started(Returns, 1)
    started.data["args"] = [1, 2]
    with pytest.raises(WorkflowTaskFailure, match="TypeError"):
        instance.apply([started], 0.0)
    instance.evict()


@workflow.defn
class FireAndForget:
    @workflow.run
    async def run(self, n: int) -> int:
        async def fails() -> None:
            raise ValueError("nobody awaits this")

        asyncio.ensure_future(fails())  # noqa: RUF006 (the point: nobody keeps it)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return n


def test_an_unawaited_task_that_fails_is_reported_once_live_and_never_in_replay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio reports a failed task whose exception nobody retrieved when the task is
    freed: in the activation it failed in, as it runs live, and never while replaying
    history (every worker that replays the run would report it again)."""
    instance, started = _started(FireAndForget, 1)
    with caplog.at_level(logging.ERROR, logger="tether"):
        commands = instance.apply([started], 0.0)
        assert commands == [("WorkflowCompleted", {"result": 1})]
        reported = [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert len(reported) == 1, caplog.text
        assert "nobody awaits this" in caplog.text
        instance.evict()
        caplog.clear()
        replayed, _ = _started(FireAndForget, 1)
        history = [
            started,
            Event(2, "WorkflowCompleted", 0.0, {"result": 1}),
            Event(3, "WorkflowTaskCompleted", 0.0, {"inputs_through": 1}),
        ]
        assert replayed.apply(history, 0.0) == []
        assert replayed.closed
        replayed.evict()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


@workflow.defn
class LongSleep:
    @workflow.run
    async def run(self) -> float:
        started = workflow.time()
        await workflow.sleep(timedelta(days=30))
        return workflow.time() - started


async def test_thirty_day_sleep_passes_in_under_a_second(
    skipping_env: WorkflowEnvironment,
) -> None:
    client = skipping_env.client
    async with Worker(client, task_queue="test", workflows=[LongSleep]):
        began = time.monotonic()
        slept = await client.execute_workflow(LongSleep, id="sleepy", task_queue="test")
        elapsed = time.monotonic() - began
    assert slept >= 30 * 86400
    assert elapsed < 1.0, f"30-day sleep took {elapsed:.2f}s of wall time"


@workflow.defn
class TimeoutRace:
    @workflow.run
    async def run(self) -> str:
        try:
            await asyncio.wait_for(asyncio.sleep(timedelta(days=2).total_seconds()), 3600)
        except TimeoutError:
            return "timed out after an hour"
        return "slept"


async def test_wait_for_timeout_is_a_durable_timer(skipping_env: WorkflowEnvironment) -> None:
    client = skipping_env.client
    async with Worker(client, task_queue="test", workflows=[TimeoutRace]):
        handle = await client.start_workflow(TimeoutRace, id="race", task_queue="test")
        assert await handle.result(timeout=10) == "timed out after an hour"
    types = [e.type for e in await handle.history()]
    assert types.count("TimerStarted") == 2
    assert "TimerCancelled" in types  # the 2-day sleep was cancelled, durably


async def test_env_sleep_moves_time_without_a_result_waiter(
    skipping_env: WorkflowEnvironment,
) -> None:
    client = skipping_env.client
    async with Worker(client, task_queue="test", workflows=[LongSleep]):
        handle = await client.start_workflow(LongSleep, id="observed", task_queue="test")
        await asyncio.sleep(0.2)
        # Nobody waits on the result, so time does not skip: still asleep.
        assert (await handle.describe()).status == "running"
        await skipping_env.sleep(timedelta(days=31))
        assert await handle.result(timeout=10) >= 30 * 86400


async def test_an_idle_worker_leaves_no_store_waiters_behind(tmp_path: Path) -> None:
    """Each idle poll of the worker's loops waits on the store for its kind of change;
    a wait that ends without that change must not stay registered (it would pile up
    until, say, the first query ever comes)."""
    env = await WorkflowEnvironment.start_local(str(tmp_path / "idle.db"))
    try:
        async with Worker(
            env.client, task_queue="test", workflows=[Counter], activities=[increment]
        ):
            await env.client.execute_workflow(Counter, 1, id="idle", task_queue="test")
            await asyncio.sleep(2.5)  # two idle polls of every loop
            waiters = env.client.store._waiters._waiting  # type: ignore[attr-defined]
            pending = [fut for _, fut, _ in waiters if not fut.done()]
            assert len(pending) <= 4  # at most one per loop that is waiting right now
    finally:
        await env.shutdown()


async def test_an_idle_worker_does_not_claim_after_each_task(env: WorkflowEnvironment) -> None:
    """A finished task frees a slot, but without work left behind by the last claim,
    the worker waits for new work instead of claiming again (a claim is a transaction).
    Nor does a timer that fires make it claim more than the task the firing readied."""
    store = env.client.store
    claim = store.claim_workflow_tasks
    empty_claims = 0

    async def counting(*args: object) -> object:
        nonlocal empty_claims
        tasks = await claim(*args)  # type: ignore[arg-type]
        empty_claims += not tasks
        return tasks

    store.claim_workflow_tasks = counting  # type: ignore[method-assign]
    began = time.monotonic()
    async with Worker(env.client, task_queue="test", workflows=[Counter], activities=[increment]):
        for i in range(5):  # 5 runs of 9 workflow tasks each, one at a time
            assert await env.client.execute_workflow(Counter, i, id=f"i{i}", task_queue="test")
    # The first look at start and at most one poll a second while idle (_IDLE_POLL);
    # not one per task (45 tasks), nor one per timer that fires (20 timers), and one to
    # spare.
    assert empty_claims <= 2 + (time.monotonic() - began), empty_claims


_FAIL_ONCE: set[str] = set()
"""Workflow ids whose first workflow task still has to fail (``FailsFirstTask``)."""


@workflow.defn
class FailsFirstTask:
    @workflow.run
    async def run(self, x: int) -> int:
        wf = workflow.info().workflow_id
        if wf in _FAIL_ONCE:
            _FAIL_ONCE.discard(wf)
            # A bug (a TypeError) fails the workflow task, which is retried; not the run.
            raise TypeError("the first try hits a bug")
        return x * 2


async def test_tasks_claimed_together_fail_and_commit_each_on_its_own(
    env: WorkflowEnvironment,
) -> None:
    """Workflow tasks claimed in one batch (their histories read with the claim) run
    in one asyncio task and complete together; one that fails is retried alone, and
    the others commit at once, untouched by it."""
    handles = [
        await env.client.start_workflow(FailsFirstTask, i, id=f"b{i}", task_queue="test")
        for i in range(8)
    ]
    _FAIL_ONCE.add("b3")
    async with Worker(env.client, task_queue="test", workflows=[FailsFirstTask]) as worker:
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
        stats = worker.stats
    assert results == [i * 2 for i in range(8)]
    assert stats["workflow_claims"] >= 2  # the failed task came back on a later claim
    assert stats["workflow_task_failures"] == 1
    assert stats["workflow_tasks"] == 8
