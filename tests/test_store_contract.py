"""The store contract, run against every backend (the ``store`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import pytest

from tether._store.base import (
    ACTIVITY_COMPLETED,
    ACTIVITY_SCHEDULED,
    CLAIM_HISTORY_EVENTS,
    TIMER_FIRED,
    TIMER_STARTED,
    UPDATE_ACCEPTED,
    WORKFLOW_COMPLETED,
    WORKFLOW_TASK_COMPLETED,
    NewActivity,
    NewRun,
    RunClose,
    Store,
    UpdateRequest,
    UpdateState,
    WorkflowTask,
    WorkflowTaskCompletion,
)
from tether.exceptions import (
    StaleTaskError,
    StoreError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)

NOW = 1_000_000.0
LEASE = 10.0


def new_run(workflow_id: str = "wf", run_id: str = "run-1", request_id: str = "req-1") -> NewRun:
    return NewRun(
        namespace="default",
        workflow_id=workflow_id,
        run_id=run_id,
        workflow_type="Flow",
        task_queue="q",
        args=[1, {"a": "b"}],
        request_id=request_id,
        seed=42,
        now=NOW,
    )


async def claim_one(store: Store, now: float = NOW, owner: str = "w1") -> WorkflowTask:
    tasks = await store.claim_workflow_tasks("q", owner, 10, now + LEASE, now)
    assert len(tasks) == 1
    return tasks[0]


def schedule(task: WorkflowTask, seq: int = 1, eager: int = 0) -> WorkflowTaskCompletion:
    return WorkflowTaskCompletion(
        task=task,
        events=[(ACTIVITY_SCHEDULED, {"seq": seq, "activity_type": "act"})],
        inputs_through=task.history_length,
        activities=[NewActivity(seq, "act", "q", ["x"], {"retry_policy": {}})],
        eager_activity_limit=eager,
        activity_lease_until=NOW + LEASE,
    )


async def test_start_run_records_started_event_and_task(store: Store) -> None:
    outcome = await store.start_run(new_run())
    assert outcome.created and outcome.run_id == "run-1"
    history = await store.read_history("run-1")
    assert [(e.seq, e.type) for e in history] == [(1, "WorkflowStarted")]
    assert history[0].data["args"] == [1, {"a": "b"}]
    run = await store.get_run("default", "wf", None)
    assert (run.status, run.history_length, run.workflow_type) == ("running", 1, "Flow")
    task = await claim_one(store)
    assert (task.run_id, task.attempt, task.task_version, task.history_length) == (
        "run-1",
        1,
        0,
        1,
    )


async def test_duplicate_id_rejected_unless_same_request(store: Store) -> None:
    await store.start_run(new_run())
    with pytest.raises(WorkflowAlreadyStartedError, match="'wf' is already running"):
        await store.start_run(new_run(run_id="run-2", request_id="req-2"))
    again = await store.start_run(new_run(run_id="run-3", request_id="req-1"))
    assert (again.run_id, again.created) == ("run-1", False)
    assert len(await store.list_runs("default")) == 1


async def test_closed_id_can_be_reused(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    await store.complete_workflow_task(
        WorkflowTaskCompletion(
            task=task,
            events=[(WORKFLOW_COMPLETED, {"result": 7})],
            inputs_through=1,
            close=RunClose(status="completed", result=7),
        ),
        "w1",
        NOW,
    )
    # The first start's request, repeated after its run closed, gets that run.
    repeated = await store.start_run(new_run(run_id="run-x", request_id="req-1"))
    assert (repeated.run_id, repeated.created) == ("run-1", False)
    # Started after the first closed (same creation times would leave "latest" a tie).
    reuse = dataclasses.replace(new_run(run_id="run-2", request_id="req-2"), now=NOW + 1)
    second = await store.start_run(reuse)
    assert second.created
    latest = await store.get_run("default", "wf", None)
    first = await store.get_run("default", "wf", "run-1")
    assert latest.run_id == "run-2" and first.status == "completed" and first.result == 7


async def test_unknown_run(store: Store) -> None:
    with pytest.raises(WorkflowNotFoundError, match="nope"):
        await store.get_run("default", "nope", None)


async def test_claim_leases_and_lapsed_lease_is_reclaimed(store: Store) -> None:
    await store.start_run(new_run())
    first = await claim_one(store)
    assert await store.claim_workflow_tasks("q", "w2", 10, NOW + LEASE, NOW + 1) == []
    # The lease lapses (the worker died): another worker gets the task with a new token.
    second = await claim_one(store, now=NOW + LEASE + 1, owner="w2")
    assert second.token != first.token and second.attempt == 2
    with pytest.raises(StaleTaskError):
        await store.complete_workflow_task(schedule(first), "w1", NOW)
    result = await store.complete_workflow_task(schedule(second), "w2", NOW + LEASE + 1)
    assert result.task_version == 1


async def test_racing_completions_only_one_commits(store: Store) -> None:
    """Two workers holding the same task version: the second commit is refused."""
    await store.start_run(new_run())
    first = await claim_one(store)
    second = await claim_one(store, now=NOW + LEASE + 1, owner="w2")
    results = await asyncio.gather(
        store.complete_workflow_task(schedule(first), "w1", NOW),
        store.complete_workflow_task(schedule(second), "w2", NOW),
        return_exceptions=True,
    )
    assert sum(isinstance(r, StaleTaskError) for r in results) == 1
    history = await store.read_history("run-1")
    assert [e.type for e in history].count(WORKFLOW_TASK_COMPLETED) == 1
    # Even with a valid lease, a task whose version is behind the run's is refused.
    await store.start_run(new_run("wf2", "run-2", "req-2"))
    fresh = await claim_one(store)
    stale = dataclasses.replace(fresh, task_version=fresh.task_version + 5)
    with pytest.raises(StaleTaskError, match="advanced past task version"):
        await store.complete_workflow_task(schedule(stale), "w1", NOW)


async def test_completion_is_atomic(store: Store) -> None:
    """A completion that fails part-way leaves history and tasks untouched."""
    await store.start_run(new_run())
    task = await claim_one(store)
    bad = schedule(task)
    bad.activities.append(bad.activities[0])  # duplicate key: the insert fails mid-way
    with pytest.raises(StoreError):
        await store.complete_workflow_task(bad, "w1", NOW)
    assert [e.type for e in await store.read_history("run-1")] == ["WorkflowStarted"]
    assert await store.claim_activity_tasks("q", "w1", 10, NOW + LEASE, NOW) == []
    # The task is still leased to w1 and can be completed properly.
    await store.complete_workflow_task(schedule(task), "w1", NOW)
    assert len(await store.claim_activity_tasks("q", "w1", 10, NOW + LEASE, NOW)) == 1


async def test_group_commit_isolates_failures(store: Store) -> None:
    """Operations batched into one transaction do not undo each other."""
    starts = [store.start_run(new_run(f"wf{i}", f"run-{i}", f"r{i}")) for i in range(20)]
    starts.append(store.start_run(new_run("wf3", "run-x", "other")))  # duplicate id
    results = await asyncio.gather(*starts, return_exceptions=True)
    assert sum(isinstance(r, WorkflowAlreadyStartedError) for r in results) == 1
    assert len(await store.list_runs("default")) == 20


async def test_activity_lifecycle_and_eager_dispatch(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    result = await store.complete_workflow_task(schedule(task, eager=1), "w1", NOW)
    assert [a.seq for a in result.eager_activities] == [1]
    activity = result.eager_activities[0]
    assert activity.attempt == 1 and activity.args == ["x"]
    # Eagerly leased: nobody else can claim it.
    assert await store.claim_activity_tasks("q", "w2", 10, NOW + LEASE, NOW) == []
    assert await store.heartbeat_activity(activity, {"progress": 3}, NOW + 2 * LEASE) is False
    await store.retry_activity(activity, {"message": "boom"}, NOW + 5, {"progress": 3})
    assert await store.claim_activity_tasks("q", "w2", 10, NOW + LEASE, NOW + 1) == []
    (retry,) = await store.claim_activity_tasks("q", "w2", 10, NOW + 5 + LEASE, NOW + 5)
    assert retry.attempt == 2 and retry.heartbeat_details == {"progress": 3}
    with pytest.raises(StaleTaskError):
        await store.finish_activity(activity, ACTIVITY_COMPLETED, {"seq": 1}, NOW + 6)
    await store.finish_activity(retry, ACTIVITY_COMPLETED, {"seq": 1, "result": "ok"}, NOW + 6)
    history = await store.read_history("run-1", after_seq=3)
    assert [(e.seq, e.type, e.data) for e in history] == [
        (4, ACTIVITY_COMPLETED, {"seq": 1, "result": "ok"})
    ]
    # The completion woke the workflow: a workflow task is ready.
    assert (await claim_one(store, now=NOW + 6)).history_length == 4


async def test_expired_activity_leases_are_reported(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    await store.complete_workflow_task(schedule(task), "w1", NOW)
    (activity,) = await store.claim_activity_tasks("q", "w1", 10, NOW + LEASE, NOW)
    assert await store.expired_activity_tasks(NOW + 1, 10) == []
    await store.renew_leases([], [activity], NOW + 3 * LEASE, NOW + 1)
    assert await store.expired_activity_tasks(NOW + 2 * LEASE, 10) == []
    (expired,) = await store.expired_activity_tasks(NOW + 3 * LEASE + 1, 10)
    assert (expired.owner, expired.token, expired.seq) == ("w1", activity.token, 1)


async def test_release_leases_makes_work_ready_at_once(store: Store) -> None:
    await store.start_run(new_run())
    await claim_one(store)
    await store.release_leases("w1", NOW + 1)
    assert (await claim_one(store, now=NOW + 1, owner="w1-restarted")).attempt == 2


async def test_inbound_event_during_task_keeps_task_queued(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    timer = WorkflowTaskCompletion(
        task=task,
        events=[(TIMER_STARTED, {"seq": 1, "fire_at": NOW + 5})],
        inputs_through=1,
        timers=[(1, NOW + 5)],
    )
    await store.complete_workflow_task(timer, "w1", NOW)
    assert await store.next_due_time() == NOW + 5
    assert await store.next_due_times(after=NOW) == (NOW + 5, None)
    assert await store.fire_due_timers(NOW + 4, 10) == 0
    assert await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW + 4) == []
    assert await store.fire_due_timers(NOW + 5, 10) == 1
    task = await claim_one(store, now=NOW + 5)
    # A second timer fires while that task runs: the task must stay queued.
    late = WorkflowTaskCompletion(
        task=task,
        events=[(TIMER_STARTED, {"seq": 2, "fire_at": NOW + 6})],
        inputs_through=task.history_length,
        timers=[(2, NOW + 6)],
    )
    await store.complete_workflow_task(late, "w1", NOW + 5)
    assert await store.fire_due_timers(NOW + 6, 10) == 1
    task = await claim_one(store, now=NOW + 6)
    events = await store.read_history("run-1", after_seq=task.history_length - 1)
    assert events[-1].type == TIMER_FIRED
    racing = WorkflowTaskCompletion(task=task, events=[], inputs_through=task.history_length - 1)
    result = await store.complete_workflow_task(racing, "w1", NOW + 6)
    assert result.more_work
    assert (await claim_one(store, now=NOW + 6)).task_version == result.task_version


async def test_many_timers_fire_together(store: Store) -> None:
    """Timers of many runs fire in one call (more than one statement's worth of runs);
    then two timers of one run fire in one call, in firing order."""
    runs = [f"run-{i}" for i in range(70)]
    for i, run_id in enumerate(runs):
        await store.start_run(new_run(f"wf-{i}", run_id, f"req-{i}"))
    tasks = await store.claim_workflow_tasks("q", "w1", 100, NOW + LEASE, NOW)
    assert len(tasks) == len(runs)
    for task in tasks:
        timers = [(1, NOW + 5)]
        if task.run_id == "run-0":
            timers += [(3, NOW + 6.5), (2, NOW + 6)]
        sleep = WorkflowTaskCompletion(
            task=task,
            events=[(TIMER_STARTED, {"seq": seq, "fire_at": at}) for seq, at in timers],
            inputs_through=1,
            timers=timers,
        )
        await store.complete_workflow_task(sleep, "w1", NOW)
    assert await store.fire_due_timers(NOW + 5, 500) == len(runs)
    assert await store.fire_due_timers(NOW + 5, 500) == 0
    assert await store.fire_due_timers(NOW + 7, 500) == 2
    claimed = await store.claim_workflow_tasks("q", "w1", 100, NOW + 7 + LEASE, NOW + 7)
    assert sorted(t.run_id for t in claimed) == sorted(runs)
    for run_id in runs:
        history = await store.read_history(run_id)
        assert [e.seq for e in history] == list(range(1, len(history) + 1)), run_id
        want = [1, 2, 3] if run_id == "run-0" else [1]
        fired = history[-len(want) :]
        assert [(e.type, e.data["seq"]) for e in fired] == [(TIMER_FIRED, s) for s in want]


async def test_closing_a_run_removes_its_pending_work(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    await store.complete_workflow_task(schedule(task), "w1", NOW)
    await store.fire_due_timers(NOW, 10)
    # Close the run with a workflow task (an inbound event queued one).
    await store.start_run(new_run("other", "run-2", "r2"))
    closing = WorkflowTaskCompletion(
        task=(await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW))[0],
        events=[(WORKFLOW_COMPLETED, {"result": None})],
        inputs_through=1,
        close=RunClose(status="completed"),
    )
    await store.complete_workflow_task(closing, "w1", NOW)
    remaining = {r.run_id: r.status for r in await store.list_runs("default")}
    assert remaining == {"run-1": "running", "run-2": "completed"}
    assert await store.list_runs("default", status="completed") == [
        await store.get_run("default", "other", None)
    ]


async def test_change_waiter_fires_on_commit(store: Store) -> None:
    waiter = store.change_waiter()
    await store.start_run(new_run())
    await asyncio.wait_for(waiter, 1.0)


async def test_worker_registry(store: Store) -> None:
    assert await store.workflows_served("q", NOW - 10) is None
    await store.register_worker("q", "w1", {"A": {"signals": ["s"]}, "B": {}}, ["act"], NOW)
    await store.register_worker("q", "w2", {"A": {"signals": ["t"]}, "C": {}}, [], NOW)
    served = await store.workflows_served("q", NOW - 10)
    assert served == {"A": {"signals": ["s", "t"]}, "B": {}, "C": {}}
    assert await store.workflows_served("q", NOW + 1) is None


async def test_failure_after_writes_does_not_undo_batched_neighbours(store: Store) -> None:
    """An operation failing half-way is undone alone; operations batched with it commit."""
    await store.start_run(new_run())
    task = await claim_one(store)
    bad = schedule(task)
    bad.activities.append(bad.activities[0])  # fails on its second insert, after writing
    results = await asyncio.gather(
        *(store.start_run(new_run(f"n{i}", f"run-n{i}", f"rn{i}")) for i in range(5)),
        store.complete_workflow_task(bad, "w1", NOW),
        *(store.start_run(new_run(f"m{i}", f"run-m{i}", f"rm{i}")) for i in range(5)),
        return_exceptions=True,
    )
    assert isinstance(results[5], StoreError)
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 5)
    assert len(await store.list_runs("default")) == 11
    assert [e.type for e in await store.read_history("run-1")] == ["WorkflowStarted"]


async def test_next_due_time_after_skips_tasks_ready_already(store: Store) -> None:
    """A timer loop asks what falls due later: a backlog of ready tasks is not that."""
    await store.start_run(new_run())
    assert await store.next_due_time() == NOW
    assert await store.next_due_time(after=NOW) is None
    task = await claim_one(store)
    await store.fail_workflow_task(task, {"message": "boom"}, NOW + 3)
    assert await store.next_due_time(after=NOW) == NOW + 3
    # Apart, so that a timer loop can tell a retry falling due from a timer doing so.
    assert await store.next_due_times(after=NOW) == (None, NOW + 3)


def continue_after(task: WorkflowTask, version: int, history_length: int) -> WorkflowTaskCompletion:
    """The workflow task an activity result wakes, computed on a cached instance."""
    woken = dataclasses.replace(task, token="", task_version=version, history_length=history_length)
    return WorkflowTaskCompletion(
        task=woken,
        events=[(WORKFLOW_COMPLETED, {"result": "done"})],
        inputs_through=history_length,
        close=RunClose("completed", {"result": "done"}),
    )


async def test_activity_result_and_woken_task_commit_together(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    done = await store.complete_workflow_task(schedule(task, eager=1), "w1", NOW)
    (activity,) = done.eager_activities
    data = {"seq": 1, "result": "ok"}
    woken = continue_after(task, done.task_version, done.history_length + 1)
    result = await store.finish_activity_and_continue(
        activity, data, NOW + 1, woken, done.history_length + 1, "w1"
    )
    assert result is not None and not result.more_work
    history = await store.read_history("run-1", after_seq=done.history_length)
    assert [e.type for e in history] == [
        ACTIVITY_COMPLETED,
        WORKFLOW_COMPLETED,
        WORKFLOW_TASK_COMPLETED,
    ]
    assert (await store.get_run("default", "wf", None)).status == "completed"
    assert await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW + 2) == []


async def test_activity_result_is_not_continued_past_unseen_inputs(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    # A signal arrives while the first task runs: it sits below the task's own events.
    await store.signal_run("default", "wf", None, "approve", [], NOW)
    done = await store.complete_workflow_task(schedule(task, eager=1), "w1", NOW)
    assert done.more_work
    (activity,) = done.eager_activities
    data = {"seq": 1, "result": "ok"}
    woken = continue_after(task, done.task_version, done.history_length + 1)
    assert (
        await store.finish_activity_and_continue(
            activity, data, NOW + 1, woken, done.history_length + 1, "w1"
        )
        is None
    )
    # The result is recorded and the queued task will see signal and result together.
    assert (await store.get_run("default", "wf", None)).status == "running"
    queued = await claim_one(store, now=NOW + 1)
    history = await store.read_history("run-1", after_seq=task.history_length)
    assert history[0].type == "SignalReceived"
    assert history[-1].type == ACTIVITY_COMPLETED and queued.history_length == history[-1].seq


async def test_claim_brings_short_histories_along(store: Store) -> None:
    await store.start_run(new_run())
    await store.start_run(new_run("long", "run-long", "req-long"))
    for i in range(CLAIM_HISTORY_EVENTS):  # past the limit: read it separately
        await store.signal_run("default", "long", None, "poke", [i], NOW)
    tasks = await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW)
    by_run = {t.run_id: t for t in tasks}
    short, long = by_run["run-1"], by_run["run-long"]
    assert short.history == await store.read_history("run-1")
    assert [e.type for e in short.history or []] == ["WorkflowStarted"]
    assert long.history is None and long.history_length == CLAIM_HISTORY_EVENTS + 1


async def test_activity_result_with_a_lost_lease_continues_nothing(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    done = await store.complete_workflow_task(schedule(task, eager=1), "w1", NOW)
    (activity,) = done.eager_activities
    lost = dataclasses.replace(activity, token="not-the-lease")
    woken = continue_after(task, done.task_version, done.history_length + 1)
    with pytest.raises(StaleTaskError):
        await store.finish_activity_and_continue(
            lost, {"seq": 1, "result": "ok"}, NOW + 1, woken, done.history_length + 1, "w1"
        )
    assert len(await store.read_history("run-1")) == done.history_length
    assert (await store.get_run("default", "wf", None)).status == "running"


async def test_payloads_keep_big_integers_non_finite_floats_and_text(store: Store) -> None:
    """What the converter accepts comes back from the store unchanged."""
    args = [2**80, -(2**70), 0.1, 1e16, float("inf"), 'é ☃ \u0000 "q"', {"k": [None, True]}]
    run = dataclasses.replace(new_run(), args=[*args, float("nan")])
    await store.start_run(run)
    (started,) = await store.read_history("run-1")
    *back, nan = started.data["args"]
    assert back == args
    assert [type(v) for v in back] == [type(v) for v in args]
    assert nan != nan  # NaN


async def test_deeply_nested_payloads_read_back(store: Store) -> None:
    """Nesting the converter accepts (deeper than some JSON parsers allow) reads back,
    with the claim and from the history."""
    deep: object = "bottom"
    for _ in range(240):
        deep = [deep]
    await store.start_run(dataclasses.replace(new_run(), args=[deep]))
    task = await claim_one(store)
    assert task.history is not None and task.history[0].data["args"] == [deep]
    assert (await store.read_history("run-1"))[0].data["args"] == [deep]


async def test_an_update_accepted_by_the_closing_task_is_rejected(store: Store) -> None:
    """The task that accepts an update and closes the run leaves no update waiting:
    closing rejects what is still open, after the task's own update states."""
    await store.start_run(new_run())
    request = UpdateRequest("u1", "add", [1])
    await store.request_update("default", "wf", None, request, NOW)
    task = await claim_one(store)
    closing = WorkflowTaskCompletion(
        task=task,
        events=[
            (UPDATE_ACCEPTED, {"update_id": "u1", "name": "add", "args": [1]}),
            (WORKFLOW_COMPLETED, {"result": None}),
        ],
        inputs_through=task.history_length,
        updates=[UpdateState("run-1", "u1", "accepted")],
        close=RunClose(status="completed"),
    )
    await store.complete_workflow_task(closing, "w1", NOW)
    state = await store.get_update("run-1", "u1")
    assert state is not None and state.state == "rejected"
    assert state.failure is not None and state.failure["type"] == "WorkflowClosed"


def complete(task: WorkflowTask) -> WorkflowTaskCompletion:
    """Completes the run, with inputs seen up to the task's history."""
    return WorkflowTaskCompletion(
        task=task,
        events=[(WORKFLOW_COMPLETED, {"result": None})],
        inputs_through=task.history_length,
        close=RunClose(status="completed"),
    )


def activity_and_timer(task: WorkflowTask) -> WorkflowTaskCompletion:
    """Schedules activity 1 (not leased) and starts timer 2 (due at NOW + 5)."""
    return dataclasses.replace(
        schedule(task),
        events=[
            (ACTIVITY_SCHEDULED, {"seq": 1, "activity_type": "act"}),
            (TIMER_STARTED, {"seq": 2, "fire_at": NOW + 5}),
        ],
        timers=[(2, NOW + 5)],
    )


async def test_closing_drops_the_work_left_of_its_run_only(store: Store) -> None:
    """A closing task removes its run's activity tasks, timers and open updates, those
    that came while it ran too, and nothing of other runs; a run that closes with
    nothing left behind closes as well."""
    await store.start_run(new_run())
    await store.start_run(new_run("other", "run-2", "r2"))
    await store.start_run(new_run("bare", "run-3", "r3"))
    for task in await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW):
        if task.run_id != "run-3":
            await store.complete_workflow_task(activity_and_timer(task), "w1", NOW)
        else:
            await store.complete_workflow_task(complete(task), "w1", NOW)
    await store.request_update("default", "wf", None, UpdateRequest("u1", "add", [1]), NOW)
    task = await claim_one(store)
    await store.request_update("default", "wf", None, UpdateRequest("u2", "add", [2]), NOW)
    await store.complete_workflow_task(complete(task), "w1", NOW)
    for update_id in ("u1", "u2"):
        state = await store.get_update("run-1", update_id)
        assert state is not None and state.state == "rejected", update_id
    activities = await store.claim_activity_tasks("q", "w1", 10, NOW + LEASE, NOW)
    assert [(a.run_id, a.seq) for a in activities] == [("run-2", 1)]
    assert await store.fire_due_timers(NOW + 5, 10) == 1
    woken = await store.claim_workflow_tasks("q", "w1", 10, NOW + 5 + LEASE, NOW + 5)
    assert [t.run_id for t in woken] == ["run-2"]
    closed = {r.run_id: r.status for r in await store.list_runs("default")}
    assert closed == {"run-1": "completed", "run-2": "running", "run-3": "completed"}


