"""Bad input gets a clear error and changes nothing in the store.

Each test checks the error's type and that its message says what was wrong, then
that no run, history event or task was written (``client.list_workflows()`` and the
store's tables are as they were).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from backends import store_url, table_counts
from tether import (
    ApplicationError,
    Client,
    InvalidArgumentError,
    PayloadConverter,
    PayloadError,
    RetryPolicy,
    StoreError,
    UnknownWorkflowTypeError,
    Worker,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
    activity,
    workflow,
)
from tether.testing import WorkflowEnvironment

TABLES = ("runs", "history", "workflow_tasks", "activity_tasks", "timers")


def row_counts(client: Client) -> dict[str, int]:
    """Rows per table, read through a separate connection (what is durably committed)."""
    return table_counts(client.store, TABLES)


EMPTY = dict.fromkeys(TABLES, 0)


@activity.defn
async def greet(name: str) -> str:
    return f"hello {name}"


@workflow.defn
class Greeter:
    @workflow.run
    async def run(self, name: str) -> str:
        result: str = await workflow.execute_activity(greet, name, start_to_close_timeout=5)
        return result


@workflow.defn
class Pinger:
    @workflow.run
    async def run(self) -> str:
        return "pong"


# -- unknown or invalid workflow types ------------------------------------------------------


async def test_unknown_workflow_type_is_rejected_and_nothing_is_stored(
    env: WorkflowEnvironment,
) -> None:
    client = env.client
    async with Worker(client, task_queue="orders", workflows=[Greeter, Pinger]):
        with pytest.raises(UnknownWorkflowTypeError) as caught:
            await client.start_workflow("Greeterr", "ann", id="typo", task_queue="orders")
        message = str(caught.value)
        assert "'Greeterr'" in message
        assert "'orders'" in message
        assert "Greeter, Pinger" in message  # what the queue does serve
        assert await client.list_workflows() == []
        assert row_counts(client) == EMPTY

        # The same name spelled right works.
        assert (
            await client.execute_workflow("Pinger", id="ok", task_queue="orders", result_type=str)
        ) == "pong"


async def test_workflow_and_activity_workers_sharing_a_queue(env: WorkflowEnvironment) -> None:
    """Two workers in one process on one queue: each one's types count as served."""
    client = env.client
    async with (
        Worker(client, task_queue="split", workflows=[Greeter]),
        Worker(client, task_queue="split", activities=[greet]),
    ):
        # Let both workers' periodic re-registration run once.
        await asyncio.sleep(0.05)
        result = await client.execute_workflow(Greeter, "bo", id="split", task_queue="split")
    assert result == "hello bo"


async def test_a_process_pool_as_activity_executor_is_rejected(env: WorkflowEnvironment) -> None:
    """Sync activities run in the worker process's context (info, heartbeats,
    cancellation): a process pool cannot run them, and says so before anything runs."""
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool,
        pytest.raises(InvalidArgumentError, match=r"process pool.*thread pool"),
    ):
        Worker(env.client, task_queue="q", activities=[greet], activity_executor=pool)
    assert row_counts(env.client) == EMPTY


class NotAWorkflow:
    async def run(self) -> None:
        pass


async def plain_function() -> None:
    pass


@pytest.mark.parametrize(
    "target", [NotAWorkflow, plain_function, greet], ids=["class", "function", "activity"]
)
async def test_starting_something_that_is_not_a_workflow(
    env: WorkflowEnvironment, target: Any
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"decorate the class with @workflow\.defn"):
        await env.client.start_workflow(target, id="nope", task_queue="test")
    assert await env.client.list_workflows() == []
    assert row_counts(env.client) == EMPTY


