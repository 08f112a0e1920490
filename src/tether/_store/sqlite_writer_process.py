"""The SQLite store's writer in a process of its own (``SqliteStore(writer="process")``).

In one process the writer thread and the event loop share the GIL: a wake of a
workflow costs both about as much Python, and they take turns instead of running
side by side. Here the store's writer thread only hands batches of operations to a
child process, which runs them (``BatchWriter``, the same group commits) and sends
the outcomes back: the SQL, the commits and the operations' own Python run on the
other core.

The operations travel pickled: ``make`` is a picklable callable (a ``partial`` of a
``SqlStore`` method; the store itself pickles as a reference to the child's own
``SqlStore``, see ``SqliteStore.__reduce__``). Outcomes are acknowledged only after
the child's COMMIT returned, as in-process. The child exits when the store closes or
its parent's end of the socket closes (the parent died); if the child dies, the batch
it held fails with a retryable ``StoreError`` (it may or may not have committed,
like a lost connection to a server) and the next batch starts a new child.
"""

from __future__ import annotations

import asyncio
import collections
import copyreg
import dataclasses
import functools
import io
import logging
import operator
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

import tether._gc_tuning as _gc_tuning
from tether._store import base
from tether._store.sql import SqlStore
from tether._store.sql_statements import Dialect
from tether._store.sqlite_batches import BatchWriter, Outcome, Request, connect
from tether.exceptions import StoreError

logger = logging.getLogger("tether.store")

_POLL = "poll"
"""A request without operations: has another connection committed?"""
_STOP = "stop"
"""The last request: answer everything before it, then exit."""
_STARTUP_TIMEOUT = 60.0
_MERGE_LIMIT = 2048
"""Most operations the child merges into one transaction."""
_FLUSH_EVERY = 16
"""Queued operations that go out at once rather than at the end of the loop's pass:
the child starts on the first ones while the event loop still runs the rest, instead
of the two taking turns (E: 9.5 -> 7.8 s for 100,000 wakes against once per pass)."""
_HEADER = struct.Struct("!i")
"""A message's length before it (``multiprocessing.connection``'s framing, which the
child uses)."""

Replied = Callable[[list[Request] | None, list[Outcome], int, bool], None]
"""Called for each request, in order: its operations (None for a poll), their outcomes,
the kinds of work (``Change``) the commit touched, and whether another connection
committed."""


