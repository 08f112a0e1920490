"""Messages to running workflows: signals, queries, updates (acceptance tests).

A shopping cart driven by update-with-start, update deduplication under client retries,
signals sent before any worker runs, handlers running beside the main method, bad
messages (each a clear error that changes nothing), failing handlers, and the
built-in stack-trace query. Workflow tests take ``make_worker`` and run twice (cached,
and always-replay).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from polling import event_types, wait_until
from tether import (
    ApplicationError,
    Client,
    InvalidArgumentError,
    NoWorkerResponseError,
    PayloadError,
    QueryFailedError,
    UpdateFailedError,
    Worker,
    WorkflowHandle,
    WorkflowNotFoundError,
    activity,
    workflow,
)
from tether.testing import WorkflowEnvironment

MakeWorker = Callable[..., Worker]


async def runs_of(client: Client, workflow_id: str) -> list[Any]:
    return [r for r in await client.list_workflows() if r.workflow_id == workflow_id]


# == shopping cart with update-with-start ====================================================
PRICES = {"apple": 120, "pear": 90, "melon": 450}


@workflow.defn
class ShoppingCart:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.checked_out = False

    @workflow.run
    async def run(self, customer: str) -> dict[str, Any]:
        await workflow.wait_condition(lambda: self.checked_out)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return {"customer": customer, "items": self.items, "total": self.subtotal()}

    @workflow.update
    def add_item(self, item: str, quantity: int) -> int:
        self.items[item] = self.items.get(item, 0) + quantity
        return self.subtotal()

    @add_item.validator
    def check_add(self, item: str, quantity: int) -> None:
        if quantity <= 0:
            raise ValueError(f"quantity must be positive (got {quantity})")
        if item not in PRICES:
            raise ValueError(f"we do not sell {item!r}")
        if self.checked_out:
            raise ValueError("the cart is checked out")

    @workflow.update
    def remove_item(self, item: str, quantity: int) -> int:
        self.items[item] -= quantity
        if not self.items[item]:
            del self.items[item]
        return self.subtotal()

    @remove_item.validator
    def check_remove(self, item: str, quantity: int) -> None:
        if quantity <= 0:
            raise ValueError(f"quantity must be positive (got {quantity})")
        if self.items.get(item, 0) < quantity:
            raise ValueError(f"the cart has {self.items.get(item, 0)} x {item}")

    @workflow.query
    def subtotal(self) -> int:
        return sum(PRICES[item] * n for item, n in self.items.items())

    @workflow.signal
    def checkout(self) -> None:
        self.checked_out = True


async def add_to_cart(
    client: Client, customer: str, item: str, quantity: int, update_id: str | None = None
) -> Any:
    """Add to ``customer``'s cart (update-with-start: the first call starts the cart)."""
    return await client.execute_update_with_start(
        ShoppingCart,
        customer,
        id=f"cart-{customer}",
        task_queue="test",
        update=ShoppingCart.add_item,
        update_args=(item, quantity),
        update_id=update_id,
    )


async def test_update_with_start_repeated_update_id_applies_once(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[ShoppingCart]):
        # The first call starts the cart; the retries reach the running cart and get the
        # first call's result without adding another apple.
        added = [
            await add_to_cart(client, "bob", "apple", 1, update_id="apple-once") for _ in range(3)
        ]
        assert added == [120, 120, 120]
        cart = client.get_workflow_handle("cart-bob", workflow=ShoppingCart)
        assert await cart.query(ShoppingCart.subtotal) == 120
        accepted = [e for e in await cart.history() if e.type == "UpdateAccepted"]
        assert len(accepted) == 1


async def test_shopping_cart_with_update_with_start(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[ShoppingCart]):

        async def add(item: str, quantity: int) -> Any:
            return await add_to_cart(client, "ann", item, quantity)

        # The first update starts the cart, the next ones go to the running cart.
        assert await add("apple", 2) == 240
        assert await add("pear", 1) == 330
        runs = await runs_of(client, "cart-ann")
        assert len(runs) == 1 and runs[0].status == "running"
        cart = client.get_workflow_handle("cart-ann", workflow=ShoppingCart)
        assert await cart.execute_update(ShoppingCart.add_item, "melon", 1) == 780
        assert await cart.execute_update(ShoppingCart.remove_item, "apple", 1) == 660
        assert await cart.query(ShoppingCart.subtotal) == 660

        # Rejected by the validators: an error for the caller, nothing in history.
        before = await cart.history()
        with pytest.raises(UpdateFailedError, match=r"quantity must be positive \(got -1\)"):
            await cart.execute_update(ShoppingCart.add_item, "apple", -1, id="neg")
        with pytest.raises(UpdateFailedError, match="quantity must be positive"):
            await add("pear", -3)
        with pytest.raises(UpdateFailedError, match="the cart has 1 x pear"):
            await cart.execute_update(ShoppingCart.remove_item, "pear", 5, id="too-many")
        after = await cart.history()
        assert [e.type for e in after] == [e.type for e in before], "a rejection left a trace"
        assert not any(e.data.get("update_id") in ("neg", "too-many") for e in after)
        assert await cart.query(ShoppingCart.subtotal) == 660

        await cart.signal(ShoppingCart.checkout)
        receipt = await cart.result(timeout=10)
        assert receipt == {
            "customer": "ann",
            "items": {"apple": 1, "pear": 1, "melon": 1},
            "total": 660,
        }
        # A query on the closed cart answers from its final state.
        assert await cart.query(ShoppingCart.subtotal) == 660
        assert len(await runs_of(client, "cart-ann")) == 1
    accepted = [e for e in await cart.history() if e.type == "UpdateAccepted"]
    assert [e.data["name"] for e in accepted] == [
        "add_item",
        "add_item",
        "add_item",
        "remove_item",
    ]