async def test_too_many_arguments_for_a_workflow(env: WorkflowEnvironment) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await env.client.start_workflow(Greeter, "ann", "extra", id="args", task_queue="test")
    assert str(caught.value) == "workflow 'Greeter' takes 1 arguments, 2 given"
    with pytest.raises(InvalidArgumentError, match="takes 0 arguments, 1 given"):
        await env.client.start_workflow(Pinger.run, 1, id="args", task_queue="test")
    assert await env.client.list_workflows() == []
    assert row_counts(env.client) == EMPTY


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"id": "", "task_queue": "q"}, "workflow id"), ({"id": "x", "task_queue": ""}, "task queue")],
)
async def test_missing_id_or_task_queue(
    env: WorkflowEnvironment, options: dict[str, str], fragment: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=fragment):
        await env.client.start_workflow(Pinger, **options)
    assert row_counts(env.client) == EMPTY


# -- unserializable and oversize payloads ------------------------------------------------------


@workflow.defn
class TakesAnything:
    @workflow.run
    async def run(self, first: Any, second: Any = None) -> Any:
        return [first, second]


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        ("socket", "socket"),
        ({object()}, "set"),
        ({"nested": [1, {"deep": object()}]}, "dict"),
        (lambda: None, "function"),
    ],
    ids=["object", "socket", "set-of-objects", "nested", "lambda"],
)
async def test_unserializable_argument_is_rejected(
    env: WorkflowEnvironment, value: Any, type_name: str
) -> None:
    with socket.socket() as sock:
        if value == "socket":
            value = sock
        with pytest.raises(PayloadError) as caught:
            await env.client.start_workflow(
                TakesAnything, "fine", value, id="bad-arg", task_queue="test"
            )
    message = str(caught.value)
    assert "workflow 'TakesAnything' argument 2" in message  # which argument
    assert f"type {type_name}" in message
    assert "cannot serialize" in message
    assert await env.client.list_workflows() == []
    assert row_counts(env.client) == EMPTY


@pytest.mark.parametrize(
    "value",
    ["x" * 500, "é" * 300, list(range(200)), {"blob": "y" * 3000}],
    ids=["short-str", "non-ascii-str", "list", "dict"],
)
async def test_oversize_argument_is_rejected(env: WorkflowEnvironment, value: Any) -> None:
    small = Client(env.client.store, converter=PayloadConverter(max_payload_bytes=200))
    with pytest.raises(PayloadError) as caught:
        await small.start_workflow(TakesAnything, value, id="big", task_queue="test")
    message = str(caught.value)
    assert "workflow 'TakesAnything' argument 1" in message
    assert "over the limit of 200 bytes" in message
    assert "max_payload_bytes" in message  # says how to raise it
    assert await env.client.list_workflows() == []
    assert row_counts(env.client) == EMPTY
    # Just under the limit is fine.
    await small.start_workflow(TakesAnything, "z" * 150, id="small", task_queue="test")
    assert [d.workflow_id for d in await env.client.list_workflows()] == ["small"]


@pytest.mark.parametrize(
    "value",
    [1.2345678901234567e-300, -2.2250738585072014e-308, -(1 << 63), 1 << 70, 10**50, True, None],
)
def test_small_values_are_measured_against_a_tiny_limit(value: Any) -> None:
    """Numbers, booleans and None skip measuring their JSON under a normal limit; under a
    limit too small for them they are measured, and refused when over it."""
    assert PayloadConverter().encode(value, "result") == value
    size = len(json.dumps(value))
    tiny = PayloadConverter(max_payload_bytes=size - 1) if size > 1 else None
    if tiny is not None:
        with pytest.raises(PayloadError, match="over the limit"):
            tiny.encode(value, "result")
    assert PayloadConverter(max_payload_bytes=size).encode(value, "result") == value


def test_a_huge_int_is_measured_under_a_normal_limit() -> None:
    """Only 64-bit ints skip measuring: a wider one may exceed a limit above 32 bytes."""
    with pytest.raises(PayloadError, match="over the limit"):
        PayloadConverter(max_payload_bytes=40).encode(10**50, "result")
    assert PayloadConverter(max_payload_bytes=40).encode(10**30, "result") == 10**30


async def test_oversize_argument_via_connect(env: WorkflowEnvironment) -> None:
    client = await Client.connect(store_url(env.client.store), max_payload_bytes=1000)
    try:
        with pytest.raises(PayloadError, match="over the limit of 1000 bytes"):
            await client.start_workflow(TakesAnything, "a" * 2000, id="big", task_queue="test")
        assert await client.list_workflows() == []
        assert row_counts(client) == EMPTY
    finally:
        await client.close()


