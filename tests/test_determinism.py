"""Replay checks code against history; bugs and nondeterminism retry the task, not the run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tether import (
    ApplicationError,
    NondeterminismError,
    Worker,
    WorkflowFailureError,
    activity,
    workflow,
)
from tether.client import WorkflowHandle
from tether.testing import WorkflowEnvironment, replay


@activity.defn
async def step_a() -> str:
    return "a"


@activity.defn
async def step_b() -> str:
    return "b"


@activity.defn
async def step_c() -> str:
    return "c"


@workflow.defn(name="Versioned")
class VersionOne:
    @workflow.run
    async def run(self) -> str:
        first = await workflow.execute_activity(step_a, start_to_close_timeout=5)
        await asyncio.sleep(1.0)
        second = await workflow.execute_activity(step_b, start_to_close_timeout=5)
        return first + second


@workflow.defn(name="Versioned")
class IncompatibleVersion:
    @workflow.run
    async def run(self) -> str:
        first = await workflow.execute_activity(step_c, start_to_close_timeout=5)
        await asyncio.sleep(1.0)
        return first


async def wait_for_event(handle: WorkflowHandle, event_type: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while event_type not in [e.type for e in await handle.history()]:
            await asyncio.sleep(0.02)


async def wait_for_task_failure(handle: WorkflowHandle, timeout: float = 10) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            description = await handle.describe()
            if description.task_failure is not None:
                return description.task_failure
            await asyncio.sleep(0.02)


ACTIVITIES = [step_a, step_b, step_c]


async def test_incompatible_change_raises_nondeterminism_then_old_code_finishes(
    env: WorkflowEnvironment,
) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[VersionOne], activities=ACTIVITIES):
        handle = await client.start_workflow(VersionOne, id="v", task_queue="test")
        await wait_for_event(handle, "TimerStarted")

    # The timer fires while a worker with incompatible code serves the queue.
    async with Worker(
        client, task_queue="test", workflows=[IncompatibleVersion], activities=ACTIVITIES
    ):
        failure = await wait_for_task_failure(handle)
        description = await handle.describe()
    message = str(failure["message"])
    assert failure["type"] == "NondeterminismError"
    assert "history event #2 is ActivityScheduled(activity 'step_a', seq 1)" in message
    assert "emitted ActivityScheduled(activity 'step_c', seq 1)" in message
    assert description.status == "running", "nondeterminism must not fail the run"

    async with Worker(client, task_queue="test", workflows=[VersionOne], activities=ACTIVITIES):
        assert await handle.result(timeout=30) == "ab"
    assert (await handle.describe()).task_failure is None


async def test_replay_helper_flags_incompatible_code(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[VersionOne], activities=ACTIVITIES):
        handle = await env.client.start_workflow(VersionOne, id="golden", task_queue="test")
        await handle.result(timeout=30)
    history = await handle.history()
    replay(VersionOne, history)
    with pytest.raises(NondeterminismError, match="step_a"):
        replay(IncompatibleVersion, history)


BROKEN = {"on": True}


@workflow.defn
class BuggyUntilFixed:
    @workflow.run
    async def run(self) -> str:
        value = await workflow.execute_activity(step_a, start_to_close_timeout=5)
        if BROKEN["on"]:
            return undefined_name  # type: ignore[name-defined]  # noqa: F821
        return value


async def test_bug_retries_workflow_task_until_code_is_fixed(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    BROKEN["on"] = True
    async with make_worker(env.client, workflows=[BuggyUntilFixed], activities=ACTIVITIES):
        handle = await env.client.start_workflow(BuggyUntilFixed, id="bug", task_queue="test")
        failure = await wait_for_task_failure(handle)
        assert failure["type"] == "NameError"
        assert "undefined_name" in str(failure["message"])
        assert (await handle.describe()).status == "running"
        BROKEN["on"] = False  # "deploy" the fix; the retried task now succeeds
        assert await handle.result(timeout=30) == "a"


@workflow.defn
class FailsOnPurpose:
    @workflow.run
    async def run(self, kind: str) -> None:
        await workflow.execute_activity(step_a, start_to_close_timeout=5)
        if kind == "application":
            raise ApplicationError("order rejected", {"reason": "fraud"}, type="Rejected")
        raise ValueError("bad order total")


@pytest.mark.parametrize("kind", ["application", "value"])
async def test_exception_from_workflow_code_fails_the_run(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker], kind: str
) -> None:
    async with make_worker(env.client, workflows=[FailsOnPurpose], activities=ACTIVITIES):
        handle = await env.client.start_workflow(
            FailsOnPurpose, kind, id=f"fail-{kind}", task_queue="test"
        )
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result(timeout=30)
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    if kind == "application":
        assert (cause.type, cause.message, list(cause.details)) == (
            "Rejected",
            "order rejected",
            [{"reason": "fraud"}],
        )
    else:
        assert (cause.type, cause.message) == ("ValueError", "bad order total")
    description = await handle.describe()
    assert description.status == "failed"
    assert description.failure is not None and description.failure["type"] == cause.type


SWALLOWED: list[str] = []


@workflow.defn
class SwallowsEverything:
    @workflow.run
    async def run(self) -> int:
        total = 0
        for _ in range(3):
            try:
                await asyncio.sleep(0.01)
                total += 1
            except Exception as e:  # a user's broad handler must not eat control flow
                SWALLOWED.append(repr(e))
        return total


async def test_broad_except_does_not_swallow_eviction(env: WorkflowEnvironment) -> None:
    SWALLOWED.clear()
    async with Worker(
        env.client, task_queue="test", workflows=[SwallowsEverything], max_cached_workflows=0
    ):
        result = await env.client.execute_workflow(SwallowsEverything, id="sw", task_queue="test")
    assert result == 3
    assert SWALLOWED == []