async def test_a_run_closed_by_an_activity_result_drops_its_timer(store: Store) -> None:
    await store.start_run(new_run())
    task = await claim_one(store)
    started = dataclasses.replace(activity_and_timer(task), eager_activity_limit=1)
    done = await store.complete_workflow_task(started, "w1", NOW)
    (activity,) = done.eager_activities
    woken = continue_after(task, done.task_version, done.history_length + 1)
    result = await store.finish_activity_and_continue(
        activity, {"seq": 1, "result": "ok"}, NOW + 1, woken, done.history_length + 1, "w1"
    )
    assert result is not None
    assert (await store.get_run("default", "wf", None)).status == "completed"
    assert await store.next_due_times() == (None, None)
    assert await store.fire_due_timers(NOW + 5, 10) == 0


@pytest.mark.parametrize("api", ["complete_workflow_task", "complete_workflow_tasks"])
async def test_many_closing_tasks_commit_together_each_as_if_alone(store: Store, api: str) -> None:
    """Closing completions committed in one transaction (SQLite runs them as one
    set-based operation) each do exactly what they would alone: a lost lease fails
    only its own; a run's leftover timer goes; a child's close reaches its parent.
    Sent one call each, or all in one ``complete_workflow_tasks`` (from a generator,
    as the worker does), each gets its own outcome in its own place."""
    plain = [f"run-{i}" for i in range(10)]
    for i, run_id in enumerate(plain):
        await store.start_run(new_run(f"wf{i}", run_id, f"r{i}"))
    await store.start_run(new_run("stale", "run-stale", "r-stale"))
    await store.start_run(new_run("timer", "run-timer", "r-timer"))
    await store.start_run(new_run("parent", "run-parent", "r-parent"))
    child = dataclasses.replace(
        new_run("child", "run-child", "r-child"), parent_run_id="run-parent", parent_seq=2
    )
    await store.start_run(child)
    tasks = {
        t.run_id: t for t in await store.claim_workflow_tasks("q", "w1", 100, NOW + LEASE, NOW)
    }
    # run-timer sleeps (a pending timer), then a signal gives it a task that closes it.
    sleep = WorkflowTaskCompletion(
        task=tasks.pop("run-timer"),
        events=[(TIMER_STARTED, {"seq": 2, "fire_at": NOW + 50})],
        inputs_through=1,
        timers=[(2, NOW + 50)],
    )
    await store.complete_workflow_task(sleep, "w1", NOW)
    await store.signal_run("default", "timer", None, "go", [], NOW)
    (woken,) = await store.claim_workflow_tasks("q", "w1", 100, NOW + LEASE, NOW)
    tasks["run-timer"] = woken
    tasks["run-stale"] = dataclasses.replace(tasks["run-stale"], token="not-the-lease")
    tasks.pop("run-parent")  # stays open, to hear from its child

    order = [*plain[:5], "run-stale", "run-timer", "run-child", *plain[5:]]
    if api == "complete_workflow_task":
        results: list[Any] = await asyncio.gather(
            *(store.complete_workflow_task(complete(tasks[r]), "w1", NOW) for r in order),
            return_exceptions=True,
        )
    else:
        results = [
            outcome
            async for outcome in store.complete_workflow_tasks(
                ((complete(tasks[r]), NOW) for r in order), "w1"
            )
        ]
    outcome = dict(zip(order, results, strict=True))
    assert isinstance(outcome.pop("run-stale"), StaleTaskError)
    for run_id, result in outcome.items():
        assert not isinstance(result, BaseException), (run_id, result)
        assert result.history_length == tasks[run_id].history_length + 2
        assert result.more_work is False and result.eager_activities == []
    runs = {r.run_id: r.status for r in await store.list_runs("default")}
    assert runs == {
        **dict.fromkeys([*plain, "run-timer", "run-child"], "completed"),
        "run-stale": "running",
        "run-parent": "running",
    }
    for run_id in plain:
        history = await store.read_history(run_id)
        assert [(e.seq, e.type) for e in history] == [
            (1, "WorkflowStarted"),
            (2, WORKFLOW_COMPLETED),
            (3, WORKFLOW_TASK_COMPLETED),
        ]
    assert (await store.next_due_times())[0] is None  # run-timer's timer went with it
    parent = await store.read_history("run-parent")
    assert parent[-1].type == "ChildWorkflowCompleted" and parent[-1].data["seq"] == 2
    # Only the parent (told of its child) and the stale run have a task left.
    left = await store.claim_workflow_tasks("q", "w2", 100, NOW + 2 * LEASE, NOW + LEASE + 1)
    assert sorted(t.run_id for t in left) == ["run-parent", "run-stale"]


