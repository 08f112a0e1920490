"""SQLite store: the embedded default.

One writer connection commits in groups: callers queue operations, and its thread
runs every queued operation inside one transaction (one that fails after writing is
undone alone, the others' writes stay), commits once, and
only then resolves the callers' futures. Many state transitions share one fsync;
none is acknowledged before its commit is durable (WAL, ``synchronous=FULL``). A batch
of writes that tell no one anything (leases; workflow tasks that neither close their run
nor answer an update) commits with ``NORMAL`` (no fsync): losing it equals a crash
before it, and the next synced commit makes it durable too (the WAL is in order).
Where nothing else waits, the event loop commits a pass's writes itself, under the
same lock, rather than handing them to the thread (``_flush_on_loop``).

Other processes' commits wake this process's waiters through a Unix datagram
socket per store (``sqlite_wakeup``), so cross-process dispatch does not wait for a
poll; ``PRAGMA data_version``, polled every ``poll_interval`` without it and every
100 ms with it, notices the commits of writers that send no wake-ups.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from tether._store.changes import Change, ChangeWaiters
from tether._store.sql import SqlStore
from tether._store.sql_statements import Dialect, Op
from tether._store.sqlite_batches import BatchWriter, Outcome, Request, connect, store_error
from tether._store.sqlite_wakeup import CommitWakeup
from tether._store.sqlite_writer_process import ProcessWriter, writer_side_store
from tether.exceptions import InvalidArgumentError, StoreError

T = TypeVar("T")

logger = logging.getLogger("tether.store")

# The schema lives in migrations/sqlite/NNNN_*.sql (and the same change for PostgreSQL
# in migrations/postgres/): add a new numbered file to both to change it.

_MAX_BATCH = 512

_READ_ON_LOOP_BUDGET = 0.002
"""Seconds an idle event loop may spend running a read itself; a longer read is
interrupted there and left to the reader thread (a read is safe to run again)."""
_BUDGET_CHECK_STEPS = 1000
"""SQLite virtual-machine steps between two looks at that budget."""

WriterKind = Literal["auto", "thread", "process"]

_PROMOTE_WRITES_PER_S = 4000
"""``writer="auto"``: write operations per second that, sustained, move the writer into
a process of its own (sequential work such as one workflow at a time stays far below:
about 1,500 per second). Not higher: a slow machine putting 100,000 sleepers to bed
reached only 3,000-4,000, and kept its writer in the thread for their wake."""
_PROMOTE_AFTER_S = 2
"""For this many consecutive seconds."""
_LIGHT_WRITES_PER_S = (20, 2500)
"""A moved writer goes back to a thread once the write load stays within these bounds
(per second): work is going on, and little enough that a hop between processes per write
costs its callers more than a shared core does. An idle store (below the first) keeps
its process: nobody waits on it, and a burst that follows an idle spell (timers that fall
due together) finds it ready."""
_DEMOTE_AFTER_S = 10
"""For this many consecutive seconds."""
_LOAD_WINDOW_S = 1.0
_CLOSE_THERE_S = 5.0
"""How long a close from another event loop waits for the writer's own loop to close
the writer process (answering what is in flight) before closing it from here."""


class _Op(Request):
    """A queued operation and the caller waiting for its outcome."""

    __slots__ = ("fut", "loop")

    def __init__(
        self,
        make: Callable[[], Op[Any]],
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        writes: bool,
        durable: bool = True,
    ) -> None:
        super().__init__(make, writes, durable)
        self.loop = loop
        self.fut = fut


def _resolve_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _deliver(batch: Sequence[Request], outcomes: list[Outcome]) -> None:
    """Hand outcomes back with one wake-up per event loop, not one per operation."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for op, (ok, value) in zip(batch, outcomes, strict=True):
        assert isinstance(op, _Op)
        by_loop.setdefault(op.loop, []).append((op.fut, ok, value))
    here = asyncio._get_running_loop()  # the process writer replies on the event loop
    for loop, items in by_loop.items():
        if loop is here:
            _resolve_all(items)
            continue
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:
            pass  # the caller's loop has closed; nobody is waiting


def _never_started(ops: Sequence[Request]) -> None:
    """Fail ``ops`` as never started: the store closed before they were handed on."""
    error = StoreError("the store is closed", retryable=False)
    _deliver(ops, [(False, error)] * len(ops))


