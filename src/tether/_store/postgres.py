"""PostgreSQL store: any number of workers on any number of hosts share one database.

The domain logic is ``SqlStore``'s (``sql.py`` and its layers), unchanged; this module is
the driver.

- **Group commit.** Writes go through one queue to a few committer tasks, each with
  its own connection. A committer takes what has queued (up to ``_MAX_BATCH``
  operations), runs it in one transaction and commits once; callers hear back only
  after ``COMMIT`` returned. As in the SQLite driver, one failing operation does not
  undo the others: most failures (a lost lease, a duplicate id) are found before
  anything is written, and when one is not (or a statement fails, which aborts a
  PostgreSQL transaction), the batch is rolled back and run again with a
  ``SAVEPOINT`` per operation. Reads go straight to a connection pool.
- **Concurrency.** Transactions are READ COMMITTED. Claims take rows with
  ``FOR UPDATE OF ... SKIP LOCKED`` (``Dialect(row_locks=True)``); lease checks and
  the run lookups of starts, signals, cancels and updates lock their row; and a
  workflow task commits only if the run's ``task_version`` is still the one it read
  (optimistic concurrency), so two workers cannot both advance a run.
- **Wake-ups.** A batch that made work available sends ``NOTIFY`` (with the kinds of
  work, a ``Change``, as payload) in its transaction;
  a listening connection in every process resolves ``change_waiter()`` futures.
  Polling stays the fallback: waiting loops look again at least once a second.
- **Connection loss and conflicts.** An operation that failed before anything of it
  could commit (the database restarting, a dropped connection, a deadlock or a
  unique-key race with a concurrent transaction) is run again, reconnecting with
  backoff, for up to ``reconnect_timeout`` seconds; then it fails with
  ``StoreError(retryable=True)``. A connection lost *during* ``COMMIT`` leaves the
  outcome unknown: those calls fail with a retryable ``StoreError`` that says so,
  and Tether's own callers retry them safely (lease tokens, task versions and start
  request ids make a repeat harmless).

A store belongs to the event loop that opened it (asyncpg connections do).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from tether._store import migrations
from tether._store.changes import Change, ChangeWaiters
from tether._store.pg_statements import DeferredWrites, translate
from tether._store.sql import SqlStore, spans
from tether._store.sql_statements import ALL, MANY, NOTIFY_MARK, ONE, TOUCH, WRITE, Dialect, Op
from tether.exceptions import StoreError

logger = logging.getLogger("tether.store")

T = TypeVar("T")

CHANNEL = "tether_changes"
"""``NOTIFY`` channel: something committed; look for work."""

_MAX_BATCH = 48
"""Operations per transaction: a batch run with savepoints should stay under the 64
subtransactions per transaction beyond which PostgreSQL slows down for everyone."""

_MAX_DUPLICATE_RETRIES = 5

_CLAIM_FUNCTIONS = ("tether_claim_workflow_tasks", "tether_claim_activity_tasks")
"""Migration 0003's functions (``Dialect.claim_functions``)."""
_COMPLETION_FUNCTIONS = ("tether_close_runs", "tether_complete_waiting_tasks")
"""Migration 0004's functions (``Dialect.completion_functions``)."""
_CALLABLE_FUNCTIONS = (
    "SELECT p.proname FROM pg_proc p WHERE p.proname = ANY($1::text[]) "
    "AND p.pronamespace = current_schema()::regnamespace "
    "AND has_function_privilege(p.oid, 'EXECUTE')"
)
"""Which of the schema's functions this role can call (a database whose owner revoked
EXECUTE from PUBLIC may not let it)."""

_READ_PREFIXES = ("SELECT", "SHOW")
"""Statements that cannot write; any other (``WITH`` over an ``INSERT``...) may."""

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection left mid-operation by a failure
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)
_CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.LockNotAvailableError,
)


class _NotApplied(StoreError):
    """Nothing of the operation was applied: running it again is safe (done here)."""

    def __init__(self, message: str, *, conflict: bool, duplicate: bool = False) -> None:
        super().__init__(message, retryable=True)
        self.conflict = conflict
        self.duplicate = duplicate
        """A unique-key race (retried a few times: a persistent one is a bug, not a race)."""


