"""The SQLite store with its writer in a process of its own (``?writer=process``)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tether import Client, Worker, activity, workflow
from tether._runtime.connection import open_store
from tether._store import sqlite as sqlite_module
from tether._store import sqlite_writer_process as writer_process
from tether._store.base import NewRun
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
        ("sqlite:///t.db?writer=fork", "writer='fork' is not one of auto, thread, process"),
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


async def test_store_operations_travel_as_method_names_and_arguments(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "store.db"), writer="thread")
    try:
        run = NewRun(
            namespace="default",
            workflow_id="w1",
            run_id="r1",
            workflow_type="Chain",
            task_queue="q",
            args=[1],
            request_id="req-1",
            seed=7,
            now=1.0,
        )
        make = functools.partial(store._start_run, run)
        wire = writer_process._on_the_wire(make)
        assert wire == ("_start_run", (run,))
        # On the writer's side: the same method of that side's store, same arguments.
        back = writer_process._from_the_wire(pickle.loads(pickle.dumps(wire)), store)
        assert isinstance(back, functools.partial)
        assert back.func == store._start_run and back.args == (run,)
        # Anything else goes as itself.
        keyed = functools.partial(store._start_run, run=run)
        assert writer_process._on_the_wire(keyed) is keyed
        assert writer_process._from_the_wire(keyed, store) is keyed
    finally:
        await store.close()


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


# -- writer="auto": from the thread into a process under sustained load -------------------


def _new_run(i: int) -> NewRun:
    return NewRun(
        namespace="default",
        workflow_id=f"wf{i}",
        run_id=f"run-{i}",
        workflow_type="Flow",
        task_queue="q",
        args=[i],
        request_id=f"req-{i}",
        seed=i,
        now=1_000_000.0,
    )


async def _signals_to_first_run(store: SqliteStore) -> list[Any]:
    """The arguments of the signals run ``run--1`` received, in the order committed."""
    history = await store.read_history("run--1")
    return [e.data["args"][0] for e in history if e.type == "SignalReceived"]


@pytest.fixture
def quick_to_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """An auto writer moves after two windows of 50 ms with 20 writes or more each."""
    monkeypatch.setattr(sqlite_module, "_LOAD_WINDOW_S", 0.05)
    monkeypatch.setattr(sqlite_module, "_PROMOTE_AFTER_S", 0.1)
    monkeypatch.setattr(sqlite_module, "_PROMOTE_WRITES_PER_S", 400)


async def _load(store: SqliteStore, runs: range, until: asyncio.Event) -> int:
    """Start runs in waves of 20 until ``until`` is set (and a few waves more)."""
    started = 0
    after = 5
    for first in range(runs.start, runs.stop, 20):
        wave = [_new_run(i) for i in range(first, min(first + 20, runs.stop))]
        await asyncio.gather(*(store.start_run(r) for r in wave))
        started += len(wave)
        if until.is_set():
            after -= 1
            if after == 0:
                break
    return started


async def test_an_auto_writer_moves_into_a_process_under_load_in_order(
    tmp_path: Path, quick_to_move: None
) -> None:
    """Under sustained load the default writer leaves its thread for a process. Writes
    acknowledged before, during and after the move are all there, and writes that
    follow one another commit in that order (signals to one run keep their order)."""
    store = SqliteStore(os.path.join(tmp_path, "t.db"))  # writer="auto", the default
    try:
        await store.start_run(_new_run(-1))
        moved = asyncio.Event()
        signals_sent = 0

        async def signal_in_turn() -> None:
            nonlocal signals_sent
            while not moved.is_set() or signals_sent < 300:
                await store.signal_run("default", "wf-1", None, "n", [signals_sent], 1e6)
                signals_sent += 1
                if store.process_writer is not None:
                    moved.set()

        signaller = asyncio.create_task(signal_in_turn())
        started = await _load(store, range(20_000), moved)
        await asyncio.wait_for(signaller, 30)
        assert store.process_writer is not None and store.process_writer.pid is not None
        assert not store._writer_thread.is_alive()
        runs = await store.list_runs("default", limit=100_000)
        assert len(runs) == started + 1
        assert await _signals_to_first_run(store) == list(range(signals_sent))
    finally:
        await store.close()


async def test_a_thread_writer_stays_in_its_thread_under_load(
    tmp_path: Path, quick_to_move: None
) -> None:
    store = SqliteStore(os.path.join(tmp_path, "t.db"), writer="thread")
    try:
        deadline = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, deadline.set)
        started = await _load(store, range(100_000), deadline)
        assert started > 400  # the load an auto writer moves under (see above)
        assert store.process_writer is None and store._writer_thread.is_alive()
    finally:
        await store.close()


def _writer_children() -> list[int]:
    """This process's children that are SQLite writer processes (and still running)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"sqlite_writer" in cmdline:
            found.append(int(entry))
    return found


