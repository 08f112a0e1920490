"""The store contract: a narrow interface in domain terms that every backend implements.

A run is its history: an append-only list of events numbered from 1. Every state
transition is one call here and one transaction in the backend: the events it
appends and the tasks they cause (workflow tasks, activity tasks, timers) commit
together or not at all. Work is claimed under leases; a lease that is not renewed
expires and the work is picked up again. Times are epoch seconds supplied by the
caller, so a test clock can move them.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tether._store.changes import Change as Change  # re-exported: part of the contract

# Event types. Inbound events arrive from outside the workflow code and are
# delivered to it; command events record what the code decided.
WORKFLOW_STARTED = "WorkflowStarted"
ACTIVITY_COMPLETED = "ActivityCompleted"
ACTIVITY_FAILED = "ActivityFailed"
TIMER_FIRED = "TimerFired"
SIGNAL_RECEIVED = "SignalReceived"
WORKFLOW_CANCEL_REQUESTED = "WorkflowCancelRequested"
CHILD_WORKFLOW_COMPLETED = "ChildWorkflowCompleted"
CHILD_WORKFLOW_FAILED = "ChildWorkflowFailed"
INBOUND_EVENTS = frozenset(
    {
        CHILD_WORKFLOW_COMPLETED,
        CHILD_WORKFLOW_FAILED,
        WORKFLOW_STARTED,
        ACTIVITY_COMPLETED,
        ACTIVITY_FAILED,
        TIMER_FIRED,
        SIGNAL_RECEIVED,
        WORKFLOW_CANCEL_REQUESTED,
    }
)

# Written by the workflow task that accepted an update; replay delivers it at the
# start of that task's activation, after its inbound events.
UPDATE_ACCEPTED = "UpdateAccepted"

ACTIVITY_SCHEDULED = "ActivityScheduled"
ACTIVITY_CANCEL_REQUESTED = "ActivityCancelRequested"
TIMER_STARTED = "TimerStarted"
TIMER_CANCELLED = "TimerCancelled"
WORKFLOW_COMPLETED = "WorkflowCompleted"
WORKFLOW_FAILED = "WorkflowFailed"
WORKFLOW_CANCELLED = "WorkflowCancelled"
WORKFLOW_CONTINUED_AS_NEW = "WorkflowContinuedAsNew"
UPDATE_COMPLETED = "UpdateCompleted"
MARKER_RECORDED = "MarkerRecorded"
CHILD_WORKFLOW_INITIATED = "ChildWorkflowInitiated"
CHILD_CANCEL_REQUESTED = "ChildCancelRequested"
SEARCH_ATTRIBUTES_UPSERTED = "SearchAttributesUpserted"
COMMAND_EVENTS = frozenset(
    {
        CHILD_WORKFLOW_INITIATED,
        CHILD_CANCEL_REQUESTED,
        SEARCH_ATTRIBUTES_UPSERTED,
        ACTIVITY_SCHEDULED,
        ACTIVITY_CANCEL_REQUESTED,
        TIMER_STARTED,
        TIMER_CANCELLED,
        WORKFLOW_COMPLETED,
        WORKFLOW_FAILED,
        WORKFLOW_CANCELLED,
        WORKFLOW_CONTINUED_AS_NEW,
        UPDATE_COMPLETED,
        MARKER_RECORDED,
    }
)

# Appended by the store itself when a run is ended from outside or by its deadline.
WORKFLOW_TERMINATED = "WorkflowTerminated"
WORKFLOW_TIMED_OUT = "WorkflowTimedOut"

# Closes each workflow task's block of command events; records which inbound
# events the task had seen and the workflow time it ran at, for replay.
WORKFLOW_TASK_COMPLETED = "WorkflowTaskCompleted"

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINATED = "terminated"
CONTINUED_AS_NEW = "continued_as_new"
TIMED_OUT = "timed_out"
STATUSES = (RUNNING, COMPLETED, FAILED, CANCELLED, TERMINATED, CONTINUED_AS_NEW, TIMED_OUT)


@dataclass(slots=True)
class Event:
    seq: int
    type: str
    time: float
    data: dict[str, Any]


@dataclass(slots=True)
class NewRun:
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    args: list[Any]
    request_id: str
    seed: int
    now: float
    conflict_policy: str = "fail"
    """While the id runs: ``fail``, ``use_existing`` or ``terminate_existing``."""
    reuse_policy: str = "allow_duplicate"
    """After the id closed: ``allow_duplicate``, ``allow_duplicate_failed_only`` or
    ``reject_duplicate``."""
    signal: tuple[str, list[Any]] | None = None
    """Signal-with-start: deliver this signal to the new or running run, atomically."""
    update: UpdateRequest | None = None
    """Update-with-start: request this update on the new or running run, atomically."""
    memo: dict[str, Any] | None = None
    search_attributes: dict[str, Any] | None = None
    run_timeout: float | None = None
    """Seconds this run may take before it is closed as timed out."""
    execution_deadline: float | None = None
    """Epoch time by which the workflow (across continue-as-new) must close."""
    parent_run_id: str | None = None
    parent_seq: int | None = None
    parent_close_policy: str = "terminate"
    """What happens to this child when its parent closes first: ``terminate``,
    ``request_cancel`` or ``abandon``."""


@dataclass(slots=True)
class UpdateRequest:
    update_id: str
    name: str
    args: list[Any]


@dataclass(slots=True)
class UpdateState:
    run_id: str
    update_id: str
    state: str
    """``requested``, ``accepted``, ``completed`` or ``rejected``."""
    result: Any = None
    failure: dict[str, Any] | None = None


@dataclass(slots=True)
class StartOutcome:
    run_id: str
    created: bool
    """False when the call repeated an earlier start with the same request id, or
    joined a running run (``use_existing``)."""


@dataclass(slots=True)
class QueryTask:
    query_id: str
    run_id: str
    workflow_id: str
    workflow_type: str
    namespace: str
    name: str
    args: list[Any]
    token: str


@dataclass(frozen=True)
class RunFilter:
    """Which runs ``list_runs``/``count_runs`` return: every condition given must hold.

    Times are epoch seconds; an ``*_after`` bound is inclusive, a ``*_before`` bound
    exclusive. ``search_attributes`` are compared for equality with string, number or
    boolean values (a number equals the same number of either type).
    """

    statuses: tuple[str, ...] = ()
    """Any of these statuses (empty: any status)."""
    workflow_type: str | None = None
    workflow_id_prefix: str | None = None
    started_after: float | None = None
    started_before: float | None = None
    closed_after: float | None = None
    closed_before: float | None = None
    search_attributes: Mapping[str, str | int | float | bool] = field(default_factory=dict)


@dataclass(slots=True)
class RunInfo:
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: str
    created_at: float
    closed_at: float | None
    result: Any
    failure: dict[str, Any] | None
    history_length: int
    task_failure: dict[str, Any] | None
    """The last workflow task failure (a bug or nondeterminism), while the task is retried."""
    memo: dict[str, Any] | None = None
    search_attributes: dict[str, Any] | None = None
    parent_run_id: str | None = None
    next_run_id: str | None = None
    """The run this one continued as new into."""


@dataclass(slots=True)
class WorkflowTask:
    run_id: str
    workflow_id: str
    workflow_type: str
    task_queue: str
    namespace: str
    token: str
    attempt: int
    task_version: int
    """Workflow tasks completed so far; the completion must find it unchanged."""
    history_length: int
    has_updates: bool = False
    """Update requests wait for this run: read them with ``pending_updates``."""
    history: list[Event] | None = None
    """The run's whole history as of the claim, if the claim read it (short histories,
    ``CLAIM_HISTORY_EVENTS`` at most): no separate read needed."""


CLAIM_HISTORY_EVENTS = 64
"""Claims return the history of runs with at most this many events."""


@dataclass(slots=True)
class ActivityTask:
    run_id: str
    workflow_id: str
    workflow_type: str
    seq: int
    activity_type: str
    task_queue: str
    args: list[Any]
    options: dict[str, Any]
    attempt: int
    scheduled_at: float
    heartbeat_details: Any
    token: str
    owner: str | None = None
    cancel_requested: bool = False


@dataclass(slots=True)
class NewActivity:
    seq: int
    activity_type: str
    task_queue: str
    args: list[Any]
    options: dict[str, Any]


@dataclass(slots=True)
class EagerClaim:
    owner: str
    lease_until: float
    after_seq: int


@dataclass(slots=True)
class RunClose:
    status: str
    result: Any = None
    failure: dict[str, Any] | None = None


@dataclass(slots=True)
class WorkflowTaskCompletion:
    task: WorkflowTask
    events: list[tuple[str, dict[str, Any]]]
    """Command events in order; the store appends ``WorkflowTaskCompleted`` after them."""
    inputs_through: int
    """Seq of the last history event the task had read."""
    activities: list[NewActivity] = field(default_factory=list)
    timers: list[tuple[int, float]] = field(default_factory=list)
    cancel_timers: list[int] = field(default_factory=list)
    cancel_activities: list[int] = field(default_factory=list)
    close: RunClose | None = None
    eager_activity_limit: int = 0
    """Claim up to this many of the new activity tasks for the completing worker."""
    activity_lease_until: float = 0.0
    updates: list[UpdateState] = field(default_factory=list)
    """Update requests this task accepted, rejected or completed."""
    continue_as_new: NewRun | None = None
    """The run that continues this one (with ``close`` set to ``continued_as_new``)."""
    children: list[NewRun] = field(default_factory=list)
    """Child runs to start (their ``parent_seq`` names the command)."""
    cancel_children: list[int] = field(default_factory=list)
    search_attributes: dict[str, Any] | None = None
    """Attributes to merge into the run's search attributes."""
    record: bool = True
    """False when the task read no new inputs and decided nothing (it only rejected
    update requests): no history is written, so a rejected update leaves no trace."""

    @property
    def acknowledged(self) -> bool:
        """Whether recording it tells someone outside something: a closed run's outcome
        or an update's. Only such a completion must wait for the disk. Any other one only
        moves the run along (activities, timers, children, signals); a crash that loses
        it is a crash before it was recorded (the task runs again, its activities at
        least once as ever), and any later durable commit makes it durable too (the log
        is in order)."""
        return self.close is not None or bool(self.updates)


