"""Workflows whose recorded histories are checked in under tests/golden/.

Changing this code incompatibly makes tests/test_golden.py fail: that is the point.
Regenerate the files only for a deliberate, versioned change (python tests/golden_app.py).
"""

from __future__ import annotations

import asyncio
import pathlib
from dataclasses import dataclass

from tether import RetryPolicy, Worker, activity, workflow


@dataclass
class Order:
    order_id: str
    amount: int


@activity.defn
async def charge(order: Order) -> str:
    return f"charge-{order.order_id}"


@activity.defn
async def ship(order: Order) -> str:
    return f"parcel-{order.order_id}"


@workflow.defn
class OrderFlow:
    def __init__(self) -> None:
        self.approved = False
        self.notes: list[str] = []

    @workflow.run
    async def run(self, order: Order) -> dict[str, str]:
        policy = RetryPolicy(initial_interval=0.1, maximum_attempts=3)
        receipt = await workflow.execute_activity(
            charge, order, start_to_close_timeout=5, retry_policy=policy
        )
        await workflow.wait_condition(lambda: self.approved, timeout=3600)
        await asyncio.sleep(0.05)
        parcel = await workflow.execute_activity(ship, order, start_to_close_timeout=5)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return {"receipt": receipt, "parcel": parcel, "notes": ",".join(self.notes)}

    @workflow.signal
    def approve(self) -> None:
        self.approved = True

    @workflow.update
    def add_note(self, note: str) -> int:
        self.notes.append(note)
        return len(self.notes)

    @workflow.query
    def status(self) -> str:
        return "approved" if self.approved else "waiting"


async def _record(directory: pathlib.Path) -> None:
    from tether.replayer import export_history, save_history
    from tether.testing import WorkflowEnvironment

    async with await WorkflowEnvironment.start_local() as env:
        client = env.client
        async with Worker(
            client, task_queue="golden", workflows=[OrderFlow], activities=[charge, ship]
        ):
            for i in range(2):
                handle = await client.start_workflow(
                    OrderFlow, Order(f"o-{i}", 100 + i), id=f"golden-{i}", task_queue="golden"
                )
                await handle.execute_update(OrderFlow.add_note, f"gift wrap {i}")
                await handle.signal(OrderFlow.approve)
                await handle.result(timeout=30)
                save_history(directory / f"order-{i}.json", await export_history(handle))


if __name__ == "__main__":
    asyncio.run(_record(pathlib.Path(__file__).parent / "golden"))
