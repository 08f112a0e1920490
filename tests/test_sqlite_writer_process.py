"""The SQLite store with its writer in a process of its own (``?writer=process``)."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether import Client, Worker, activity, workflow
from tether._runtime.connection import open_store
from tether._store.sqlite import SqliteStore
from tether.exceptions import InvalidArgumentError, StoreError, WorkflowAlreadyStartedError


@activity.defn
async def add_one(x: int) -> int:
    return x + 1


@workflow.defn
class Chain:
    def __init__(self) -> None:
        self.bonus = 0

    @workflow.signal
    def add(self, n: int) -> None:
        self.bonus += n

    @workflow.run
    async def run(self, x: int) -> int:
        for _ in range(3):
            x = await workflow.execute_activity(add_one, x, start_to_close_timeout=10)
        await asyncio.sleep(0.05)  # a durable timer
        await workflow.wait_condition(lambda: self.bonus > 0)
        return x + self.bonus


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _writer_pid(client: Client) -> int:
    store = client.store
    assert isinstance(store, SqliteStore) and store.process_writer is not None
    pid = store.process_writer.pid
    assert pid is not None and pid != os.getpid()
    return pid


async def test_workflows_run_with_the_writer_in_its_own_process(tmp_path: Path) -> None:
    client = await Client.connect(f"sqlite:///{tmp_path}/t.db?writer=process")
    try:
        writer = _writer_pid(client)
        assert _alive(writer)
        async with Worker(client, task_queue="q", workflows=[Chain], activities=[add_one]):
            handles = [
                await client.start_workflow(Chain, i, id=f"c{i}", task_queue="q") for i in range(20)
            ]
            for h in handles:
                await h.signal(Chain.add, 100)
            results = await asyncio.gather(*(h.result() for h in handles))
        assert results == [i + 3 + 100 for i in range(20)]
        # An error raised in the writer process reaches the caller with its details.
        with pytest.raises(WorkflowAlreadyStartedError) as caught:
            await client.start_workflow(
                Chain, 0, id="c0", task_queue="q", id_reuse_policy="reject_duplicate"
            )
        assert caught.value.workflow_id == "c0"
    finally:
        await client.close()
    deadline = time.monotonic() + 10
    while _alive(writer) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _alive(writer), "the writer process outlived its store"


async def test_a_lost_writer_process_fails_its_batch_and_is_replaced(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/t.db?writer=process")
    assert isinstance(store, SqliteStore) and store.process_writer is not None
    try:
        first = store.process_writer.pid
        assert first is not None
        await store.register_worker("q", "w", {}, [], 1.0)
        os.kill(first, signal.SIGKILL)
        outcome: list[object] = []
        for _ in range(3):  # the batch the dead child held fails; a new child takes the next
            try:
                await store.register_worker("q", "w", {}, [], 2.0)
                outcome.append("ok")
                break
            except StoreError as e:
                assert e.retryable
                outcome.append(e)
        assert outcome[-1] == "ok"
        assert store.process_writer.pid not in (None, first)
        # Both registrations were committed by the writer processes: the second one's
        # time is the one recorded.
        assert await store.workflows_served("q", 1.5) == {}
    finally:
        await store.close()


_PARENT = """
import asyncio, sys
from tether._runtime.connection import open_store

async def main():
    store = await open_store(sys.argv[1])
    await store.register_worker("q", "w", {}, [], 1.0)
    print(store.process_writer.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_writer_process_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, f"sqlite:///{tmp_path}/t.db?writer=process"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        writer = int(parent.stdout.readline())
        assert _alive(writer)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(writer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(writer), "the writer process outlived its killed parent"
    finally:
        parent.kill()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///t.db?writer=fork", "writer='fork' is not one of thread, process"),
        ("sqlite:///t.db?journal=off", "unknown option 'journal'"),
        ("sqlite:///:memory:?writer=process", "in-memory SQLite store cannot have its writer"),
    ],
)
async def test_bad_sqlite_url_options_are_refused(
    url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match=message):
        await open_store(url)
    assert not (tmp_path / "t.db").exists()


async def test_the_writer_process_leaves_ctrl_c_to_its_parent(tmp_path: Path) -> None:
    """SIGINT goes to a terminal's whole process group: the parent shuts down
    gracefully, and its writer must keep serving it meanwhile."""
    store = await open_store(f"sqlite:///{tmp_path}/t.db?writer=process")
    assert isinstance(store, SqliteStore) and store.process_writer is not None
    try:
        await store.register_worker("q", "w", {}, [], 1.0)
        child = store.process_writer.pid
        assert child is not None
        os.kill(child, signal.SIGINT)
        await asyncio.sleep(0.2)
        assert _alive(child)
        await store.register_worker("q", "w", {}, [], 2.0)
        assert store.process_writer.pid == child
    finally:
        await store.close()


async def test_a_store_whose_writer_process_died_closes_cleanly(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/t.db?writer=process")
    assert isinstance(store, SqliteStore) and store.process_writer is not None
    await store.register_worker("q", "w", {}, [], 1.0)
    child = store.process_writer.pid
    assert child is not None
    os.kill(child, signal.SIGKILL)
    await store.close()  # no error, and no new child started for the close
    assert store.process_writer.pid is None
    with pytest.raises(StoreError, match="closed"):
        await store.register_worker("q", "w", {}, [], 2.0)


def test_the_writer_child_loads_the_store_alone_not_the_public_api() -> None:
    """The child's program imports only what the writer needs (the store's modules):
    the package's public API (client, worker, pydantic models) would add a third to
    the start-up that a restarted worker waits for."""
    from tether._store import sqlite_writer_process

    program = sqlite_writer_process._CHILD_MAIN.replace(
        "import main; main()",
        "import main; from tether._store.sqlite import SqliteStore; "
        "print(sorted(m for m in sys.modules if m.startswith('tether')))",
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    ).stdout
    loaded = ast.literal_eval(out)  # a printed list of module names
    assert "tether._store.sqlite_batches" in loaded
    assert not {"tether.client", "tether.worker", "tether._runtime"} & set(loaded), loaded