@dataclass(slots=True)
class WorkflowTaskResult:
    task_version: int
    history_length: int
    eager_activities: list[ActivityTask]
    more_work: bool
    """New inbound events arrived while the task ran: the workflow task stays queued."""


class Store(abc.ABC):
    """Persistence and coordination for runs, their histories and their tasks."""

    # -- runs ---------------------------------------------------------------
    @abc.abstractmethod
    async def start_run(self, run: NewRun) -> StartOutcome:
        """Create a run with its ``WorkflowStarted`` event and first workflow task.

        Raises ``WorkflowAlreadyStartedError`` if a run with that workflow id is still
        running. A run of that workflow id started by the same ``request_id``, running
        or closed, is returned instead (``created=False``): starts are idempotent.
        """

    @abc.abstractmethod
    async def get_run(self, namespace: str, workflow_id: str, run_id: str | None) -> RunInfo:
        """The given run, or the latest run of the workflow id; ``WorkflowNotFoundError``."""

    @abc.abstractmethod
    async def list_runs(
        self,
        namespace: str,
        *,
        status: str | None = None,
        workflow_type: str | None = None,
        limit: int = 1000,
        where: RunFilter | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """Runs matching ``where`` (and ``status``/``workflow_type``, a shorthand), newest
        first: by start time, then run id, descending. ``after`` is the ``(created_at,
        run_id)`` of the last run of the previous page: the page continues after it."""

    @abc.abstractmethod
    async def count_runs(self, namespace: str, where: RunFilter | None = None) -> int:
        """How many runs match ``where``."""

    @abc.abstractmethod
    async def task_queue_backlog(self, task_queue: str, now: float) -> int:
        """Work waiting on or held by ``task_queue``: ready or leased workflow and activity
        tasks, unanswered queries, and due timers of its runs (0: the queue is idle)."""

    @abc.abstractmethod
    async def closed_runs(self, run_ids: list[str]) -> list[RunInfo]:
        """Those of ``run_ids`` no longer running (one query for many result waiters)."""

    @abc.abstractmethod
    async def read_history(self, run_id: str, after_seq: int = 0) -> list[Event]:
        """Events of the run with ``seq > after_seq``, in order."""

    # -- workflow tasks -----------------------------------------------------
    @abc.abstractmethod
    async def claim_workflow_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[WorkflowTask]:
        """Lease up to ``limit`` ready workflow tasks (a lapsed lease counts as ready)."""

    @abc.abstractmethod
    async def complete_workflow_task(
        self, completion: WorkflowTaskCompletion, owner: str, now: float
    ) -> WorkflowTaskResult:
        """Append the task's events and enqueue what they cause, in one transaction.

        Raises ``StaleTaskError`` if the lease was lost or another task completed first.
        """

    async def complete_workflow_tasks(
        self, completions: Iterable[tuple[WorkflowTaskCompletion, float]], owner: str
    ) -> AsyncIterator[WorkflowTaskResult | Exception]:
        """``complete_workflow_task`` for each ``(completion, now)``, independently:
        yields each outcome in order, its result or the exception it raised
        (``StaleTaskError``...), as soon as it is known. ``completions`` may be a
        generator: a backend may queue each as it is produced, so that it commits the
        first ones while the caller still produces the rest."""
        outcomes = await asyncio.gather(
            *(self.complete_workflow_task(c, owner, now) for c, now in completions),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            yield outcome

    @abc.abstractmethod
    async def fail_workflow_task(
        self, task: WorkflowTask, failure: dict[str, Any], retry_at: float
    ) -> None:
        """Record why the task failed and make it ready again at ``retry_at``."""

    # -- activities ---------------------------------------------------------
    @abc.abstractmethod
    async def claim_activity_tasks(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[ActivityTask]:
        """Lease up to ``limit`` ready activity tasks; each claim counts as a new attempt."""

    @abc.abstractmethod
    async def heartbeat_activity(
        self, task: ActivityTask, details: Any, lease_until: float
    ) -> bool:
        """Save heartbeat details and extend the lease. Returns whether cancel was requested.

        Raises ``StaleTaskError`` if the task is no longer leased by this attempt.
        """

    @abc.abstractmethod
    async def finish_activity(
        self,
        task: ActivityTask,
        event_type: str,
        data: dict[str, Any],
        now: float,
        claim: EagerClaim | None = None,
    ) -> tuple[WorkflowTask, list[Event]] | None:
        """Record the activity's final outcome in history and wake the workflow.

        With ``claim``, the workflow task this wakes is leased to the caller in the same
        transaction (if nobody holds it) and returned with the events after
        ``claim.after_seq``: a worker that has the run cached continues it at once.
        """

    @abc.abstractmethod
    async def finish_activity_and_continue(
        self,
        task: ActivityTask,
        data: dict[str, Any],
        now: float,
        completion: WorkflowTaskCompletion,
        expected_seq: int,
        owner: str,
    ) -> WorkflowTaskResult | None:
        """Record an activity's result and the workflow task it wakes, in one transaction.

        A worker that has the run cached and idle computes that workflow task itself
        (its ``ActivityCompleted`` event would get seq ``expected_seq``) without leasing
        it: one commit instead of three. If other inputs reached the run first (the
        event got another seq, or a workflow task was queued already: inputs that came
        while the run's last task ran) or the workflow no longer waits for the result, the
        result alone is recorded, the workflow task is queued as usual, and this returns None:
        the caller must drop its speculative state (also when the run advanced past
        ``completion.task.task_version``). Raises ``StaleTaskError``, recording nothing,
        if the activity's lease is lost.
        """

    @abc.abstractmethod
    async def retry_activity(
        self,
        task: ActivityTask,
        failure: dict[str, Any],
        retry_at: float,
        heartbeat_details: Any,
    ) -> None:
        """Release the task after a failed attempt, ready again at ``retry_at``."""

    @abc.abstractmethod
    async def expired_activity_tasks(self, now: float, limit: int) -> list[ActivityTask]:
        """Activity tasks whose lease lapsed (their worker died or hung)."""

    # -- timers, leases, housekeeping ----------------------------------------
    @abc.abstractmethod
    async def fire_due_timers(self, now: float, limit: int) -> int:
        """Append ``TimerFired`` for due timers and wake their workflows; returns the count."""

    async def next_due_time(self, after: float | None = None) -> float | None:
        """Earliest time an unleased timer, retry or workflow task becomes due.

        With ``after``, tasks already ready by then do not count (a backlog waiting to
        be claimed is not a reason for a timer loop to wake); timers always do."""
        return earliest(*await self.next_due_times(after))

    @abc.abstractmethod
    async def next_due_times(self, after: float | None = None) -> tuple[float | None, float | None]:
        """``next_due_time`` in two parts: (the next timer, the next delayed task)."""

    @abc.abstractmethod
    async def leased_task_count(self) -> int:
        """How many tasks are leased right now (work in progress somewhere)."""

    @abc.abstractmethod
    async def renew_leases(
        self,
        workflow_tasks: list[WorkflowTask],
        activity_tasks: list[ActivityTask],
        lease_until: float,
        now: float,
    ) -> None:
        """Extend the leases of these claims (work in flight) that have not lapsed yet."""

    @abc.abstractmethod
    async def release_leases(self, owner: str, now: float) -> None:
        """Make every task leased by ``owner`` ready now (graceful shutdown, or a restart)."""

    @abc.abstractmethod
    async def register_worker(
        self,
        task_queue: str,
        identity: str,
        workflow_types: dict[str, dict[str, list[str]]],
        activity_types: list[str],
        now: float,
    ) -> None:
        """Record which workflow types (with their handler names) and activities a worker
        serves on a task queue."""

    @abc.abstractmethod
    async def workflows_served(
        self, task_queue: str, since: float
    ) -> dict[str, dict[str, list[str]]] | None:
        """Workflow types (with their signal/query/update names) registered by workers seen
        since ``since``; None if no worker was."""

    # -- messages and lifecycle -------------------------------------------------
    @abc.abstractmethod
    async def signal_run(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        name: str,
        args: list[Any],
        now: float,
    ) -> str:
        """Append a signal to the running run; returns its run id. ``WorkflowNotFoundError``."""

    @abc.abstractmethod
    async def request_cancel(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> str:
        """Ask the running run to cancel (its code sees ``CancelledError``); returns run id."""

    @abc.abstractmethod
    async def terminate_run(
        self, namespace: str, workflow_id: str, run_id: str | None, reason: str, now: float
    ) -> str:
        """End the running run at once, without running its code; returns its run id."""

    @abc.abstractmethod
    async def request_update(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        request: UpdateRequest,
        now: float,
    ) -> UpdateState:
        """Ask the run to handle an update, or return the state of the same update id."""

    @abc.abstractmethod
    async def get_update(self, run_id: str, update_id: str) -> UpdateState | None: ...

    @abc.abstractmethod
    async def pending_updates(self, run_id: str) -> list[UpdateRequest]:
        """Update requests not yet accepted or rejected, oldest first."""

    @abc.abstractmethod
    async def create_query(
        self,
        namespace: str,
        workflow_id: str,
        run_id: str | None,
        query_id: str,
        name: str,
        args: list[Any],
        now: float,
    ) -> None:
        """Queue a query for a worker of the run's task queue (closed runs included)."""

    @abc.abstractmethod
    async def claim_queries(
        self, task_queue: str, owner: str, limit: int, lease_until: float, now: float
    ) -> list[QueryTask]: ...

    @abc.abstractmethod
    async def answer_query(
        self, query: QueryTask, result: Any, failure: dict[str, Any] | None
    ) -> None: ...

    @abc.abstractmethod
    async def take_query_answer(self, query_id: str) -> tuple[bool, Any, dict[str, Any] | None]:
        """(answered, result, failure); an answered query is removed."""

    @abc.abstractmethod
    async def drop_query(self, query_id: str) -> None: ...

    # -- notifications --------------------------------------------------------
    @abc.abstractmethod
    def change_waiter(self, changes: Change = Change.ALL) -> asyncio.Future[None]:
        """A future resolved at the next commit that touched one of ``changes`` (here or,
        as far as the backend can tell, in another process). Take it *before* looking
        for work."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def earliest(*times: float | None) -> float | None:
    """The earliest of ``times`` that are set, or None."""
    return min((t for t in times if t is not None), default=None)