# == update deduplication ==================================================================
CARD_CHARGES: list[int] = []
CHARGES_LOCK = threading.Lock()


@activity.defn
async def charge_card(amount: int) -> str:
    with CHARGES_LOCK:
        CARD_CHARGES.append(amount)
        return f"receipt-{len(CARD_CHARGES)}"


@workflow.defn
class Payments:
    def __init__(self) -> None:
        self.charged: list[int] = []
        self.executions = 0
        self.closed = False

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.closed)
        # Updates still charging must finish before the workflow does.
        await workflow.wait_condition(workflow.all_handlers_finished)
        return sum(self.charged)

    @workflow.update
    async def charge(self, amount: int) -> str:
        self.executions += 1
        receipt = await workflow.execute_activity(charge_card, amount, start_to_close_timeout=10)
        self.charged.append(amount)
        return str(receipt)

    @workflow.query
    def handler_runs(self) -> int:
        return self.executions

    @workflow.signal
    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def card_charges() -> list[int]:
    CARD_CHARGES.clear()
    return CARD_CHARGES


async def test_update_retried_with_the_same_id_runs_once(
    env: WorkflowEnvironment, make_worker: MakeWorker, card_charges: list[int]
) -> None:
    client = env.client
    handle = await client.start_workflow(Payments, id="pay", task_queue="test")
    # No worker yet: the caller gives up, the request is kept.
    with pytest.raises(NoWorkerResponseError, match="Retry with the same id"):
        await handle.execute_update(Payments.charge, 100, id="charge-1", timeout=0.3)
    async with make_worker(client, workflows=[Payments], activities=[charge_card]):
        # The retry gets the result of the request it repeats.
        assert await handle.execute_update(Payments.charge, 100, id="charge-1") == "receipt-1"
        assert await handle.execute_update(Payments.charge, 100, id="charge-1") == "receipt-1"
        # Concurrent duplicates of a new id: one execution, everyone gets its result.
        results = await asyncio.gather(
            *(handle.execute_update(Payments.charge, 50, id="charge-2") for _ in range(5))
        )
        assert results == ["receipt-2"] * 5
        assert await handle.query(Payments.handler_runs) == 2
        await handle.signal(Payments.close)
        assert await handle.result(timeout=10) == 150
        # After the workflow closed, a retry still answers from the recorded result.
        assert await handle.execute_update(Payments.charge, 100, id="charge-1") == "receipt-1"
    assert card_charges == [100, 50]
    history = await handle.history()
    for update_id in ("charge-1", "charge-2"):
        for event_type in ("UpdateAccepted", "UpdateCompleted"):
            found = [e for e in history if e.type == event_type]
            assert sum(e.data["update_id"] == update_id for e in found) == 1, (update_id, found)


async def test_all_handlers_finished_waits_for_a_running_update(
    env: WorkflowEnvironment, make_worker: MakeWorker, card_charges: list[int]
) -> None:
    client = env.client
    handle = await client.start_workflow(Payments, id="pay-late", task_queue="test")
    # The update and the close signal reach the workflow in the same workflow task.
    update = asyncio.create_task(handle.execute_update(Payments.charge, 7, id="late"))
    await wait_until(lambda: client.store.pending_updates(str(handle.run_id)), "the update")
    await handle.signal(Payments.close)
    async with make_worker(client, workflows=[Payments], activities=[charge_card]):
        assert await handle.result(timeout=10) == 7
        assert await asyncio.wait_for(update, 10) == "receipt-1"
    types = await event_types(handle)
    assert types.index("UpdateCompleted") < types.index("WorkflowCompleted")


