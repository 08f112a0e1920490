"""Workflows run activities and timers and return typed results."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any

import pydantic
import pytest

from tether import Worker, activity, workflow
from tether.testing import WorkflowEnvironment


@dataclasses.dataclass
class Order:
    order_id: str
    amount_cents: int


class Receipt(pydantic.BaseModel):
    order_id: str
    charged: int
    steps: list[str]


@activity.defn
async def charge(order: Order) -> int:
    assert isinstance(order, Order)
    return order.amount_cents


@activity.defn
def describe_sync(order: Order) -> str:
    return f"order {order.order_id}"


@workflow.defn
class Checkout:
    @workflow.run
    async def run(self, order: Order) -> Receipt:
        assert isinstance(order, Order)
        charged = await workflow.execute_activity(charge, order, start_to_close_timeout=5)
        text = await workflow.execute_activity(describe_sync, order, start_to_close_timeout=5)
        await asyncio.sleep(0.05)
        return Receipt(order_id=order.order_id, charged=charged, steps=[text])


async def test_typed_round_trip(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[Checkout], activities=[charge, describe_sync]):
        receipt = await env.client.execute_workflow(
            Checkout.run, Order("o-1", 1250), id="o-1", task_queue="test"
        )
    assert receipt == Receipt(order_id="o-1", charged=1250, steps=["order o-1"])


@activity.defn
async def double(x: int) -> int:
    return 2 * x


@workflow.defn
class FanOut:
    @workflow.run
    async def run(self, n: int) -> list[int]:
        results = await asyncio.gather(
            *(workflow.execute_activity(double, i, start_to_close_timeout=5) for i in range(n))
        )
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(asyncio.sleep(0.01)), asyncio.ensure_future(asyncio.sleep(9))],
            return_when=asyncio.FIRST_COMPLETED,
        )
        assert len(done) == 1
        try:
            await asyncio.wait_for(
                workflow.execute_activity(double, 1, start_to_close_timeout=5), timeout=30
            )
        except TimeoutError:
            results.append(-1)
        return list(results)


async def test_gather_wait_and_wait_for(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[FanOut], activities=[double]):
        result = await env.client.execute_workflow(FanOut, 10, id="fan", task_queue="test")
    assert result == [2 * i for i in range(10)]


@workflow.defn
class Deterministic:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        before = workflow.now()
        values = [workflow.random().random(), str(workflow.uuid4())]
        await asyncio.sleep(0.05)
        values += [workflow.random().random(), str(workflow.uuid4())]
        assert workflow.time() >= before.timestamp() + 0.05
        info = workflow.info()
        return {"values": values, "id": info.workflow_id, "type": info.workflow_type}


async def test_deterministic_values_survive_replay(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[Deterministic]):
        handle = await env.client.start_workflow(Deterministic, id="det", task_queue="test")
        first = await handle.result()
    # A fresh worker with no cache replays the whole history: same values again.
    async with Worker(
        env.client, task_queue="test", workflows=[Deterministic], max_cached_workflows=0
    ):
        pass
    assert first["id"] == "det" and first["type"] == "Deterministic"
    assert len(set(first["values"])) == 4
    history = await handle.history()
    assert [e.type for e in history][-2:] == ["WorkflowCompleted", "WorkflowTaskCompleted"]


@workflow.defn
class Chatty:
    @workflow.run
    async def run(self) -> None:
        for i in range(3):
            workflow.logger.info("step %d", i)
            await asyncio.sleep(0.01)


async def test_workflow_logger_is_quiet_during_replay(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker], caplog: Any
) -> None:
    caplog.set_level("INFO", logger="tether.workflow")
    async with make_worker(env.client, workflows=[Chatty]):
        await env.client.execute_workflow(Chatty, id="chatty", task_queue="test")
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.workflow"]
    # Each line is logged once, even when every task replays the run from the start.
    assert [m.split(" [")[0] for m in messages] == ["step 0", "step 1", "step 2"]
    assert all("id=chatty" in m for m in messages)


@workflow.defn
class Returns:
    @workflow.run
    async def run(self, x: int) -> int:
        return x


@workflow.defn
class Waits:
    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


async def test_result_of_a_closed_run_is_at_once_while_others_are_awaited(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    client = env.client
    async with make_worker(client, workflows=[Returns, Waits]):
        waiting = await client.start_workflow(Waits, id="waits", task_queue="test")
        background = asyncio.create_task(waiting.result())  # keeps the watcher busy
        try:
            for i in range(3):
                handle = await client.start_workflow(Returns, i, id=f"r{i}", task_queue="test")
                while (await handle.describe()).status == "running":
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # its close has been announced already
                # Not at the watcher's next timed look (1 s): it looks again at once.
                assert await asyncio.wait_for(handle.result(), 0.5) == i
        finally:
            background.cancel()


@pytest.fixture
def gc_threshold() -> Iterator[None]:
    """Restores the collector's thresholds that a test changes."""
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


@pytest.mark.usefixtures("gc_threshold")
async def test_a_started_worker_raises_only_the_default_gc_threshold(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    older = gc.get_threshold()[1:]
    gc.set_threshold(700, *older)  # CPython's default: the worker raises it
    async with make_worker(env.client, workflows=[Deterministic]):
        assert gc.get_threshold() == (20_000, *older)
    gc.set_threshold(1234, *older)  # the process's own choice: left alone
    async with make_worker(env.client, workflows=[Deterministic]):
        assert gc.get_threshold() == (1234, *older)
    gc.set_threshold(700, *older)
    async with make_worker(env.client, workflows=[Deterministic], tune_gc=False):
        assert gc.get_threshold() == (700, *older)
