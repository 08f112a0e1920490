"""The PostgreSQL driver: connection loss, wake-ups across processes, clear errors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from backends import database_url, empty_tables, pg_fetch
from groups import count_groups, run_nothing_together
from tether import (
    Client,
    InvalidArgumentError,
    StoreError,
    Worker,
    activity,
    workflow,
)
from tether._store.base import (
    ACTIVITY_COMPLETED,
    ACTIVITY_SCHEDULED,
    TIMER_STARTED,
    UPDATE_ACCEPTED,
    WORKFLOW_COMPLETED,
    WORKFLOW_TASK_COMPLETED,
    ActivityTask,
    NewActivity,
    NewRun,
    RunClose,
    UpdateRequest,
    UpdateState,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
)
from tether._store.changes import Change
from tether._store.pg_statements import translate
from tether._store.postgres import PostgresStore, redact
from tether._store.sql_statements import ALL, EXEC, ONE, LeaseAndRead, Op, Stmt

NOW = 1_000_000.0
T = TypeVar("T")


def new_run(n: int) -> NewRun:
    return NewRun("default", f"wf-{n}", f"run-{n}", "Flow", "q", [n], f"req-{n}", 1, NOW)


async def terminate_connections(url: str, *, except_pids: tuple[int, ...] = ()) -> int:
    """Kill every other session on the database, as a server restart would."""
    conn = await asyncpg.connect(url)
    try:
        pids = (*except_pids, conn.get_server_pid())
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid != ALL($1::int[])",
                list(pids),
            )
        )
    finally:
        await conn.close()


def test_placeholders_are_translated_outside_literals() -> None:
    assert translate("SELECT ? , '?' , ?") == "SELECT $1 , '?' , $2"
    assert translate("UPDATE t SET a = ? WHERE b = 'x' AND c = ?") == (
        "UPDATE t SET a = $1 WHERE b = 'x' AND c = $2"
    )


def test_urls_in_messages_hide_the_password() -> None:
    assert redact("postgresql://app:s3cret@db.example:6543/prod") == (
        "postgresql://db.example:6543/prod"
    )


async def test_lost_connections_are_replaced_and_calls_carry_on(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    for n in range(5):
        await postgres_store.start_run(new_run(n))
        await postgres_store.get_run("default", f"wf-{n}", None)
    killed = await terminate_connections(fresh_postgres)
    assert killed >= 3  # committers, listener, pooled reader
    # Reads and writes after the loss reconnect without the caller noticing.
    for n in range(5, 10):
        await postgres_store.start_run(new_run(n))
    assert len(await postgres_store.list_runs("default")) == 10
    # The listener came back too: another process's commit wakes this one.
    other = await PostgresStore.open(fresh_postgres)
    try:
        deadline = time.monotonic() + 10
        while True:
            waiter = postgres_store.change_waiter()
            await other.start_run(new_run(100))
            try:
                await asyncio.wait_for(waiter, 1.0)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no wake-up after the listener reconnected"
                await other.terminate_run("default", "wf-100", None, "again", NOW)
    finally:
        await other.close()


async def test_commits_of_one_process_wake_another(fresh_postgres: str) -> None:
    a = await PostgresStore.open(fresh_postgres)
    b = await PostgresStore.open(fresh_postgres)
    try:
        waiter = b.change_waiter()
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = time.monotonic()
        await a.start_run(new_run(1))
        await asyncio.wait_for(waiter, 2.0)
        assert time.monotonic() - started < 0.5
        assert b.stats["notifications"] >= 1
        # The lone start said so from within its statement: no NOTIFY of its own.
        assert a.stats["operations_alone"] == 1 and a.stats["notify_transactions"] == 0
        # A claim that finds nothing changes nothing and wakes nobody.
        quiet = b.change_waiter()
        await a.claim_workflow_tasks("other-queue", "w", 10, NOW + 10, NOW)
        await asyncio.sleep(0.2)
        assert not quiet.done()
    finally:
        await a.close()
        await b.close()


async def test_a_batch_cut_off_mid_transaction_is_run_again(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """The connection dies while a write waits on a lock: nothing of it committed, so
    it is run again on a new connection, and applied once."""
    await postgres_store.start_run(new_run(1))
    (task,) = await postgres_store.claim_workflow_tasks("q", "w", 10, NOW + 10, NOW)
    locker = await asyncpg.connect(fresh_postgres)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM runs WHERE run_id = 'run-1' FOR UPDATE")
        signal = asyncio.ensure_future(
            postgres_store.signal_run("default", "wf-1", None, "poke", [1], NOW)
        )
        deadline = time.monotonic() + 10
        while True:
            blocked = await pg_column(
                fresh_postgres,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'",
            )
            if blocked:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await pg_column(fresh_postgres, f"SELECT pg_terminate_backend({blocked[0]})")
        await tx.rollback()
        assert await asyncio.wait_for(signal, 10) == "run-1"
    finally:
        await locker.close()
    history = await postgres_store.read_history("run-1")
    assert [e.type for e in history] == ["WorkflowStarted", "SignalReceived"]
    assert postgres_store.stats["retried_operations"] >= 1
    assert task.run_id == "run-1"


async def pg_column(url: str, query: str) -> list[object]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch(query)]
    finally:
        await conn.close()


async def test_unreachable_server_gives_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL at .*127\.0\.0\.1:1/") as e:
        await PostgresStore.open("postgresql://postgres@127.0.0.1:1/tether", reconnect_timeout=0.3)
    assert e.value.retryable
    assert "is the server running and the URL right?" in str(e.value)
    assert time.monotonic() - started < 5


async def test_unknown_database_is_not_retried(postgres_url: str) -> None:
    url = database_url("tether_no_such_database", postgres_url)
    started = time.monotonic()
    with pytest.raises(StoreError, match='database "tether_no_such_database" does not exist') as e:
        await Client.connect(url)
    assert not e.value.retryable
    assert time.monotonic() - started < 5


async def test_bad_scheme_names_both_backends() -> None:
    with pytest.raises(InvalidArgumentError, match="postgresql://user@host:port/database"):
        await Client.connect("mysql://localhost/tether")


async def test_closed_store_refuses_calls(postgres_store: PostgresStore) -> None:
    await postgres_store.close()
    with pytest.raises(StoreError, match="closed") as e:
        await postgres_store.start_run(new_run(1))
    assert not e.value.retryable


@workflow.defn
class SleepsLong:
    @workflow.run
    async def run(self) -> None:
        await asyncio.sleep(3600)


_probe_log: list[str] = []
_probe_events: dict[str, asyncio.Event] = {}


def _probe_event(name: str) -> asyncio.Event:
    return _probe_events.setdefault(name, asyncio.Event())


@activity.defn
async def slot_probe(name: str) -> str:
    _probe_log.append(f"{name} runs")
    _probe_event(f"{name} runs").set()
    await _probe_event(f"{name} may return").wait()
    _probe_log.append(f"{name} returns")
    return name


@workflow.defn
class CallsProbe:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(slot_probe, name, start_to_close_timeout=60)


async def test_an_activity_slot_is_free_while_its_result_is_being_recorded(
    fresh_postgres: str,
) -> None:
    """``max_concurrent_activities`` bounds the activities whose code runs: once an
    activity's code returns, the next one starts while its result is still being
    recorded (here held up by a lock on its row), not after. Recordings run ahead by
    the limit at most: with two held up, a third activity waits."""
    _probe_log.clear()
    _probe_events.clear()
    client = await Client.connect(fresh_postgres)
    locker = await asyncpg.connect(fresh_postgres)
    try:
        async with Worker(
            client,
            task_queue="q",
            workflows=[CallsProbe],
            activities=[slot_probe],
            max_concurrent_activities=1,
        ):
            first = await client.start_workflow(CallsProbe, "a", id="a", task_queue="q")
            await asyncio.wait_for(_probe_event("a runs").wait(), 10)
            await locker.execute("BEGIN")
            try:
                await locker.execute("SELECT 1 FROM activity_tasks FOR UPDATE")  # a's row
                second = await client.start_workflow(CallsProbe, "b", id="b", task_queue="q")
                _probe_event("a may return").set()
                await asyncio.wait_for(_probe_event("b runs").wait(), 10)
                assert _probe_log == ["a runs", "a returns", "b runs"]
                assert (await first.describe()).status == "running"  # a's result waits
                await locker.execute("SELECT 1 FROM activity_tasks FOR UPDATE")  # b's too
                third = await client.start_workflow(CallsProbe, "c", id="c", task_queue="q")
                _probe_event("b may return").set()
                _probe_event("c may return").set()
                await asyncio.sleep(1.0)  # c's activity is ready, and would be claimed
                assert _probe_log == ["a runs", "a returns", "b runs", "b returns"]
            finally:
                await locker.execute("ROLLBACK")
            assert await first.result(timeout=30) == "a"
            assert await second.result(timeout=30) == "b"
            assert await third.result(timeout=30) == "c"
            assert _probe_log[-2:] == ["c runs", "c returns"]
    finally:
        await locker.close()
        await client.close()


async def test_a_due_timer_locked_elsewhere_does_not_make_the_timer_loop_spin(
    fresh_postgres: str,
) -> None:
    client = await Client.connect(fresh_postgres)
    store = client.store
    fired = 0
    fire = store.fire_due_timers

    async def counting(now: float, limit: int) -> int:
        nonlocal fired
        fired += 1
        return await fire(now, limit)

    store.fire_due_timers = counting  # type: ignore[method-assign]
    locker = await asyncpg.connect(fresh_postgres)
    try:
        async with Worker(client, task_queue="q", workflows=[SleepsLong]):
            await client.start_workflow(SleepsLong, id="s", task_queue="q")
            while not await locker.fetchval("SELECT count(*) FROM timers"):
                await asyncio.sleep(0.02)
            # Due, but held by another transaction (another worker firing it, say).
            await locker.execute("UPDATE timers SET fire_at = 0")
            await locker.execute("BEGIN")
            await locker.execute("SELECT * FROM timers FOR UPDATE")
            fired = 0
            await asyncio.sleep(2.5)  # the timer loop sees it within its 1 s idle poll
            assert fired <= 60  # then a try every 50 ms or so, not a busy loop
            await locker.execute("ROLLBACK")
    finally:
        await locker.close()
        await client.close()


def _show(setting: str) -> Callable[[], Op[str]]:
    """An operation that reads a server setting as its connection has it."""

    def op() -> Op[str]:
        row = yield Stmt(ONE, f"SHOW {setting}", ())
        return str(row[0])

    return op


_synchronous_commit = _show("synchronous_commit")


async def test_lease_only_writes_commit_without_waiting_for_the_wal(
    postgres_store: PostgresStore,
) -> None:
    """A transaction of lease-only writes commits asynchronously; every other write,
    before and after it, synchronously (the server's setting stays on)."""
    store = postgres_store
    assert await store._execute(_synchronous_commit, writes=True) == "on"
    assert await store._execute_lease(_synchronous_commit) == "off"
    assert await store._execute(_synchronous_commit, writes=True) == "on"
    assert await store._execute(_synchronous_commit, writes=False) == "on"


async def test_the_store_reads_committed_whatever_the_database_default(
    fresh_postgres: str,
) -> None:
    """Claims read back what they leased on a newer snapshot than the lease's, which
    takes READ COMMITTED: a database defaulting to REPEATABLE READ does not change it."""
    conn = await asyncpg.connect(fresh_postgres)
    try:
        await conn.execute(
            f'ALTER DATABASE "{conn._params.database}" '
            "SET default_transaction_isolation = 'repeatable read'"
        )
    finally:
        await conn.close()
    store = await PostgresStore.open(fresh_postgres)
    try:
        isolation = _show("transaction_isolation")
        assert await store._execute(isolation, writes=True) == "read committed"
        assert await store._execute_lease(isolation) == "read committed"
        assert await store._execute(isolation, writes=False) == "read committed"
    finally:
        await store.close()


def _probe_op(*statements: Stmt) -> Callable[[], Op[None]]:
    def op() -> Op[None]:
        for stmt in statements:  # noqa: UP028 (results are sent in: a tuple cannot take them)
            yield stmt

    return op


_PROBE_INSERT = "INSERT INTO alone_probe (n) VALUES (1) RETURNING n"
_FAILS = Stmt(ONE, "SELECT 1 / 0", ())


@pytest.fixture
async def probe_table(fresh_postgres: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_postgres)
    await conn.execute("CREATE TABLE alone_probe (n int PRIMARY KEY)")
    try:
        yield conn
    finally:
        await conn.execute("DROP TABLE alone_probe")
        await conn.close()


async def test_a_lone_first_statement_commits_by_itself(
    postgres_store: PostgresStore, probe_table: asyncpg.Connection
) -> None:
    """A first statement marked ``alone`` commits by itself; what follows it has a
    transaction of its own. Unmarked, or not first, it shares the operation's."""
    store = postgres_store
    alone = Stmt(ONE, _PROBE_INSERT, (), alone=True)
    with pytest.raises(StoreError, match="division by zero"):
        await store._execute(_probe_op(alone, _FAILS), writes=True)
    assert await probe_table.fetchval("SELECT count(*) FROM alone_probe") == 1

    await probe_table.execute("DELETE FROM alone_probe")
    with pytest.raises(StoreError, match="division by zero"):
        await store._execute(_probe_op(Stmt(ONE, _PROBE_INSERT, ()), _FAILS), writes=True)
    read_first = Stmt(ONE, "SELECT count(*) FROM alone_probe", ())
    with pytest.raises(StoreError, match="division by zero"):
        await store._execute(_probe_op(read_first, alone, _FAILS), writes=True)
    assert await probe_table.fetchval("SELECT count(*) FROM alone_probe") == 0

    await store._execute(_probe_op(alone), writes=True)
    assert await probe_table.fetchval("SELECT count(*) FROM alone_probe") == 1


async def test_a_lone_statement_cut_off_is_run_again(
    fresh_postgres: str, probe_table: asyncpg.Connection
) -> None:
    """The connection dies while a statement committing by itself is out: whether it
    committed is unknown, and its operation is safe to repeat (``Stmt.alone``), so it
    runs again on a new connection without the caller noticing."""
    store = await PostgresStore.open(fresh_postgres, lock_timeout=30.0)
    try:
        await probe_table.execute("BEGIN")
        await probe_table.execute("INSERT INTO alone_probe (n) VALUES (2)")
        blocked_insert = "INSERT INTO alone_probe (n) VALUES (2) RETURNING n"
        insert = asyncio.ensure_future(
            store._execute(_probe_op(Stmt(ONE, blocked_insert, (), alone=True)), writes=True)
        )
        deadline = time.monotonic() + 10
        while not (
            blocked := await pg_column(
                fresh_postgres,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'",
            )
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await pg_column(fresh_postgres, f"SELECT pg_terminate_backend({blocked[0]})")
        await probe_table.execute("ROLLBACK")  # the key is free for the second try
        await asyncio.wait_for(insert, 10)
        assert store.stats["retried_operations"] >= 1
        assert await probe_table.fetchval("SELECT count(*) FROM alone_probe") == 1
    finally:
        await store.close()


async def test_a_completion_with_input_arrived_meanwhile_commits_whole(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """A signal came in while the task ran: the completion and the hand-back of the
    task are one transaction, so a hand-back that must wait (a lock held elsewhere)
    delays the completion instead of leaving it committed without it."""
    store = postgres_store
    await store.start_run(new_run(1))
    (task,) = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
    await store.signal_run("default", "wf-1", None, "poke", [1], NOW)
    locker = await asyncpg.connect(fresh_postgres)
    try:
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM workflow_tasks WHERE run_id = 'run-1' FOR UPDATE")
        completion = WorkflowTaskCompletion(task=task, events=[], inputs_through=1)
        done = asyncio.ensure_future(store.complete_workflow_task(completion, "w", NOW))
        await asyncio.sleep(0.6)  # past the store's lock timeout: it stepped back
        assert not done.done()
        await locker.execute("ROLLBACK")
        result = await asyncio.wait_for(done, 10)
    finally:
        await locker.close()
    assert result.more_work
    assert store.stats["retried_operations"] >= 1
    (again,) = await store.claim_workflow_tasks("q", "w2", 10, NOW + 60, NOW)
    assert [e.type for e in await store.read_history("run-1")] == [
        "WorkflowStarted",
        "SignalReceived",
        "WorkflowTaskCompleted",
    ]
    assert again.task_version == task.task_version + 1


async def test_a_claim_whose_read_back_fails_keeps_what_it_leased(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """A claim whose read-back must wait (the runs table locked past the store's lock
    timeout) strands no lease: the claim function's lease steps back with its read
    (one statement), and the repeated attempt first reads what an earlier one leased
    (for a lease that committed before its connection was lost) before it leases."""
    store = postgres_store
    await store.start_run(new_run(1))
    await store.start_run(new_run(2))
    locker = await asyncpg.connect(fresh_postgres)
    try:
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        claim = asyncio.ensure_future(store.claim_workflow_tasks("q", "w1", 1, NOW + 60, NOW))
        await asyncio.sleep(0.6)  # past the lock timeout: the read-back stepped back
        assert not claim.done()
        await locker.execute("ROLLBACK")
        tasks = await asyncio.wait_for(claim, 10)
    finally:
        await locker.close()
    assert len(tasks) == 1
    assert store.stats["retried_operations"] >= 1
    # The other run's task is still there for the taking.
    others = await store.claim_workflow_tasks("q", "w2", 10, NOW + 60, NOW)
    assert [t.run_id for t in others] == [r for r in ("run-1", "run-2") if r != tasks[0].run_id]


_CLAIMING = ("tether_claim_workflow_tasks", "tether_claim_activity_tasks")
_COMPLETING = ("tether_close_runs", "tether_complete_waiting_tasks")


@pytest.mark.parametrize("revoked", [_CLAIMING + _COMPLETING, _COMPLETING])
async def test_a_role_that_cannot_call_the_functions_claims_and_closes_without_them(
    fresh_postgres: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    revoked: tuple[str, ...],
) -> None:
    """A database whose owner revoked EXECUTE on functions from PUBLIC: a store opened
    by a role with only table rights says which once, and does without just those:
    claims with the lease and the read-back as two statements, closes runs one by one,
    instead of failing every claim and close."""
    owner = await PostgresStore.open(fresh_postgres)
    await owner.close()
    role = f"tether_limited_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(fresh_postgres)
    try:
        await admin.execute(f"REVOKE EXECUTE ON FUNCTION {', '.join(revoked)} FROM PUBLIC")
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        limited_url = fresh_postgres.replace("postgres@", f"{role}@", 1)
        with caplog.at_level(logging.WARNING, logger="tether"):
            store = await PostgresStore.open(limited_url, migrate=False)
        try:
            assert f"the functions {', '.join(revoked)} are missing or not executable" in (
                caplog.text
            )
            assert store.dialect.claim_functions == (_CLAIMING[0] not in revoked)
            assert not store.dialect.completion_functions
            assert PostgresStore.dialect.completion_functions  # other stores keep them
            await store.start_run(new_run(1))
            await store.start_run(new_run(2))
            tasks = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
            assert [(t.run_id, [e.type for e in t.history or []]) for t in tasks] == [
                ("run-1", ["WorkflowStarted"]),
                ("run-2", ["WorkflowStarted"]),
            ]
            groups = count_groups(monkeypatch)
            results = await _together(store, [_closing(t) for t in tasks])
            assert [type(r).__name__ for r in results] == ["WorkflowTaskResult"] * 2
            assert groups == []  # each alone: the group would call tether_close_runs
            assert {r.status for r in await store.list_runs("default")} == {"completed"}
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.execute(f"GRANT EXECUTE ON FUNCTION {', '.join(revoked)} TO PUBLIC")
        await admin.close()


def test_a_claim_attempted_again_reads_back_before_it_leases_again() -> None:
    """A claim's lease and read-back in one call (``together``) may have committed
    before the connection carrying its answer was lost: the next attempt first reads
    back what the token leased, and leases again only if that finds nothing."""
    lease = Stmt(EXEC, "UPDATE lease", ())
    read = Stmt(ALL, "SELECT read", ())
    together = Stmt(ALL, "SELECT together", (), alone=True, writes=True)
    claim = LeaseAndRead(lease, read, together)
    first = claim()
    assert next(first) is together
    with pytest.raises(StopIteration) as done:
        first.send([("leased",)])
    assert done.value.value == [("leased",)]
    again = claim()
    assert next(again) is read
    with pytest.raises(StopIteration) as done:
        again.send([("leased before",)])
    assert done.value.value == [("leased before",)]
    third = claim()
    assert next(third) is read
    assert third.send([]) is together


async def _activity_running(
    store: PostgresStore, *, timer: bool = False, update: bool = False
) -> tuple[ActivityTask, WorkflowTaskCompletion, int]:
    """Run 1 with activity 1 leased to worker "w" and its cached instance's next task,
    which closes the run, and that task's first seq. ``timer``: timer 2 is pending and
    activity 3 queued too; ``update``: update u0 was accepted and is still running."""
    await store.start_run(new_run(1))
    if update:
        await store.request_update("default", "wf-1", None, UpdateRequest("u0", "add", []), NOW)
    (task,) = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
    events = [(ACTIVITY_SCHEDULED, {"seq": 1, "activity_type": "act"})]
    activities = [NewActivity(1, "act", "q", [], {"retry_policy": {}})]
    first = WorkflowTaskCompletion(
        task=task,
        events=events,
        inputs_through=task.history_length,
        activities=activities,
        eager_activity_limit=1,
        activity_lease_until=NOW + 60,
    )
    if timer:
        first.events += [
            (TIMER_STARTED, {"seq": 2, "fire_at": NOW + 5}),
            (ACTIVITY_SCHEDULED, {"seq": 3, "activity_type": "act"}),
        ]
        first.timers.append((2, NOW + 5))
        activities.append(NewActivity(3, "act", "q", [], {"retry_policy": {}}))
    if update:
        first.events.insert(0, (UPDATE_ACCEPTED, {"update_id": "u0", "name": "add", "args": []}))
        first.updates.append(UpdateState("run-1", "u0", "accepted"))
    done = await store.complete_workflow_task(first, "w", NOW)
    (activity,) = done.eager_activities
    seq = done.history_length + 1
    woken = dataclasses.replace(task, token="", task_version=done.task_version, history_length=seq)
    closing = WorkflowTaskCompletion(
        task=woken,
        events=[(WORKFLOW_COMPLETED, {"result": "done"})],
        inputs_through=seq,
        close=RunClose("completed", {"result": "done"}),
    )
    return activity, closing, seq


async def test_an_activity_result_that_closes_its_run_is_one_lone_statement(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """Result, closing task and the run's cleanup (its timer, its queued activity, its
    open update) commit as one statement with no transaction around it, which also
    tells other processes that the run closed."""
    store = postgres_store
    activity, closing, seq = await _activity_running(store, timer=True, update=True)
    other = await PostgresStore.open(fresh_postgres)
    try:
        closed = other.change_waiter(Change.RUN_CLOSED)
        alone = store.stats["operations_alone"]
        sent = store.stats["notify_transactions"]
        result = await store.finish_activity_and_continue(
            activity, {"seq": 1, "result": "ok"}, NOW + 1, closing, seq, "w"
        )
        await asyncio.wait_for(closed, 2.0)
    finally:
        await other.close()
    assert result is not None and not result.more_work
    assert store.stats["operations_alone"] == alone + 1
    assert store.stats["notify_transactions"] == sent
    assert (await store.get_run("default", "wf-1", None)).status == "completed"
    assert await store.next_due_times() == (None, None)
    assert await store.claim_activity_tasks("q", "w", 10, NOW + 60, NOW + 1) == []
    state = await store.get_update("run-1", "u0")
    assert state is not None and state.state == "rejected"
    assert [e.type for e in await store.read_history("run-1", after_seq=seq - 1)] == [
        ACTIVITY_COMPLETED,
        WORKFLOW_COMPLETED,
        WORKFLOW_TASK_COMPLETED,
    ]


async def _update_request_commits_during(url: str, call: Awaitable[T]) -> T:
    """Await ``call`` while an update request for run 1 commits: after the call's
    statement took its snapshot, before it got the run's row (written here as the
    store's request does: the update, the raised inputs watermark, a queued task)."""
    return await _commits_during(
        url,
        call,
        (
            "INSERT INTO updates (run_id, update_id, name, args, state, created_at) "
            "VALUES ('run-1', 'u1', 'add', '[]', 'requested', $1)",
            "UPDATE runs SET inbound_seq = next_seq WHERE run_id = 'run-1'",
            "INSERT INTO workflow_tasks (run_id, task_queue, visible_at) "
            "VALUES ('run-1', 'q', $1) ON CONFLICT (run_id) DO NOTHING",
        ),
    )


async def _commits_during(url: str, call: Awaitable[T], statements: tuple[str, ...]) -> T:
    """Await ``call`` while a transaction of ``statements`` (each given ``NOW`` as $1 if
    it takes it) holds the rows it wrote, committing once ``call`` waits for one."""
    locker = await asyncpg.connect(url)
    try:
        await locker.execute("BEGIN")
        for sql in statements:
            await locker.execute(sql, *([NOW] if "$1" in sql else []))
        running = asyncio.ensure_future(call)
        deadline = time.monotonic() + 5
        while not await pg_column(
            url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'",
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await locker.execute("COMMIT")
        return await asyncio.wait_for(running, 10)
    finally:
        await locker.close()


async def test_an_update_requested_while_the_result_commits_keeps_the_run_open(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """The lone statement sees the raised inputs watermark on the newest row and
    changes nothing; the result goes to the workflow task the request queued, and the
    update stays waiting for it (not rejected by a close)."""
    store = postgres_store
    activity, closing, seq = await _activity_running(store)
    finishing = store.finish_activity_and_continue(
        activity, {"seq": 1, "result": "ok"}, NOW + 1, closing, seq, "w"
    )
    assert await _update_request_commits_during(fresh_postgres, finishing) is None
    assert (await store.get_run("default", "wf-1", None)).status == "running"
    state = await store.get_update("run-1", "u1")
    assert state is not None and state.state == "requested"
    (queued,) = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW + 1)
    assert queued.history_length == seq
    assert (await store.read_history("run-1", after_seq=seq - 1))[0].type == ACTIVITY_COMPLETED


async def _closing_task(store: PostgresStore) -> WorkflowTaskCompletion:
    """Run 1 as ``_activity_running(timer=True, update=True)`` leaves it, then signalled:
    the completion of the woken task, which closes the run."""
    await _activity_running(store, timer=True, update=True)
    await store.signal_run("default", "wf-1", None, "poke", [], NOW)
    (task,) = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
    return WorkflowTaskCompletion(
        task=task,
        events=[(WORKFLOW_COMPLETED, {"result": None})],
        inputs_through=task.history_length,
        close=RunClose("completed"),
    )


async def test_a_task_that_closes_its_run_is_one_lone_statement(
    postgres_store: PostgresStore,
) -> None:
    store = postgres_store
    closing = await _closing_task(store)
    alone = store.stats["operations_alone"]
    sent = store.stats["notify_transactions"]
    await store.complete_workflow_task(closing, "w", NOW)
    assert store.stats["operations_alone"] == alone + 1
    assert store.stats["notify_transactions"] == sent  # announced from within
    assert (await store.get_run("default", "wf-1", None)).status == "completed"
    assert await store.next_due_times() == (None, None)
    assert await store.claim_activity_tasks("q", "w", 10, NOW + 60, NOW) == []
    assert await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW) == []
    state = await store.get_update("run-1", "u0")
    assert state is not None and state.state == "rejected"


async def test_an_update_requested_while_the_closing_task_commits_is_rejected(
    fresh_postgres: str, postgres_store: PostgresStore
) -> None:
    """The lone closing statement changes nothing; the transaction that closes the run
    instead sees the request and answers it (else it would wait forever)."""
    store = postgres_store
    closing = await _closing_task(store)
    await _update_request_commits_during(
        fresh_postgres, store.complete_workflow_task(closing, "w", NOW)
    )
    assert (await store.get_run("default", "wf-1", None)).status == "completed"
    state = await store.get_update("run-1", "u1")
    assert state is not None and state.state == "rejected"
    assert await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW) == []


async def test_closing_tasks_that_meet_in_a_batch_close_together_and_clean_up_after(
    fresh_postgres: str, postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing completions that share a transaction run as one set-based operation (a
    few statements for all, not one or more each). The cleanup looks afresh after the
    close: an update request that committed while the close waited for its run's row
    is rejected, and the run's timer, activities and task rows go."""
    groups = count_groups(monkeypatch)
    store = postgres_store
    closing = [await _closing_task(store)]  # run 1: a timer, activities, an update
    for n in range(2, 6):
        await store.start_run(new_run(n))
    closing += map(_closing, await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW))

    results = await _update_request_commits_during(fresh_postgres, _together(store, closing))
    assert groups == [5]
    assert [type(r).__name__ for r in results] == ["WorkflowTaskResult"] * 5
    for c, result in zip(closing, results, strict=True):
        assert result.history_length == c.task.history_length + 2
        history = await store.read_history(c.task.run_id, after_seq=c.task.history_length)
        assert [e.type for e in history] == [WORKFLOW_COMPLETED, WORKFLOW_TASK_COMPLETED]
    runs = {r.run_id: r.status for r in await store.list_runs("default")}
    assert runs == {f"run-{n}": "completed" for n in range(1, 6)}
    for update_id in ("u0", "u1"):
        state = await store.get_update("run-1", update_id)
        assert state is not None and state.state == "rejected", update_id
    assert await store.next_due_times() == (None, None)
    assert await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW + 1) == []
    assert await pg_column(fresh_postgres, "SELECT run_id FROM activity_tasks") == []


def _closing(task: WorkflowTask) -> WorkflowTaskCompletion:
    """The completion of ``task`` that closes its run (the workflow returned)."""
    return WorkflowTaskCompletion(
        task=task,
        events=[(WORKFLOW_COMPLETED, {"result": task.run_id})],
        inputs_through=task.history_length,
        close=RunClose("completed", task.run_id),
    )


async def _together(
    store: PostgresStore, completions: list[WorkflowTaskCompletion]
) -> list[WorkflowTaskResult | Exception]:
    """Record ``completions`` as the worker does a batch of them: all queued at once."""
    pairs = ((c, NOW) for c in completions)
    return [outcome async for outcome in store.complete_workflow_tasks(pairs, "w")]


async def test_tasks_that_leave_their_runs_waiting_complete_together_in_a_batch(
    fresh_postgres: str, postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completions that leave their runs waiting (each on a timer it starts) and share
    a transaction run as one call. A run that got input while its row was waited for
    (an update request) is completed on its own instead, its next task queued."""
    groups = count_groups(monkeypatch)
    store = postgres_store
    for n in range(1, 6):
        await store.start_run(new_run(n))
    sleeping = [
        WorkflowTaskCompletion(
            task=task,
            events=[(TIMER_STARTED, {"seq": 1, "fire_at": NOW + 5})],
            inputs_through=task.history_length,
            timers=[(1, NOW + 5)],
        )
        for task in await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
    ]
    assert [c.task.run_id for c in sleeping] == [f"run-{n}" for n in range(1, 6)]
    results = await _update_request_commits_during(fresh_postgres, _together(store, sleeping))
    assert groups == [5]
    for c, result in zip(sleeping, results, strict=True):
        assert isinstance(result, WorkflowTaskResult), result
        assert result.more_work == (c.task.run_id == "run-1")
        assert result.history_length == c.task.history_length + 2
        history = await store.read_history(c.task.run_id, after_seq=c.task.history_length)
        assert [e.type for e in history] == [TIMER_STARTED, WORKFLOW_TASK_COMPLETED]
    (queued,) = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW + 1)
    assert queued.run_id == "run-1" and queued.has_updates
    assert await store.fire_due_timers(NOW + 5, 10) == 5


async def test_a_group_held_up_by_a_row_lock_sets_aside_only_the_waiting_operation(
    fresh_postgres: str, postgres_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row held elsewhere past the lock timeout fails the group's one call: the batch
    runs its operations again one by one, so that only the one that waited steps back
    (to run again later) and the others commit at once, instead of the group being
    retried one member fewer at a time."""
    store = postgres_store
    for n in range(1, 7):
        await store.start_run(new_run(n))
    tasks = await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)
    groups = count_groups(monkeypatch)
    locker = await asyncpg.connect(fresh_postgres)
    try:
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM runs WHERE run_id = 'run-6' FOR UPDATE")
        calls = [
            asyncio.ensure_future(store.complete_workflow_task(_closing(t), "w", NOW))
            for t in tasks
        ]
        await asyncio.wait_for(asyncio.gather(*calls[:5]), 10)
        assert not calls[5].done()  # still waiting for run 6's row
        await locker.execute("COMMIT")
        results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    finally:
        await locker.close()
    assert [type(r).__name__ for r in results] == ["WorkflowTaskResult"] * 6
    assert groups == [6]  # tried once as a group, then one by one
    assert {r.status for r in await store.list_runs("default")} == {"completed"}


async def _mixed_completions(store: PostgresStore) -> list[str]:
    """Six runs whose tasks complete in one batch: four close (one failing, one with a
    signal come in since its claim, one whose lease was lost), two leave their runs
    waiting on timers; events of different counts and data. Their outcomes' types."""
    for n in range(1, 7):
        await store.start_run(new_run(n))
    tasks = {t.run_id: t for t in await store.claim_workflow_tasks("q", "w", 10, NOW + 60, NOW)}
    await store.signal_run("default", "wf-3", None, "poke", [3], NOW)
    tasks["run-4"] = dataclasses.replace(tasks["run-4"], token="lost")

    def marks(n: int) -> list[tuple[str, dict[str, Any]]]:
        return [("MarkerRecorded", {"name": f"m{k}", "value": [n, k]}) for k in range(n)]

    def waiting(task: WorkflowTask, timers: list[tuple[int, float]]) -> WorkflowTaskCompletion:
        started = [(TIMER_STARTED, {"seq": seq, "fire_at": at}) for seq, at in timers]
        return WorkflowTaskCompletion(
            task=task,
            events=[*marks(len(timers)), *started],
            inputs_through=task.history_length,
            timers=timers,
        )

    failed = _closing(tasks["run-2"])
    failure = {"kind": "application", "type": "Oops", "message": "it failed"}
    failed.events = [("WorkflowFailed", {"failure": failure})]
    failed.close = RunClose("failed", failure=failure)

    def closing(task: WorkflowTask, markers: int) -> WorkflowTaskCompletion:
        plain = _closing(task)
        return dataclasses.replace(plain, events=[*marks(markers), *plain.events])

    completions = [
        closing(tasks["run-1"], 1),
        failed,
        closing(tasks["run-3"], 4),
        _closing(tasks["run-4"]),
        waiting(tasks["run-5"], [(7, NOW + 5), (8, NOW + 9)]),
        waiting(tasks["run-6"], [(2, NOW + 3)]),
    ]
    return [type(r).__name__ for r in await _together(store, completions)]


async def _tables(url: str) -> dict[str, list[Any]]:
    queries = {
        "runs": "SELECT run_id, status, result, failure, closed_at, next_seq, inbound_seq, "
        "task_version FROM runs",
        "history": "SELECT * FROM history",
        "timers": "SELECT * FROM timers",
        "workflow_tasks": "SELECT run_id, visible_at, attempt, owner IS NULL FROM workflow_tasks",
    }
    return {
        table: sorted(tuple(row) for row in await pg_fetch(url, sql))
        for table, sql in queries.items()
    }


async def test_completions_in_one_call_leave_the_database_as_one_by_one_they_do(
    fresh_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of closing and waiting completions, run grouped (one call of each of the
    schema's functions) and one by one, leaves every table the same and gets the same
    outcomes: events of any count and data in place, a failure's encoding, a lost
    lease failing only its own."""
    groups = count_groups(monkeypatch)
    store = await PostgresStore.open(fresh_postgres)
    try:
        grouped = await _mixed_completions(store)
    finally:
        await store.close()
    # (The waiting ones commit without waiting for the disk: on another connection.)
    assert sorted(groups) == [2, 4]
    after_grouped = await _tables(fresh_postgres)
    await empty_tables(fresh_postgres)
    run_nothing_together(monkeypatch)
    store = await PostgresStore.open(fresh_postgres)
    try:
        alone = await _mixed_completions(store)
    finally:
        await store.close()
    assert (
        alone
        == grouped
        == ["WorkflowTaskResult"] * 3 + ["StaleTaskError"] + ["WorkflowTaskResult"] * 2
    )
    assert await _tables(fresh_postgres) == after_grouped
    history = [row for row in after_grouped["history"] if row[0] == "run-3"]
    assert [row[2] for row in history][-6:] == ["MarkerRecorded"] * 4 + [
        WORKFLOW_COMPLETED,
        WORKFLOW_TASK_COMPLETED,
    ]
    assert [row[0] for row in after_grouped["timers"]] == ["run-5", "run-5", "run-6"]
