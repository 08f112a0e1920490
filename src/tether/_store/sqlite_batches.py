"""Group commits on one SQLite connection: the work of the store's single writer.

``BatchWriter`` runs a batch of queued operations inside one transaction and commits
once (each operation's partial writes undone on its own if it fails), and reports
commits made by other connections (``PRAGMA data_version``). The writer thread runs
it in the store's process, or a writer process runs it (``sqlite_writer_process``),
so that the same code serves both.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from tether._store import migrations
from tether._store.sql import GroupRun, spans
from tether._store.sql_statements import ALL, EXEC, ONE, TOUCH, WRITE, Op
from tether.exceptions import StoreError

_OPEN_RETRY_SECONDS = 10.0
BUSY_TIMEOUT_MS = 30_000
"""How long a statement waits for another connection's lock before failing."""

Outcome = tuple[bool, Any]
"""An operation's outcome: (True, its value) or (False, the exception it raised)."""


class Request:
    """An operation to run: ``make()`` creates it (again, if its batch is re-run)."""

    __slots__ = ("changes", "durable", "make", "writes")

    def __init__(self, make: Callable[[], Op[Any]], writes: bool, durable: bool = True) -> None:
        self.make = make
        self.writes = writes
        self.durable = durable
        """False for writes that tell no one anything: their commit need not wait for the disk."""
        self.changes = 0
        """The kinds of work (``Change``) the operation touched."""

    def run(self, conn: sqlite3.Connection) -> Any:
        """Run the operation's statements on ``conn`` until it returns its value."""
        value, self.changes = run_op(conn, self.make())
        return value


def run_op(conn: sqlite3.Connection, op: Op[Any]) -> tuple[Any, int]:
    """Run ``op``'s statements on ``conn``: its value, and the kinds of work (``Change``)
    it touched."""
    changes = 0
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
                changes |= stmt.params
                result = None
            else:
                conn.executemany(stmt.sql, stmt.params)
                result = None
            stmt = op.send(result)
    except StopIteration as done:
        return done.value, changes


def connect(path: str) -> sqlite3.Connection:
    """Open (creating and migrating if need be) the store's database at ``path``."""
    if path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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


