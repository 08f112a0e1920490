"""Starting workflows and reading their results, status and history."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
import inspect
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from tether._runtime.clock import Clock
from tether._runtime.connection import open_store
from tether._runtime.definitions import HANDLER_ATTR, WorkflowDefinition, workflow_definition
from tether._runtime.failures import from_failure
from tether._runtime.ids import new_run_id
from tether._runtime.instance import STACK_TRACE_QUERY
from tether._store.base import (
    COMPLETED,
    CONTINUED_AS_NEW,
    RUNNING,
    STATUSES,
    Change,
    NewRun,
    RunFilter,
    RunInfo,
    Store,
    UpdateRequest,
)
from tether.common import Duration, to_seconds
from tether.converter import DEFAULT_MAX_PAYLOAD_BYTES, PayloadConverter
from tether.exceptions import (
    InvalidArgumentError,
    NoWorkerResponseError,
    QueryFailedError,
    StoreError,
    UnknownWorkflowTypeError,
    UpdateFailedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
)

__all__ = ["Client", "HistoryEvent", "WorkflowDescription", "WorkflowHandle"]

_WORKER_SEEN_WINDOW = 300.0
_SERVED_CACHE_TTL = 2.0
"""Seconds a start trusts that a task queue's workers know a workflow type."""
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
    memo: dict[str, Any]
    search_attributes: dict[str, Any]
    parent_run_id: str | None

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
            memo=run.memo or {},
            search_attributes=run.search_attributes or {},
            parent_run_id=run.parent_run_id,
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
        self._served_cache: dict[str, tuple[float, set[str]]] = {}
        self._served_reads: dict[str, asyncio.Future[dict[str, dict[str, list[str]]] | None]] = {}
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
        """Connect to the store at ``url``, creating its schema if new.

        ``sqlite:///path/to/file.db`` (embedded) or ``postgresql://user@host/database``:
        the URL is the only difference between the two.
        """
        store = await open_store(url)
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
        id_conflict_policy: str | None = None,
        id_reuse_policy: str = "allow_duplicate",
        start_signal: str | None = None,
        start_signal_args: tuple[Any, ...] | list[Any] = (),
        memo: dict[str, Any] | None = None,
        search_attributes: dict[str, Any] | None = None,
        run_timeout: Duration | None = None,
        execution_timeout: Duration | None = None,
    ) -> WorkflowHandle:
        """Start a run and return its handle once the start is durably recorded.

        ``workflow`` is a ``@workflow.defn`` class, its run method, or a type name.

        While ``id`` is running, ``id_conflict_policy`` decides: ``fail`` (the default;
        raises ``WorkflowAlreadyStartedError``), ``use_existing`` (returns the running
        run) or ``terminate_existing``. A call that repeats an earlier one with the same
        ``request_id`` always returns the run that call started. After runs of ``id``
        closed, ``id_reuse_policy`` decides: ``allow_duplicate`` (the default),
        ``allow_duplicate_failed_only`` or ``reject_duplicate``.

        ``start_signal`` makes it signal-with-start: the signal is delivered to the new
        run, or to the running one (conflict policy ``use_existing``), in one transaction.

        ``memo`` and ``search_attributes`` are stored with the run (``describe()`` shows
        them; the workflow can upsert search attributes). ``run_timeout`` limits this
        run, ``execution_timeout`` the workflow across continue-as-new: when one passes,
        the run closes as ``timed_out``.
        """
        plan = self._plan_start(workflow, args, id, task_queue, result_type)
        if start_signal is not None:
            signal_args = self._encode_handler_args(
                plan.defn, "signals", start_signal, start_signal_args
            )
            id_conflict_policy = id_conflict_policy or "use_existing"
        policy = id_conflict_policy or "fail"
        _check_choice("id_conflict_policy", policy, _CONFLICT_POLICIES)
        _check_choice("id_reuse_policy", id_reuse_policy, _REUSE_POLICIES)
        run = plan.new_run(self, request_id, policy, id_reuse_policy)
        if start_signal is not None:
            run.signal = (start_signal, signal_args)
        run.memo = self.converter.encode(memo, "memo") if memo else None
        if search_attributes:
            run.search_attributes = self.converter.encode(search_attributes, "search attributes")
        run.run_timeout = to_seconds(run_timeout, "run_timeout")
        execution = to_seconds(execution_timeout, "execution_timeout")
        run.execution_deadline = None if execution is None else run.now + execution
        await self._check_served(plan.workflow_type, task_queue)
        outcome = await self._store.start_run(run)
        handle = WorkflowHandle(self, id, outcome.run_id, plan.result_hint, plan.defn)
        handle._started = True
        return handle

    async def execute_update_with_start(
        self,
        workflow: type | Callable[..., Any] | str,
        *args: Any,
        id: str,
        task_queue: str,
        update: str | Callable[..., Any],
        update_args: tuple[Any, ...] | list[Any] = (),
        update_id: str | None = None,
        id_conflict_policy: str = "use_existing",
        timeout: float | None = None,
    ) -> Any:
        """Start the workflow unless it runs (``use_existing``) and send it an update, in
        one transaction; return the update's result (see ``WorkflowHandle.execute_update``)."""
        plan = self._plan_start(workflow, args, id, task_queue, None)
        name = _handler_name(update)
        encoded = self._encode_handler_args(plan.defn, "updates", name, update_args)
        _check_choice("id_conflict_policy", id_conflict_policy, _CONFLICT_POLICIES)
        run = plan.new_run(self, None, id_conflict_policy, "allow_duplicate")
        request = UpdateRequest(update_id or str(uuid.uuid4()), name, encoded)
        run.update = request
        await self._check_served(plan.workflow_type, task_queue)
        outcome = await self._store.start_run(run)
        handle = WorkflowHandle(self, id, outcome.run_id, plan.result_hint, plan.defn)
        return await handle._await_update(outcome.run_id, request.update_id, update, timeout)

    def _plan_start(
        self,
        workflow: type | Callable[..., Any] | str,
        args: tuple[Any, ...],
        workflow_id: str,
        task_queue: str,
        result_type: Any,
    ) -> _StartPlan:
        if not workflow_id:
            raise InvalidArgumentError("start_workflow needs a non-empty workflow id (id=...)")
        if not task_queue:
            raise InvalidArgumentError("start_workflow needs a task queue (task_queue=...)")
        defn = None
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
        if defn is not None:
            # Reject arguments the workflow could not accept before anything is stored.
            self.converter.decode_args(payload, defn.arg_hints, f"workflow {workflow_type!r}")
        return _StartPlan(workflow_id, task_queue, workflow_type, defn, payload, result_hint)

    def _encode_handler_args(
        self, defn: WorkflowDefinition | None, kind: str, name: str, args: Any
    ) -> list[Any]:
        what = _KIND_NAMES[kind]
        payload = self.converter.encode_args(list(args), f"{what} {name!r}")
        if defn is not None and not (kind == "queries" and name == STACK_TRACE_QUERY):
            handlers = getattr(defn, kind)
            if name not in handlers:
                raise InvalidArgumentError(
                    f"workflow {defn.name} has no {what} handler {name!r} "
                    f"(it has: {', '.join(sorted(handlers)) or 'none'})"
                )
            method = getattr(defn.cls, handlers[name].method)
            try:
                inspect.signature(method).bind(None, *args)  # None stands for self
            except TypeError as e:
                raise InvalidArgumentError(
                    f"{what} {name!r} of workflow {defn.name}: {e} (got {len(args)})"
                ) from None
            self.converter.decode_args(payload, handlers[name].arg_hints, f"{what} {name!r}")
        return payload

    async def _check_served(self, workflow_type: str, task_queue: str) -> None:
        known = self._served_cache.get(task_queue)
        if known is not None and known[0] > time.monotonic() and workflow_type in known[1]:
            return  # confirmed moments ago: spare a store read per start
        reading = self._served_reads.get(task_queue)
        if reading is None:
            # Concurrent starts share one read.
            reading = asyncio.ensure_future(
                self._store.workflows_served(task_queue, self.clock.now() - _WORKER_SEEN_WINDOW)
            )
            self._served_reads[task_queue] = reading
            reading.add_done_callback(lambda _: self._served_reads.pop(task_queue, None))
        served = await asyncio.shield(reading)
        if served is not None:
            self._served_cache[task_queue] = (time.monotonic() + _SERVED_CACHE_TTL, set(served))
        if served is not None and workflow_type not in served:
            raise UnknownWorkflowTypeError(
                f"no worker on task queue {task_queue!r} knows workflow type "
                f"{workflow_type!r} (they serve: {', '.join(sorted(served)) or 'nothing'}); "
                "check the name or register the workflow with a worker"
            )

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
        self,
        workflow_id: str,
        *,
        run_id: str | None = None,
        result_type: Any = None,
        workflow: type | None = None,
    ) -> WorkflowHandle:
        """A handle on an existing workflow (its latest run unless ``run_id`` is given).

        Pass the ``workflow`` class to have results and messages typed and checked.
        """
        defn = workflow_definition(workflow) if workflow is not None else None
        if defn is not None and result_type is None:
            result_type = defn.return_hint
        return WorkflowHandle(self, workflow_id, run_id, result_type, defn)

    async def list_workflows(
        self,
        *,
        limit: int = 1000,
        page_token: str | None = None,
        **filters: Unpack[WorkflowFilters],
    ) -> WorkflowList:
        """Runs in this namespace, newest first, that match every filter given.

        ``status``: one status or several (any of them). ``*_after`` bounds are inclusive,
        ``*_before`` bounds exclusive: datetimes (naive ones are UTC) or epoch seconds.
        ``search_attributes``: each key must equal its string, number or boolean value.
        At most ``limit`` runs; the list's ``next_page_token``, passed back as
        ``page_token`` with the same filters, continues after them (None: no more).
        """
        where = _run_filter(**filters)
        if limit < 1:
            raise InvalidArgumentError(f"limit must be at least 1 (got {limit})")
        after = None if page_token is None else _decode_page_token(page_token)
        runs = await self._store.list_runs(
            self.namespace, where=where, limit=limit + 1, after=after
        )
        page = WorkflowList(WorkflowDescription._from(r) for r in runs[:limit])
        if len(runs) > limit:
            last = runs[limit - 1]
            page.next_page_token = _encode_page_token(last.created_at, last.run_id)
        return page

    async def count_workflows(self, **filters: Unpack[WorkflowFilters]) -> int:
        """How many runs in this namespace match the filters (as in ``list_workflows``)."""
        where = _run_filter(**filters)
        return await self._store.count_runs(self.namespace, where)


