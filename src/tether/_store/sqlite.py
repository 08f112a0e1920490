"""SQLite store: the embedded default.

One thread owns the connection and commits in groups: callers queue operations,
the thread runs every queued operation inside one transaction (each in its own
savepoint, so one failing operation does not undo the others), commits once, and
only then resolves the callers' futures. Many state transitions share one fsync;
none is acknowledged before its commit is durable (WAL, ``synchronous=FULL``). A batch
of nothing but leases commits with ``NORMAL`` (no fsync): losing it equals the lease
running out, and the next synced commit makes it durable too (the WAL is in order).

Other processes' commits wake this process's waiters through a Unix datagram
socket per store (``sqlite_wakeup``), so cross-process dispatch does not wait for a
poll; ``PRAGMA data_version``, polled every ``poll_interval`` without it and every
100 ms with it, notices the commits of writers that send no wake-ups.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tether._store import migrations
from tether._store.changes import Change, ChangeWaiters
from tether._store.sql import ALL, EXEC, ONE, TOUCH, WRITE, Dialect, Op, SqlStore
from tether._store.sqlite_wakeup import CommitWakeup
from tether.exceptions import (
    StoreError,
)

T = TypeVar("T")

# The schema lives in migrations/sqlite/NNNN_*.sql (and the same change for PostgreSQL
# in migrations/postgres/): add a new numbered file to both to change it.

_MAX_BATCH = 512
_OPEN_RETRY_SECONDS = 10.0


class _Op:
    __slots__ = ("changes", "durable", "fut", "loop", "make", "writes")

    def __init__(
        self,
        make: Callable[[], Op[Any]],
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        writes: bool,
        durable: bool = True,
    ) -> None:
        self.make = make
        self.loop = loop
        self.fut = fut
        self.writes = writes
        self.durable = durable
        """False for lease-only writes: their commit need not wait for the disk."""
        self.changes = 0
        """The kinds of work (``Change``) the operation touched."""

    def run(self, conn: sqlite3.Connection) -> Any:
        return _drive(self, conn)


def _drive(request: _Op, conn: sqlite3.Connection) -> Any:
    """Run an operation's statements on ``conn`` until it returns its value."""
    op = request.make()
    try:
        stmt = next(op)
        while True:
            if stmt.kind == ONE:
                result: Any = conn.execute(stmt.sql, stmt.params).fetchone()
            elif stmt.kind == ALL:
                result = conn.execute(stmt.sql, stmt.params).fetchall()
            elif stmt.kind == EXEC:
                result = conn.execute(stmt.sql, stmt.params).rowcount
            elif stmt.kind == WRITE:  # in process: nothing to gain from holding it back
                conn.execute(stmt.sql, stmt.params)
                result = None
            elif stmt.kind == TOUCH:
                request.changes |= stmt.params
                result = None
            else:
                conn.executemany(stmt.sql, stmt.params)
                result = None
            stmt = op.send(result)
    except StopIteration as done:
        return done.value


