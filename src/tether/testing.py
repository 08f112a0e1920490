"""Test helpers: a time-skipping workflow environment and an activity environment.

``WorkflowEnvironment.start_time_skipping()`` gives a client on a throwaway SQLite
store whose clock jumps to the next timer or retry whenever nothing is running and
a client is waiting on a result, so a 30-day ``asyncio.sleep`` passes in
milliseconds. ``ActivityEnvironment`` runs an activity function directly with an
activity context, recording its heartbeats.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from tether._runtime.activity_context import ActivityContext, ActivityInfo
from tether._runtime.activity_context import current as current_activity
from tether._runtime.clock import Clock, SkippingClock
from tether._runtime.connection import open_store
from tether._runtime.definitions import workflow_definition
from tether._runtime.instance import WorkflowInfo, WorkflowInstance, WorkflowTaskFailure
from tether._store.base import Event
from tether._store.sqlite import SqliteStore
from tether.client import Client, HistoryEvent
from tether.common import Duration, to_seconds
from tether.converter import PayloadConverter
from tether.exceptions import InvalidArgumentError

__all__ = ["ActivityEnvironment", "WorkflowEnvironment", "replay"]


class WorkflowEnvironment:
    """A client on a private store; close it with ``await env.shutdown()`` or ``async with``."""

    def __init__(self, client: Client, directory: str | None) -> None:
        self.client = client
        self._directory = directory
        self._skipper: asyncio.Task[None] | None = None

    @classmethod
    async def start_local(
        cls, path: str | None = None, *, url: str | None = None
    ) -> WorkflowEnvironment:
        """An environment on the wall clock: on a temporary SQLite file, or the SQLite
        file at ``path``, or the store at ``url`` (``postgresql://...`` for example)."""
        return await cls._start(path, url, Clock())

    @classmethod
    async def start_time_skipping(
        cls, path: str | None = None, *, url: str | None = None
    ) -> WorkflowEnvironment:
        """An environment whose clock skips ahead while everything waits on timers
        (its store as for ``start_local``)."""
        clock = SkippingClock()
        env = await cls._start(path, url, clock)
        env._skipper = asyncio.create_task(env._skip_time(clock))
        return env

    @classmethod
    async def _start(cls, path: str | None, url: str | None, clock: Clock) -> WorkflowEnvironment:
        if url is not None:
            if path is not None:
                raise InvalidArgumentError("give a SQLite path or a store URL, not both")
            store = await open_store(url)
            return cls(Client(store, clock=clock, converter=PayloadConverter()), None)
        directory = None
        if path is None:
            directory = tempfile.mkdtemp(prefix="tether-test-")
            path = os.path.join(directory, "tether.db")
        store = await asyncio.get_running_loop().run_in_executor(None, SqliteStore, path)
        return cls(Client(store, clock=clock, converter=PayloadConverter()), directory)

    @property
    def clock(self) -> Clock:
        return self.client.clock

    async def _skip_time(self, clock: SkippingClock) -> None:
        store = self.client.store
        while True:
            await asyncio.sleep(0.002)
            if clock.result_waiters <= 0:
                continue
            due = await store.next_due_time()
            if due is None or due <= clock.now():
                continue
            if await store.leased_task_count():
                continue
            # Look again: work may have appeared while we asked.
            again = await store.next_due_time()
            if again == due:
                clock.advance_to(due)

    async def sleep(self, duration: Duration) -> None:
        """Move time forward by ``duration`` (instantly on a skipping clock)."""
        seconds = to_seconds(duration, "duration") or 0.0
        clock = self.client.clock
        if isinstance(clock, SkippingClock):
            clock.advance_to(clock.now() + seconds)
            await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(seconds)

    async def shutdown(self) -> None:
        if self._skipper is not None:
            self._skipper.cancel()
            await asyncio.gather(self._skipper, return_exceptions=True)
        await self.client.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    async def __aenter__(self) -> WorkflowEnvironment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


class ActivityEnvironment:
    """Runs an activity function outside a worker, with an activity context.

    ``heartbeats`` collects every ``activity.heartbeat`` call's details; ``info`` is
    what ``activity.info()`` returns (override fields with ``dataclasses.replace``);
    ``cancel()`` makes the next heartbeat raise ``ActivityCancelled``.
    """

    def __init__(self, info: ActivityInfo | None = None) -> None:
        self.info = info or ActivityInfo(
            activity_type="test",
            activity_seq=1,
            attempt=1,
            idempotency_key="test-run/1",
            heartbeat_details=None,
            workflow_id="test-workflow",
            run_id="test-run",
            workflow_type="Test",
            task_queue="test",
            scheduled_time=0.0,
            start_to_close_timeout=None,
            heartbeat_timeout=None,
        )
        self.heartbeats: list[Any] = []
        self._context: ActivityContext | None = None
        self._cancel_reason: str | None = None

    def cancel(self, reason: str = "cancelled by the test") -> None:
        self._cancel_reason = reason
        if self._context is not None:
            self._context.cancel(reason)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` (awaiting it if async, in a thread if sync) as an activity."""
        ctx = ActivityContext(self.info, on_heartbeat=lambda: None)
        original = ctx.heartbeat

        def record(details: Any) -> None:
            original(details)
            self.heartbeats.append(details)

        ctx.heartbeat = record  # type: ignore[method-assign]
        if self._cancel_reason is not None:
            ctx.cancel(self._cancel_reason)
        self._context = ctx
        context = contextvars.copy_context()
        context.run(current_activity.set, ctx)
        if asyncio.iscoroutinefunction(fn):
            return await asyncio.get_running_loop().create_task(fn(*args), context=context)
        return await asyncio.get_running_loop().run_in_executor(None, context.run, fn, *args)


def replay(workflow: type, history: list[HistoryEvent]) -> None:
    """Replay a run's recorded history against ``workflow``'s current code.

    Raises ``NondeterminismError`` (or the workflow's own bug) where the code no
    longer produces the recorded commands; returns quietly if it replays cleanly.
    """
    defn = workflow_definition(workflow)
    if not history or history[0].type != "WorkflowStarted":
        raise ValueError("a history starts with its WorkflowStarted event")
    started = history[0].data
    info = WorkflowInfo.from_started("replay", history[0].time.timestamp(), started)
    instance = WorkflowInstance(defn, info, PayloadConverter())  # type: ignore[abstract]
    events = [Event(e.seq, e.type, e.time.timestamp(), e.data) for e in history]
    try:
        # Only completed workflow tasks are checked; trailing inbound events are new work.
        instance.apply(events, events[-1].time, activate_new=False)
    except WorkflowTaskFailure as e:
        raise (e.__cause__ or e) from None
    finally:
        instance.evict()