def _classify(error: BaseException, what: str) -> BaseException:
    """What ``error``, raised while running an operation that did not commit, means."""
    if isinstance(error, _CONFLICT_ERRORS):
        return _NotApplied(
            f"{what} conflicted with a concurrent transaction: {error}",
            conflict=True,
            duplicate=isinstance(error, asyncpg.exceptions.UniqueViolationError),
        )
    if isinstance(error, _CONNECTION_ERRORS):
        detail = str(error) or type(error).__name__
        return _NotApplied(
            f"{what} failed: connection to PostgreSQL lost ({detail})", conflict=False
        )
    if isinstance(error, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL error in {what}: {error}", retryable=False)
    return error  # the operation's own error (WorkflowAlreadyStartedError, StaleTaskError...)


def redact(url: str) -> str:
    """``postgresql://host:port/db`` without user and password (for messages)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or 'localhost'}{port}{parts.path}"


def _rowcount(status: str) -> int:
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


class _Effects:
    """What an operation did besides its result: changed rows, kinds of work touched,
    and whether its transaction has begun."""

    __slots__ = ("alone_sent", "announced", "changes", "unbegun", "wrote")

    def __init__(self, unbegun: bool = False) -> None:
        self.wrote = False
        self.changes = 0
        self.unbegun = unbegun
        """No transaction is open: one begins before the next statement, unless that is
        the operation's first and marked ``alone`` (it then commits by itself)."""
        self.alone_sent = False
        """A first statement marked ``alone`` was sent, to commit by itself."""
        self.announced = 0
        """The kinds of work that statement announced itself (``Stmt.notify``)."""

    async def before(
        self, conn: asyncpg.Connection, alone: bool = False, read: bool = False
    ) -> None:
        """Call before sending a statement (``read``: one that cannot write)."""
        if not self.unbegun:
            return
        if alone and not self.alone_sent and not self.wrote:
            self.alone_sent = True
            return
        if read and self.alone_sent and self.wrote:
            return  # after a lone statement that wrote, only reads follow: no transaction
        self.unbegun = False
        await conn.execute("BEGIN")


async def _drive(make: Callable[[], Op[Any]], conn: asyncpg.Connection, done: _Effects) -> Any:
    """Run an operation's statements on ``conn``, noting its effects in ``done``.

    Writes whose outcome the operation does not read wait in a ``DeferredWrites`` group
    and go together, before the next other statement or the operation's return."""
    op = make()
    pending = DeferredWrites()
    try:
        stmt = next(op)
        while True:
            kind = stmt.kind
            result: Any = None
            if kind == TOUCH:
                done.changes |= stmt.params
            elif kind in (WRITE, MANY):
                if kind == MANY and not stmt.params:
                    pass  # nothing to write
                elif pending.accepts(stmt):
                    pending.add(stmt)
                else:
                    if pending:
                        await _flush(pending, conn, done)
                    if pending.accepts(stmt):
                        pending.add(stmt)
                    else:
                        await done.before(conn)
                        await conn.executemany(translate(stmt.sql), stmt.params)
                        done.wrote = True
            else:
                if pending:
                    await _flush(pending, conn, done)
                read = not stmt.writes and stmt.sql.startswith(_READ_PREFIXES)
                sent_alone = done.alone_sent
                await done.before(conn, stmt.alone, read)
                sql = translate(stmt.sql)
                notify = stmt.notify if done.alone_sent and not sent_alone else 0
                if notify:  # commits by itself: its wake-up goes out with its commit
                    sql = sql.replace(NOTIFY_MARK, f", pg_notify('{CHANNEL}', '{notify}')")
                if kind == ONE:
                    result = await conn.fetchrow(sql, *stmt.params)
                    if result is not None and not read:
                        done.wrote = True
                        done.announced |= notify
                elif kind == ALL:
                    result = await conn.fetch(sql, *stmt.params)
                    if result and not read:
                        done.wrote = True
                else:
                    result = _rowcount(await conn.execute(sql, *stmt.params))
                    if result:
                        done.wrote = True
            stmt = op.send(result)
    except StopIteration as finished:
        if pending:
            await _flush(pending, conn, done)
        return finished.value
    finally:
        op.close()


def _maybe_committed(alone: _Effects | None) -> int:
    """What an operation cut off by a lost connection may have made available all the
    same: anything, if its first statement was out to commit by itself (``Stmt.alone``)."""
    return Change.ALL if alone is not None and alone.alone_sent else 0


async def _flush(pending: DeferredWrites, conn: asyncpg.Connection, done: _Effects) -> None:
    sql, args = pending.take()
    await done.before(conn)
    done.wrote = True  # (a failure after this rolls the whole transaction back)
    await conn.execute(sql, *args)


class _Attempts:
    """How often an operation was retried, and until when it may be."""

    __slots__ = ("conflicts", "deadline", "retries")

    def __init__(self) -> None:
        self.conflicts = 0
        self.retries = 0
        self.deadline: float | None = None


class _Write(_Attempts):
    __slots__ = ("durable", "fut", "make")

    def __init__(
        self, make: Callable[[], Op[Any]], fut: asyncio.Future[Any], durable: bool = True
    ) -> None:
        super().__init__()
        self.make = make
        self.fut = fut
        self.durable = durable
        """False for lease-only writes: their commit need not wait for the WAL flush."""


_Results = list[tuple[_Write, bool, Any]]


class _Failed:
    """The operation at ``index`` of a batch failed in a way that spoils the transaction;
    ``in_group``: it was the first of a group run as one (``together``), and which of
    them failed is unknown."""

    __slots__ = ("error", "in_group", "index")

    def __init__(self, index: int, error: BaseException, in_group: bool = False) -> None:
        self.index = index
        self.error = error
        self.in_group = in_group


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pooled connections keep no session state: skip asyncpg's reset round trip."""


async def _keepalive(conn: asyncpg.Connection) -> None:
    """Probe an idle connection after 10 s, give up on it after 3 unanswered probes."""
    sock = conn._transport.get_extra_info("socket") if conn._transport else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class PostgresStore(SqlStore):
    """A store in a PostgreSQL database. Open it with ``await PostgresStore.open(url)``."""

    dialect = Dialect(
        row_locks=True,
        json_functions="jsonb",
        writes_in_with=True,
        claim_functions=True,
        completion_functions=True,
    )

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        committers: int = 3,
        reconnect_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        statement_timeout: float = 60.0,
        lock_timeout: float = 0.25,
    ) -> None:
        """Options only; ``open`` connects. ``reconnect_timeout``: how long an operation
        waits for a lost database to come back before it fails. ``lock_timeout``: how
        long a write waits for a row another transaction holds before it steps back and
        runs again a moment later (instead of waiting for PostgreSQL's deadlock check)."""
        super().__init__()
        self.url = url
        self.display_url = redact(url)
        self.pool_size = pool_size
        self.committer_count = committers
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.lock_timeout = lock_timeout
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._lease_queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        """Writes that tell no one anything (claims, renewals, workflow tasks that neither
        close their run nor answer an update): a committer of their own, whose session
        commits without waiting for the WAL flush, so they wait neither for fsyncs nor
        behind the durable writes. Losing such a commit in a crash equals a crash before
        it (a lease runs out, a task runs again), and the WAL is in order: a later
        synchronous commit flushes it too. Everything else commits synchronously."""
        self._committers: list[asyncio.Task[None]] = []
        self._committer_pids: set[int] = set()
        self._listener: asyncio.Task[None] | None = None
        self._waiters = ChangeWaiters()
        self._closed = False
        self._outage_logged = 0.0
        self.stats = {
            "batches": 0,
            "operations": 0,
            "operations_alone": 0,
            "notify_transactions": 0,
            "isolated_batches": 0,
            "retried_operations": 0,
            "connections": 0,
            "notifications": 0,
        }

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, **options: Any) -> PostgresStore:
        """Connect (waiting up to ``reconnect_timeout`` for a server that is starting),
        apply pending migrations unless ``migrate=False``, start committers and listener."""
        store = cls(url, **options)
        try:
            await store._start(migrate)
        except BaseException:
            await store.close()
            raise
        return store

    # -- connections -------------------------------------------------------------------
    def _connection_options(self, lock_timeout: bool = True) -> dict[str, Any]:
        # No client-side timeout per statement (it costs a timer each): the server
        # bounds statements, and TCP keepalives notice a server that vanished.
        settings = {
            "statement_timeout": str(int(self.statement_timeout * 1000)),
            "application_name": "tether",
            # Claims read back what they leased on a snapshot newer than the lease's
            # (the claim functions): whatever the database's or role's default.
            "default_transaction_isolation": "read committed",
        }
        if lock_timeout:
            settings["lock_timeout"] = str(max(1, int(self.lock_timeout * 1000)))
        return {
            "timeout": self.connect_timeout,
            "statement_cache_size": 512,
            "server_settings": settings,
        }

    async def _connect(self, lock_timeout: bool = True) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url, **self._connection_options(lock_timeout))
        await _keepalive(conn)
        self.stats["connections"] += 1
        return conn

    async def _connect_patiently(self) -> asyncpg.Connection:
        """Connect (for migrations: no lock timeout), retrying while the server is
        unreachable or starting up."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                return await self._connect(lock_timeout=False)
            except _CONNECTION_ERRORS as e:
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"cannot connect to PostgreSQL at {self.display_url}: "
                        f"{e or type(e).__name__} (tried for {self.reconnect_timeout:g} s); "
                        "is the server running and the URL right?",
                        retryable=True,
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except asyncpg.PostgresError as e:  # no such database, bad password, ...
                raise StoreError(
                    f"cannot connect to PostgreSQL at {self.display_url}: {e}", retryable=False
                ) from None

    async def _check_functions(self, conn: asyncpg.Connection) -> None:
        """Do without the schema's functions this role may not call (saying so once)."""
        names = [*_CLAIM_FUNCTIONS, *_COMPLETION_FUNCTIONS]
        callable_ = {row[0] for row in await conn.fetch(_CALLABLE_FUNCTIONS, names)}
        missing = [name for name in names if name not in callable_]
        if not missing:
            return
        logger.warning(
            "the functions %s are missing or not executable by this role on %s: claims or "
            "completions take more round trips without them; migrate the schema (tether db "
            "migrate URL) or GRANT EXECUTE on them to the role",
            ", ".join(missing),
            self.display_url,
        )
        self.dialect = dataclasses.replace(
            self.dialect,
            claim_functions=callable_.issuperset(_CLAIM_FUNCTIONS),
            completion_functions=callable_.issuperset(_COMPLETION_FUNCTIONS),
        )

    async def _start(self, migrate: bool) -> None:
        conn = await self._connect_patiently()
        try:
            if migrate:
                applied, _ = await migrations.migrate_postgres(conn)
                if applied:
                    labels = ", ".join(m.label for m in applied)
                    logger.info("applied migrations to %s: %s", self.display_url, labels)
            else:
                await migrations.check_postgres(conn)
            await self._check_functions(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=0,  # no floor to restore while the server is down
            max_size=self.pool_size,
            max_inactive_connection_lifetime=60.0,
            init=_keepalive,
            reset=_no_reset,
            **self._connection_options(),
        )
        self._committers = [
            asyncio.create_task(self._run_committer(self._queue), name=f"tether-pg-committer-{i}")
            for i in range(self.committer_count)
        ]
        self._committers.append(
            asyncio.create_task(
                self._run_committer(self._lease_queue, leases=True), name="tether-pg-leases"
            )
        )
        listening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._listener = asyncio.create_task(self._listen(listening), name="tether-pg-listener")
        await listening

    # -- executing operations ----------------------------------------------------------
    def _submit(self, make: Callable[[], Op[T]], durable: bool) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue_for(durable).put_nowait(_Write(make, fut, durable))
        return fut

    def _submit_write(self, make: Callable[[], Op[T]], durable: bool) -> asyncio.Future[T]:
        return self._submit(make, durable)

    async def _read(self, make: Callable[[], Op[T]]) -> T:
        assert self._pool is not None
        attempt = _Attempts()
        while True:
            if self._closed:
                raise StoreError("the store is closed", retryable=False)
            try:
                return await self._read_once(make)
            except Exception as e:
                error = _classify(e, "a read")
                if not isinstance(error, _NotApplied):
                    if error is e:
                        raise
                    raise error from e
                delay = self._retry_delay(attempt, error)
                if isinstance(delay, StoreError):
                    raise delay from e
                await asyncio.sleep(delay)

    async def _read_once(self, make: Callable[[], Op[T]]) -> T:
        assert self._pool is not None
        conn = await self._pool.acquire()
        try:
            return await _drive(make, conn, _Effects())  # type: ignore[no-any-return]
        except _CONNECTION_ERRORS:
            conn.terminate()  # the pool replaces it
            raise
        finally:
            await self._pool.release(conn)

    def _retry_delay(self, attempt: _Attempts, error: _NotApplied) -> float | StoreError:
        """How long to wait before running an operation again, or the error to give up
        with once it has been retried long enough."""
        now = time.monotonic()
        if self._closed:
            return StoreError("the store is closed", retryable=False)
        if error.duplicate:
            attempt.conflicts += 1
            if attempt.conflicts > _MAX_DUPLICATE_RETRIES:
                return StoreError(f"{error} (tried {attempt.conflicts} times)", retryable=True)
        if attempt.deadline is None:
            attempt.deadline = now + self.reconnect_timeout
            if not error.conflict and now - self._outage_logged > 5.0:
                self._outage_logged = now
                logger.warning("%s; retrying for up to %g s", error, self.reconnect_timeout)
        if now >= attempt.deadline:
            return StoreError(
                f"{error}; still failing after {self.reconnect_timeout:g} s. Nothing was "
                "applied: the call can be repeated",
                retryable=True,
            )
        attempt.retries += 1
        self.stats["retried_operations"] += 1
        base = 0.005 if error.conflict else 0.05
        return min(base * 2.0 ** (attempt.retries - 1), 1.0) * (0.5 + random.random())

    def _retry_later(self, write: _Write, error: _NotApplied) -> None:
        delay = self._retry_delay(write, error)
        if isinstance(delay, StoreError):
            if not write.fut.done():
                write.fut.set_exception(delay)
        else:
            asyncio.get_running_loop().call_later(delay, self._requeue, write)

    def _requeue(self, write: _Write) -> None:
        if self._closed:
            if not write.fut.done():
                write.fut.set_exception(StoreError("the store is closed", retryable=False))
        else:
            self._queue_for(write.durable).put_nowait(write)

    def _queue_for(self, durable: bool) -> asyncio.Queue[_Write | None]:
        return self._queue if durable else self._lease_queue

    async def _run_committer(
        self, queue: asyncio.Queue[_Write | None], leases: bool = False
    ) -> None:
        """Run the writes of ``queue`` in group commits; ``leases``: lease-only writes,
        committed without waiting for the WAL flush."""
        conn: asyncpg.Connection | None = None
        pid: int | None = None
        connect_after = 0.0
        delay = 0.05
        try:
            while True:
                first = await queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < _MAX_BATCH and not queue.empty():
                    item = queue.get_nowait()
                    if item is None:
                        queue.put_nowait(None)  # stop after this batch
                        break
                    batch.append(item)
                if conn is None or conn.is_closed():
                    if pid is not None:
                        self._committer_pids.discard(pid)
                        pid = None
                    error: BaseException | None = None
                    if time.monotonic() < connect_after:
                        error = _NotApplied("PostgreSQL is unreachable", conflict=False)
                    else:
                        try:
                            conn = await self._connect()
                            if leases:
                                await conn.execute("SET synchronous_commit = off")
                            pid = conn.get_server_pid()
                            self._committer_pids.add(pid)
                            delay = 0.05
                        except Exception as e:
                            connect_after = time.monotonic() + delay
                            delay = min(delay * 2, 2.0)
                            error = _classify(e, "connecting")
                    if error is not None:
                        self._deliver([(w, False, error) for w in batch])
                        continue
                assert conn is not None
                await self._run_batch(conn, batch)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)

    async def _run_batch(self, conn: asyncpg.Connection, batch: list[_Write]) -> None:
        results: _Results = []
        changes = 0
        committing = notify_after = False
        changes_after = 0
        pending = batch
        # One operation alone: its transaction begins with its first statement, which may
        # commit by itself (``Stmt.alone``): no BEGIN and COMMIT round trips then.
        alone = _Effects(unbegun=True) if len(batch) == 1 else None
        grouped = True
        try:
            while True:
                if alone is None:
                    await conn.execute("BEGIN")
                outcome = await self._run_ops(conn, pending, False, first=alone, grouped=grouped)
                if not isinstance(outcome, _Failed):
                    break
                # An operation failed after writing, or a statement failed (which aborts
                # a PostgreSQL transaction): roll back.
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                if outcome.in_group:
                    # Run them one by one to find which it was (a row lock held elsewhere
                    # would else hold back the group's others, one retry at a time).
                    grouped = False
                    continue
                error = _classify(outcome.error, "a write")
                if isinstance(error, _NotApplied) or len(pending) == 1:
                    # A deadlock, lock timeout or key race with another transaction: that
                    # operation waits and runs again later (redone at once, it would meet
                    # the same transaction); the others go on without it.
                    results.append((pending[outcome.index], False, error))
                    pending = pending[: outcome.index] + pending[outcome.index + 1 :]
                    if pending:
                        continue
                    outcome = ([], 0)
                    break
                # It failed for its own reasons: redo with a savepoint per operation.
                self.stats["isolated_batches"] += 1
                await conn.execute("BEGIN")
                outcome = await self._run_ops(conn, pending, isolate=True)
                break
            assert not isinstance(outcome, _Failed)
            results += outcome[0]
            changes = outcome[1]
            if alone is not None and alone.alone_sent and alone.unbegun and results[0][1]:
                # Done with no transaction: in one lone statement (and its reads).
                self.stats["operations_alone"] += 1
            if conn.is_in_transaction():
                committing = True
                # The payload says which kinds of work became available (``Change``).
                await conn.execute(
                    f"NOTIFY {CHANNEL}, '{changes}'; COMMIT" if changes else "COMMIT"
                )
            else:  # committed by itself: tell callers first, then what it did not say
                changes_after = changes & ~(alone.announced if alone is not None else 0)
                notify_after = bool(changes_after)
        except Exception as e:
            lost = isinstance(e, _CONNECTION_ERRORS)
            if lost:
                conn.terminate()
                logger.info("lost the connection to PostgreSQL mid-batch: %s", e)
            elif not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            if lost and committing:
                unknown = StoreError(
                    "the connection to PostgreSQL was lost while committing: the change may "
                    f"or may not have been saved ({e or type(e).__name__}); Tether's own "
                    "calls can be repeated safely",
                    retryable=True,
                )
                results = [(w, False, unknown if ok else v) for w, ok, v in results]
                changes = Change.ALL  # perhaps
            else:
                # Nothing committed: the server rolls back the transaction of a lost
                # connection, and we rolled back any other. (Or a lone statement did,
                # perhaps: its operation is safe to run again, ``Stmt.alone`` says.)
                error = _classify(e, "a write")
                if not isinstance(error, StoreError):
                    error = StoreError(f"PostgreSQL transaction failed: {e}", retryable=True)
                results = [(w, False, error) for w in batch]
                changes = _maybe_committed(alone) if lost else 0
        self.stats["batches"] += 1
        self.stats["operations"] += len(batch)
        # Only now, after COMMIT returned, are callers told.
        self._deliver(results)
        self._waiters.notify(changes)
        if notify_after:
            try:
                # A NOTIFY commits a transaction of its own: it need not wait for the
                # WAL flush (a wake-up, not data; the data's commit was durable).
                await conn.execute(
                    "BEGIN; SET LOCAL synchronous_commit = off; "
                    f"NOTIFY {CHANNEL}, '{changes_after}'; COMMIT"
                )
                self.stats["notify_transactions"] += 1
            except Exception as e:
                # Other processes' waiters look again within their poll interval anyway.
                logger.info("could not notify other processes of a commit: %s", e)
                if isinstance(e, _CONNECTION_ERRORS):
                    conn.terminate()

    async def _run_ops(
        self,
        conn: asyncpg.Connection,
        batch: list[_Write],
        isolate: bool,
        first: _Effects | None = None,
        grouped: bool = True,
    ) -> tuple[_Results, int] | _Failed:
        """Run each operation: (results, the kinds of work they touched), or, unless
        ``isolate`` (a savepoint per operation), the failure that needs the transaction
        rolled back. ``first``: the effects of the first operation, when it runs with no
        transaction begun. With ``grouped``, neighbours that can run as one operation
        (``together``) do so, unless isolated: one call instead of a statement each."""
        results: _Results = []
        changes = 0
        grouped = grouped and not isolate and first is None
        makes = [w.make for w in batch]
        for run_group, start, end in spans(makes, grouped):
            alone: Sequence[int] = range(start, end)
            if run_group is not None:
                done = _Effects()
                group = functools.partial(run_group, makes[start:end])
                try:
                    values = await _drive(group, conn, done)
                except Exception as e:
                    if isinstance(e, _CONNECTION_ERRORS):
                        raise
                    return _Failed(start, e, in_group=True)
                changes |= done.changes
                pairs = list(zip(alone, values, strict=True))
                results += [(batch[i], True, v) for i, v in pairs if v is not None]
                alone = [i for i, v in pairs if v is None]  # each by itself, after it
            for i in alone:
                done = first if i == 0 and first is not None else _Effects()
                outcome = await self._run_one(conn, batch[i], done, isolate)
                if isinstance(outcome, BaseException):
                    return _Failed(i, outcome)
                if outcome[1]:
                    changes |= done.changes
                results.append(outcome)
        return results, changes

    @staticmethod
    async def _run_one(
        conn: asyncpg.Connection, write: _Write, done: _Effects, isolate: bool
    ) -> tuple[_Write, bool, Any] | BaseException:
        """Run one operation: its result, or the error that needs the transaction rolled
        back (unless ``isolate``: a savepoint undoes a failed operation's writes)."""
        if isolate:
            await conn.execute("SAVEPOINT op")
        try:
            value = await _drive(write.make, conn, done)
        except Exception as e:
            if isinstance(e, _CONNECTION_ERRORS):
                raise
            if isolate:
                await conn.execute("ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op")
            elif done.wrote or isinstance(e, asyncpg.PostgresError):
                return e
            return write, False, _classify(e, "a write")
        if isolate:
            await conn.execute("RELEASE SAVEPOINT op")
        return write, True, value

    def _deliver(self, results: _Results) -> None:
        for write, ok, value in results:
            if write.fut.done():
                continue
            if ok:
                write.fut.set_result(value)
            elif isinstance(value, _NotApplied):
                self._retry_later(write, value)
            else:
                write.fut.set_exception(value)

    # -- notifications -------------------------------------------------------------------
    def change_waiter(self, changes: Change = Change.ALL) -> asyncio.Future[None]:
        return self._waiters.add(changes)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if pid in self._committer_pids:
            return  # our own commit: its waiters were woken already
        self.stats["notifications"] += 1
        self._waiters.notify(int(payload) if payload.isdigit() else Change.ALL)

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        """Keep a ``LISTEN`` connection open; reconnect with backoff when it drops."""
        delay = 0.05
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                def on_lost(_conn: Any, lost: asyncio.Future[None] = lost) -> None:
                    if not lost.done():
                        lost.set_result(None)

                conn.add_termination_listener(on_lost)
                await conn.add_listener(CHANNEL, self._on_notify)
                delay = 0.05
                if not ready.done():
                    ready.set_result(None)
                # Changes may have been missed while we were away.
                self._waiters.notify(Change.ALL)
                while not lost.done():
                    await asyncio.wait([lost], timeout=10.0)
                    if not lost.done():
                        await conn.execute("SELECT 1", timeout=self.connect_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not ready.done():
                    ready.set_exception(
                        StoreError(f"cannot listen for changes on {self.display_url}: {e}")
                    )
                    return
                logger.warning(
                    "lost the notification connection to %s (%s); reconnecting",
                    self.display_url,
                    e or type(e).__name__,
                )
            finally:
                if conn is not None:
                    conn.terminate()
            self._waiters.notify(Change.ALL)  # meanwhile, waiters look for themselves
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- closing -------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in range(self.committer_count):
            self._queue.put_nowait(None)
        self._lease_queue.put_nowait(None)
        if self._committers:
            _, pending = await asyncio.wait(self._committers, timeout=10.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._committers, return_exceptions=True)
        for queue in (self._queue, self._lease_queue):
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None and not item.fut.done():
                    item.fut.set_exception(StoreError("the store is closed", retryable=False))
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5.0)
            except Exception:
                self._pool.terminate()
        self._waiters.notify(Change.ALL)
