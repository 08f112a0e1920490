"""Cross-process commit wake-ups of the SQLite store (``tether._store.sqlite_wakeup``).

Real SQLite files, real Unix sockets, and one real second process: its commits must
wake this process's ``change_waiter()`` in well under the safety-net poll interval,
and once it is killed with SIGKILL the socket file it leaves behind is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tether._store.base import Change, NewRun
from tether._store.sqlite import SqliteStore
from tether._store.sqlite_wakeup import SAFETY_POLL, CommitWakeup

SRC = Path(__file__).resolve().parent.parent / "src"
SLOW_POLL = 5.0  # polling alone would take seconds: only the socket can explain a fast wake

# Opens a store on argv[1]; for every line on stdin starts a run (a commit that makes a
# workflow task ready), then prints when.
CHILD = """
import asyncio, sys, time
from tether._store.base import NewRun
from tether._store.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.register_worker("q", "child", {}, [], 0.0)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    n = 0
    while await loop.run_in_executor(None, sys.stdin.readline):
        n += 1
        await store.start_run(NewRun(
            namespace="default", workflow_id=f"child-{n}", run_id=f"child-run-{n}",
            workflow_type="Flow", task_queue="q", args=[], request_id=f"child-{n}",
            seed=1, now=0.0,
        ))
        print(time.monotonic(), flush=True)