TimeBound = _dt.datetime | float
"""A time filter: a datetime (naive means UTC) or epoch seconds."""


class WorkflowFilters(TypedDict, total=False):
    """The filters of ``list_workflows`` and ``count_workflows``; a run must match all."""

    status: str | Sequence[str] | None
    workflow_type: str | None
    workflow_id_prefix: str | None
    started_after: TimeBound | None
    started_before: TimeBound | None
    closed_after: TimeBound | None
    closed_before: TimeBound | None
    search_attributes: Mapping[str, Any] | None


class WorkflowList(list[WorkflowDescription]):
    """A page of ``list_workflows``: a list, plus the token of the next page."""

    next_page_token: str | None = None


_HALF_MICROSECOND = 5e-7
_SEARCH_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def _run_filter(**filters: Unpack[WorkflowFilters]) -> RunFilter:
    """Check list/count filters and turn them into the store's ``RunFilter``."""
    unknown = set(filters) - set(WorkflowFilters.__annotations__)
    if unknown:
        raise InvalidArgumentError(f"unknown filter {', '.join(sorted(unknown))}")
    status = filters.get("status")
    statuses = (status,) if isinstance(status, str) else tuple(status or ())
    for s in statuses:
        if s not in STATUSES:
            raise InvalidArgumentError(
                f"unknown status {s!r}; expected one of {', '.join(STATUSES)}"
            )
    bounds = {
        name: _epoch(name, filters.get(name))
        for name in ("started_after", "started_before", "closed_after", "closed_before")
    }
    # Times are shown to the microsecond (rounded): compare at that resolution, so a
    # bound copied from a description includes (after) or excludes (before) that run.
    bounds = {name: None if b is None else b - _HALF_MICROSECOND for name, b in bounds.items()}
    for kind in ("started", "closed"):
        low, high = bounds[f"{kind}_after"], bounds[f"{kind}_before"]
        if low is not None and high is not None and low >= high:
            raise InvalidArgumentError(
                f"{kind}_after must be earlier than {kind}_before (the range is empty)"
            )
    attributes = dict(filters.get("search_attributes") or {})
    for key, value in attributes.items():
        if not isinstance(key, str) or not _SEARCH_ATTRIBUTE_KEY.match(key):
            raise InvalidArgumentError(
                f"search attribute name {key!r} is not valid: use 1-100 letters, digits, "
                "'_', '.' or '-'"
            )
        finite = not isinstance(value, float) or math.isfinite(value)
        if not isinstance(value, str | int | float) or not finite:
            raise InvalidArgumentError(
                f"search attribute {key!r}: filters compare strings, numbers or booleans "
                f"(got {value!r})"
            )
    return RunFilter(
        statuses=statuses,
        workflow_type=filters.get("workflow_type") or None,
        workflow_id_prefix=filters.get("workflow_id_prefix") or None,
        search_attributes=attributes,
        **bounds,
    )