class ProcessWriter:
    """The parent's side, run by the event loop of the store's first write: no thread
    of its own, so nothing waits for the GIL between the event loop and the socket.

    Operations queued during one pass of the loop go out as one request; the child
    merges every request that has arrived into one transaction. ``on_reply`` gets each
    outcome on the loop; ``poll_interval`` says how long an idle writer waits before
    asking whether another connection committed (``data_version``).
    """

    def __init__(self, path: str, on_reply: Replied, poll_interval: Callable[[], float]) -> None:
        self._path = path
        self._on_reply = on_reply
        self._poll_interval = poll_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pending: list[Request] = []
        self._flush_scheduled = False
        self._in_flight: collections.deque[list[Request] | None] = collections.deque()
        self._out = bytearray()
        self._in = bytearray()
        self._sent_since_idle = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        """Done once a close on the writer's loop has finished."""
        self._aborted = False
        """Stopped by ``abort``: no new child starts for what was queued before."""
        self._proc, self._sock = _spawn(path)

    @property
    def pid(self) -> int | None:
        """The child's process id (None between a lost child and the next request)."""
        return None if self._proc is None else self._proc.pid

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this writer runs on (that of its first write, or ``bind``)."""
        return self._loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` from now on (before any write; called on ``loop``)."""
        if self._loop is None:
            self._bind(loop)

    def submit(self, op: Request, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``op`` (called on ``loop``); its outcome goes to ``on_reply``."""
        if self._closed:
            raise StoreError("the store is closed", retryable=False)
        if self._loop is None:
            self._bind(loop)
        if loop is self._loop:
            self._queue(op)
        else:  # a caller on another loop: hand the operation over to ours
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._queue, op)
            except RuntimeError:
                raise StoreError("the SQLite store's event loop has closed", retryable=False)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._on_readable)
        self._idle_handle = loop.call_later(self._poll_interval(), self._idle)

    def _queue(self, op: Request) -> None:
        if self._closed:  # (handed over from another loop as the store closed)
            self._never_started([op])
            return
        self._pending.append(op)
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            try:
                request = _request(batch)
            except Exception:
                batch, request = self._without_unpicklable(batch)
            if batch:
                self._send(batch, request)

    def _without_unpicklable(self, batch: list[Request]) -> tuple[list[Request], bytes]:
        """``batch`` does not pickle as a whole: fail the operations that do not pickle
        (a programming error, told to their callers) and return the rest."""
        sendable: list[Request] = []
        for op in batch:
            try:
                _dumps(_on_the_wire(op.make))
                sendable.append(op)
            except Exception as e:
                error = TypeError(f"store operation cannot be sent to the writer process: {e}")
                self._on_reply([op], [(False, error)], 0, False)
        request = _request(sendable)
        return sendable, request

    def _send(self, batch: list[Request] | None, request: bytes) -> None:
        if self._sock is None:
            if batch is None:
                return  # a poll or the stop: no reason to start a child for them
            if self._aborted:  # no new child for writes queued before that
                self._never_started(batch)
                return
            try:
                self._restart()
            except StoreError as e:
                self._on_reply(batch, [(False, e) for _ in batch], 0, True)
                return
        self._in_flight.append(batch)
        self._sent_since_idle = True
        was_empty = not self._out
        self._out += _HEADER.pack(len(request))
        self._out += request
        if was_empty:
            self._on_writable()

    def _restart(self) -> None:
        """Start a new child after the last one was lost (blocks the loop while the
        child starts: only after a crash)."""
        self._proc, self._sock = _spawn(self._path)
        assert self._loop is not None
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_writable(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        try:
            sent = sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return
        del self._out[:sent]
        if self._out:  # the child is busy reading: send the rest when it can take it
            self._loop.add_writer(sock.fileno(), self._on_writable)
        else:
            self._loop.remove_writer(sock.fileno())

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._in += data
        while len(self._in) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._in)
            if len(self._in) < _HEADER.size + size:
                break
            message = bytes(self._in[_HEADER.size : _HEADER.size + size])
            del self._in[: _HEADER.size + size]
            try:
                reply = pickle.loads(message)
            except Exception:
                # Which callers it answered is unknown now: fail them all, as if lost.
                logger.exception("unreadable reply from the SQLite writer process")
                self._lost()
                return
            self._replied(reply)

    def _replied(self, message: tuple[list[list[Outcome]], int, bool]) -> None:
        replies, changes, others = message
        for outcomes in replies:
            batch = self._in_flight.popleft()
            self._on_reply(batch, outcomes, changes, others)
            changes, others = 0, False  # reported once per transaction
        if not self._in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _idle(self) -> None:
        """Every poll interval: if nothing went out meanwhile, ask whether another
        connection committed (a poll still out is not asked again)."""
        assert self._loop is not None
        if not self._sent_since_idle and None not in self._in_flight:
            self._send(None, pickle.dumps(_POLL))
        self._sent_since_idle = False
        self._idle_handle = self._loop.call_later(self._poll_interval(), self._idle)

    def _lost(self) -> None:
        """The child is gone: what it held fails (it may or may not have committed)."""
        sock, proc = self._sock, self._proc
        self._sock = self._proc = None
        if sock is not None:
            if self._loop is not None:  # (never bound: a move that did not finish)
                self._loop.remove_reader(sock.fileno())
                self._loop.remove_writer(sock.fileno())
            sock.close()
        if proc is not None:
            _reap(proc)
        self._out.clear()
        self._in.clear()
        lost = list(self._in_flight)
        self._in_flight.clear()
        for batch in lost:
            if batch is not None:
                error = StoreError("SQLite writer process lost; outcome unknown, retry")
                self._on_reply(batch, [(False, error) for _ in batch], 0, True)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Send what is queued, let the child answer everything, then stop it. A second
        close on the writer's loop waits for the first to finish."""
        if self._closing is not None:
            if self._loop is asyncio.get_running_loop():
                await asyncio.shield(self._closing)
            return
        self._closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._loop is None or self._loop is not asyncio.get_running_loop():
            if self._loop is not None and self._loop.is_running():
                # Its loop is busy elsewhere: there, what is in flight fails as lost
                # (it may or may not have committed) and the child is stopped.
                self._loop.call_soon_threadsafe(self._lost)
                return
            # Never used, or its loop has stopped: nobody waits for what is in flight.
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                _reap(self._proc)
            return
        self._closing = self._loop.create_future()
        try:
            self._flush()
            if self._sock is not None:
                self._drained = self._loop.create_future()
                self._send(None, pickle.dumps(_STOP))
                if self._in_flight:  # (empty if the child was lost meanwhile)
                    self._in_flight.pop()  # the stop request gets no answer
                if self._in_flight:
                    await self._drained
            if self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
                self._loop.remove_writer(self._sock.fileno())
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                proc, self._proc = self._proc, None
                await self._loop.run_in_executor(None, _reap, proc)
        except BaseException:
            self.abort()  # cancelled midway (the loop ends): done here, not left half-way
            raise
        finally:
            self._closing.set_result(None)

    def abort(self) -> None:
        """Stop at once, on the writer's loop or with it stopped: what is in flight
        fails as lost (it may or may not have committed), the child is reaped."""
        self._closed = self._aborted = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._lost()
        pending, self._pending = self._pending, []
        if pending:  # never sent: they never started
            self._never_started(pending)

    def _never_started(self, batch: list[Request]) -> None:
        error = StoreError("the store is closed", retryable=False)
        self._on_reply(batch, [(False, error) for _ in batch], 0, False)


def _request(batch: list[Request]) -> bytes:
    return _dumps([(_on_the_wire(op.make), op.writes, op.durable) for op in batch])


def _on_the_wire(make: Callable[[], Any]) -> Any:
    """``make`` as it travels: a store method's ``partial`` (nearly every operation) as
    the method's name and arguments, which pickles in a third of the time of the
    ``partial``, its bound method and the store behind it; anything else as itself."""
    if type(make) is functools.partial and not make.keywords:
        method = make.func
        if type(method) is types.MethodType and isinstance(method.__self__, SqlStore):
            return (method.__func__.__name__, make.args)
    return make


def _from_the_wire(make: Any, store: SqlStore) -> Callable[[], Any]:
    """``_on_the_wire`` undone on the writer's side, against its own store."""
    if type(make) is tuple:
        name, args = make
        return functools.partial(getattr(store, name), *args)
    return cast(Callable[[], Any], make)


Reducer = Callable[[Any], tuple[Any, ...]]


def _by_fields(cls: type, names: list[str]) -> Reducer:
    values = operator.attrgetter(*names)  # a tuple only for two names or more

    def reduce(record: Any) -> tuple[Any, ...]:
        return cls, values(record) if len(names) > 1 else (values(record),)

    return reduce


def _record_reducers() -> dict[type, Reducer]:
    """The store's records pickle as their class and field values, in order: about
    half the time and size of the default (a dict of slots per object), on the event
    loop's side and the writer's alike."""
    reducers: dict[type, Reducer] = {}
    records = [
        cls
        for cls in vars(base).values()  # its own dataclasses, not the ones it imports
        if isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and cls.__module__ == base.__name__
    ]
    for cls in records:
        reducers[cls] = _by_fields(cls, [f.name for f in dataclasses.fields(cls)])
    # A claimed task's history stays behind (it is the last field): no store operation
    # reads it.
    fields = [f.name for f in dataclasses.fields(base.WorkflowTask)]
    assert fields[-1] == "history"
    reducers[base.WorkflowTask] = _by_fields(base.WorkflowTask, fields[:-1])
    return reducers


class _Pickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, **_record_reducers()}


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


