"""SQLite store specifics: how its writer commits."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from groups import count_groups, run_nothing_together
from tether._store import sqlite_batches
from tether._store.base import WORKFLOW_COMPLETED, NewRun, RunClose, WorkflowTaskCompletion
from tether._store.sql_statements import ONE, WRITE, Op, Stmt
from tether._store.sqlite import SqliteStore
from tether.exceptions import StoreError

_NORMAL, _FULL = 1, 2


def _synchronous() -> Op[int]:
    row = yield Stmt(ONE, "PRAGMA synchronous", ())
    return int(row[0])


async def test_lease_only_writes_commit_without_waiting_for_the_disk(tmp_path: Path) -> None:
    """A batch of lease-only writes commits with synchronous=NORMAL (no fsync); every
    other write, before and after it, with synchronous=FULL."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"))
    try:
        assert await store._execute(_synchronous, writes=True) == _FULL
        assert await store._execute_lease(_synchronous) == _NORMAL
        assert await store._execute(_synchronous, writes=True) == _FULL
        # Claims take that path, and the writer is back to FULL after them.
        leases = []
        lease = store._execute_lease

        async def counted(make: Any) -> Any:
            leases.append(make)
            return await lease(make)

        store._execute_lease = counted  # type: ignore[method-assign]
        assert await store.claim_workflow_tasks("q", "w1", 10, 20.0, 10.0) == []
        assert await store.claim_activity_tasks("q", "w1", 10, 20.0, 10.0) == []
        assert len(leases) == 2
        assert await store._execute(_synchronous, writes=True) == _FULL
    finally:
        await store.close()


_NO_POLL = 3600.0
"""The writer thread's idle poll takes the writer's lock: none in these tests."""


def _thread_id() -> Op[int]:
    yield Stmt(ONE, "SELECT 1", ())
    return threading.get_ident()


async def test_writes_of_an_idle_loop_commit_on_it_in_one_batch(tmp_path: Path) -> None:
    """Nothing else waiting: the writes of one pass of the loop commit together on the
    loop's own thread, with no hand-off to the writer thread and back."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"), poll_interval=_NO_POLL)
    try:
        assert await store._execute(_thread_id, writes=True) == threading.get_ident()
        before = dict(store.stats)
        threads = await asyncio.gather(
            *(store._execute(_thread_id, writes=True) for _ in range(20))
        )
        assert set(threads) == {threading.get_ident()}
        assert store.stats["loop_batches"] == before["loop_batches"] + 1
        assert store.stats["thread_batches"] == before["thread_batches"]
    finally:
        await store.close()


@pytest.mark.parametrize("writes", [True, False], ids=["write", "read"])
async def test_work_goes_to_the_store_threads_while_the_loop_has_other_work(
    tmp_path: Path, writes: bool
) -> None:
    store = SqliteStore(os.path.join(tmp_path, "store.db"), poll_interval=_NO_POLL)
    stop = False

    async def busy() -> None:
        while not stop:
            await asyncio.sleep(0)  # always a callback ready

    spinner = asyncio.create_task(busy())
    try:
        await asyncio.sleep(0)
        assert await store._execute(_thread_id, writes=writes) != threading.get_ident()
        assert store.stats["thread_batches"] == int(writes)
        assert store.stats["loop_reads"] == 0
    finally:
        stop = True
        await spinner
        await store.close()


async def test_a_write_never_blocks_the_loop_behind_another_connections_lock(
    tmp_path: Path,
) -> None:
    """Another process holds the write lock: the write waits on the writer thread, and
    the event loop goes on meanwhile. (The write before ran on the loop, which leaves the
    connection's busy timeout off: the thread must turn it back on to wait.)"""
    path = os.path.join(tmp_path, "store.db")
    store = SqliteStore(path, poll_interval=_NO_POLL)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        assert await store._execute(_thread_id, writes=True) == threading.get_ident()
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(1.0, other.execute, ["COMMIT"])
        release.start()
        write = asyncio.create_task(store._execute(_thread_id, writes=True))
        began = time.monotonic()
        await asyncio.sleep(0.05)
        assert time.monotonic() - began < 0.5, "the event loop was blocked"
        assert not write.done()
        assert await write != threading.get_ident()
        assert time.monotonic() - began >= 0.9  # it did wait for the lock
        release.join()
    finally:
        other.close()
        await store.close()


async def _close_many(path: str, runs: int) -> dict[str, list[Any]]:
    """Start ``runs`` runs, then close them all with completions gathered into one
    batch (one of them with a lease it lost); the tables as they are afterwards."""
    store = SqliteStore(path, poll_interval=_NO_POLL)
    try:
        for i in range(runs):
            await store.start_run(
                NewRun("default", f"wf{i}", f"run-{i:02}", "Flow", "q", [i], f"r{i}", 7, 100.0)
            )
        tasks = await store.claim_workflow_tasks("q", "w1", runs, 200.0, 100.0)
        tasks[3].token = "lost"
        completions = [
            WorkflowTaskCompletion(
                task=task,
                events=[(WORKFLOW_COMPLETED, {"result": task.run_id})],
                inputs_through=1,
                close=RunClose(status="completed", result=task.run_id),
            )
            for task in tasks
        ]
        results = await asyncio.gather(
            *(store.complete_workflow_task(c, "w1", 150.0) for c in completions),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == [
            "StaleTaskError" if i == 3 else "WorkflowTaskResult" for i in range(runs)
        ]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        return {
            table: conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()
            for table, columns in [
                ("runs", "*"),
                ("history", "*"),
                ("workflow_tasks", "run_id, task_queue, visible_at, attempt"),
            ]
        }
    finally:
        conn.close()


async def test_closing_completions_run_as_one_group_with_the_same_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of closing completions runs as one set-based operation (``together``),
    and leaves the database exactly as running them one by one does."""
    groups = count_groups(monkeypatch)
    grouped = await _close_many(os.path.join(tmp_path, "grouped.db"), 20)
    assert groups == [20]  # one group, the lost lease among them

    run_nothing_together(monkeypatch)
    alone = await _close_many(os.path.join(tmp_path, "alone.db"), 20)
    assert alone == grouped
    assert [row[5] for row in grouped["runs"]].count("completed") == 19


async def test_reads_of_an_idle_loop_run_on_it(tmp_path: Path) -> None:
    """Nothing else waiting: a read runs on the loop's own thread, with no hand-off to
    the reader thread and back."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"), poll_interval=_NO_POLL)
    try:
        assert await store._execute(_thread_id, writes=False) == threading.get_ident()
        assert store.stats["loop_reads"] == 1
    finally:
        await store.close()


