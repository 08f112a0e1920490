"""Starting workflows and reading their results, status and history."""

from __future__ import annotations

import asyncio
import datetime as _dt
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether._runtime.clock import Clock
from tether._runtime.connection import open_store
from tether._runtime.definitions import workflow_definition
from tether._runtime.failures import from_failure
from tether._store.base import COMPLETED, RUNNING, STATUSES, NewRun, RunInfo, Store
from tether.converter import DEFAULT_MAX_PAYLOAD_BYTES, PayloadConverter
from tether.exceptions import (
    InvalidArgumentError,
    StoreError,
    UnknownWorkflowTypeError,
    WorkflowFailureError,
)

__all__ = ["Client", "HistoryEvent", "WorkflowDescription", "WorkflowHandle"]

_WORKER_SEEN_WINDOW = 300.0
"""A worker seen within this many seconds counts as serving its task queue."""


def _datetime(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.UTC)


@dataclass(frozen=True)
class WorkflowDescription:
    """A run's status as ``handle.describe()`` reports it."""

    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    namespace: str
    status: str
    """``running``, ``completed`` or ``failed``."""
    start_time: _dt.datetime
    close_time: _dt.datetime | None
    history_length: int
    failure: dict[str, Any] | None
    """The recorded error of a failed run."""
    task_failure: dict[str, Any] | None
    """Why the latest workflow task failed (a bug or nondeterminism) while it is retried."""

    @classmethod
    def _from(cls, run: RunInfo) -> WorkflowDescription:
        return cls(
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            workflow_type=run.workflow_type,
            task_queue=run.task_queue,
            namespace=run.namespace,
            status=run.status,
            start_time=_datetime(run.created_at) or _dt.datetime.now(_dt.UTC),
            close_time=_datetime(run.closed_at),
            history_length=run.history_length,
            failure=run.failure,
            task_failure=run.task_failure,
        )


@dataclass(frozen=True)
class HistoryEvent:
    """One event of a run's history."""

    seq: int
    type: str
    time: _dt.datetime
    data: dict[str, Any]


