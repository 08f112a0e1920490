"""Listing and counting runs with filters, and task queue backlogs, on every backend."""

from __future__ import annotations

import dataclasses
from typing import Any

from tether._store.base import NewRun, RunFilter, Store

NOW = 1_000_000.0
LEASE = 10.0


def run(
    workflow_id: str,
    *,
    at: float,
    workflow_type: str = "Order",
    task_queue: str = "q",
    attrs: dict[str, Any] | None = None,
) -> NewRun:
    return NewRun(
        namespace="default",
        workflow_id=workflow_id,
        run_id=f"run-{workflow_id}",
        workflow_type=workflow_type,
        task_queue=task_queue,
        args=[],
        request_id=f"req-{workflow_id}",
        seed=1,
        now=at,
        search_attributes=attrs,
    )


async def seed(store: Store) -> None:
    await store.start_run(run("order-1", at=NOW, attrs={"customer": "acme", "total": 5}))
    await store.start_run(run("order-2", at=NOW + 1, attrs={"customer": "beta", "total": 5.0}))
    await store.start_run(run("Order-3", at=NOW + 2, attrs={"customer": "acme", "vip": True}))
    await store.start_run(
        run("ship/1", at=NOW + 3, workflow_type="Ship", attrs={"customer": "5", "vip": False})
    )
    await store.start_run(run("ship/2", at=NOW + 3, workflow_type="Ship"))
    await store.start_run(dataclasses.replace(run("elsewhere", at=NOW), namespace="other"))
    await store.terminate_run("default", "order-1", None, "done", NOW + 10)
    await store.terminate_run("default", "ship/1", None, "done", NOW + 20)


async def ids(store: Store, **conditions: Any) -> list[str]:
    where = RunFilter(**conditions)
    listed = [r.workflow_id for r in await store.list_runs("default", where=where)]
    assert await store.count_runs("default", where) == len(listed), conditions
    return listed


async def test_filters_select_in_sql_and_count_agrees(store: Store) -> None:
    await seed(store)
    # Newest first; runs started at the same moment in run id order, descending.
    assert await ids(store) == ["ship/2", "ship/1", "Order-3", "order-2", "order-1"]
    assert await ids(store, statuses=("terminated",)) == ["ship/1", "order-1"]
    assert await ids(store, statuses=("running", "terminated"), workflow_type="Ship") == [
        "ship/2",
        "ship/1",
    ]
    assert await ids(store, workflow_type="Nope") == []
    # A prefix is case-sensitive and taken literally ('%' and '_' are not wildcards).
    assert await ids(store, workflow_id_prefix="order-") == ["order-2", "order-1"]
    assert await ids(store, workflow_id_prefix="ship/") == ["ship/2", "ship/1"]
    assert await ids(store, workflow_id_prefix="order%") == []
    assert await ids(store, workflow_id_prefix="o_der") == []
    # Start time: after inclusive, before exclusive. Close time only matches closed runs.
    assert await ids(store, started_after=NOW + 1, started_before=NOW + 3) == [
        "Order-3",
        "order-2",
    ]
    assert await ids(store, closed_after=NOW) == ["ship/1", "order-1"]
    assert await ids(store, closed_before=NOW + 20) == ["order-1"]
    # Search attributes: typed equality; numbers compare as numbers, "5" is not 5.
    assert await ids(store, search_attributes={"customer": "acme"}) == ["Order-3", "order-1"]
    assert await ids(store, search_attributes={"total": 5}) == ["order-2", "order-1"]
    assert await ids(store, search_attributes={"total": 5.0}) == ["order-2", "order-1"]
    assert await ids(store, search_attributes={"customer": 5}) == []
    assert await ids(store, search_attributes={"customer": "5"}) == ["ship/1"]
    assert await ids(store, search_attributes={"vip": True}) == ["Order-3"]
    assert await ids(store, search_attributes={"vip": False}) == ["ship/1"]
    assert await ids(store, search_attributes={"missing": "x"}) == []
    assert await ids(store, search_attributes={"customer": "acme", "total": 5}) == ["order-1"]
    assert await store.count_runs("other") == 1
    # The older shorthand arguments still work, combined with a filter.
    rows = await store.list_runs("default", status="running", where=RunFilter(workflow_type="Ship"))
    assert [r.workflow_id for r in rows] == ["ship/2"]


async def test_pages_continue_after_the_last_run(store: Store) -> None:
    await seed(store)
    seen: list[str] = []
    after = None
    while True:
        page = await store.list_runs("default", limit=2, after=after)
        seen += [r.workflow_id for r in page]
        if len(page) < 2:
            break
        after = (page[-1].created_at, page[-1].run_id)
    assert seen == ["ship/2", "ship/1", "Order-3", "order-2", "order-1"]


async def test_task_queue_backlog(store: Store) -> None:
    assert await store.task_queue_backlog("q", NOW) == 0
    await store.start_run(run("a", at=NOW))
    await store.start_run(run("b", at=NOW, task_queue="other"))
    assert await store.task_queue_backlog("q", NOW) == 1
    claimed = await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW)
    assert len(claimed) == 1
    assert await store.task_queue_backlog("q", NOW) == 1  # leased work counts too
    await store.terminate_run("default", "a", None, "done", NOW)
    assert await store.task_queue_backlog("q", NOW) == 0
    assert await store.task_queue_backlog("other", NOW) == 1