def _long_count() -> Op[tuple[int, int]]:
    row = yield Stmt(
        ONE,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
        "SELECT count(*) FROM c",
        (2_000_000,),
    )
    return threading.get_ident(), int(row[0])


async def test_a_long_read_is_handed_from_the_loop_to_the_reader_thread(tmp_path: Path) -> None:
    """A read that would hold an idle loop longer than its small budget is interrupted
    there and run again, to the end, on the reader thread; the loop goes on meanwhile."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"), poll_interval=_NO_POLL)
    try:
        began = time.monotonic()
        read = asyncio.create_task(store._execute(_long_count, writes=False))
        await asyncio.sleep(0.01)
        assert time.monotonic() - began < 0.1, "the event loop was blocked"
        thread, count = await read
        assert count == 2_000_000
        assert thread != threading.get_ident()
        assert store.stats["loop_reads"] == 0
    finally:
        await store.close()


async def test_a_malformed_completion_fails_alone_not_its_batch(tmp_path: Path) -> None:
    """Completions batched together: one that cannot even be looked at (no events
    list) fails by itself; the good one beside it commits."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"), poll_interval=_NO_POLL)
    try:
        for i in (1, 2):
            await store.start_run(
                NewRun("default", f"w{i}", f"r{i}", "F", "q", [], f"q{i}", 1, 1.0)
            )
        bad_task, good_task = await store.claim_workflow_tasks("q", "w", 10, 100.0, 1.0)
        close = RunClose(status="completed", result=1)
        bad = WorkflowTaskCompletion(task=bad_task, events=None, inputs_through=1, close=close)  # type: ignore[arg-type]
        good = WorkflowTaskCompletion(
            task=good_task, events=[(WORKFLOW_COMPLETED, {})], inputs_through=1, close=close
        )
        results = await asyncio.wait_for(
            asyncio.gather(
                store.complete_workflow_task(bad, "w", 2.0),
                store.complete_workflow_task(good, "w", 2.0),
                return_exceptions=True,
            ),
            5,
        )
        assert isinstance(results[0], TypeError)
        assert not isinstance(results[1], BaseException)
        assert (await store.get_run("default", "w2", None)).status == "completed"
        assert (await store.get_run("default", "w1", None)).status == "running"
    finally:
        await store.close()


def _insert(key: str) -> Op[None]:
    yield Stmt(WRITE, "INSERT INTO workers VALUES ('q', ?, '{}', '[]', 1.0)", (key,))


def _rolled_back_by_sqlite() -> Op[None]:
    # As SQLite does by itself on some errors (a full disk, an I/O error).
    yield Stmt(WRITE, "ROLLBACK", ())
    raise sqlite3.OperationalError("database or disk is full")


def test_a_transaction_sqlite_rolled_back_fails_the_batch_and_commits_nothing(
    tmp_path: Path,
) -> None:
    """When SQLite ends the batch's transaction by itself, no operation after it may
    commit on its own (autocommit) while the batch is reported failed: all fail, and
    nothing of the batch is in the database, so retrying them applies each once."""
    path = os.path.join(tmp_path, "store.db")
    conn = sqlite_batches.connect(path)
    try:
        writer = sqlite_batches.BatchWriter(conn)
        batch = [
            sqlite_batches.Request(partial(_insert, "before"), writes=True),
            sqlite_batches.Request(_rolled_back_by_sqlite, writes=True),
            sqlite_batches.Request(partial(_insert, "after"), writes=True),
        ]
        outcomes, _, _ = writer.run(batch)
        assert [ok for ok, _ in outcomes] == [False, False, False]
        assert all(isinstance(e, StoreError) and e.retryable for _, e in outcomes)
        assert conn.execute("SELECT identity FROM workers").fetchall() == []
    finally:
        conn.close()


def test_a_data_version_that_cannot_be_read_counts_as_another_processs_commit(
    tmp_path: Path,
) -> None:
    """Reading ``data_version`` may fail (busy while another process recovers the WAL
    after a crash, with the busy timeout off): the writer then says that something may
    have changed, so that waiters look, instead of raising in the writer's thread."""
    conn = sqlite_batches.connect(os.path.join(tmp_path, "store.db"))
    writer = sqlite_batches.BatchWriter(conn)
    assert writer.others_committed() is False
    conn.close()  # reading it now fails with an sqlite3.Error, as a busy database would
    assert writer.others_committed() is True