def _spawn(path: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a child on ``path``; return it and our end of its socket, once it is ready."""
    ours, theirs = socket.socketpair()
    # The child imports this package from where the parent did.
    package_root = os.path.dirname(_PACKAGE_DIR)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, path, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        ours.close()
        raise StoreError(f"cannot start the SQLite writer process: {e}") from e
    finally:
        theirs.close()
    # The child says it is ready once its connection is open (or why it is not).
    channel = Connection(os.dup(ours.fileno()))
    try:
        if not channel.poll(_STARTUP_TIMEOUT):
            raise StoreError(f"the SQLite writer process for {path!r} did not start")
        ok, detail = pickle.loads(channel.recv_bytes())
    except (OSError, EOFError, StoreError) as e:
        ours.close()
        _reap(proc)
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"the SQLite writer process for {path!r} exited: {e}") from e
    finally:
        channel.close()
    if not ok:
        ours.close()
        _reap(proc)
        raise StoreError(f"cannot open SQLite store {path!r}: {detail}", retryable=False)
    ours.setblocking(False)
    return proc, ours


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a child whose socket is closed (it exits on EOF)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the child ----------------------------------------------------------------------
_store: SqlStore | None = None


def writer_side_store() -> SqlStore:
    """The ``SqlStore`` whose methods the operations sent to this process call."""
    if _store is None:
        raise RuntimeError("not in a SQLite writer process")
    return _store


class _WriterSideStore(SqlStore):
    """Only runs operations (``make`` callables name its methods); never awaited."""

    def _read(self, make: Any) -> Any:  # pragma: no cover
        raise RuntimeError("the writer process runs operations, not store calls")

    def _submit_write(self, make: Any, durable: bool) -> Any:  # pragma: no cover
        raise RuntimeError("the writer process runs operations, not store calls")

    async def close(self) -> None:  # pragma: no cover
        pass

    def change_waiter(self, changes: Any = None) -> Any:  # pragma: no cover
        raise RuntimeError("the writer process has no waiters")


def _serve(path: str, channel: Connection, dialect: Dialect) -> None:
    global _store
    try:
        conn = connect(path)
    except BaseException as e:
        channel.send_bytes(pickle.dumps((False, str(e))))
        return
    store = _WriterSideStore()
    store.dialect = dialect
    _store = store
    writer = BatchWriter(conn)
    channel.send_bytes(pickle.dumps((True, None)))
    try:
        while True:
            # Everything that has arrived runs as one transaction: one commit for all.
            requests: list[Any] = []
            merged = 0
            stop = False
            while not requests or (merged < _MERGE_LIMIT and channel.poll(0)):
                try:
                    request = pickle.loads(channel.recv_bytes())
                except (EOFError, OSError):
                    return  # the store's process died or gave up: nothing is waiting
                if request == _STOP:
                    stop = True
                    break
                requests.append(request)
                if request != _POLL:
                    merged += len(request)
            if requests:
                reply = _run(writer, requests)
                try:
                    channel.send_bytes(reply)
                except OSError:  # the parent closed its end (it gave these up as lost)
                    return
            if stop:
                return
    finally:
        conn.close()


def _run(writer: BatchWriter, requests: list[Any]) -> bytes:
    store = writer_side_store()
    batch = [
        Request(_from_the_wire(make, store), writes, durable)
        for request in requests
        if request != _POLL
        for make, writes, durable in request
    ]
    if batch:
        outcomes, changes, others = writer.run(batch)
    else:
        outcomes, changes, others = [], 0, writer.others_committed()
    replies: list[list[Outcome]] = []
    start = 0
    for request in requests:
        if request == _POLL:
            replies.append([])
        else:
            replies.append(outcomes[start : start + len(request)])
            start += len(request)
    return _pickle_reply(replies, changes, others)


def _pickle_reply(replies: list[list[Outcome]], changes: int, others: bool) -> bytes:
    try:
        return _dumps((replies, changes, others))
    except Exception:
        # A value or error that does not pickle fails its own caller, not the batch.
        return _dumps(([_picklable_outcomes(r) for r in replies], changes, others))


def _picklable_outcomes(outcomes: list[Outcome]) -> list[Outcome]:
    sendable: list[Outcome] = []
    for ok, value in outcomes:
        try:
            _dumps(value)
            sendable.append((ok, value))
        except Exception as e:
            detail = f"{type(value).__name__}: {value}" if not ok else repr(e)
            sendable.append((False, StoreError(f"outcome cannot be sent back: {detail}")))
    return sendable


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The ``tether`` package's directory (the child imports it from there)."""
_CHILD_MAIN = (
    "import sys, types; "
    "package = types.ModuleType('tether'); "
    f"package.__path__ = [{_PACKAGE_DIR!r}]; "
    "sys.modules['tether'] = package; "
    f"from {__name__} import main; main()"
)
"""The child's program (not ``-m``, which would load this module twice: as
``__main__`` and, for the operations that name it, under its own name). The
``tether`` package stands in for itself without running its ``__init__``: that loads
the public API (client, worker, pydantic models), which the child never uses, and
was a third of its start-up (0.17 -> 0.12 s here), which a restarted worker waits
for before its first claim."""


def main() -> None:
    from tether._store.sqlite import SqliteStore

    # A Ctrl-C (or a SIGTERM to the process group) is for the parent, which shuts down
    # gracefully and then closes the socket: this process ends with its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    # Each operation unpickled and run here is short-lived garbage, as in a worker.
    _gc_tuning.raise_first_threshold()
    path, fd = sys.argv[1], int(sys.argv[2])
    _serve(path, Connection(fd), SqliteStore.dialect)