def _loop_idle(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` has no other callback ready to run. CPython's loops keep them in
    ``_ready``; another loop counts as busy (work is handed to the store's threads)."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


class SqliteStore(SqlStore):
    """A store in one SQLite file, shared safely by any number of local processes.

    Two threads own one connection each: the writer commits in groups, the reader
    serves reads from WAL snapshots without waiting behind the writer's fsync. With
    ``writer="process"`` the writer runs in a process of its own
    (``sqlite_writer_process``): more throughput where many workflows run in this
    process, at the cost of a process per store and a hop per write. ``"auto"`` (the
    default) starts with the thread and moves the writer into a process once the write
    load stays high; ``"thread"`` never does.
    """

    # One writer at a time: no row locks needed.
    dialect = Dialect(row_locks=False, json_functions="json1")

    def __init__(
        self, path: str, *, poll_interval: float = 0.01, writer: WriterKind = "auto"
    ) -> None:
        super().__init__()
        in_memory = path == ":memory:"
        if writer not in ("auto", "thread", "process"):
            raise InvalidArgumentError(
                f"unknown SQLite writer {writer!r}: use 'auto' (the default), 'thread' or 'process'"
            )
        if writer == "process" and in_memory:
            raise InvalidArgumentError(
                "an in-memory SQLite store cannot have its writer in another process: "
                "use a file, or writer='thread'"
            )
        self.path = path
        self._poll_interval = poll_interval
        self._writes: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._reads = self._writes if in_memory else queue.SimpleQueue()
        self._waiters = ChangeWaiters()
        self._closed = False
        self._writer: tuple[BatchWriter, CommitWakeup] | None = None
        """The writer thread's batch writer and wake-up, once it runs."""
        self._writer_lock = threading.Lock()
        """Held by whoever uses the writer's connection: its thread, or the event loop
        committing inline (``_flush_on_loop``)."""
        self._unfinished = 0
        """Writes handed to the writer thread that it has not committed yet (taken from
        its queue or not): while there are any, the event loop must not commit writes
        itself, which would overtake them. Changed under ``_unfinished_lock``."""
        self._unfinished_lock = threading.Lock()
        self._on_loop: list[_Op] = []
        """Writes queued during this pass of ``_home_loop``, for ``_flush_on_loop``."""
        self._home_loop: asyncio.AbstractEventLoop | None = None
        self._home_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        """The reader thread's connection while it runs; used under ``_reader_lock``."""
        self._reader_lock = threading.Lock()
        """Held by whoever uses the reader's connection: its thread, or an idle event
        loop reading inline (``_read_on_loop``)."""
        self.stats = {"loop_batches": 0, "thread_batches": 0, "loop_reads": 0}
        """Write batches committed on the event loop's thread and on the writer thread;
        reads run on the event loop's thread."""
        self._threads: list[threading.Thread] = []
        self.process_writer: ProcessWriter | None = None
        """The writer process's parent side, with ``writer="process"`` (or once an
        ``"auto"`` writer has moved there)."""
        self._process_wakeup: CommitWakeup | None = None
        self._auto = writer == "auto" and not in_memory
        """Move the writer into a process once the write load stays high (``_promote``)."""
        self._writes_counted = 0
        self._loaded_windows = 0
        """Windows in a row past the load that moves the writer (either way)."""
        self._load_check: asyncio.TimerHandle | None = None
        self._move: asyncio.Task[None] | None = None
        """The writer's move into a process or back into a thread, while it runs."""
        self._held: list[_Op] | None = None
        """While the writer moves: the writes that wait for the move to finish."""
        self._switch_lock = threading.Lock()
        """Guards the choice of where a write goes against the move (``_held``)."""
        try:
            if writer == "process":
                # (The reader's connection creates and migrates the file.)
                self._open_thread(self._run_reader, "reader", self._prepare_reader)
                self.process_writer, self._process_wakeup = self._new_process_writer()
                return
            self._open_writer_thread()
            if not in_memory:
                self._open_thread(self._run_reader, "reader", self._prepare_reader)
        except StoreError:
            self._shutdown_threads()
            raise

    def __reduce__(self) -> tuple[Callable[[], SqlStore], tuple[()]]:
        # Operations sent to the writer process (``partial``s of this store's methods)
        # run on that process's own store.
        return writer_side_store, ()

    def _open_thread(
        self,
        target: Callable[[sqlite3.Connection], None],
        role: str,
        prepare: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Start the thread that runs ``target`` on a connection of its own, once the
        connection is open and ``prepare`` has run on it (both before this returns)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                conn = connect(self.path)
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            try:
                if prepare is not None:
                    prepare(conn)
            except BaseException as e:
                conn.close()
                failure.append(e)
                ready.set()
                return
            ready.set()
            try:
                target(conn)
            finally:
                conn.close()

        thread = threading.Thread(target=main, name=f"tether-sqlite-{role}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: {failure[0]}", retryable=False
            )
        self._threads.append(thread)

    # -- the threads -------------------------------------------------------------
    @staticmethod
    def _drain(q: queue.SimpleQueue[_Op | None], first: _Op) -> tuple[list[_Op], bool]:
        batch = [first]
        while len(batch) < _MAX_BATCH:
            try:
                op = q.get_nowait()
            except queue.Empty:
                break
            if op is None:
                return batch, True
            batch.append(op)
        return batch, False

    def _prepare_reader(self, conn: sqlite3.Connection) -> None:
        self._reader = conn

    def _run_reader(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._reads.get()
                if first is None:
                    return
                batch, stop = self._drain(self._reads, first)
                outcomes: list[Outcome] = []
                with self._reader_lock:
                    for op in batch:
                        try:
                            outcomes.append((True, op.run(conn)))
                        except BaseException as e:
                            outcomes.append((False, store_error(e)))
                _deliver(batch, outcomes)
                if stop:
                    return
        finally:
            with self._reader_lock:
                self._reader = None  # its connection closes next

    def _read_on_loop(self, op: _Op, loop: asyncio.AbstractEventLoop) -> bool:
        """Run the read ``op`` right here if nothing else waits (no other callback ready
        on the loop, the reader thread idle with nothing queued), within
        ``_READ_ON_LOOP_BUDGET``: that saves the two thread hand-offs of a read (a
        client's look at a run that just closed, a worker's history read) where nothing
        would run meanwhile. True if it ran (``op.fut`` is done); False if the thread
        must run it (busy, or the read took too long and was interrupted)."""
        if not (_loop_idle(loop) and self._reads.empty()):
            return False
        if not self._reader_lock.acquire(blocking=False):
            return False
        try:
            conn = self._reader
            if conn is None:
                return False
            deadline = time.perf_counter() + _READ_ON_LOOP_BUDGET
            conn.set_progress_handler(lambda: time.perf_counter() > deadline, _BUDGET_CHECK_STEPS)
            try:
                value = op.run(conn)
            except Exception as e:
                if isinstance(e, sqlite3.Error) and e.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT:
                    return False  # over budget
                op.fut.set_exception(store_error(e))
                return True
            finally:
                conn.set_progress_handler(None, 0)
        finally:
            self._reader_lock.release()
        self.stats["loop_reads"] += 1
        op.fut.set_result(value)
        return True

    def _open_writer_thread(self) -> None:
        self._open_thread(self._run_writer, "writer", self._prepare_writer)
        self._writer_thread = self._threads[-1]

    def _prepare_writer(self, conn: sqlite3.Connection) -> None:
        # Before the store is returned: its first write may already commit on the loop.
        wakeup = CommitWakeup(self.path, self._waiters.notify, self._poll_interval)
        self._writer = (BatchWriter(conn), wakeup)

    def _run_writer(self, conn: sqlite3.Connection) -> None:
        assert self._writer is not None
        writer, wakeup = self._writer
        try:
            while True:
                try:
                    first = self._writes.get(timeout=wakeup.poll_interval)
                except queue.Empty:
                    # Another process committed? Wake our waiters without polling tables.
                    with self._writer_lock:
                        self._replied(wakeup, None, [], 0, writer.others_committed())
                    continue
                if first is None:
                    return
                batch, stop = self._drain(self._writes, first)
                with self._writer_lock:
                    done = writer.run(batch)
                    self.stats["thread_batches"] += 1  # before callers can see it done
                    with self._unfinished_lock:
                        self._unfinished -= sum(op.writes for op in batch)
                    self._replied(wakeup, batch, *done)
                if stop:
                    return
        finally:
            with self._writer_lock:
                self._writer = None  # no more commits on the loop: the connection closes
                wakeup.close()

    def _to_thread(self, ops: Sequence[_Op]) -> None:
        """Queue ``ops`` for the writer thread, in order (``_unfinished`` counts them)."""
        with self._unfinished_lock:
            self._unfinished += len(ops)
            for op in ops:
                self._writes.put(op)

    def _queue_write(self, op: _Op, loop: asyncio.AbstractEventLoop) -> None:
        """Writes of one event loop wait for the end of its pass (``_flush_on_loop``);
        those of any other loop go to the writer thread at once."""
        if self._home_loop is None:
            with self._home_lock:  # two loops' first writes at once: one is home
                if self._home_loop is None:
                    self._home_loop = loop
                    if self._auto:
                        self._load_check = loop.call_later(_LOAD_WINDOW_S, self._check_load)
        if loop is not self._home_loop or self._writer is None:
            self._to_thread([op])
            return
        self._on_loop.append(op)
        if len(self._on_loop) == 1:
            loop.call_soon(self._flush_on_loop)

    def _flush_on_loop(self, closing: bool = False) -> None:
        """Commit the writes of this pass of the loop right here if nothing else waits:
        neither the writer thread (idle, nothing queued) nor the loop (no other callback
        ready) nor another process (the write lock is free). That saves the two thread
        hand-offs (about 0.1 ms per sequential write) where nothing else would run
        meanwhile; under load the writes go to the thread, whose group commits overlap
        the loop's work."""
        batch, self._on_loop = self._on_loop, []
        if not batch:
            return
        if self._closed and not closing:  # closed from another loop: never started
            _never_started(batch)
            return
        idle = _loop_idle(asyncio.get_running_loop()) and self._writes.empty()
        if idle and not self._closed and self._writer_lock.acquire(blocking=False):
            try:
                # (Under the lock the thread is between batches: nothing it took from
                # its queue is left uncommitted unless ``_unfinished`` says so.)
                if self._writer is not None and self._unfinished == 0:
                    writer, wakeup = self._writer
                    done = writer.run_unless_locked(batch)
                    if done is not None:
                        self.stats["loop_batches"] += 1
                        self._replied(wakeup, batch, *done)
                        return
            finally:
                self._writer_lock.release()
        self._to_thread(batch)

    def _new_process_writer(self) -> tuple[ProcessWriter, CommitWakeup]:
        wakeup = CommitWakeup(self.path, self._waiters.notify, self._poll_interval)
        try:
            writer = ProcessWriter(
                self.path,
                lambda batch, *reply: self._replied(wakeup, batch, *reply),
                lambda: wakeup.poll_interval,
            )
        except BaseException:
            wakeup.close()
            raise
        return writer, wakeup

    # -- writer="auto": into a process under sustained load, and back ------------------
    def _check_load(self) -> None:
        """Once a window (on the home loop): count the writes, and move the writer into
        a process after ``_PROMOTE_AFTER_S`` loaded windows in a row, or back into a
        thread after ``_DEMOTE_AFTER_S`` light ones. In one process the writer thread and
        the event loop share the GIL, so a busy worker uses one core; sequential work
        is better off with the thread, whose commits need no hop between processes."""
        if self._closed or (self._move is not None and not self._move.done()):
            return
        with self._switch_lock:  # (writes from other threads count too)
            rate, self._writes_counted = self._writes_counted / _LOAD_WINDOW_S, 0
        if self.process_writer is None:
            move, after = rate >= _PROMOTE_WRITES_PER_S, _PROMOTE_AFTER_S
        else:
            move, after = _LIGHT_WRITES_PER_S[0] <= rate < _LIGHT_WRITES_PER_S[1], _DEMOTE_AFTER_S
        self._loaded_windows = self._loaded_windows + 1 if move else 0
        loop = asyncio.get_running_loop()
        if self._loaded_windows >= after / _LOAD_WINDOW_S:
            self._loaded_windows = 0
            self._move = loop.create_task(
                self._promote() if self.process_writer is None else self._demote()
            )
            return
        self._load_check = loop.call_later(_LOAD_WINDOW_S, self._check_load)

    def _watch_load(self) -> None:
        """After a move: count the load again (on the home loop), unless closed."""
        if self._load_check is not None:
            self._load_check.cancel()
        if not self._closed:
            self._load_check = asyncio.get_running_loop().call_later(
                _LOAD_WINDOW_S, self._check_load
            )

    async def _promote(self) -> None:
        """Move the writer from its thread into a process of its own. Writes that come
        meanwhile wait (``_held``) until the thread has committed everything queued
        before them, then go to the process in the order they came: no write commits
        out of order, and none is lost if the store closes meanwhile (they fail as
        never started). If the process cannot start, the thread stays."""
        loop = asyncio.get_running_loop()
        try:
            writer, wakeup = await loop.run_in_executor(None, self._new_process_writer)
        except Exception as e:
            logger.warning("SQLite store %s keeps its writer thread: %s", self.path, e)
            return
        if self._closed:
            await self._discard(writer, wakeup, [])
            return
        with self._switch_lock:
            self._held = []
        self._flush_on_loop()  # this pass's writes: committed or queued to the thread
        self._writes.put(None)  # the thread stops after what is queued before it
        # From here on the move must finish whatever happens to this task (the thread is
        # stopping): a cancelled close or an ending event loop must not strand writes.
        await asyncio.shield(self._finish_move(writer, wakeup))

    async def _finish_move(self, writer: ProcessWriter, wakeup: CommitWakeup) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._writer_thread.join)
        except RuntimeError:  # no executor any more: the loop is ending (as below)
            self._writer_thread.join()
            self._stay_in_a_thread(writer, wakeup)
            return
        except BaseException:
            # Cancelled even under the shield: the loop is ending. A process bound to
            # it would serve nobody; a new thread takes the held writes, in order.
            self._writer_thread.join()
            self._stay_in_a_thread(writer, wakeup)
            raise
        with self._switch_lock:
            held, self._held = self._held or [], None
            if not self._closed:
                # Bound to this, the home loop, before anyone can see it: writes from
                # other loops are handed over to it, after the held ones.
                writer.bind(loop)
                for op in held:
                    writer.submit(op, loop)
                self.process_writer, self._process_wakeup = writer, wakeup
                logger.info("SQLite store %s moved its writer into a process", self.path)
                self._watch_load()
                return
        await self._discard(writer, wakeup, held)

    async def _demote(self) -> None:
        """Move the writer from its process back into a thread. The thread starts first
        (if it cannot, the process stays); then writes that come meanwhile wait
        (``_held``) until the process has answered everything sent before them, and go
        to the thread in the order they came. A close meanwhile fails them as never
        started."""
        loop = asyncio.get_running_loop()
        # If this is cancelled while the thread opens, the thread starts all the same:
        # whichever of the two comes second stops it (nothing else reads its queue while
        # the process writes), so that one writer is left.
        step = threading.Lock()
        state = {"opened": False, "abandoned": False}

        def open_thread() -> None:
            self._open_writer_thread()
            with step:
                state["opened"] = True
                if state["abandoned"]:
                    self._writes.put(None)

        try:
            await loop.run_in_executor(None, open_thread)
        except asyncio.CancelledError:
            with step:
                state["abandoned"] = True
                if state["opened"]:
                    self._writes.put(None)
            raise
        except Exception as e:
            logger.warning("SQLite store %s keeps its writer process: %s", self.path, e)
            self._watch_load()
            return
        with self._switch_lock:
            if self._closed:
                return  # (close stops the new thread with the others)
            self._held = []
        # Writes handed over from other loops before that (under the lock) are in this
        # loop's queue already, ahead of the task the shield starts: they reach the
        # process before it closes, as they are older than the held ones.
        await asyncio.shield(self._finish_demotion())

    async def _finish_demotion(self) -> None:
        writer = self.process_writer
        assert writer is not None
        try:
            await writer.close()  # sends what it has queued, and every reply comes in
        finally:  # (cancelled, as the loop ends: its close failed what was in flight)
            with self._switch_lock:
                held, self._held = self._held or [], None
                wakeup, self._process_wakeup = self._process_wakeup, None
                self.process_writer = None
                closed = self._closed
                if not closed:
                    self._to_thread(held)  # in the order they came, from any loop
            if wakeup is not None:  # (a close from another loop may have taken it)
                wakeup.close()
        if closed:  # the thread may be stopping already: they never started
            _never_started(held)
            return
        logger.info("SQLite store %s moved its writer back into a thread", self.path)
        self._watch_load()

    def _stay_in_a_thread(self, writer: ProcessWriter, wakeup: CommitWakeup) -> None:
        """A move into a process that cannot finish: stop the unused process, start a
        writer thread again, and hand it the held writes (or fail them if closed)."""
        writer.abort()
        wakeup.close()
        failure: Exception | None = None
        if not self._closed:
            try:
                self._open_writer_thread()
            except Exception as e:
                failure = e
        with self._switch_lock:  # held writes go first, before any that comes after
            held, self._held = self._held or [], None
            if failure is None and not self._closed:
                self._to_thread(held)
                return
            if failure is not None:
                self._closed = True  # no writer any more: refuse writes, do not queue them
        if failure is not None:
            logger.error("SQLite store %s lost its writer: %s", self.path, failure)
        _never_started(held)

    @staticmethod
    async def _discard(writer: ProcessWriter, wakeup: CommitWakeup, held: list[_Op]) -> None:
        """The store closed during the move: fail ``held``, stop the unused process."""
        _never_started(held)
        await writer.close()
        wakeup.close()

    def _replied(
        self,
        wakeup: CommitWakeup,
        batch: Sequence[Request] | None,
        outcomes: list[Outcome],
        changes: int,
        others: bool,
    ) -> None:
        """After a commit (or, ``batch`` None, an idle poll): tell the callers, then wake
        whoever waits for what changed. ``others``: another connection committed."""
        if batch is None:
            wakeup.polled(changed=others)
            if others:
                self._waiters.notify(Change.ALL)  # what changed is unknown
            return
        # Only now, after COMMIT returned (fsync done unless lazy), are callers told.
        # Other processes first: waking one takes tens of microseconds, which then
        # overlap this process's own delivery instead of following it.
        if changes:
            try:
                wakeup.committed(changes)
            except Exception:  # they notice by polling; the callers must hear anyway
                logger.exception("waking other processes after a commit failed")
        _deliver(batch, outcomes)
        if changes:
            self._waiters.notify(changes)
        if others and not wakeup.active:  # else their wake-up says what changed
            self._waiters.notify(Change.ALL)

    def _read(self, make: Callable[[], Op[T]]) -> asyncio.Future[T]:
        return self._submit(make, writes=False, durable=True)

    def _submit(self, make: Callable[[], Op[T]], writes: bool, durable: bool) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        op = _Op(make, loop, fut, writes, durable)
        if not writes:
            if not self._read_on_loop(op, loop):
                self._reads.put(op)
        else:
            # Where the write goes is decided under the lock (uncontended but for a move),
            # so that a move sees every write either handed to the writer it replaces or
            # held for the next one.
            with self._switch_lock:
                if self._closed:  # closed from another thread since ``_starting``
                    raise StoreError("the store is closed", retryable=False)
                self._writes_counted += 1
                if self._held is not None:
                    self._held.append(op)
                elif self.process_writer is not None:
                    self.process_writer.submit(op, loop)
                else:
                    self._queue_write(op, loop)
        return fut

    def _submit_write(self, make: Callable[[], Op[T]], durable: bool) -> asyncio.Future[T]:
        return self._submit(make, writes=True, durable=durable)

    def change_waiter(self, changes: Change = Change.ALL) -> asyncio.Future[None]:
        waiter = self._waiters.add(changes)
        # The waiting loop watches for other processes' commits itself: one wake-up
        # per hop instead of the listener thread's and then the loop's.
        loop = waiter.get_loop()
        writer = self._writer
        if writer is not None:
            writer[1].attach(loop)
        if self._process_wakeup is not None:
            self._process_wakeup.attach(loop)
        return waiter

    def _shutdown_threads(self) -> None:
        self._writes.put(None)
        if self._reads is not self._writes:
            self._reads.put(None)

    async def close(self) -> None:
        with self._switch_lock:  # a writer being moved is either installed or discarded
            if self._closed:
                return
            self._closed = True
        loop = asyncio.get_running_loop()
        if loop is self._home_loop:
            if self._load_check is not None:
                self._load_check.cancel()
            if self._move is not None:
                # It stops at its next step (its held writes fail as never started).
                await asyncio.gather(self._move, return_exceptions=True)
            with self._switch_lock:
                held, self._held = self._held, None
            if held:  # (a move cancelled before it could hand them on)
                _never_started(held)
            self._flush_on_loop(closing=True)  # accepted before the close: to the thread
        elif self._home_loop is not None:
            try:  # its writes not yet handed over fail as never started
                self._home_loop.call_soon_threadsafe(self._flush_on_loop)
            except RuntimeError:
                pass  # that loop has closed: nobody waits for them
        try:
            writer = self.process_writer
            if writer is not None:
                home = writer.loop
                if home is None or home is loop or not home.is_running():
                    await writer.close()
                else:  # it runs on another loop: close it there, its writes answered
                    there = asyncio.run_coroutine_threadsafe(writer.close(), home)
                    try:
                        await asyncio.wait_for(asyncio.wrap_future(there), _CLOSE_THERE_S)
                    except TimeoutError:  # that loop is blocked (on this close, perhaps)
                        await writer.close()
        finally:
            with self._switch_lock:  # (a move back into a thread may close it too)
                wakeup, self._process_wakeup = self._process_wakeup, None
            if wakeup is not None:
                wakeup.close()
            self._shutdown_threads()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join)