def _epoch(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a datetime or epoch seconds (got {value!r})")
    return float(value)


def _encode_page_token(created_at: float, run_id: str) -> str:
    raw = json.dumps([created_at, run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, run_id = json.loads(raw)
        if isinstance(created_at, int | float) and isinstance(run_id, str):
            return float(created_at), run_id
    except (ValueError, TypeError):
        pass
    raise InvalidArgumentError("page_token is not valid: pass back a next_page_token unchanged")


_KIND_NAMES = {"signals": "signal", "queries": "query", "updates": "update"}
_CONFLICT_POLICIES = ("fail", "use_existing", "terminate_existing")
_REUSE_POLICIES = ("allow_duplicate", "allow_duplicate_failed_only", "reject_duplicate")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(choices)} (got {value!r})")


def _handler_name(handler: str | Callable[..., Any]) -> str:
    if isinstance(handler, str):
        if not handler:
            raise InvalidArgumentError("a handler name must not be empty")
        return handler
    marker = getattr(handler, HANDLER_ATTR, None)
    if marker is None:
        raise InvalidArgumentError(
            f"{handler!r} is not a signal, query or update handler: pass its name or a method "
            "decorated with @workflow.signal/query/update"
        )
    return str(marker[1])


@dataclass
class _StartPlan:
    workflow_id: str
    task_queue: str
    workflow_type: str
    defn: WorkflowDefinition | None
    payload: list[Any]
    result_hint: Any

    def new_run(self, client: Client, request_id: str | None, conflict: str, reuse: str) -> NewRun:
        return NewRun(
            namespace=client.namespace,
            workflow_id=self.workflow_id,
            run_id=new_run_id(),
            workflow_type=self.workflow_type,
            task_queue=self.task_queue,
            args=self.payload,
            request_id=request_id or secrets.token_hex(16),
            seed=secrets.randbits(63),
            now=client.clock.now(),
            conflict_policy=conflict,
            reuse_policy=reuse,
        )


class WorkflowHandle:
    """Refers to one workflow; get it from ``start_workflow`` or ``get_workflow_handle``.

    Without a run id it means the workflow id's latest run; ``result()`` follows a
    workflow through continue-as-new to its final run.
    """

    def __init__(
        self,
        client: Client,
        workflow_id: str,
        run_id: str | None,
        result_type: Any = None,
        workflow: WorkflowDefinition | None = None,
    ) -> None:
        self.client = client
        self.id = workflow_id
        self.run_id = run_id
        self._result_type = result_type
        self._defn = workflow
        self._started = False
        """Whether ``run_id`` is a run that this handle's client just started."""

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
        """Wait for the workflow to close; return its result or raise ``WorkflowFailureError``.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        clock = self.client.clock
        store = self.client.store
        namespace = self.client.namespace
        clock.begin_result_wait()
        try:
            async with asyncio.timeout(timeout):
                # A run this client just started exists: wait for it without a lookup.
                run = None if self._started else await self._run()
                while True:
                    if run is None or run.status == RUNNING:
                        run_id = self.run_id if run is None else run.run_id
                        assert run_id is not None
                        run = await self.client._closed_watcher.wait(run_id)
                    elif run.status == CONTINUED_AS_NEW:
                        run = await store.get_run(namespace, self.id, run.next_run_id)
                    else:
                        break
        finally:
            clock.end_result_wait()
        if run.status == COMPLETED:
            return self.client.converter.decode(run.result, self._result_type, "workflow result")
        cause = from_failure(run.failure) if run.failure else None
        raise WorkflowFailureError(
            f"workflow {run.workflow_type} {self.id!r} (run {run.run_id}) {run.status}: {cause}",
            workflow_id=self.id,
            run_id=run.run_id,
            cause=cause,
        )

    async def _handler_payload(
        self, kind: str, handler: str | Callable[..., Any], args: tuple[Any, ...]
    ) -> tuple[str, list[Any], RunInfo]:
        """Validate a message against what the workflow's workers declare; nothing is stored."""
        name = _handler_name(handler)
        payload = self.client._encode_handler_args(self._defn, kind, name, args)
        run = await self._run()
        served = await self.client.store.workflows_served(
            run.task_queue, self.client.clock.now() - _WORKER_SEEN_WINDOW
        )
        declared = (served or {}).get(run.workflow_type, {}).get(kind)
        builtin = kind == "queries" and name == STACK_TRACE_QUERY
        if declared is not None and name not in declared and not builtin:
            raise InvalidArgumentError(
                f"workflow {run.workflow_type} {self.id!r} has no {_KIND_NAMES[kind]} handler "
                f"{name!r} (it has: {', '.join(declared) or 'none'})"
            )
        return name, payload, run

    async def signal(self, signal: str | Callable[..., Any], *args: Any) -> None:
        """Send a signal; it is durably recorded before this returns."""
        name, payload, run = await self._handler_payload("signals", signal, args)
        if run.status != RUNNING and self.run_id is None:
            raise WorkflowNotFoundError(f"workflow {self.id!r} is not running (it is {run.status})")
        await self.client.store.signal_run(
            self.client.namespace, self.id, self.run_id, name, payload, self.client.clock.now()
        )

    async def query(
        self, query: str | Callable[..., Any], *args: Any, timeout: float = 10.0
    ) -> Any:
        """Ask a worker for the workflow's state (open or closed); nothing is recorded.

        Raises ``QueryFailedError`` if the handler is unknown or raised, and
        ``NoWorkerResponseError`` if no worker answers within ``timeout`` seconds.
        """
        name, payload, run = await self._handler_payload("queries", query, args)
        store = self.client.store
        query_id = str(uuid.uuid4())
        await store.create_query(
            self.client.namespace,
            self.id,
            run.run_id,
            query_id,
            name,
            payload,
            self.client.clock.now(),
        )
        try:
            async with asyncio.timeout(timeout):
                while True:
                    change = store.change_waiter(Change.QUERY)
                    try:
                        answered, result, failure = await store.take_query_answer(query_id)
                        if answered:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(change, 0.5)
                    finally:
                        change.cancel()  # (else it stays registered with the store)
        except TimeoutError:
            await store.drop_query(query_id)
            raise NoWorkerResponseError(
                f"no worker of task queue {run.task_queue!r} answered query {name!r} within "
                f"{timeout} s; is a worker for workflow {run.workflow_type} running?"
            ) from None
        if failure is not None:
            raise QueryFailedError(
                f"query {name!r} failed: {failure.get('message')}", cause=from_failure(failure)
            )
        hint = self._handler_hint("queries", name)
        return self.client.converter.decode(result, hint, f"query {name!r} result")

    def _handler_hint(self, kind: str, name: str) -> Any:
        if self._defn is None:
            return None
        handler = getattr(self._defn, kind).get(name)
        return None if handler is None else handler.return_hint

    async def execute_update(
        self,
        update: str | Callable[..., Any],
        *args: Any,
        id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send an update and return its handler's result.

        An update ``id`` deduplicates: repeating it returns the first call's result and
        the handler runs once. A rejected update (validator) raises ``UpdateFailedError``
        and leaves no trace in history. ``NoWorkerResponseError`` after ``timeout``.
        """
        name, payload, _ = await self._handler_payload("updates", update, args)
        request = UpdateRequest(id or str(uuid.uuid4()), name, payload)
        state = await self.client.store.request_update(
            self.client.namespace, self.id, self.run_id, request, self.client.clock.now()
        )
        return await self._await_update(state.run_id, request.update_id, update, timeout)

    async def _await_update(
        self,
        run_id: str,
        update_id: str,
        update: str | Callable[..., Any],
        timeout: float | None,
    ) -> Any:
        store = self.client.store
        name = _handler_name(update)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    change = store.change_waiter(Change.UPDATE | Change.RUN_CLOSED)
                    try:
                        state = await store.get_update(run_id, update_id)
                        if state is None:
                            # Continue-as-new moved the request on to the workflow's next run.
                            latest = await store.get_run(self.client.namespace, self.id, None)
                            state = await store.get_update(latest.run_id, update_id)
                            if state is not None:
                                run_id = latest.run_id
                        if state is not None and state.state in ("completed", "rejected"):
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(change, 0.5)
                    finally:
                        change.cancel()  # (else it stays registered with the store)
        except TimeoutError:
            raise NoWorkerResponseError(
                f"update {name!r} (id {update_id}) of workflow {self.id!r} was not handled "
                f"within {timeout} s; is a worker for it running? Retry with the same id."
            ) from None
        if state.failure is not None:
            verb = "was rejected" if state.state == "rejected" else "failed"
            raise UpdateFailedError(
                f"update {name!r} {verb}: {state.failure.get('message')}",
                cause=from_failure(state.failure),
            )
        hint = self._handler_hint("updates", name)
        return self.client.converter.decode(state.result, hint, f"update {name!r} result")

    async def cancel(self, reason: str = "") -> None:
        """Ask the workflow to cancel: its code sees ``asyncio.CancelledError`` and may clean up."""
        await self.client.store.request_cancel(
            self.client.namespace, self.id, self.run_id, reason, self.client.clock.now()
        )

    async def terminate(self, reason: str = "") -> None:
        """End the workflow at once, without running any more of its code."""
        await self.client.store.terminate_run(
            self.client.namespace,
            self.id,
            self.run_id,
            reason or "terminated",
            self.client.clock.now(),
        )


_ADDED_LOOK_SECONDS = 0.02
"""Runs newly waited for are looked up together, at most this often."""
_WATCH_FREE_SECONDS = 0.002
"""A look for closed runs that took longer makes the next one wait (see _poll)."""


class _ClosedRunWatcher:
    """Waits for many runs to close with one store query per change, not one per waiter."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: dict[str, list[asyncio.Future[RunInfo]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._added: asyncio.Future[None] | None = None
        """Done when a run was added since the poller's last look (it may be closed)."""

    async def wait(self, run_id: str) -> RunInfo:
        """Wait until run ``run_id`` closes; return it as it closed."""
        fut: asyncio.Future[RunInfo] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(run_id, []).append(fut)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        elif self._added is not None and not self._added.done():
            self._added.set_result(None)  # look again: it may have closed already
        try:
            return await fut
        finally:
            futs = self._waiting.get(run_id)
            if futs is not None and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiting[run_id]

    async def _poll(self) -> None:
        while self._waiting:
            change = self._store.change_waiter(Change.RUN_CLOSED)
            self._added = asyncio.get_running_loop().create_future()
            try:
                await self._look(change)
            finally:
                change.cancel()  # (else it stays registered with the store)

    async def _look(self, change: asyncio.Future[None]) -> None:
        """Resolve the waiters of runs that closed; then wait for ``change``, a new run to
        wait for, or 1 s."""
        began = time.monotonic()
        try:
            closed = await self._store.closed_runs(list(self._waiting))
        except StoreError:
            closed = []
        spent = time.monotonic() - began
        for run in closed:
            for fut in self._waiting.pop(run.run_id, []):
                if not fut.done():
                    fut.set_result(run)
        if self._waiting:
            if spent > _WATCH_FREE_SECONDS:
                # Many waiters make each look costly (it reads all of them): look at
                # most a fifth of the time, or they would starve the store's reader.
                await asyncio.sleep(min(4 * spent, 1.0))
            assert self._added is not None
            await asyncio.wait(
                [change, self._added], timeout=1.0, return_when=asyncio.FIRST_COMPLETED
            )
            if not change.done():
                # Only new runs to wait for (each start's result() adds one): look for
                # them together, at most every _ADDED_LOOK_SECONDS.
                await asyncio.sleep(max(0.0, began + _ADDED_LOOK_SECONDS - time.monotonic()))