# == signals =================================================================================
@workflow.defn
class Inbox:
    def __init__(self) -> None:
        self.received: list[str] = []

    @workflow.run
    async def run(self, expected: int) -> list[str]:
        await workflow.wait_condition(lambda: len(self.received) >= expected)
        return self.received

    @workflow.signal
    def message(self, text: str) -> None:
        self.received.append(f"message:{text}")

    @workflow.signal(name="urgent")
    async def urgent_message(self, text: str) -> None:
        self.received.append(f"urgent:{text}")


async def test_signals_sent_before_the_worker_starts_are_handled_in_order(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    handle = await client.start_workflow(Inbox, 30, id="inbox", task_queue="test")
    sent = []
    for i in range(30):
        if i % 4 == 3:
            await handle.signal("urgent", str(i))
            sent.append(f"urgent:{i}")
        else:
            await handle.signal(Inbox.message, str(i))
            sent.append(f"message:{i}")
    async with make_worker(client, workflows=[Inbox]):
        assert await handle.result(timeout=10) == sent
    signals = [e for e in await handle.history() if e.type == "SignalReceived"]
    assert [e.data["args"][0] for e in signals] == [str(i) for i in range(30)]


# == bad input, failing handlers ================================================================
@workflow.defn
class Counter:
    def __init__(self) -> None:
        self.value = 0
        self.done = False

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.done)
        return self.value

    @workflow.signal
    def increment(self, by: int) -> None:
        self.value += by

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def current(self) -> int:
        return self.value

    @workflow.query
    def times(self, factor: int) -> int:
        return self.value * factor

    @workflow.query
    def broken(self) -> int:
        raise ValueError("the query handler is broken")

    @workflow.query
    def sneaky(self) -> int:
        workflow.start_activity("nothing", start_to_close_timeout=1)
        return self.value

    @workflow.update
    def set_value(self, value: int) -> int:
        if value < 0:
            raise ApplicationError(f"cannot set a negative value ({value})")
        self.value = value
        return value


async def start_counter(client: Client, wid: str = "counter") -> WorkflowHandle:
    handle = await client.start_workflow(Counter, id=wid, task_queue="test")
    await handle.signal(Counter.increment, 5)
    await wait_until(lambda: _current_is(handle, 5), "the counter to start")
    return handle


async def _current_is(handle: WorkflowHandle, value: int) -> bool:
    return bool(await handle.query(Counter.current) == value)


async def test_messages_to_an_unknown_workflow_id(env: WorkflowEnvironment) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[Counter]):
        for handle in (
            client.get_workflow_handle("no-such-id"),
            client.get_workflow_handle("no-such-id", workflow=Counter),
        ):
            with pytest.raises(WorkflowNotFoundError, match="no-such-id"):
                await handle.signal(Counter.increment, 1)
            with pytest.raises(WorkflowNotFoundError, match="no-such-id"):
                await handle.query(Counter.current)
            with pytest.raises(WorkflowNotFoundError, match="no-such-id"):
                await handle.execute_update(Counter.set_value, 1)
            with pytest.raises(WorkflowNotFoundError, match="no-such-id"):
                await handle.cancel()
            with pytest.raises(WorkflowNotFoundError, match="no-such-id"):
                await handle.terminate()
        assert await client.list_workflows() == []


async def test_unknown_handler_names_are_refused_and_change_nothing(
    env: WorkflowEnvironment,
) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[Counter]):
        await start_counter(client)
        length = (await client.get_workflow_handle("counter").describe()).history_length
        # The worker registered the type, so even an untyped handle knows the names.
        for handle in (
            client.get_workflow_handle("counter"),
            client.get_workflow_handle("counter", workflow=Counter),
        ):
            with pytest.raises(InvalidArgumentError, match="no signal handler 'incrementt'"):
                await handle.signal("incrementt", 1)
            with pytest.raises(InvalidArgumentError, match="no query handler 'valeu'"):
                await handle.query("valeu")
            with pytest.raises(InvalidArgumentError, match="no update handler 'sett'"):
                await handle.execute_update("sett", 1)
            assert (await handle.describe()).history_length == length
        assert await handle.query(Counter.current) == 5


async def test_wrong_argument_types_are_refused_and_change_nothing(
    env: WorkflowEnvironment,
) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[Counter]):
        await start_counter(client)
        typed = client.get_workflow_handle("counter", workflow=Counter)
        length = (await typed.describe()).history_length
        with pytest.raises(PayloadError, match="signal 'increment' argument 1"):
            await typed.signal(Counter.increment, "five")
        with pytest.raises(PayloadError, match="update 'set_value' argument 1"):
            await typed.execute_update(Counter.set_value, {"value": 1})
        with pytest.raises(PayloadError, match="query 'times' argument 1"):
            await typed.query(Counter.times, "twice")
        with pytest.raises(InvalidArgumentError, match="increment"):
            await typed.signal(Counter.increment, 1, 2)
        with pytest.raises(InvalidArgumentError, match="set_value"):
            await typed.execute_update(Counter.set_value)
        assert (await typed.describe()).history_length == length
        assert await typed.query(Counter.times, 3) == 15
        await typed.signal(Counter.finish)
        assert await typed.result(timeout=10) == 5


