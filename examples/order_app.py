"""The order-processing app that ``order_demo.py`` runs and crashes.

One workflow, three activities. The workflow charges the payment, reserves the
inventory (the inventory service fails the first try for some orders), waits
durably for the warehouse pickup window and ships. Each activity performs its side
effect by appending a line to a ledger file, the stand-in for a payment API, an
inventory service and a shipping API. The ledger line carries the activity's
idempotency key, which is what a real API would use to deduplicate a repeated call.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

from tether import ApplicationError, RetryPolicy, activity, workflow

TASK_QUEUE = "orders"
STEPS = ("charge_payment", "reserve_inventory", "ship")
LEDGER_ENV = "ORDER_DEMO_LEDGER"
"""The environment variable naming the ledger file the activities append to."""


@dataclass
class Order:
    order_id: str
    amount_cents: int
    flaky_inventory: bool = False
    """The inventory service fails this order's first reservation attempt."""


@dataclass
class Receipt:
    order_id: str
    charge_id: str
    reservation_id: str
    tracking_number: str
    attempts: dict[str, int] = field(default_factory=dict)
    """Which attempt of each step succeeded (a rerun after a crash counts as one)."""


def record_side_effect(order_id: str, step: str) -> str:
    """Append ``order-id step key=... attempt=... pid=...`` to the ledger; return the key.

    One ``write`` on an ``O_APPEND`` descriptor, so lines from concurrent activities
    and processes never interleave, and a line is either there in full or not at all.
    """
    info = activity.info()
    key, attempt, pid = info.idempotency_key, info.attempt, os.getpid()
    line = f"{order_id} {step} key={key} attempt={attempt} pid={pid}\n"
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return key


async def _call_service(order_id: str, step: str) -> tuple[str, int]:
    """Talk to a slow service: a request, the side effect, then a slow response.

    A worker killed after the side effect but before the result is recorded is why
    activities are at-least-once: the step reruns, with the same idempotency key.
    """
    await asyncio.sleep(random.uniform(0.05, 0.15))
    key = record_side_effect(order_id, step)
    await asyncio.sleep(random.uniform(0.05, 0.15))
    return key, activity.info().attempt


@activity.defn
async def charge_payment(order: Order) -> tuple[str, int]:
    key, attempt = await _call_service(order.order_id, "charge_payment")
    return f"ch_{key.replace('/', '_')}", attempt


@activity.defn
async def reserve_inventory(order: Order) -> tuple[str, int]:
    info = activity.info()
    if order.flaky_inventory and info.attempt == 1:
        await asyncio.sleep(0.05)
        # No side effect happened: the request never reached the inventory service.
        raise ApplicationError(f"inventory service unavailable for {order.order_id}; try again")
    key, attempt = await _call_service(order.order_id, "reserve_inventory")
    return f"rsv_{key.replace('/', '_')}", attempt


@activity.defn
async def ship(order: Order) -> tuple[str, int]:
    key, attempt = await _call_service(order.order_id, "ship")
    return f"trk_{key.replace('/', '_')}", attempt


RETRY = RetryPolicy(initial_interval=0.2, backoff_coefficient=2.0, maximum_attempts=5)


@workflow.defn
class ProcessOrder:
    @workflow.run
    async def run(self, order: Order) -> Receipt:
        charge_id, charge_attempt = await workflow.execute_activity(
            charge_payment, order, start_to_close_timeout=10, retry_policy=RETRY
        )
        reservation_id, reserve_attempt = await workflow.execute_activity(
            reserve_inventory, order, start_to_close_timeout=10, retry_policy=RETRY
        )
        workflow.logger.info("waiting for the warehouse pickup window")
        await workflow.sleep(1)  # a durable timer: it survives the worker's death
        tracking_number, ship_attempt = await workflow.execute_activity(
            ship, order, start_to_close_timeout=10, retry_policy=RETRY
        )
        return Receipt(
            order_id=order.order_id,
            charge_id=charge_id,
            reservation_id=reservation_id,
            tracking_number=tracking_number,
            attempts={
                "charge_payment": charge_attempt,
                "reserve_inventory": reserve_attempt,
                "ship": ship_attempt,
            },
        )


WORKFLOWS = [ProcessOrder]
ACTIVITIES = [charge_payment, reserve_inventory, ship]
