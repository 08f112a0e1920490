"""Changing workflow code safely with ``workflow.patched`` / ``deprecate_patch``.

v1 labels shipments for ground transport. v2 switches new runs to express with
``patched("express-label")``; runs already past that point on v1 keep the ground path.
v3 drops the branch (incompatible with runs in flight); v4 deprecates the patch once
no v1 run remains. ``testing.replay`` tells which code can replay which history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tether import NondeterminismError, Worker, WorkflowHandle, activity, workflow
from tether.client import HistoryEvent
from tether.testing import WorkflowEnvironment, replay

MakeWorker = Callable[..., Worker]


@activity.defn
async def pack(order: str) -> str:
    return f"packed {order}"


@activity.defn
async def label_ground(order: str) -> str:
    return "ground"


@activity.defn
async def label_express(order: str) -> str:
    return "express"


@activity.defn
async def ship(order: str, label: str) -> str:
    return f"shipped {order} by {label}"


ACTIVITIES = [pack, label_ground, label_express, ship]


class _Shipment:
    def __init__(self) -> None:
        self.picked_up = False

    @workflow.signal
    def pickup(self) -> None:
        self.picked_up = True

    async def finish(self, order: str, packed: str, label: str) -> str:
        await workflow.wait_condition(lambda: self.picked_up)
        shipped = await workflow.execute_activity(ship, order, label, start_to_close_timeout=5)
        return f"{packed}; {shipped}"


@workflow.defn(name="Shipment")
class ShipmentV1(_Shipment):
    @workflow.run
    async def run(self, order: str) -> str:
        packed = await workflow.execute_activity(pack, order, start_to_close_timeout=5)
        label = await workflow.execute_activity(label_ground, order, start_to_close_timeout=5)
        return await self.finish(order, packed, label)


@workflow.defn(name="Shipment")
class ShipmentV2(_Shipment):
    @workflow.run
    async def run(self, order: str) -> str:
        packed = await workflow.execute_activity(pack, order, start_to_close_timeout=5)
        if workflow.patched("express-label"):
            label = await workflow.execute_activity(label_express, order, start_to_close_timeout=5)
        else:
            label = await workflow.execute_activity(label_ground, order, start_to_close_timeout=5)
        return await self.finish(order, packed, label)


@workflow.defn(name="Shipment")
class ShipmentV3(_Shipment):
    """Express only, branch removed too early: breaks v1 runs in flight."""

    @workflow.run
    async def run(self, order: str) -> str:
        packed = await workflow.execute_activity(pack, order, start_to_close_timeout=5)
        label = await workflow.execute_activity(label_express, order, start_to_close_timeout=5)
        return await self.finish(order, packed, label)


@workflow.defn(name="Shipment")
class ShipmentV4(_Shipment):
    """Express only, with the patch deprecated: replays v2 runs, not v1 runs."""

    @workflow.run
    async def run(self, order: str) -> str:
        packed = await workflow.execute_activity(pack, order, start_to_close_timeout=5)
        workflow.deprecate_patch("express-label")
        label = await workflow.execute_activity(label_express, order, start_to_close_timeout=5)
        return await self.finish(order, packed, label)


async def wait_until(
    condition: Callable[[], Awaitable[Any]], what: str, timeout: float = 10
) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


async def waiting_for_pickup(handle: WorkflowHandle) -> bool:
    """The label activity completed and a workflow task ran after it (now it waits)."""
    types = [e.type for e in await handle.history()]
    return (
        len(types) >= 2
        and types[-1] == "WorkflowTaskCompleted"
        and types.count("ActivityCompleted") == 2
    )


def markers(history: list[HistoryEvent]) -> list[str]:
    return [e.data["patch_id"] for e in history if e.type == "MarkerRecorded"]


def labels(history: list[HistoryEvent]) -> list[str]:
    return [
        e.data["activity_type"]
        for e in history
        if e.type == "ActivityScheduled" and e.data["activity_type"].startswith("label")
    ]


async def test_run_started_on_v1_finishes_on_v2_and_new_runs_take_the_patch(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[ShipmentV1], activities=ACTIVITIES):
        old = await client.start_workflow(ShipmentV1, "o-1", id="ship-old", task_queue="test")
        await wait_until(lambda: waiting_for_pickup(old), "the v1 run to wait for pickup")

    # Deploy v2: the v1 run continues on the old path, a new run takes the new one.
    async with make_worker(client, workflows=[ShipmentV2], activities=ACTIVITIES):
        await old.signal(ShipmentV2.pickup)
        assert await old.result(timeout=10) == "packed o-1; shipped o-1 by ground"
        new = await client.start_workflow(ShipmentV2, "o-2", id="ship-new", task_queue="test")
        await new.signal(ShipmentV2.pickup)
        assert await new.result(timeout=10) == "packed o-2; shipped o-2 by express"
    assert (await old.describe()).task_failure is None

    v1_history, v2_history = await old.history(), await new.history()
    assert markers(v1_history) == [] and labels(v1_history) == ["label_ground"]
    assert markers(v2_history) == ["express-label"] and labels(v2_history) == ["label_express"]

    # v2 replays both; v3 dropped the branch and breaks both; v4 (deprecated patch)
    # replays v2 runs only, so it may ship once no v1 run remains.
    replay(ShipmentV2, v1_history)
    replay(ShipmentV2, v2_history)
    with pytest.raises(NondeterminismError, match="label_ground"):
        replay(ShipmentV3, v1_history)
    with pytest.raises(NondeterminismError, match="MarkerRecorded"):
        replay(ShipmentV3, v2_history)
    replay(ShipmentV4, v2_history)
    with pytest.raises(NondeterminismError, match="label_ground"):
        replay(ShipmentV4, v1_history)


async def test_v1_run_waiting_before_the_patch_point_takes_the_new_path(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    """A v1 run that had not reached the patched code yet has no old decision to keep."""

    @workflow.defn(name="Gate")
    class GateV1(_Shipment):
        @workflow.run
        async def run(self, order: str) -> str:
            await workflow.wait_condition(lambda: self.picked_up)
            return await workflow.execute_activity(label_ground, order, start_to_close_timeout=5)

    @workflow.defn(name="Gate")
    class GateV2(_Shipment):
        @workflow.run
        async def run(self, order: str) -> str:
            await workflow.wait_condition(lambda: self.picked_up)
            if workflow.patched("express-label"):
                return await workflow.execute_activity(
                    label_express, order, start_to_close_timeout=5
                )
            return await workflow.execute_activity(label_ground, order, start_to_close_timeout=5)

    client = env.client
    async with make_worker(client, workflows=[GateV1], activities=ACTIVITIES):
        handle = await client.start_workflow(GateV1, "o-3", id="gate", task_queue="test")
        await wait_until(
            lambda: _has(handle, "WorkflowTaskCompleted"), "the v1 run to start waiting"
        )
    async with make_worker(client, workflows=[GateV2], activities=ACTIVITIES):
        await handle.signal(GateV2.pickup)
        assert await handle.result(timeout=10) == "express"
    history = await handle.history()
    assert markers(history) == ["express-label"]
    replay(GateV2, history)
    with pytest.raises(NondeterminismError):
        replay(GateV1, history)


async def _has(handle: WorkflowHandle, event_type: str) -> bool:
    return event_type in [e.type for e in await handle.history()]