async def test_untyped_bad_arguments_do_not_break_the_workflow(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    """Without the class the client cannot check arguments; the workflow must cope."""
    client = env.client
    async with make_worker(client, workflows=[Counter]):
        await start_counter(client)
        untyped = client.get_workflow_handle("counter")
        before = await untyped.history()
        with pytest.raises(UpdateFailedError, match="set_value"):
            await untyped.execute_update("set_value", "seven")
        with pytest.raises(UpdateFailedError, match="set_value"):
            await untyped.execute_update("set_value", 1, 2)
        assert [e.type for e in await untyped.history()] == [e.type for e in before]
        # Bad signals are recorded (the client cannot tell) and dropped by the workflow.
        await untyped.signal("increment", "seven")
        await untyped.signal("increment", 1, 2)
        await untyped.signal("increment", 2)
        await wait_until(lambda: _current_is(untyped, 7), "the good signal")
        description = await untyped.describe()
        assert description.status == "running" and description.task_failure is None
        await untyped.signal("finish")
        assert await untyped.result(timeout=10) == 7


async def test_query_without_a_worker_times_out(env: WorkflowEnvironment) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[Counter]):
        handle = await start_counter(client)
    length = (await handle.describe()).history_length
    started = time.monotonic()
    with pytest.raises(NoWorkerResponseError, match="current"):
        await handle.query(Counter.current, timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert (await handle.describe()).history_length == length, "a query is never recorded"
    async with Worker(client, task_queue="test", workflows=[Counter]):
        assert await handle.query(Counter.current) == 5


async def test_failing_query_and_update_handlers(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[Counter]):
        handle = await start_counter(client)
        with pytest.raises(QueryFailedError, match="the query handler is broken"):
            await handle.query(Counter.broken)
        with pytest.raises(QueryFailedError, match="queries must only read state"):
            await handle.query(Counter.sneaky)
        with pytest.raises(UpdateFailedError, match=r"cannot set a negative value \(-1\)"):
            await handle.execute_update(Counter.set_value, -1)
        # The workflow keeps running and takes further messages.
        description = await handle.describe()
        assert description.status == "running" and description.task_failure is None
        assert await handle.execute_update(Counter.set_value, 40) == 40
        await handle.signal(Counter.increment, 2)
        await handle.signal(Counter.finish)
        assert await handle.result(timeout=10) == 42
    failed = [
        e for e in await handle.history() if e.type == "UpdateCompleted" and "failure" in e.data
    ]
    assert len(failed) == 1


async def test_query_right_after_start(env: WorkflowEnvironment, make_worker: MakeWorker) -> None:
    """A query may reach a worker before the first workflow task ran: it still answers."""
    client = env.client
    async with make_worker(client, workflows=[Counter]):
        for i in range(5):
            handle = await client.start_workflow(Counter, id=f"fresh-{i}", task_queue="test")
            assert await handle.query(Counter.current) == 0
            await handle.terminate()


# == stack trace ==================================================================================
@workflow.defn
class Waiter:
    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self) -> str:
        await self.hold()
        return "released"

    async def hold(self) -> None:
        await workflow.wait_condition(lambda: self.released)

    @workflow.update
    async def slow_update(self) -> str:
        await workflow.wait_condition(lambda: self.released)
        return "done"

    @workflow.signal
    def release(self) -> None:
        self.released = True


def line_of(function: Any, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


async def test_stack_trace_shows_where_the_workflow_waits(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[Waiter]):
        handle = await client.start_workflow(Waiter, id="waiter", task_queue="test")
        update = asyncio.create_task(handle.execute_update(Waiter.slow_update))
        await wait_until(lambda: _has_event(handle, "UpdateAccepted"), "the update")
        trace = await handle.query("__stack_trace")
        assert f"{__file__}:{line_of(Waiter.run, 'await self.hold()')} in run" in trace
        assert f"{__file__}:{line_of(Waiter.hold, 'wait_condition')} in hold" in trace
        assert f"{__file__}:{line_of(Waiter.slow_update, 'wait_condition')} in slow_update" in (
            trace
        )
        await handle.signal(Waiter.release)
        assert await handle.result(timeout=10) == "released"
        assert await asyncio.wait_for(update, 10) == "done"


async def _has_event(handle: WorkflowHandle, event_type: str) -> bool:
    return event_type in await event_types(handle)