@activity.defn
async def upload(blob: str) -> int:
    return len(blob)


@workflow.defn
class Uploader:
    @workflow.run
    async def run(self, size: int, catch: bool) -> Any:
        try:
            return await workflow.execute_activity(upload, "b" * size, start_to_close_timeout=5)
        except PayloadError as e:
            if catch:
                return f"caught: {e}"
            raise


async def test_oversize_activity_argument_in_workflow_code(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    """Scheduling an activity with an oversize argument raises PayloadError in workflow code.

    It is an ordinary failure, not a code defect (it would fail the same way on every
    retry of the workflow task): the workflow can catch it, and if it does not, the run
    fails with the error. No activity is scheduled either way.
    """
    small = Client(env.client.store, converter=PayloadConverter(max_payload_bytes=2000))
    async with make_worker(small, workflows=[Uploader], activities=[upload]):
        ok = await small.execute_workflow(Uploader, 100, False, id="ok", task_queue="test")
        caught = await small.execute_workflow(Uploader, 5000, True, id="caught", task_queue="test")
        handle = await small.start_workflow(Uploader, 5000, False, id="fails", task_queue="test")
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result(timeout=10)
    assert ok == 100
    assert caught.startswith("caught: activity 'upload' argument 1: payload is 5002 bytes")
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "PayloadError"
    assert "over the limit of 2000 bytes" in cause.message
    assert (await handle.describe()).status == "failed"
    for wf_id in ("caught", "fails"):
        events = await small.get_workflow_handle(wf_id).history()
        assert "ActivityScheduled" not in [e.type for e in events]
    assert row_counts(small)["activity_tasks"] == 0


# -- workflow id uniqueness ------------------------------------------------------------------


async def test_duplicate_workflow_id(env: WorkflowEnvironment) -> None:
    client = env.client
    # No worker yet: the first run stays running.
    first = await client.start_workflow(Pinger, id="dup", task_queue="dup", request_id="req-1")
    assert first.run_id is not None
    before = row_counts(client)

    with pytest.raises(WorkflowAlreadyStartedError) as caught:
        await client.start_workflow(Pinger, id="dup", task_queue="dup")
    error = caught.value
    assert error.workflow_id == "dup" and error.run_id == first.run_id
    assert "'dup'" in str(error) and first.run_id in str(error)
    assert row_counts(client) == before

    # The same request again (a client retrying after a lost reply) gets the same run.
    again = await client.start_workflow(Pinger, id="dup", task_queue="dup", request_id="req-1")
    assert again.run_id == first.run_id
    assert row_counts(client) == before
    assert len(await client.list_workflows()) == 1

    async with Worker(client, task_queue="dup", workflows=[Pinger]):
        assert await first.result(timeout=10) == "pong"
        after_close = row_counts(client)
        # A retry of the first request, arriving after the run closed, still gets that run
        # rather than starting the work a second time.
        late_retry = await client.start_workflow(
            Pinger, id="dup", task_queue="dup", request_id="req-1"
        )
        assert late_retry.run_id == first.run_id
        assert row_counts(client) == after_close
        # A new request reuses the id of a closed run: a new run.
        second = await client.start_workflow(Pinger, id="dup", task_queue="dup")
        assert second.run_id != first.run_id
        assert await second.result(timeout=10) == "pong"
    runs = await client.list_workflows()
    assert [(r.workflow_id, r.run_id) for r in runs] == [
        ("dup", second.run_id),
        ("dup", first.run_id),
    ]
    assert (await client.get_workflow_handle("dup").describe()).run_id == second.run_id


# -- invalid calls inside workflow code --------------------------------------------------------


@workflow.defn(name="Forgetful")
class ForgetsTimeout:
    @workflow.run
    async def run(self, name: str) -> str:
        result: str = await workflow.execute_activity(greet, name)
        return result


@workflow.defn(name="Forgetful")
class RemembersTimeout:
    @workflow.run
    async def run(self, name: str) -> str:
        result: str = await workflow.execute_activity(greet, name, start_to_close_timeout=5)
        return result


async def test_missing_activity_timeout_fails_the_task_not_the_run(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    client = env.client
    async with make_worker(client, workflows=[ForgetsTimeout], activities=[greet]):
        handle = await client.start_workflow(
            ForgetsTimeout, "cy", id="forgetful", task_queue="test"
        )
        description = await _wait_for(handle, lambda d: d.task_failure is not None)
    assert description.status == "running"
    failure = description.task_failure
    assert failure is not None
    assert failure["type"] == "InvalidArgumentError"
    assert failure["attempt"] == 1
    assert (
        "activity 'greet' needs start_to_close_timeout or schedule_to_close_timeout"
        in failure["message"]
    )
    assert "ActivityScheduled" not in [e.type for e in await handle.history()]
    assert row_counts(client)["activity_tasks"] == 0

    # The task is retried: deploying fixed code lets the same run finish.
    async with make_worker(client, workflows=[RemembersTimeout], activities=[greet]):
        assert await handle.result(timeout=10) == "hello cy"
    description = await handle.describe()
    assert description.status == "completed"
    assert description.task_failure is None


async def _wait_for(handle: Any, condition: Callable[[Any], bool], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        description = await handle.describe()
        if condition(description):
            return description
        assert time.monotonic() < deadline, f"condition not met: {description}"
        await asyncio.sleep(0.02)


@activity.defn
async def never_runs() -> None:
    raise AssertionError("a bad retry policy must not schedule the activity")


@workflow.defn
class BadPolicy:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(
            never_runs, start_to_close_timeout=-1, retry_policy=RetryPolicy()
        )


async def test_negative_activity_timeout_fails_the_task(env: WorkflowEnvironment) -> None:
    async with Worker(
        env.client, task_queue="test", workflows=[BadPolicy], activities=[never_runs]
    ):
        handle = await env.client.start_workflow(BadPolicy, id="negative", task_queue="test")
        description = await _wait_for(handle, lambda d: d.task_failure is not None)
    assert description.task_failure is not None
    assert "start_to_close_timeout must not be negative" in description.task_failure["message"]
    assert row_counts(env.client)["activity_tasks"] == 0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"initial_interval": 0}, "initial_interval must be > 0"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient must be >= 1"),
        ({"initial_interval": 2, "maximum_interval": 1}, "maximum_interval must be >="),
        ({"maximum_attempts": -1}, "maximum_attempts must be >= 0"),
    ],
)
def test_bad_retry_policy(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgumentError, match=fragment):
        RetryPolicy(**options)


