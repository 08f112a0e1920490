"""Running workflows and activities in your process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from typing import Any

import tether._gc_tuning as gc_tuning
from tether._runtime.definitions import activity_definition, workflow_definition
from tether._runtime.engine import Engine, default_identity
from tether.client import Client
from tether.exceptions import InvalidArgumentError

__all__ = ["Worker"]

logger = logging.getLogger("tether.worker")


class Worker:
    """Polls one task queue and runs the given workflows and activities.

    Use ``async with Worker(...):`` to run it in the background of a block, or
    ``await worker.run()`` to run until ``await worker.shutdown()`` (or cancellation).
    Shutdown is graceful: it stops taking work, lets running work finish for up to
    ``graceful_shutdown_timeout`` seconds and hands the rest back to the store.
    """

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str,
        workflows: Sequence[type] = (),
        activities: Sequence[Callable[..., Any]] = (),
        max_concurrent_activities: int = 100,
        max_concurrent_workflow_tasks: int = 100,
        max_cached_workflows: int = 1000,
        identity: str | None = None,
        lease_duration: float = 10.0,
        graceful_shutdown_timeout: float = 10.0,
        activity_executor: concurrent.futures.Executor | None = None,
        tune_gc: bool = True,
    ) -> None:
        """Args:
        max_cached_workflows: live workflows kept in memory between tasks; an evicted
            one is rebuilt by replaying its history. 0 replays on every task.
        identity: names this worker in leases; a worker restarted with the same
            identity takes back its unfinished work at once (default ``host:pid``,
            with ``/2``, ``/3``... for further workers in the process). Give each
            worker its own: workers sharing one take each other's leases.
        lease_duration: seconds after which work held by a worker that stopped
            renewing its leases (it died) is given to another worker.
        activity_executor: runs sync activities (default: a thread pool with a thread
            per ``max_concurrent_activities``). A smaller one makes a sync activity
            wait for a thread while its timeouts run. Its code and arguments must
            stay in this process: a process pool cannot take them.
        tune_gc: on start, raise the garbage collector's first-generation threshold
            from CPython's default of 700 to 20,000 (only if the process still has the
            default): workflow tasks allocate many short-lived objects, and the
            default makes the collector run every few tasks. False leaves it alone.
        """
        if not task_queue:
            raise InvalidArgumentError("Worker needs a task_queue")
        if not workflows and not activities:
            raise InvalidArgumentError("Worker needs at least one workflow or activity")
        for name, value in (
            ("max_concurrent_activities", max_concurrent_activities),
            ("max_concurrent_workflow_tasks", max_concurrent_workflow_tasks),
        ):
            if value < 1:
                raise InvalidArgumentError(f"{name} must be at least 1 (got {value})")
        if max_cached_workflows < 0:
            raise InvalidArgumentError("max_cached_workflows must be >= 0")
        if lease_duration <= 0:
            raise InvalidArgumentError("lease_duration must be positive")
        if isinstance(activity_executor, concurrent.futures.ProcessPoolExecutor):
            raise InvalidArgumentError(
                "activity_executor cannot be a process pool: a sync activity runs in this "
                "process's context (its info, heartbeats, cancellation); pass a thread pool, "
                "or start processes from within the activity"
            )
        workflow_defs = [workflow_definition(w) for w in workflows]
        activity_defs = [activity_definition(a) for a in activities]
        for kind, names in (
            ("workflow", [w.name for w in workflow_defs]),
            ("activity", [a.name for a in activity_defs]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise InvalidArgumentError(f"duplicate {kind} names: {', '.join(duplicates)}")
        self.client = client
        self.task_queue = task_queue
        self._options: dict[str, Any] = {
            "task_queue": task_queue,
            "workflows": workflows,
            "activities": activities,
            "max_concurrent_activities": max_concurrent_activities,
            "max_concurrent_workflow_tasks": max_concurrent_workflow_tasks,
            "max_cached_workflows": max_cached_workflows,
            "identity": identity,
            "lease_duration": lease_duration,
            "graceful_shutdown_timeout": graceful_shutdown_timeout,
            "activity_executor": activity_executor,
            "tune_gc": tune_gc,
        }
        self._engine = Engine(
            client.store,
            client.clock,
            client.converter,
            task_queue=task_queue,
            workflows=workflow_defs,
            activities=activity_defs,
            identity=identity or default_identity(),
            max_concurrent_activities=max_concurrent_activities,
            max_concurrent_workflow_tasks=max_concurrent_workflow_tasks,
            max_cached_workflows=max_cached_workflows,
            lease_duration=lease_duration,
            graceful_shutdown_timeout=graceful_shutdown_timeout,
            activity_executor=activity_executor,
        )
        self._started = False
        self._stopped: asyncio.Event | None = None

    @property
    def identity(self) -> str:
        return self._engine.identity

    def with_options(self, **changes: Any) -> Worker:
        """A new worker like this one (same client, workflows, activities and identity)
        with some constructor arguments changed, e.g. ``task_queue=...``; this one must
        not have started."""
        if self._started:
            raise RuntimeError("with_options() needs a worker that has not started")
        unknown = set(changes) - set(self._options)
        if unknown:
            raise InvalidArgumentError(f"unknown worker options: {', '.join(sorted(unknown))}")
        return Worker(self.client, **{**self._options, "identity": self.identity, **changes})

    @property
    def stats(self) -> dict[str, int]:
        """Counters: workflow tasks, activities, replays, evictions, retries."""
        return dict(self._engine.stats)

    async def start(self) -> None:
        """Start polling in the background."""
        if self._started:
            raise RuntimeError("worker already started")
        self._started = True
        self._stopped = asyncio.Event()
        if self._options["tune_gc"] and gc_tuning.raise_first_threshold():
            logger.debug("garbage collector threshold raised to %d", gc_tuning.WORKER_THRESHOLD)
        await self._engine.start()
        logger.info("worker %s polling task queue %r", self.identity, self.task_queue)

    async def shutdown(self) -> None:
        """Stop gracefully (see the class docstring)."""
        if not self._started:
            return
        await self._engine.stop()
        if self._stopped is not None:
            self._stopped.set()

    async def run(self) -> None:
        """Run until ``shutdown()`` is called or this coroutine is cancelled."""
        await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.shutdown()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
