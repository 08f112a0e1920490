"""Which kinds of work a commit may have made available, and who waits for them.

Every write operation says what it touched (a workflow task became ready, a run
closed, ...); after the commit only the waiters interested in one of those kinds
wake. A worker's activity loop does not poll the store because a workflow task was
completed elsewhere, and a client awaiting results does not re-read them because a
task was claimed. Changes seen from other processes whose kind is unknown wake
everyone (``Change.ALL``).
"""

from __future__ import annotations

import asyncio
import enum
import threading


class Change(enum.IntFlag):
    WORKFLOW_TASK = 1
    """A workflow task may have become ready (new run, inbound event, update request)."""
    ACTIVITY_TASK = 2
    """An activity task may have become ready for any worker."""
    TIMER = 4
    """A durable timer was set, or a task delayed (a retry): the next due time may be
    earlier."""
    QUERY = 8
    """A query was asked or answered."""
    RUN_CLOSED = 16
    """A run closed."""
    UPDATE = 32
    """An update was accepted, completed or rejected."""
    HISTORY = 64
    """A workflow task completed with events."""
    ALL = 127


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


class ChangeWaiters:
    """Futures waiting for kinds of change; ``notify`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int]] = []

    def add(self, changes: Change) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if len(self._waiting) > 256:
                self._waiting = [w for w in self._waiting if not w[1].done()]
            self._waiting.append((loop, fut, int(changes)))
        return fut

    def notify(self, changes: int) -> None:
        if not changes:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        with self._lock:
            keep = []
            for waiter in self._waiting:
                loop, fut, wanted = waiter
                if wanted & changes:
                    by_loop.setdefault(loop, []).append(fut)
                elif not fut.done():
                    keep.append(waiter)
            self._waiting = keep
        for loop, futures in by_loop.items():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is running:
                _resolve(futures)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:
                pass  # that loop has closed; nobody is waiting