async def _writer_children_after(seconds: float) -> list[int]:
    """The writer children still running after waiting up to ``seconds`` for them to go."""
    deadline = time.monotonic() + seconds
    while _writer_children() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _writer_children()


async def _runs_in_file(path: str) -> set[str]:
    """The ids of the runs in the store file at ``path``, read by a store of its own."""
    reopened = SqliteStore(path, writer="thread")
    try:
        return {r.run_id for r in await reopened.list_runs("default", limit=100_000)}
    finally:
        await reopened.close()


@pytest.mark.parametrize("close_after", [0.0, 0.05, 0.5])
async def test_a_store_closed_while_its_writer_moves_loses_nothing_acknowledged(
    tmp_path: Path, close_after: float
) -> None:
    """Closing during the move: every write either was acknowledged and is in the file,
    or failed as never started; no writer process is left behind."""
    path = os.path.join(tmp_path, "t.db")
    store = SqliteStore(path)
    await store.start_run(_new_run(-1))
    store._move = asyncio.get_running_loop().create_task(store._promote())
    writes = [asyncio.create_task(store.start_run(_new_run(i))) for i in range(300)]
    await asyncio.sleep(close_after)
    await store.close()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    failed = {i for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
    for i in failed:
        assert isinstance(outcomes[i], StoreError) and "closed" in str(outcomes[i])
    assert await _writer_children_after(5) == []
    in_file = await _runs_in_file(path)
    assert in_file == {"run--1"} | {f"run-{i}" for i in range(300) if i not in failed}


async def test_a_moved_writer_runs_on_the_home_loop_and_closes_from_any_loop(
    tmp_path: Path,
) -> None:
    """The moved writer belongs to the store's home loop (not to whichever loop writes
    first), and a close from another thread's loop answers the home loop's writes in
    flight: each is either in the file or failed, none left waiting."""
    path = os.path.join(tmp_path, "t.db")
    store = SqliteStore(path)
    await store.start_run(_new_run(-1))
    await store._promote()
    assert store.process_writer is not None
    assert store.process_writer.loop is asyncio.get_running_loop()
    writes = [asyncio.ensure_future(store.start_run(_new_run(i))) for i in range(1000)]
    await asyncio.sleep(0)
    closer = asyncio.get_running_loop().run_in_executor(None, asyncio.run, store.close())
    outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
    await closer
    acknowledged = {f"run-{i}" for i, o in enumerate(outcomes) if not isinstance(o, Exception)}
    assert all(isinstance(o, StoreError) for o in outcomes if isinstance(o, Exception))
    in_file = await _runs_in_file(path)
    assert acknowledged | {"run--1"} <= in_file


async def test_a_move_cancelled_halfway_still_finishes(tmp_path: Path) -> None:
    """Once the writer thread is told to stop, the move completes even if its task is
    cancelled (an ending event loop, a timed-out close): writes keep working."""
    store = SqliteStore(os.path.join(tmp_path, "t.db"))
    try:
        await store.start_run(_new_run(-1))
        store._writer_lock.acquire()  # the thread stops at its next batch: held there
        try:
            queued = asyncio.ensure_future(store.start_run(_new_run(0)))
            promotion = asyncio.get_running_loop().create_task(store._promote())
            while store._held is None:  # the child is up; the thread is being stopped
                await asyncio.sleep(0.005)
            held = [asyncio.ensure_future(store.start_run(_new_run(i))) for i in (1, 2)]
            await asyncio.sleep(0.01)
            promotion.cancel()
        finally:
            store._writer_lock.release()
        await asyncio.wait_for(asyncio.gather(queued, *held), 10)
        await asyncio.wait_for(store.start_run(_new_run(3)), 10)
        assert store.process_writer is not None and not store._writer_thread.is_alive()
        assert len(await store.list_runs("default")) == 5
    finally:
        await store.close()


@pytest.fixture
def quick_to_move_back(quick_to_move: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A moved writer moves back after two windows of 50 ms with 1 to 19 writes each."""
    monkeypatch.setattr(sqlite_module, "_LIGHT_WRITES_PER_S", (20, 400))
    monkeypatch.setattr(sqlite_module, "_DEMOTE_AFTER_S", 0.1)


async def test_a_moved_writer_moves_back_into_a_thread_when_the_load_is_light(
    tmp_path: Path, quick_to_move_back: None
) -> None:
    """After the burst, sequential work brings the writer back into a thread (no hop
    between processes per write); writes before, during and after keep their order."""
    store = SqliteStore(os.path.join(tmp_path, "t.db"))
    try:
        await store.start_run(_new_run(-1))
        moved = asyncio.Event()
        mover = asyncio.create_task(_load(store, range(20_000), moved))
        while store.process_writer is None:
            await asyncio.sleep(0.01)
        child = store.process_writer.pid
        moved.set()
        started = await mover
        signals_sent = 0
        deadline = time.monotonic() + 10
        while store.process_writer is not None and time.monotonic() < deadline:
            await store.signal_run("default", "wf-1", None, "n", [signals_sent], 1e6)
            signals_sent += 1
            await asyncio.sleep(0.01)  # about 100 writes a second: light
        assert store.process_writer is None and store._writer_thread.is_alive()
        for _ in range(20):  # and after the move
            await store.signal_run("default", "wf-1", None, "n", [signals_sent], 1e6)
            signals_sent += 1
        assert child is not None and not _alive(child)
        assert len(await store.list_runs("default", limit=100_000)) == started + 1
        assert await _signals_to_first_run(store) == list(range(signals_sent))
    finally:
        await store.close()


async def test_an_idle_moved_writer_keeps_its_process(
    tmp_path: Path, quick_to_move_back: None
) -> None:
    """Idle is not light: a burst that follows an idle spell finds the process ready."""
    store = SqliteStore(os.path.join(tmp_path, "t.db"))
    try:
        await store.start_run(_new_run(-1))
        await store._promote()
        assert store.process_writer is not None
        await asyncio.sleep(0.5)  # ten windows without a write
        assert store.process_writer is not None and store.process_writer.pid is not None
    finally:
        await store.close()


@pytest.mark.parametrize("close_after", [0.0, 0.02, 0.5])
@pytest.mark.parametrize("from_other_loop", [False, True])
async def test_a_store_closed_while_its_writer_moves_back_loses_nothing_acknowledged(
    tmp_path: Path, close_after: float, from_other_loop: bool
) -> None:
    """Closing (from its own loop or another) while the writer moves back into a
    thread: every write was either acknowledged and is in the file, or failed; none is
    left waiting, and no writer process is left behind."""
    path = os.path.join(tmp_path, "t.db")
    store = SqliteStore(path)
    await store.start_run(_new_run(-1))
    await store._promote()
    assert store.process_writer is not None
    writes = [asyncio.ensure_future(store.start_run(_new_run(i))) for i in range(150)]
    store._move = asyncio.get_running_loop().create_task(store._demote())
    writes += [asyncio.ensure_future(store.start_run(_new_run(i))) for i in range(150, 300)]
    await asyncio.sleep(close_after)
    if from_other_loop:
        await asyncio.get_running_loop().run_in_executor(None, asyncio.run, store.close())
    else:
        await store.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
    failed = {i for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
    for i in failed:
        assert isinstance(outcomes[i], StoreError), outcomes[i]
    await asyncio.wait_for(asyncio.gather(store._move, return_exceptions=True), 10)
    assert await _writer_children_after(5) == []
    in_file = await _runs_in_file(path)
    acknowledged = {f"run-{i}" for i in range(300) if i not in failed}
    assert acknowledged | {"run--1"} <= in_file


async def test_closing_the_writer_process_twice_waits_for_the_first_close(
    tmp_path: Path,
) -> None:
    """A move back into a thread and a store's close may both close the process
    writer: the second waits for the first, and every write in flight is answered."""
    store = SqliteStore(os.path.join(tmp_path, "t.db"), writer="process")
    writer = store.process_writer
    assert writer is not None
    try:
        writes = [asyncio.ensure_future(store.start_run(_new_run(i))) for i in range(300)]
        await asyncio.sleep(0)  # queued: they go out with the first close
        await asyncio.wait_for(asyncio.gather(writer.close(), writer.close()), 10)
        outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
        assert not [o for o in outcomes if isinstance(o, BaseException)]
        assert writer.pid is None
    finally:
        await store.close()


async def test_the_loop_never_commits_ahead_of_writes_the_thread_has_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write handed to the writer thread (the loop was busy) and taken from its queue
    but not committed yet: a later write from the same loop, flushed when the loop is
    idle, must not commit on the loop ahead of it."""
    drain = SqliteStore._drain

    def slow_drain(q: Any, first: Any) -> Any:
        taken = drain(q, first)
        if threading.current_thread().name == "tether-sqlite-writer":
            time.sleep(0.05)  # between taking the batch and committing it
        return taken

    monkeypatch.setattr(SqliteStore, "_drain", staticmethod(slow_drain))
    store = SqliteStore(os.path.join(tmp_path, "t.db"), writer="thread")
    try:
        await store.start_run(_new_run(-1))
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(store.signal_run("default", "wf-1", None, "n", ["A"], 1e6))

        def busy(n: int = 3) -> None:  # the loop is not idle when A is flushed
            if n:
                loop.call_soon(busy, n - 1)

        busy()
        await asyncio.sleep(0.01)
        second = store.signal_run("default", "wf-1", None, "n", ["B"], 1e6)
        await asyncio.gather(first, second)
        assert await _signals_to_first_run(store) == ["A", "B"]
    finally:
        await store.close()


@pytest.mark.parametrize("direction", ["into a process", "back into a thread"])
def test_a_move_cut_short_by_its_loop_ending_leaves_a_working_writer(
    tmp_path: Path, direction: str
) -> None:
    """The home loop ends in the middle of a move (asyncio.run cancels every task, the
    shielded ones too): no write is left waiting, and the store keeps working from
    another loop with a writer thread, no process left behind."""
    path = os.path.join(tmp_path, "t.db")
    holder: dict[str, Any] = {}

    async def home() -> None:
        store = SqliteStore(path)
        holder["store"] = store
        await store.start_run(_new_run(-1))
        if direction == "into a process":
            # The thread stops at its next batch, held there until after the loop ends.
            store._writer_lock.acquire()
            let_go = threading.Timer(0.3, store._writer_lock.release)
        else:
            await store._promote()
            assert store.process_writer is not None and store.process_writer.pid is not None
            child = store.process_writer.pid
            os.kill(child, signal.SIGSTOP)  # it answers nothing until after the loop ends
            let_go = threading.Timer(0.3, os.kill, (child, signal.SIGCONT))
        writes = [asyncio.ensure_future(store.start_run(_new_run(i))) for i in range(200)]
        holder["writes"] = writes
        move = store._promote() if direction == "into a process" else store._demote()
        store._move = asyncio.get_running_loop().create_task(move)
        while store._held is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert not store._move.done()
        # (Counted from here, not from the start: a slow machine takes longer than the
        # hold to start the child.)
        let_go.start()
        # Return: the loop ends with the move under way.

    asyncio.run(home())
    store: SqliteStore = holder["store"]
    for write in holder["writes"]:
        assert write.done()  # committed, failed, or cancelled with the loop: none waiting
    assert store._held is None and store.process_writer is None

    async def elsewhere() -> None:
        try:
            outcome = await asyncio.wait_for(store.start_run(_new_run(1000)), 10)
            assert outcome.created
        finally:
            await asyncio.wait_for(store.close(), 10)

    asyncio.run(elsewhere())
    assert asyncio.run(_writer_children_after(10)) == []


async def test_a_write_queued_while_the_writer_child_is_gone_goes_to_a_new_one(
    tmp_path: Path,
) -> None:
    """The child died; a write accepted before the store's close still commits (a new
    child starts for it) rather than failing as if the store had been closed."""
    path = os.path.join(tmp_path, "t.db")
    store = SqliteStore(path, writer="process")
    await store.start_run(_new_run(-1))
    writer = store.process_writer
    assert writer is not None and writer.pid is not None
    os.kill(writer.pid, signal.SIGKILL)
    while writer._sock is not None:
        await asyncio.sleep(0.01)
    accepted = asyncio.ensure_future(store.start_run(_new_run(0)))
    await asyncio.sleep(0)  # queued in the writer, not yet sent
    await store.close()
    assert (await accepted).created
    assert await _runs_in_file(path) == {"run--1", "run-0"}


def test_held_writes_of_a_move_cut_short_go_before_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The home loop ends mid-move, with a write of another loop held: a write that loop
    sends after the move gave up still commits after the held one."""
    path = os.path.join(tmp_path, "t.db")
    other = asyncio.new_event_loop()
    threading.Thread(target=other.run_forever, daemon=True).start()
    holder: dict[str, Any] = {}

    async def home() -> None:
        store = SqliteStore(path)
        holder["store"] = store
        await store.start_run(_new_run(-1))
        store._writer_lock.acquire()  # the old thread cannot finish before the loop ends
        store._move = asyncio.get_running_loop().create_task(store._promote())
        while store._held is None:
            await asyncio.sleep(0.005)
        opens = store._open_writer_thread
        monkeypatch.setattr(store, "_open_writer_thread", lambda: (time.sleep(0.3), opens()))

        async def in_turn() -> list[Any]:
            first = asyncio.ensure_future(store.start_run(_new_run(1)))
            await asyncio.sleep(0)
            assert store._held is not None and len(store._held) == 1  # held by the move
            while store._held is not None:
                time.sleep(0.001)  # (blocks this loop: the next write comes right after)
            second = asyncio.ensure_future(store.start_run(_new_run(2)))
            return await asyncio.gather(first, second)

        holder["writes"] = asyncio.run_coroutine_threadsafe(in_turn(), other)
        await asyncio.sleep(0.05)
        threading.Timer(0.1, store._writer_lock.release).start()
        # Return: asyncio.run cancels every task, the shielded move too.

    asyncio.run(home())
    try:
        assert [o.created for o in holder["writes"].result(10)] == [True, True]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            order = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY rowid")]
        assert order == ["run--1", "run-1", "run-2"]
    finally:
        asyncio.run(holder["store"].close())
        other.call_soon_threadsafe(other.stop)
