"""The fault-injection switch, and workflows that complete with faults on (every backend)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from tether import StoreError, Worker, activity, workflow
from tether._store.base import NewRun
from tether._store.faults import FaultInjector
from tether._store.sql import SqlStore
from tether.testing import WorkflowEnvironment, replay

T = TypeVar("T")


def test_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_FAULT_RATE", raising=False)
    assert FaultInjector.from_env() is None
    monkeypatch.setenv("TETHER_FAULT_RATE", "0")
    assert FaultInjector.from_env() is None
    monkeypatch.setenv("TETHER_FAULT_RATE", "0.25")
    monkeypatch.setenv("TETHER_FAULT_LOST_SHARE", "0.1")
    injector = FaultInjector.from_env()
    assert injector is not None and (injector.rate, injector.lost_share) == (0.25, 0.1)
    monkeypatch.setenv("TETHER_FAULT_RATE", "lots")
    with pytest.raises(ValueError, match="TETHER_FAULT_RATE='lots'"):
        FaultInjector.from_env()
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaultInjector(1.5)


def test_rate_and_kinds_of_faults() -> None:
    injector = FaultInjector(0.1, lost_share=0.5, seed=1)
    failed = 0
    for _ in range(20_000):
        try:
            injector.before(True)
            injector.after(True)
        except StoreError as e:
            assert e.retryable
            failed += 1
    assert 1600 < failed < 2400
    assert injector.injected["before"] + injector.injected["after_commit"] == failed
    assert 0.4 < injector.injected["after_commit"] / failed < 0.6
    reads = FaultInjector(0.1, seed=2)
    for _ in range(1000):
        reads.after(False)  # results of reads are never "lost after commit"
    assert not reads.injected


def new_run(n: int) -> NewRun:
    return NewRun("default", f"wf-{n}", f"run-{n}", "Flow", "q", [], f"req-{n}", 1, 1000.0)


async def test_faults_before_and_after_the_call(env: WorkflowEnvironment) -> None:
    store = env.client.store
    assert isinstance(store, SqlStore)
    store.faults = FaultInjector(1.0, lost_share=0.0)
    with pytest.raises(StoreError, match="the call was not made"):
        await store.start_run(new_run(1))
    store.faults = FaultInjector(1.0, lost_share=1.0)
    with pytest.raises(StoreError, match="committed but its result was lost"):
        await store.start_run(new_run(2))
    store.faults = None
    assert [r.workflow_id for r in await store.list_runs("default")] == ["wf-2"]
    # Repeating the start whose answer was lost returns the run it started.
    again = await store.start_run(new_run(2))
    assert (again.run_id, again.created) == ("run-2", False)


@activity.defn
async def double(n: int) -> int:
    return 2 * n


@workflow.defn
class Doubler:
    @workflow.run
    async def run(self, n: int) -> list[int]:
        out = []
        for i in range(3):
            out.append(await workflow.execute_activity(double, n + i, start_to_close_timeout=10))
        return out


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    for _ in range(50):
        try:
            return await call()
        except StoreError:
            await asyncio.sleep(0.01)
    return await call()


async def test_workflows_complete_with_frequent_store_faults(env: WorkflowEnvironment) -> None:
    """One store call in 10 fails (half of the failed writes after committing): the
    worker retries, and refuses its own repeats of what had committed. The rate is high
    enough that both kinds of fault happen in every run (about 8 of each are expected)."""
    client = env.client
    store: Any = client.store
    store.faults = FaultInjector(0.1, seed=3)
    async with Worker(
        client, task_queue="test", workflows=[Doubler], activities=[double], lease_duration=1.0
    ):
        handles = [
            await patiently(
                lambda n=n: client.start_workflow(
                    Doubler, n, id=f"d{n}", task_queue="test", request_id=f"r{n}"
                )
            )
            for n in range(20)
        ]
        results = [await patiently(lambda h=h: h.result(timeout=60)) for h in handles]
    injected = dict(store.faults.injected)
    store.faults = None
    assert results == [[2 * n, 2 * n + 2, 2 * n + 4] for n in range(20)]
    assert injected.get("before", 0) > 0 and injected.get("after_commit", 0) > 0, injected
    assert len(await client.list_workflows()) == 20
    for handle in handles:
        replay(Doubler, await handle.history())