asyncio.run(main())
"""


def sockets(db: Path) -> set[str]:
    return set(os.listdir(f"{db}-wake"))


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def bound(db: Path, count: int) -> set[str]:
    """Wait until ``count`` entries (the stores' sockets) are in the wake-up directory.

    Writer threads bind them as they start. (Waiting on a commit of the store's own
    instead would let that commit's notification wake the store's next waiter.)
    """
    await eventually(lambda: os.path.isdir(f"{db}-wake") and len(sockets(db)) >= count)
    return sockets(db)


async def commit(store: SqliteStore, now: float = 0.0) -> None:
    """Commit a change that makes a workflow task ready (a new run)."""
    n = next(_runs)
    await store.start_run(
        NewRun(
            namespace="default",
            workflow_id=f"here-{n}",
            run_id=f"here-run-{n}",
            workflow_type="Flow",
            task_queue="q",
            args=[],
            request_id=f"here-{n}",
            seed=1,
            now=now,
        )
    )


_runs = itertools.count()


async def test_another_process_commit_wakes_waiters_at_once(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(str(db), poll_interval=SLOW_POLL)
    ours = await bound(db, 1)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(db),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"ready\n"
        (theirs,) = await bound(db, 2) - ours
        latencies = []
        for _ in range(7):
            waiter = store.change_waiter(Change.WORKFLOW_TASK)
            unrelated = store.change_waiter(Change.QUERY | Change.RUN_CLOSED)
            child.stdin.write(b"go\n")
            await asyncio.wait_for(waiter, SLOW_POLL / 2)
            # The wake-up says what the commit touched: waiters for other work sleep on.
            assert not unrelated.done()
            woke = time.monotonic()
            committed = float(await asyncio.wait_for(child.stdout.readline(), 10))
            latencies.append(woke - committed)
        assert statistics.median(latencies) < 0.03, latencies

        child.send_signal(signal.SIGKILL)
        await child.wait()
        assert theirs in sockets(db)  # left behind
        await commit(store, 1.0)  # sending to it finds nobody there: removed
        await eventually(lambda: sockets(db) == ours)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await store.close()
    assert not db.with_name("store.db-wake").exists()  # the last store out removes it


async def test_stale_socket_and_foreign_files(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    wake_dir = tmp_path / "store.db-wake"
    wake_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(wake_dir / "999999-deadbeef"))
    stale.close()  # as if its process was killed: the file stays, nobody reads it
    (wake_dir / "notes.txt").write_text("not ours")
    a = SqliteStore(str(db))
    b = SqliteStore(str(db), poll_interval=SLOW_POLL)
    try:
        await bound(db, 4)  # a, b, the stale socket and notes.txt
        waiter = b.change_waiter()
        started = time.monotonic()
        await commit(a)
        await asyncio.wait_for(waiter, SLOW_POLL / 2)
        assert time.monotonic() - started < 1.0
        await eventually(lambda: not (wake_dir / "999999-deadbeef").exists())
        assert (wake_dir / "notes.txt").exists()
    finally:
        await a.close()
        await b.close()
    assert sorted(os.listdir(wake_dir)) == ["notes.txt"]


async def test_path_too_long_for_a_socket_address(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    db = deep / "store.db"
    linux = sys.platform.startswith("linux")
    a = SqliteStore(str(db))
    b = SqliteStore(str(db), poll_interval=SLOW_POLL if linux else 0.05)
    try:
        if linux:  # addressed through /proc/self/fd/<fd of the directory>
            await bound(db, 2)
        else:
            await commit(b)
            await asyncio.sleep(0.1)  # its own commit's notification is behind us
        waiter = b.change_waiter()
        started = time.monotonic()
        await commit(a, 1.0)
        await asyncio.wait_for(waiter, SLOW_POLL / 2)
        assert time.monotonic() - started < 1.0
    finally:
        await a.close()
        await b.close()
    assert not (deep / "store.db-wake").exists()


async def test_writer_without_wakeups_is_noticed_by_the_poll(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(str(db))
    try:
        await bound(db, 1)
        waiter = store.change_waiter()
        conn = sqlite3.connect(db, isolation_level=None)  # like the sqlite3 shell
        conn.execute(
            "INSERT INTO workers (task_queue, identity, workflow_types, activity_types, "
            "last_seen) VALUES ('q', 'cli', '{}', '[]', 0)"
        )
        conn.close()
        await asyncio.wait_for(waiter, 5 * SAFETY_POLL + 1)
    finally:
        await store.close()


def test_poll_interval_is_slow_until_a_commit_comes_unannounced(tmp_path: Path) -> None:
    woken = threading.Event()
    db = str(tmp_path / "x.db")
    a = CommitWakeup(db, lambda changes: woken.set(), fast_poll=0.01)
    b = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    try:
        assert a.active and b.active
        assert a.poll_interval == SAFETY_POLL
        a.polled(changed=False)
        assert a.poll_interval == SAFETY_POLL
        b.committed()
        assert woken.wait(5)
        a.polled(changed=True)  # announced by b's wake-up
        assert a.poll_interval == SAFETY_POLL
        a.polled(changed=True)  # nobody said anything: an old or foreign writer
        assert a.poll_interval == 0.01
    finally:
        a.close()
        b.close()
    assert not os.path.exists(db + "-wake")


def test_no_socket_means_fast_polling(tmp_path: Path) -> None:
    memory = CommitWakeup(":memory:", lambda changes: None, fast_poll=0.01)
    (tmp_path / "x.db-wake").write_text("a file where the directory should be")
    blocked = CommitWakeup(str(tmp_path / "x.db"), lambda changes: None, fast_poll=0.01)
    for wakeup in (memory, blocked):
        assert not wakeup.active
        assert wakeup.poll_interval == 0.01
        wakeup.committed()  # nothing to do, nothing raised
        wakeup.close()


def test_kinds_refused_by_a_full_queue_are_sent_later(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    sender = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a peer that is not reading
    busy.bind(f"{db}-wake/{os.getpid()}-0000beef")
    busy.setblocking(False)
    try:
        for _ in range(1000):  # fill its queue with one kind of change
            sender.committed(Change.HISTORY)
        sender.committed(Change.WORKFLOW_TASK)  # refused: the queue is full

        def drain() -> int:
            got = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    got |= busy.recv(64)[0]
            return got

        assert drain() == Change.HISTORY
        sender.polled(changed=False)  # the next idle poll sends what was refused
        assert drain() & Change.WORKFLOW_TASK
    finally:
        busy.close()
        sender.close()


def test_a_running_loop_takes_wake_ups_itself_until_it_closes(tmp_path: Path) -> None:
    """Attached, the loop reads the socket (one thread wake-up per hop, not two); once
    that loop has closed, the listener thread takes over (it looks every safety-poll
    interval, whatever the writer does)."""
    db = str(tmp_path / "x.db")
    woken_on: list[str] = []
    got = threading.Event()

    def on_wake(changes: int) -> None:
        woken_on.append(threading.current_thread().name)
        got.set()

    ours = CommitWakeup(db, on_wake, fast_poll=0.01)
    theirs = CommitWakeup(db, lambda changes: None, fast_poll=0.01)

    async def on_a_loop() -> None:
        ours.attach(asyncio.get_running_loop())
        theirs.committed(Change.WORKFLOW_TASK)
        await eventually(got.is_set)

    try:
        asyncio.run(on_a_loop())
        assert woken_on == [threading.current_thread().name]
        got.clear()
        theirs.committed(Change.WORKFLOW_TASK)
        assert got.wait(5)
        assert woken_on[1] == "tether-sqlite-wakeup"
    finally:
        ours.close()
        theirs.close()
    assert not os.path.exists(db + "-wake")


async def test_closed_from_another_thread_while_a_loop_watches(tmp_path: Path) -> None:
    """The watching loop takes its socket out of its selector itself: the next reader
    registered under the same descriptor number must work."""
    db = str(tmp_path / "x.db")
    wakeup = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    wakeup.attach(asyncio.get_running_loop())
    await asyncio.to_thread(wakeup.close)
    await asyncio.sleep(0)  # the loop's own part of the close
    left, right = socket.socketpair()  # likely the closed socket's number
    try:
        readable = asyncio.Event()
        asyncio.get_running_loop().add_reader(left, readable.set)
        right.send(b"x")
        await asyncio.wait_for(readable.wait(), 5)
        asyncio.get_running_loop().remove_reader(left)
    finally:
        left.close()
        right.close()
    assert not os.path.exists(db + "-wake")


def test_a_store_used_on_one_loop_then_another_is_woken_on_both(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(str(db), poll_interval=SLOW_POLL)
    other = SqliteStore(str(db), poll_interval=SLOW_POLL)

    async def woken_by_the_other() -> float:
        await bound(db, 2)
        waiter = store.change_waiter(Change.WORKFLOW_TASK)
        started = time.monotonic()
        await asyncio.to_thread(asyncio.run, commit(other))
        await asyncio.wait_for(waiter, SLOW_POLL / 2)
        return time.monotonic() - started

    try:
        assert asyncio.run(woken_by_the_other()) < 1.0
        assert asyncio.run(woken_by_the_other()) < 1.0  # a new loop: it watches now
    finally:
        asyncio.run(store.close())
        asyncio.run(other.close())


def test_a_stopped_loop_keeps_no_stale_registration_of_a_closed_socket(tmp_path: Path) -> None:
    """A loop run step by step (``run_until_complete`` per use, as a test runner with a
    shared loop does) watched the socket, and the wake-up closed while that loop was
    stopped: a new socket given the same descriptor number must be watchable on it
    (a stale registration in the selector would hide it)."""
    db = str(tmp_path / "x.db")
    loop = asyncio.new_event_loop()
    wakeup = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    try:

        async def attach() -> None:
            wakeup.attach(asyncio.get_running_loop())

        loop.run_until_complete(attach())
        assert wakeup._sock is not None
        number = wakeup._sock.fileno()
        wakeup.polled(changed=False)
        wakeup.close()  # from this thread, while the loop is stopped
        left, right = socket.socketpair()
        if left.fileno() == number:
            reused = left
        else:  # put a new socket under the closed one's number
            os.dup2(left.fileno(), number)
            reused = socket.socket(fileno=number)
        try:

            async def readable() -> None:
                ready = asyncio.Event()
                asyncio.get_running_loop().add_reader(reused, ready.set)
                right.send(b"x")
                await asyncio.wait_for(ready.wait(), 5)
                asyncio.get_running_loop().remove_reader(reused)

            loop.run_until_complete(readable())
        finally:
            for sock in {reused, left, right}:
                sock.close()
    finally:
        loop.close()


def test_loops_that_came_and_went_leave_no_descriptors_behind(tmp_path: Path) -> None:
    """A long-lived store waited on from many short-lived loops (``asyncio.run`` per
    request): each closed loop's duplicate of the socket is closed at the next attach."""
    store = SqliteStore(str(tmp_path / "store.db"))

    async def wait_a_moment() -> None:
        waiter = store.change_waiter(Change.WORKFLOW_TASK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, 0.001)

    try:
        asyncio.run(wait_a_moment())
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            asyncio.run(wait_a_moment())
        assert len(os.listdir("/proc/self/fd")) <= before + 1
    finally:
        asyncio.run(store.close())


async def test_a_wake_up_the_busy_loop_has_not_read_yet_counts_as_announced(
    tmp_path: Path,
) -> None:
    """The writer's idle poll may see another process's commit before the (busy) loop
    has read that commit's wake-up: a byte waiting in the socket means it was
    announced, so the store keeps polling slowly."""
    db = str(tmp_path / "x.db")
    ours = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    theirs = CommitWakeup(db, lambda changes: None, fast_poll=0.01)
    try:
        ours.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.05)  # the listener thread has stopped watching
        theirs.committed(Change.WORKFLOW_TASK)
        time.sleep(0.05)  # queued, and this loop is busy: nobody has read it
        ours.polled(changed=True)
        assert ours.poll_interval == SAFETY_POLL
    finally:
        ours.close()
        theirs.close()