# -- connecting and looking up -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://localhost/tether", "unsupported store URL 'mysql://localhost/tether'"),
        ("tether.db", "unsupported store URL 'tether.db': expected sqlite:///"),
        ("sqlite://", "names no file"),
        ("sqlite:///", "names no file"),
    ],
)
async def test_bad_store_url(url: str, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError, match=fragment):
        await Client.connect(url)


async def test_store_that_cannot_be_opened(tmp_path: Any) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open SQLite store"):
        await Client.connect(f"sqlite:///{blocker}/tether.db")


async def test_unknown_workflow_id(env: WorkflowEnvironment) -> None:
    handle = env.client.get_workflow_handle("no-such-id")
    for call in (handle.describe, handle.history, handle.result):
        with pytest.raises(WorkflowNotFoundError, match="'no-such-id'"):
            await call()
    started = await env.client.start_workflow(Pinger, id="exists", task_queue="test")
    wrong_run = env.client.get_workflow_handle("exists", run_id="not-a-run")
    with pytest.raises(WorkflowNotFoundError, match="run 'not-a-run' of workflow 'exists'"):
        await wrong_run.describe()
    assert [d.run_id for d in await env.client.list_workflows()] == [started.run_id]


async def test_list_workflows_with_unknown_status(env: WorkflowEnvironment) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown status 'done'"):
        await env.client.list_workflows(status="done")