def _resolve_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _deliver(results: list[tuple[_Op, bool, Any]]) -> None:
    """Hand results back with one wake-up per event loop, not one per operation."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for op, ok, value in results:
        if not ok and isinstance(value, sqlite3.Error):
            value = StoreError(f"SQLite error: {value}", retryable=True)
        by_loop.setdefault(op.loop, []).append((op.fut, ok, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:
            pass  # the caller's loop has closed; nobody is waiting


class SqliteStore(SqlStore):
    """A store in one SQLite file, shared safely by any number of local processes.

    Two threads own one connection each: the writer commits in groups, the reader
    serves reads from WAL snapshots without waiting behind the writer's fsync.
    """

    # One writer at a time: no row locks needed.
    dialect = Dialect(row_locks=False, json_functions="json1")

    def __init__(self, path: str, *, poll_interval: float = 0.01) -> None:
        super().__init__()
        self.path = path
        self._poll_interval = poll_interval
        self._writes: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        in_memory = path == ":memory:"
        self._reads = self._writes if in_memory else queue.SimpleQueue()
        self._waiters = ChangeWaiters()
        self._lazy_commits = False
        """Whether the writer connection is at synchronous=NORMAL (lease-only batches)."""
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._open_thread(self._run_writer, "writer")
        if not in_memory:
            self._open_thread(self._run_reader, "reader")

    def _open_thread(self, target: Callable[[sqlite3.Connection], None], role: str) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                conn = self._connect()
            except BaseException as e:
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
            self._shutdown_threads()
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: {failure[0]}", retryable=False
            )
        self._threads.append(thread)

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            deadline = time.monotonic() + _OPEN_RETRY_SECONDS
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = FULL")
                    migrations.migrate_sqlite(conn)
                    return conn
                except sqlite3.OperationalError as e:
                    # Another process creating the same new database (switching it to
                    # WAL) can make these fail at once, without the busy timeout.
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            conn.close()
            raise

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

    def _run_reader(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._reads.get()
            if first is None:
                return
            batch, stop = self._drain(self._reads, first)
            results: list[tuple[_Op, bool, Any]] = []
            for op in batch:
                try:
                    results.append((op, True, op.run(conn)))
                except BaseException as e:
                    results.append((op, False, e))
            _deliver(results)
            if stop:
                return

    def _run_writer(self, conn: sqlite3.Connection) -> None:
        wakeup = CommitWakeup(self.path, self._waiters.notify, self._poll_interval)
        try:
            self._write_loop(conn, wakeup)
        finally:
            wakeup.close()

    def _write_loop(self, conn: sqlite3.Connection, wakeup: CommitWakeup) -> None:
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        while True:
            try:
                first = self._writes.get(timeout=wakeup.poll_interval)
            except queue.Empty:
                # Another process committed? Wake our waiters without polling the tables.
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                wakeup.polled(changed=version != data_version)
                if version != data_version:
                    data_version = version
                    self._waiters.notify(Change.ALL)  # what changed is unknown
                continue
            if first is None:
                return
            batch, stop = self._drain(self._writes, first)
            changes = self._run_batch(conn, batch)
            if changes:
                wakeup.committed(changes)
                self._waiters.notify(changes)
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != data_version:
                data_version = version
                if not wakeup.active:  # else the other process's wake-up says what changed
                    self._waiters.notify(Change.ALL)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> int:
        """Run and commit ``batch``; return the kinds of work (``Change``) it touched."""
        writes = any(op.writes for op in batch)
        # Only leases in this batch: commit without fsync. The WAL is written in order,
        # so the next synced commit makes this one durable too.
        lazy = not any(op.durable for op in batch)
        changes = 0
        try:
            if lazy != self._lazy_commits:
                # Set before BEGIN; a durable batch never starts unless FULL was set.
                conn.execute(f"PRAGMA synchronous = {'NORMAL' if lazy else 'FULL'}")
                self._lazy_commits = lazy
            conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
            results = self._run_ops(conn, batch, isolate=False)
            if results is None:
                # An operation failed after writing: redo the batch with each operation in
                # its own savepoint, so its partial writes go and the others' stay.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                results = self._run_ops(conn, batch, isolate=True)
                assert results is not None
            conn.execute("COMMIT")
            for op, ok, _ in results:
                if ok:
                    changes |= op.changes
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = StoreError(f"SQLite transaction failed: {e}", retryable=True)
            results = [(op, False, error) for op in batch]
        # Only now, after COMMIT returned (fsync done unless lazy), are callers told.
        _deliver(results)
        return changes

    @staticmethod
    def _run_ops(
        conn: sqlite3.Connection, batch: list[_Op], isolate: bool
    ) -> list[tuple[_Op, bool, Any]] | None:
        """Run each operation; None if one failed after writing (and ``isolate`` is off).

        Most failures (a lost lease, a duplicate id) are found before anything is
        written, so the common path needs no savepoint per operation.
        """
        results: list[tuple[_Op, bool, Any]] = []
        for op in batch:
            if isolate:
                conn.execute("SAVEPOINT op")
            changes = conn.total_changes
            try:
                value = op.run(conn)
            except BaseException as e:
                if isolate:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                elif conn.total_changes != changes:
                    return None
                results.append((op, False, e))
                continue
            if isolate:
                conn.execute("RELEASE op")
            results.append((op, True, value))
        return results

    async def _execute(self, make: Callable[[], Op[T]], writes: bool, durable: bool = True) -> T:
        if self._closed:
            raise StoreError("the store is closed", retryable=False)
        if self.faults is not None:
            self.faults.before(writes)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        (self._writes if writes else self._reads).put(_Op(make, loop, fut, writes, durable))
        value = await fut
        if self.faults is not None:
            self.faults.after(writes)
        return value

    async def _execute_lease(self, make: Callable[[], Op[T]]) -> T:
        return await self._execute(make, writes=True, durable=False)

    def change_waiter(self, changes: Change = Change.ALL) -> asyncio.Future[None]:
        return self._waiters.add(changes)

    def _shutdown_threads(self) -> None:
        self._writes.put(None)
        if self._reads is not self._writes:
            self._reads.put(None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shutdown_threads()
        loop = asyncio.get_running_loop()
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join)