class BatchWriter:
    """Runs batches of write operations on ``conn``, one transaction and commit each."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lazy_commits = False
        """Whether the connection is at synchronous=NORMAL (for unacknowledged batches)."""
        self._waits = True
        """Whether the connection's busy timeout is on (``connect`` set it), or 0 (for
        batches that must not wait for another process's write lock)."""
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]

    def run(self, batch: Sequence[Request]) -> tuple[list[Outcome], int, bool]:
        """Run and commit ``batch``: each operation's outcome, the kinds of work
        (``Change``) the commit touched, and whether another connection committed
        since the last look."""
        done = self._run_batch(batch, wait=True)
        assert done is not None
        return (*done, self.others_committed())

    def run_unless_locked(self, batch: Sequence[Request]) -> tuple[list[Outcome], int, bool] | None:
        """Like ``run``, but None at once, having done nothing, if another connection
        (another process) holds the write lock: for callers that must not wait."""
        done = self._run_batch(batch, wait=False)
        return None if done is None else (*done, self.others_committed())

    def others_committed(self) -> bool:
        """Whether another connection committed since the last look (our own commits
        leave ``data_version`` as it is)."""
        try:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            # Busy, say, while another process recovers the WAL after a crash (the
            # busy timeout may be off, see ``_begin``): unknown, so say changed.
            return True
        if version == self._data_version:
            return False
        self._data_version = version
        return True

    def _run_batch(self, batch: Sequence[Request], wait: bool) -> tuple[list[Outcome], int] | None:
        conn = self._conn
        writes = any(op.writes for op in batch)
        # Nothing in this batch is acknowledged: commit without fsync. The WAL is written
        # in order, so the next synced commit makes this one durable too.
        lazy = not any(op.durable for op in batch)
        changes = 0
        try:
            if lazy != self._lazy_commits:
                # Set before BEGIN; a durable batch never starts unless FULL was set.
                conn.execute(f"PRAGMA synchronous = {'NORMAL' if lazy else 'FULL'}")
                self._lazy_commits = lazy
            if not self._begin(writes, wait):
                return None
            outcomes = self._run_ops(batch, isolate=False)
            if outcomes is None:
                # An operation failed after writing: redo the batch with each operation in
                # its own savepoint, so its partial writes go and the others' stay. (Not
                # a savepoint around the first pass instead: that made E 10% slower.)
                conn.execute("ROLLBACK")
                if not self._begin(True, wait):
                    return None  # another connection took the lock: nothing done
                outcomes = self._run_ops(batch, isolate=True)
                assert outcomes is not None
            conn.execute("COMMIT")
            for op, (ok, _) in zip(batch, outcomes, strict=True):
                if ok:
                    changes |= op.changes
        except Exception as e:  # SQLite's, or what an operation raised as it ended it
            self._roll_back()
            error = StoreError(f"SQLite transaction failed: {e}", retryable=True)
            outcomes = [(False, error) for _ in batch]
        except BaseException:
            self._roll_back()  # interrupted (Ctrl-C on the loop's thread): leave nothing open
            raise
        # Only now, after COMMIT returned (fsync done unless lazy), may callers be told.
        return outcomes, changes

    def _roll_back(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _begin(self, writes: bool, wait: bool) -> bool:
        """Begin the batch's transaction; False if ``wait`` is off and another
        connection holds the write lock."""
        wait = wait or not writes
        if wait != self._waits:
            # Kept until a batch wants the other setting, not restored after BEGIN: two
            # PRAGMAs a batch cost about 10 us, 2% of a sequential workflow's latency.
            # Once BEGIN IMMEDIATE holds the write lock, no statement of a WAL
            # transaction waits (the commit's automatic checkpoint is passive).
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS if wait else 0}")
            self._waits = wait
        try:
            self._conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        except sqlite3.OperationalError as e:
            if not wait and e.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                return False
            raise
        return True

    def _run_ops(self, batch: Sequence[Request], isolate: bool) -> list[Outcome] | None:
        """Run each operation; None if one failed after writing (and ``isolate`` is off).

        Most failures (a lost lease, a duplicate id) are found before anything is
        written, so the common path needs no savepoint per operation. Neighbours that
        can run as one operation (``together``) do so, except when isolated.
        """
        outcomes: list[Outcome] = []
        for run_group, start, end in spans([op.make for op in batch], grouped=not isolate):
            if run_group is not None:
                done = self._run_group(run_group, batch[start:end])
                if done is None:
                    return None
                outcomes += done
            else:
                outcome = self._run_one(batch[start], isolate)
                if outcome is None:
                    return None
                outcomes.append(outcome)
        return outcomes

    def _run_one(self, op: Request, isolate: bool) -> Outcome | None:
        """Run ``op``: its outcome; None if it failed after writing and not ``isolate``d."""
        conn = self._conn
        op.changes = 0
        if isolate:
            conn.execute("SAVEPOINT op")
        changes = conn.total_changes
        try:
            value = op.run(conn)
        except Exception as e:  # (an interrupt ends the batch: _run_batch)
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back by itself (a full disk, an
                # I/O error): the batch's earlier writes are gone, and what follows
                # must not commit on its own. Every operation fails, none committed.
                raise
            if isolate:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            elif conn.total_changes != changes:
                return None
            return False, store_error(e)
        if isolate:
            conn.execute("RELEASE op")
        return True, value

    def _run_group(self, run_group: GroupRun, group: Sequence[Request]) -> list[Outcome] | None:
        """Run ``group`` as one operation; those it leaves (None) each on their own,
        after it. None if it failed after writing."""
        conn = self._conn
        changes = conn.total_changes
        try:
            values, touched = run_op(conn, run_group([op.make for op in group]))
        except Exception:
            if not conn.in_transaction:
                raise  # rolled back by SQLite itself: as in _run_one
            if conn.total_changes != changes:
                return None
            values, touched = [None] * len(group), 0  # nothing written: one by one
        outcomes: list[Outcome] = []
        for op, value in zip(group, values, strict=True):
            if value is not None:
                op.changes = touched
                outcomes.append((True, value))
                continue
            outcome = self._run_one(op, isolate=False)
            if outcome is None:
                return None
            outcomes.append(outcome)
        return outcomes


def store_error(e: BaseException) -> BaseException:
    """What a caller gets for ``e``: a SQLite error becomes a retryable ``StoreError``."""
    if isinstance(e, sqlite3.Error):
        return StoreError(f"SQLite error: {e}", retryable=True)
    return e