@pytest.mark.parametrize("api", ["complete_workflow_task", "complete_workflow_tasks"])
async def test_only_completions_someone_is_told_of_wait_for_the_disk(
    store: Store, api: str
) -> None:
    """A workflow task that closes its run or answers an update is committed durably;
    one that only schedules work (an activity, a timer) may commit without waiting for
    the disk (nobody is told of it; a later durable commit makes it durable too). Both
    are recorded alike."""
    for i in range(4):
        await store.start_run(new_run(f"wf{i}", f"run-{i}", f"r{i}"))
    await store.request_update("default", "wf3", None, UpdateRequest("u1", "add", [1]), NOW)
    tasks = {t.run_id: t for t in await store.claim_workflow_tasks("q", "w1", 10, NOW + LEASE, NOW)}
    accept = WorkflowTaskCompletion(
        task=tasks["run-3"],
        events=[(UPDATE_ACCEPTED, {"update_id": "u1", "name": "add", "args": [1]})],
        inputs_through=tasks["run-3"].history_length,
        updates=[UpdateState("run-3", "u1", "accepted")],
    )
    completions = [
        schedule(tasks["run-0"]),
        activity_and_timer(tasks["run-1"]),
        complete(tasks["run-2"]),
        accept,
    ]
    assert [c.acknowledged for c in completions] == [False, False, True, True]

    durable: list[bool] = []
    submit = store._submit  # type: ignore[attr-defined]

    def spy(make: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(make, "func", None) == store._complete_workflow_task:  # type: ignore[attr-defined]
            durable.append(
                inspect.signature(submit).bind(make, *args, **kwargs).arguments["durable"]
            )
        return submit(make, *args, **kwargs)

    store._submit = spy  # type: ignore[attr-defined]
    if api == "complete_workflow_task":
        for c in completions:
            await store.complete_workflow_task(c, "w1", NOW)
    else:
        outcomes = [
            o async for o in store.complete_workflow_tasks(((c, NOW) for c in completions), "w1")
        ]
        assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert durable == [False, False, True, True]

    histories = [[e.type for e in await store.read_history(f"run-{i}")] for i in range(4)]
    assert [h[-2:] for h in histories] == [
        [ACTIVITY_SCHEDULED, WORKFLOW_TASK_COMPLETED],
        [TIMER_STARTED, WORKFLOW_TASK_COMPLETED],
        [WORKFLOW_COMPLETED, WORKFLOW_TASK_COMPLETED],
        [UPDATE_ACCEPTED, WORKFLOW_TASK_COMPLETED],
    ]
    state = await store.get_update("run-3", "u1")
    assert state is not None and state.state == "accepted"