class Client:
    """A connection to a Tether store. Create with ``await Client.connect(url)``."""

    def __init__(
        self,
        store: Store,
        *,
        namespace: str = "default",
        converter: PayloadConverter | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._closed_watcher = _ClosedRunWatcher(store)
        self.namespace = namespace
        self.converter = converter or PayloadConverter()
        self.clock = clock or Clock()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        namespace: str = "default",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> Client:
        """Connect to the store at ``url`` (``sqlite:///path/to/file.db``), creating it if new."""
        store = await asyncio.get_running_loop().run_in_executor(None, open_store, url)
        return cls(store, namespace=namespace, converter=PayloadConverter(max_payload_bytes))

    @property
    def store(self) -> Store:
        return self._store

    async def close(self) -> None:
        await self._store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_workflow(
        self,
        workflow: type | Callable[..., Any] | str,
        *args: Any,
        id: str,
        task_queue: str,
        request_id: str | None = None,
        result_type: Any = None,
    ) -> WorkflowHandle:
        """Start a run and return its handle once the start is durably recorded.

        ``workflow`` is a ``@workflow.defn`` class, its run method, or a type name.
        Raises ``WorkflowAlreadyStartedError`` if ``id`` is running, unless this call
        repeats an earlier one with the same ``request_id`` (idempotent start).
        """
        if not id:
            raise InvalidArgumentError("start_workflow needs a non-empty workflow id (id=...)")
        if not task_queue:
            raise InvalidArgumentError("start_workflow needs a task queue (task_queue=...)")
        if isinstance(workflow, str):
            workflow_type, result_hint = workflow, result_type
        else:
            defn = workflow_definition(workflow)
            workflow_type = defn.name
            result_hint = result_type if result_type is not None else defn.return_hint
            if len(args) > len(defn.arg_hints):
                raise InvalidArgumentError(
                    f"workflow {workflow_type!r} takes {len(defn.arg_hints)} arguments, "
                    f"{len(args)} given"
                )
        payload = self.converter.encode_args(args, f"workflow {workflow_type!r}")
        if not isinstance(workflow, str):
            # Reject arguments the workflow could not accept before anything is stored.
            self.converter.decode_args(payload, defn.arg_hints, f"workflow {workflow_type!r}")
        now = self.clock.now()
        served = await self._store.workflow_types_served(task_queue, now - _WORKER_SEEN_WINDOW)
        if served is not None and workflow_type not in served:
            raise UnknownWorkflowTypeError(
                f"no worker on task queue {task_queue!r} knows workflow type "
                f"{workflow_type!r} (they serve: {', '.join(sorted(served)) or 'nothing'}); "
                "check the name or register the workflow with a worker"
            )
        outcome = await self._store.start_run(
            NewRun(
                namespace=self.namespace,
                workflow_id=id,
                run_id=str(uuid.uuid4()),
                workflow_type=workflow_type,
                task_queue=task_queue,
                args=payload,
                request_id=request_id or secrets.token_hex(16),
                seed=secrets.randbits(63),
                now=now,
            )
        )
        return WorkflowHandle(self, id, outcome.run_id, result_hint)

    async def execute_workflow(
        self,
        workflow: type | Callable[..., Any] | str,
        *args: Any,
        id: str,
        task_queue: str,
        request_id: str | None = None,
        result_type: Any = None,
    ) -> Any:
        """Start a run and wait for its result."""
        handle = await self.start_workflow(
            workflow,
            *args,
            id=id,
            task_queue=task_queue,
            request_id=request_id,
            result_type=result_type,
        )
        return await handle.result()

    def get_workflow_handle(
        self, workflow_id: str, *, run_id: str | None = None, result_type: Any = None
    ) -> WorkflowHandle:
        """A handle on an existing workflow (its latest run unless ``run_id`` is given)."""
        return WorkflowHandle(self, workflow_id, run_id, result_type)

    async def list_workflows(
        self, *, status: str | None = None, workflow_type: str | None = None, limit: int = 1000
    ) -> list[WorkflowDescription]:
        """Runs in this namespace, newest first, optionally filtered."""
        if status is not None and status not in STATUSES:
            raise InvalidArgumentError(
                f"unknown status {status!r}; expected one of {', '.join(STATUSES)}"
            )
        runs = await self._store.list_runs(
            self.namespace, status=status, workflow_type=workflow_type, limit=limit
        )
        return [WorkflowDescription._from(r) for r in runs]


class WorkflowHandle:
    """Refers to one workflow run; get it from ``start_workflow`` or ``get_workflow_handle``."""

    def __init__(
        self, client: Client, workflow_id: str, run_id: str | None, result_type: Any = None
    ) -> None:
        self.client = client
        self.id = workflow_id
        self.run_id = run_id
        self._result_type = result_type

    async def _run(self) -> RunInfo:
        return await self.client.store.get_run(self.client.namespace, self.id, self.run_id)

    async def describe(self) -> WorkflowDescription:
        return WorkflowDescription._from(await self._run())

    async def history(self) -> list[HistoryEvent]:
        run = await self._run()
        events = await self.client.store.read_history(run.run_id)
        return [
            HistoryEvent(e.seq, e.type, _dt.datetime.fromtimestamp(e.time, _dt.UTC), e.data)
            for e in events
        ]

    async def result(self, *, timeout: float | None = None) -> Any:
        """Wait for the run to close; return its result or raise ``WorkflowFailureError``.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        clock = self.client.clock
        clock.begin_result_wait()
        try:
            async with asyncio.timeout(timeout):
                run = await self._run()
                if run.status == RUNNING:
                    await self.client._closed_watcher.wait(run.run_id)
                    run = await self.client.store.get_run(
                        self.client.namespace, self.id, run.run_id
                    )
        finally:
            clock.end_result_wait()
        if run.status == COMPLETED:
            return self.client.converter.decode(run.result, self._result_type, "workflow result")
        cause = from_failure(run.failure) if run.failure else None
        raise WorkflowFailureError(
            f"workflow {run.workflow_type} {self.id!r} (run {run.run_id}) failed: {cause}",
            workflow_id=self.id,
            run_id=run.run_id,
            cause=cause,
        )


class _ClosedRunWatcher:
    """Waits for many runs to close with one store query per change, not one per waiter."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def wait(self, run_id: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(run_id, []).append(fut)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            await fut
        finally:
            futs = self._waiting.get(run_id)
            if futs is not None and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiting[run_id]

    async def _poll(self) -> None:
        while self._waiting:
            change = self._store.change_waiter()
            try:
                closed = await self._store.closed_runs(list(self._waiting))
            except StoreError:
                closed = []
            for run_id in closed:
                for fut in self._waiting.pop(run_id, []):
                    if not fut.done():
                        fut.set_result(None)
            if self._waiting:
                try:
                    await asyncio.wait_for(change, 1.0)
                except TimeoutError:
                    pass
