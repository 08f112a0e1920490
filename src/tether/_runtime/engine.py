"""The worker engine: claims tasks under leases, runs workflows and activities.

Loops, all on the caller's event loop:

- workflow tasks: claim a batch, replay or continue each run from the cache, commit
  the commands in one transaction; activities it schedules are leased to this
  worker in that same transaction when it has free slots (eager dispatch);
- activity tasks: claim what is ready and run it, with timeouts and heartbeats;
- timers: fire due timers, and wake the other loops when a retry falls due;
- leases: renew this worker's leases, and retry activities whose worker died.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import functools
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from tether._runtime.activity_context import ActivityCancelled, ActivityContext, ActivityInfo
from tether._runtime.activity_context import current as current_activity
from tether._runtime.clock import Clock
from tether._runtime.definitions import ActivityDefinition, WorkflowDefinition
from tether._runtime.failures import to_failure
from tether._runtime.ids import new_run_id
from tether._runtime.instance import (
    Command,
    WorkflowInfo,
    WorkflowInstance,
    WorkflowTaskFailure,
)
from tether._store.base import (
    ACTIVITY_CANCEL_REQUESTED,
    ACTIVITY_COMPLETED,
    ACTIVITY_FAILED,
    ACTIVITY_SCHEDULED,
    CANCELLED,
    CHILD_CANCEL_REQUESTED,
    CHILD_WORKFLOW_INITIATED,
    COMPLETED,
    CONTINUED_AS_NEW,
    FAILED,
    SEARCH_ATTRIBUTES_UPSERTED,
    TIMER_CANCELLED,
    TIMER_STARTED,
    UPDATE_ACCEPTED,
    UPDATE_COMPLETED,
    WORKFLOW_CANCELLED,
    WORKFLOW_COMPLETED,
    WORKFLOW_CONTINUED_AS_NEW,
    WORKFLOW_FAILED,
    WORKFLOW_TASK_COMPLETED,
    WORKFLOW_TERMINATED,
    WORKFLOW_TIMED_OUT,
    ActivityTask,
    Change,
    EagerClaim,
    Event,
    NewActivity,
    NewRun,
    QueryTask,
    RunClose,
    Store,
    UpdateRequest,
    UpdateState,
    WorkflowTask,
    WorkflowTaskCompletion,
    WorkflowTaskResult,
    earliest,
)
from tether.common import RetryPolicy
from tether.converter import PayloadConverter
from tether.exceptions import (
    ActivityError,
    ApplicationError,
    PayloadError,
    StaleTaskError,
    StoreError,
    TimeoutFailure,
)

logger = logging.getLogger("tether.worker")

T = TypeVar("T")

_FIRST_TASK_WAIT = 5.0
"""How long a query waits for a new run's first workflow task before answering anyway."""

_WORKFLOW_TASK = int(Change.WORKFLOW_TASK)
_ACTIVITY_TASK = int(Change.ACTIVITY_TASK)
_IDLE_POLL = 1.0
"""Longest sleep of an idle loop; store notifications usually wake it much sooner."""
_BUSY_RETRY = 0.05
"""Wait before looking again at a due timer that another transaction holds."""
_ENDED_WITHOUT_TASK = (WORKFLOW_TERMINATED, WORKFLOW_TIMED_OUT)
"""Last events of a run that closed without running a workflow task."""


_worker_numbers = itertools.count(1)


def default_identity() -> str:
    """``host:pid`` for a process's first worker, ``host:pid/2``, ``/3``... for later ones.

    Workers must not share an identity: a starting worker takes back the leases held
    under its identity and registers its queue's workflow types under it, so a sibling
    with the same identity would lose its running work and hide its types.
    """
    base = f"{socket.gethostname()}:{os.getpid()}"
    number = next(_worker_numbers)
    return base if number == 1 else f"{base}/{number}"


class Engine:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        converter: PayloadConverter,
        *,
        task_queue: str,
        workflows: Sequence[WorkflowDefinition],
        activities: Sequence[ActivityDefinition],
        identity: str,
        max_concurrent_activities: int,
        max_concurrent_workflow_tasks: int,
        max_cached_workflows: int,
        lease_duration: float,
        graceful_shutdown_timeout: float,
        activity_executor: concurrent.futures.Executor | None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.converter = converter
        self.task_queue = task_queue
        self.workflows = {w.name: w for w in workflows}
        self.activities = {a.name: a for a in activities}
        self.identity = identity
        self.max_activities = max_concurrent_activities
        self.max_workflow_tasks = max_concurrent_workflow_tasks
        self._claim_limit = max(1, max_concurrent_workflow_tasks // 2)
        self.max_cached = max_cached_workflows
        self.lease_duration = lease_duration
        self.graceful_shutdown_timeout = graceful_shutdown_timeout
        self._own_executor = activity_executor is None
        self._executor = activity_executor or concurrent.futures.ThreadPoolExecutor(
            # As many threads as slots (started only as needed): a sync activity given
            # a slot must not wait for a thread while its timeouts run.
            max_workers=max(1, max_concurrent_activities),
            thread_name_prefix="tether-activity",
        )
        self._cache: collections.OrderedDict[str, WorkflowInstance] = collections.OrderedDict()
        self._workflow_tasks: dict[int, WorkflowTask] = {}
        """Workflow tasks in hand (by ``id``): each holds a slot, and its lease is renewed."""
        self._workflow_runners: set[asyncio.Task[None]] = set()
        """The asyncio tasks running them (one per task, or one per claimed batch)."""
        self._query_tasks: set[asyncio.Task[None]] = set()
        self._activity_tasks: dict[asyncio.Task[None], ActivityTask] = {}
        self._recording: set[asyncio.Task[None]] = set()
        """Activities whose code has returned and whose outcome is being recorded: their
        slots are free already (see ``_free_slot_of_current_activity``)."""
        self._abandoned: set[asyncio.Future[Any] | concurrent.futures.Future[Any]] = set()
        """Activity code still running after its attempt ended (a timeout, a cancel): a
        thread cannot be stopped, and an async activity may ignore its cancellation.
        Each holds a slot until it returns, so that ``max_concurrent_activities`` bounds
        the code running, and a sync activity never waits for a thread in the pool
        (while its own timeout runs) behind ones that were given up on."""
        self._activity_slots_reserved = 0
        self._next_task_due: float | None = None
        """When the next delayed task (a retry) becomes ready, as the timer loop last saw."""
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        # Change masks as plain ints: an IntFlag's operators cost a microsecond each, and
        # these run for every task.
        self._kicks: dict[int, asyncio.Future[None]] = {}  # by the loop's kind of work
        self._backlog = int(Change.WORKFLOW_TASK | Change.ACTIVITY_TASK)
        """Kinds of task whose last claim took all it could: a freed slot claims again."""
        self.stats = collections.Counter[str]()

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock.now()
        await self._persist(lambda: self._register(now))
        # A restart with the same identity takes back its own work at once instead
        # of waiting for its old leases to lapse.
        await self._persist(lambda: self.store.release_leases(self.identity, now))
        loops: list[Callable[[], Coroutine[Any, Any, None]]] = [self._timer_loop, self._lease_loop]
        if self.workflows:
            loops += [self._workflow_loop, self._query_loop]
        if self.activities:
            loops.append(self._activity_loop)
        self._loops = [asyncio.create_task(fn(), name=f"tether {fn.__name__}") for fn in loops]

    async def stop(self) -> None:
        """Stop claiming, let in-flight work finish (up to the grace period), release the rest."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._workflow_runners:
            await asyncio.wait(set(self._workflow_runners), timeout=self.graceful_shutdown_timeout)
        if self._activity_tasks:
            _, pending = await asyncio.wait(
                set(self._activity_tasks), timeout=self.graceful_shutdown_timeout
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        try:
            await self.store.release_leases(self.identity, self.clock.now())
        except StoreError:
            logger.warning("could not release leases on shutdown; they will lapse instead")
        for inst in self._cache.values():
            inst.evict()
        self._cache.clear()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return not self._stopping

    # -- waiting ----------------------------------------------------------------------
    def _wake(self, kinds: int = Change.ALL) -> None:
        """Make the loops for ``kinds`` of work look again now (not only on store changes)."""
        for kind in [k for k in self._kicks if k & kinds]:
            kick = self._kicks.pop(kind)
            if not kick.done():
                kick.set_result(None)

    def _kick_for(self, kind: Change) -> asyncio.Future[None]:
        kick = self._kicks.get(kind)
        if kick is None or kick.done():
            kick = self._kicks[int(kind)] = asyncio.get_running_loop().create_future()
        return kick

    async def _wait(self, waiters: list[asyncio.Future[None]], deadline: float) -> None:
        """Until one of ``waiters`` is done or ``deadline``; then cancels them all (a store
        waiter left pending would stay registered until its kind of change comes)."""
        sleeper = asyncio.ensure_future(self.clock.wait_until(deadline))
        try:
            await asyncio.wait([*waiters, sleeper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            for waiter in waiters:
                waiter.cancel()

    async def _guarded(
        self,
        what: str,
        step: Callable[[], Awaitable[float | None]],
        wakes_on: Change | None,
    ) -> None:
        """Run ``step`` until stopped; it returns how long to wait for work (None: no wait),
        counted from when it began (clock time: a test clock may jump meanwhile).

        The loop also runs again when the engine kicks it and, with ``wakes_on``, when
        the store commits one of those kinds of change.
        """
        backoff = 0.05
        while not self._stopping:
            # Made before the step, so that what happens during it is not missed.
            waiters = (
                [self.store.change_waiter(wakes_on), self._kick_for(wakes_on)]
                if wakes_on is not None
                else []
            )
            began = self.clock.now()
            try:
                delay = await step()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as e:
                level = logging.WARNING if isinstance(e, StoreError) else logging.ERROR
                logger.log(level, "%s loop: %s; retrying in %.2fs", what, e, backoff, exc_info=True)
                delay = backoff
                backoff = min(backoff * 2, 5.0)
            if delay is None:
                for waiter in waiters:
                    waiter.cancel()  # (else it stays registered with the store)
                continue
            await self._wait(waiters, began + delay)

    async def _register(self, now: float) -> None:
        handlers = {name: d.handler_names() for name, d in self.workflows.items()}
        await self.store.register_worker(
            self.task_queue, self.identity, handlers, sorted(self.activities), now
        )

    async def _persist(
        self, call: Callable[[], Awaitable[T]], failed: StoreError | None = None
    ) -> T:
        """Record an outcome, retrying transient store errors while the lease lasts;
        ``failed``: the first try was made already and failed with that error.

        Retrying is safe even if an earlier try did commit: the claim's token no longer
        matches and the store answers ``StaleTaskError``.
        """
        delay = 0.05
        deadline = time.monotonic() + self.lease_duration / 2
        while True:
            if failed is None:
                try:
                    return await call()
                except StaleTaskError:
                    raise
                except StoreError as e:
                    failed = e
            stale = isinstance(failed, StaleTaskError)
            if stale or not failed.retryable or time.monotonic() + delay > deadline:
                raise failed
            logger.warning("store call failed (%s); retrying in %.2fs", failed, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            failed = None

    # -- workflow tasks ------------------------------------------------------------------
    async def _workflow_loop(self) -> None:
        async def step() -> float | None:
            # At most half the slots per claim: the next claim is then in flight while
            # this one's tasks run, instead of after they all committed.
            free = min(self.max_workflow_tasks - len(self._workflow_tasks), self._claim_limit)
            if free <= 0:
                self._backlog |= _WORKFLOW_TASK
                return _IDLE_POLL
            now = self.clock.now()
            tasks = await self.store.claim_workflow_tasks(
                self.task_queue, self.identity, free, now + self.lease_duration, now
            )
            self.stats["workflow_claims"] += 1
            self._run_claimed(tasks)
            return self._claimed(_WORKFLOW_TASK, len(tasks) == free)

        await self._guarded("workflow", step, Change.WORKFLOW_TASK)

    def _take_instance(self, task: WorkflowTask) -> WorkflowInstance | None:
        inst = self._cache.pop(task.run_id, None)
        if inst is not None and (inst.task_version != task.task_version or inst.poisoned):
            inst.evict()  # another worker advanced this run; rebuild from history
            return None
        return inst

    def _put_instance(self, run_id: str, inst: WorkflowInstance) -> None:
        if inst.closed or self.max_cached <= 0:
            inst.evict()
            return
        old = self._cache.pop(run_id, None)
        if old is not None and old is not inst:
            old.evict()  # rebuilt meanwhile by a task that ran while this one was out
        self._cache[run_id] = inst
        while len(self._cache) > self.max_cached:
            _, old = self._cache.popitem(last=False)
            old.evict()
            self.stats["evictions"] += 1

    def _run_claimed(self, tasks: list[WorkflowTask]) -> None:
        """Run claimed tasks: those whose inputs came with the claim together, in one
        asyncio task (a task of its own costs each about what a quarter of a replay
        does); the others each on their own, as they read first."""
        at_hand = []
        for task in tasks:
            if task.history is not None and not task.has_updates:
                at_hand.append(task)
            else:
                self._spawn_workflow_task(task)
        if at_hand:
            self._spawn_workflow_runner(self._run_workflow_batch(at_hand), at_hand)

    def _spawn_workflow_task(
        self, task: WorkflowTask, prefetched: tuple[int, list[Event]] | None = None
    ) -> None:
        self._spawn_workflow_runner(self._run_workflow_task(task, prefetched), [task])

    def _spawn_workflow_runner(
        self, runner: Coroutine[Any, Any, None], tasks: list[WorkflowTask]
    ) -> None:
        """Run ``runner``, which calls ``_workflow_task_finished`` for each of ``tasks``."""
        for task in tasks:
            self._workflow_tasks[id(task)] = task
        t = asyncio.create_task(runner)
        self._workflow_runners.add(t)
        t.add_done_callback(self._workflow_runners.discard)

    def _claimed(self, kind: int, full: bool) -> float | None:
        """After a claim of ``kind``: look again at once if it took all it could (more
        may be waiting), else wait for new work."""
        if full:
            self._backlog |= kind
            return None
        self._backlog &= ~kind
        return _IDLE_POLL

    def _slot_freed(self, kind: int) -> None:
        # Only worth a claim if the last one left work behind: new work wakes the loop
        # by itself (store changes), and a claim that finds nothing costs a transaction.
        if not self._stopping and self._backlog & kind:
            self._wake(kind)

    def _workflow_task_finished(self, task: WorkflowTask) -> None:
        if self._workflow_tasks.pop(id(task), None) is not None:
            self._slot_freed(_WORKFLOW_TASK)

    async def _run_workflow_task(
        self, task: WorkflowTask, prefetched: tuple[int, list[Event]] | None = None
    ) -> None:
        """Run one workflow task; ``prefetched`` is (after_seq, events) read at claim time."""
        try:
            inst = self._take_instance(task)
            try:
                events = self._events_at_hand(task, inst, prefetched)
                if events is None:
                    after = 0 if inst is None else inst.last_seq
                    events = await self.store.read_history(task.run_id, after)
                updates = await self.store.pending_updates(task.run_id) if task.has_updates else []
                inst, commands, now = self._activate(task, inst, events, updates)
            except Exception as e:
                failure = self._not_activated(task, inst, e)
                if failure is not None:
                    await self._fail_workflow_task(task, failure)
                return
            completion, reserved = self._completion(task, inst, commands, now)
            try:
                outcome: WorkflowTaskResult | Exception = await self._persist(
                    lambda: self.store.complete_workflow_task(completion, self.identity, now)
                )
            except Exception as e:  # a StoreError (StaleTaskError too), or a bug: reported
                outcome = e  # there, the instance dropped and the reserved slots given back
            self._recorded(inst, completion, reserved, outcome)
        finally:
            self._workflow_task_finished(task)

    async def _run_workflow_batch(self, tasks: list[WorkflowTask]) -> None:
        """Run tasks whose inputs came with their claim, in one asyncio task: each
        completion is queued as soon as its activation ran (so the store starts on the
        first ones while later ones run), and each outcome is handled as it comes."""
        activated: list[tuple[WorkflowInstance, WorkflowTaskCompletion, int, float]] = []
        failed: list[tuple[WorkflowTask, WorkflowTaskFailure]] = []

        def completions() -> Iterator[tuple[WorkflowTaskCompletion, float]]:
            for task in tasks:
                inst = self._take_instance(task)
                try:
                    events = self._events_at_hand(task, inst, None)
                    assert events is not None
                    inst, commands, now = self._activate(task, inst, events, [])
                except Exception as e:
                    failure = self._not_activated(task, inst, e)
                    if failure is None:
                        self._workflow_task_finished(task)
                    else:
                        failed.append((task, failure))
                    continue
                completion, reserved = self._completion(task, inst, commands, now)
                activated.append((inst, completion, reserved, now))
                yield completion, now

        try:
            # Each outcome as it comes: a task's slot and eager activities need not wait
            # for the commits of the ones after it.
            answered = 0
            async for outcome in self.store.complete_workflow_tasks(completions(), self.identity):
                inst, completion, reserved, now = activated[answered]
                answered += 1
                if isinstance(outcome, StoreError) and not isinstance(outcome, StaleTaskError):
                    outcome = await self._retry_completion(completion, now, outcome)
                self._recorded(inst, completion, reserved, outcome)
                self._workflow_task_finished(completion.task)
            for task, failure in failed:
                await self._fail_workflow_task(task, failure)
                self._workflow_task_finished(task)
        finally:
            for task in tasks:  # (only if it ended early)
                self._workflow_task_finished(task)

    async def _retry_completion(
        self, completion: WorkflowTaskCompletion, now: float, error: StoreError
    ) -> WorkflowTaskResult | Exception:
        try:
            return await self._persist(
                lambda: self.store.complete_workflow_task(completion, self.identity, now), error
            )
        except StoreError as e:
            return e

    def _events_at_hand(
        self,
        task: WorkflowTask,
        inst: WorkflowInstance | None,
        prefetched: tuple[int, list[Event]] | None,
    ) -> list[Event] | None:
        """The events ``task`` brings to ``inst`` (the whole history for a new instance)
        if they are here already (read with the claim, or prefetched); None: read them."""
        if inst is None:
            return task.history
        if prefetched is not None and prefetched[0] == inst.last_seq:
            self.stats["eager_workflow_tasks"] += 1
            return prefetched[1]
        if task.history is not None:  # the whole history, read with the claim
            return [e for e in task.history if e.seq > inst.last_seq]
        return None

    def _activate(
        self,
        task: WorkflowTask,
        inst: WorkflowInstance | None,
        events: list[Event],
        updates: list[UpdateRequest],
    ) -> tuple[WorkflowInstance, list[Command], float]:
        """Apply ``events`` to ``inst`` (None: a new instance replays them) and run the
        new activation: the instance, its commands, and the time it ran at. A new
        instance that fails here is evicted (the caller evicts the one it passed)."""
        new: WorkflowInstance | None = None
        try:
            if inst is None:
                inst = new = self._new_instance(task, events[0].time, events[0].data)
                self.stats["replays"] += 1
            now = self.clock.now()
            return inst, inst.apply(events, now, updates=updates), now
        except BaseException:
            if new is not None:
                new.evict()
            raise

    def _not_activated(
        self, task: WorkflowTask, inst: WorkflowInstance | None, error: Exception
    ) -> WorkflowTaskFailure | None:
        """``task`` failed before its completion: what to report as its failure, or None
        if nothing is (a store error: its lease lapses and it is picked up again)."""
        if inst is not None:
            inst.evict()
        if isinstance(error, StoreError):
            logger.warning("workflow task of run %s not processed: %s", task.run_id, error)
            return None
        if isinstance(error, WorkflowTaskFailure):
            return error
        return WorkflowTaskFailure(f"workflow task failed: {type(error).__name__}: {error}", error)

    def _recorded(
        self,
        inst: WorkflowInstance,
        completion: WorkflowTaskCompletion,
        reserved: int,
        outcome: WorkflowTaskResult | Exception,
    ) -> None:
        """The store answered ``completion`` with ``outcome``: its result or why not."""
        self._release_reserved(reserved, outcome)
        if isinstance(outcome, Exception):
            inst.evict()
            if isinstance(outcome, StoreError):
                logger.info(
                    "workflow task of run %s not committed: %s", completion.task.run_id, outcome
                )
            else:
                logger.error(
                    "workflow task of run %s not committed",
                    completion.task.run_id,
                    exc_info=outcome,
                )
            return
        self._committed(inst, completion, outcome)

    def _release_reserved(self, reserved: int, outcome: object) -> None:
        """Give back the activity slots a completion held for its eager activities; if
        some went unused, the claim loop may have found none free meanwhile: wake it."""
        self._activity_slots_reserved -= reserved
        used = len(outcome.eager_activities) if isinstance(outcome, WorkflowTaskResult) else 0
        if reserved > used:
            self._slot_freed(_ACTIVITY_TASK)

    def _committed(
        self, inst: WorkflowInstance, completion: WorkflowTaskCompletion, result: WorkflowTaskResult
    ) -> None:
        """A workflow task of ``inst`` is durable: cache the run, start its eager work."""
        self.stats["workflow_tasks"] += 1
        inst.task_version = result.task_version
        inst.history_length = result.history_length
        inst.mark_committed(result.history_length - len(completion.events), result.history_length)
        self._put_instance(completion.task.run_id, inst)
        for activity in result.eager_activities:
            self._start_activity(activity)
        if result.more_work:
            self._wake(_WORKFLOW_TASK)

    def _new_instance(
        self, task: WorkflowTask | QueryTask, start_time: float, started: dict[str, Any]
    ) -> Any:
        defn = self.workflows.get(task.workflow_type)
        info = WorkflowInfo.from_started(task.run_id, start_time, started)
        if defn is None:
            raise WorkflowTaskFailure(
                f"workflow type {task.workflow_type!r} is not registered on worker "
                f"{self.identity} (task queue {self.task_queue!r}; it has "
                f"{sorted(self.workflows) or 'none'})",
                LookupError(task.workflow_type),
            )
        return WorkflowInstance(defn, info, self.converter)  # type: ignore[abstract]

    async def _fail_workflow_task(self, task: WorkflowTask, error: WorkflowTaskFailure) -> None:
        delay = min(0.5 * 2 ** (task.attempt - 1), 10.0)
        logger.error(
            "workflow task failed (attempt %d, retry in %.1fs) for workflow %s run %s: %s",
            task.attempt,
            delay,
            task.workflow_id,
            task.run_id,
            error,
            exc_info=error.__cause__,
        )
        failure = to_failure(error.__cause__ or error)
        failure["message"] = str(error)
        failure["attempt"] = task.attempt
        try:
            await self.store.fail_workflow_task(task, failure, self.clock.now() + delay)
        except StoreError:
            pass  # the lease lapses and the task is retried anyway
        self.stats["workflow_task_failures"] += 1

    def _completion(
        self, task: WorkflowTask, inst: WorkflowInstance, commands: list[Command], now: float
    ) -> tuple[WorkflowTaskCompletion, int]:
        completion = WorkflowTaskCompletion(
            task=task,
            events=commands,
            inputs_through=inst.last_seq,
            record=bool(commands) or inst.read_new_inputs,
        )
        updates: dict[str, UpdateState] = {}
        for event_type, data in commands:
            if event_type == ACTIVITY_SCHEDULED:
                completion.activities.append(
                    NewActivity(
                        seq=data["seq"],
                        activity_type=data["activity_type"],
                        task_queue=data["task_queue"],
                        args=data["args"],
                        options=data["options"],
                    )
                )
            elif event_type == TIMER_STARTED:
                completion.timers.append((data["seq"], data["fire_at"]))
            elif event_type == TIMER_CANCELLED:
                completion.cancel_timers.append(data["seq"])
            elif event_type == ACTIVITY_CANCEL_REQUESTED:
                completion.cancel_activities.append(data["seq"])
            elif event_type == WORKFLOW_COMPLETED:
                completion.close = RunClose(status=COMPLETED, result=data["result"])
            elif event_type == WORKFLOW_FAILED:
                completion.close = RunClose(status=FAILED, failure=data["failure"])
            elif event_type == WORKFLOW_CANCELLED:
                completion.close = RunClose(status=CANCELLED, failure=data["failure"])
            elif event_type == WORKFLOW_CONTINUED_AS_NEW:
                completion.close = RunClose(status=CONTINUED_AS_NEW)
                completion.continue_as_new = NewRun(
                    namespace=task.namespace,
                    workflow_id=task.workflow_id,
                    run_id=new_run_id(),
                    workflow_type=task.workflow_type,
                    task_queue=inst.info.task_queue,
                    args=data["args"],
                    request_id=secrets.token_hex(16),
                    seed=secrets.randbits(63),
                    now=now,
                )
            elif event_type == CHILD_WORKFLOW_INITIATED:
                completion.children.append(
                    NewRun(
                        namespace=task.namespace,
                        workflow_id=data["workflow_id"],
                        run_id=new_run_id(),
                        workflow_type=data["workflow_type"],
                        task_queue=data["task_queue"],
                        args=data["args"],
                        request_id=f"{task.run_id}/{data['seq']}",
                        seed=secrets.randbits(63),
                        now=now,
                        memo=data.get("memo"),
                        search_attributes=data.get("search_attributes"),
                        run_timeout=data.get("run_timeout"),
                        execution_deadline=(
                            now + data["execution_timeout"]
                            if data.get("execution_timeout")
                            else None
                        ),
                        parent_run_id=task.run_id,
                        parent_seq=data["seq"],
                        parent_close_policy=data["parent_close_policy"],
                    )
                )
            elif event_type == CHILD_CANCEL_REQUESTED:
                completion.cancel_children.append(data["seq"])
            elif event_type == SEARCH_ATTRIBUTES_UPSERTED:
                completion.search_attributes = {
                    **(completion.search_attributes or {}),
                    **data["attributes"],
                }
            elif event_type == UPDATE_ACCEPTED:
                updates[data["update_id"]] = UpdateState(task.run_id, data["update_id"], "accepted")
            elif event_type == UPDATE_COMPLETED:
                updates[data["update_id"]] = UpdateState(
                    task.run_id,
                    data["update_id"],
                    "completed",
                    data.get("result"),
                    data.get("failure"),
                )
        for update_id, failure in inst.rejected_updates:
            updates[update_id] = UpdateState(task.run_id, update_id, "rejected", failure=failure)
        completion.updates = list(updates.values())
        reserved = 0
        if completion.activities and self.activities and not self._stopping:
            eligible = sum(
                1
                for a in completion.activities
                if a.task_queue == self.task_queue and a.activity_type in self.activities
            )
            if eligible == len(completion.activities):
                reserved = max(0, min(eligible, self._free_activity_slots()))
        self._activity_slots_reserved += reserved
        completion.eager_activity_limit = reserved
        completion.activity_lease_until = now + self.lease_duration
        return completion, reserved

    # -- queries -----------------------------------------------------------------------
    async def _query_loop(self) -> None:
        batch = 50

        async def step() -> float | None:
            now = self.clock.now()
            queries = await self.store.claim_queries(
                self.task_queue, self.identity, batch, now + self.lease_duration, now
            )
            for query in queries:
                t = asyncio.create_task(self._answer_query(query))
                self._query_tasks.add(t)
                t.add_done_callback(self._query_tasks.discard)
            return None if len(queries) == batch else _IDLE_POLL

        await self._guarded("query", step, Change.QUERY)

    async def _history_after_first_task(self, run_id: str) -> list[Event]:
        """The run's history once its first workflow task has run (briefly waiting for it),
        so a query sent right after start sees the state ``run()`` has set up."""
        deadline = time.monotonic() + _FIRST_TASK_WAIT
        while True:
            change = self.store.change_waiter(Change.HISTORY | Change.RUN_CLOSED)
            try:
                events = await self.store.read_history(run_id)
            except BaseException:
                change.cancel()
                raise
            if (
                any(e.type == WORKFLOW_TASK_COMPLETED for e in events)
                or time.monotonic() >= deadline
                or (len(events) > 1 and events[-1].type in _ENDED_WITHOUT_TASK)
            ):
                change.cancel()  # (else it stays registered with the store)
                return events
            await self._wait([change], self.clock.now() + 0.05)

    async def _answer_query(self, query: QueryTask) -> None:
        """Answer from the cached instance, or from one rebuilt by replay (closed runs too)."""
        result: Any = None
        failure: dict[str, Any] | None = None
        inst = self._cache.get(query.run_id)
        rebuilt = inst is None or inst.poisoned
        try:
            if rebuilt:
                events = await self._history_after_first_task(query.run_id)
                inst = self._new_instance(query, events[0].time, events[0].data)
                inst.apply(events, self.clock.now(), activate_new=False)
            assert inst is not None
            result = inst.query(query.name, query.args)
        except WorkflowTaskFailure as e:
            failure = to_failure(e.__cause__ or e)
        except StoreError:
            return  # the query's lease lapses and it is answered later
        except Exception as e:
            failure = to_failure(e)
        finally:
            if rebuilt and inst is not None:
                inst.evict()
        try:
            await self.store.answer_query(query, result, failure)
        except StoreError as e:
            logger.info("query answer not recorded: %s", e)

    # -- activities --------------------------------------------------------------------
    def _free_activity_slots(self) -> int:
        alive = len(self._activity_tasks)
        running = alive - len(self._recording) + len(self._abandoned)
        # Recordings run ahead of the next activities by at most the limit again: a
        # store slow to record them must not let claimed work pile up without bound.
        free = min(self.max_activities - running, 2 * self.max_activities - alive)
        return free - self._activity_slots_reserved

    async def _activity_loop(self) -> None:
        async def step() -> float | None:
            free = self._free_activity_slots()
            if free <= 0:
                self._backlog |= _ACTIVITY_TASK
                return _IDLE_POLL
            now = self.clock.now()
            # Hold the slots while the claim is in flight, or eager dispatch from a
            # workflow task finishing meanwhile would hand them out a second time.
            self._activity_slots_reserved += free
            try:
                tasks = await self.store.claim_activity_tasks(
                    self.task_queue, self.identity, free, now + self.lease_duration, now
                )
            finally:
                self._activity_slots_reserved -= free
            for task in tasks:
                self._start_activity(task)
            return self._claimed(_ACTIVITY_TASK, len(tasks) == free)

        await self._guarded("activity", step, Change.ACTIVITY_TASK)

    def _start_activity(self, task: ActivityTask) -> None:
        t = asyncio.create_task(self._run_activity(task))
        self._activity_tasks[t] = task
        t.add_done_callback(self._activity_done)

    def _activity_done(self, t: asyncio.Task[None]) -> None:
        self._activity_tasks.pop(t, None)
        if t not in self._recording:
            self._slot_freed(_ACTIVITY_TASK)
            return
        # Its slot was freed when its code returned; its end makes room only where the
        # recordings' own bound held claims back (see ``_free_activity_slots``).
        self._recording.discard(t)
        if len(self._recording) >= self.max_activities:
            self._slot_freed(_ACTIVITY_TASK)

    def _free_slot_of_current_activity(self) -> None:
        """The running activity's code has returned: its slot goes to the next activity
        now, not once its outcome is recorded (a durable commit, and for a cached run its
        next workflow task): under a full concurrency limit that wait left every slot
        idle between activities (D: 35 ms per wave of 48 on PostgreSQL)."""
        t = asyncio.current_task()
        if t in self._activity_tasks and t not in self._recording:
            self._recording.add(t)  # type: ignore[arg-type]
            self._slot_freed(_ACTIVITY_TASK)

    async def _run_activity(self, task: ActivityTask) -> None:
        opts = task.options
        now = self.clock.now()
        s2c = opts.get("schedule_to_close")
        s2c_deadline = task.scheduled_at + s2c if s2c else None
        defn = self.activities.get(task.activity_type)
        heartbeat_timeout = opts.get("heartbeat")
        ctx = ActivityContext(
            ActivityInfo(
                activity_type=task.activity_type,
                activity_seq=task.seq,
                attempt=task.attempt,
                idempotency_key=f"{task.run_id}/{task.seq}",
                heartbeat_details=task.heartbeat_details,
                workflow_id=task.workflow_id,
                run_id=task.run_id,
                workflow_type=task.workflow_type,
                task_queue=task.task_queue,
                scheduled_time=task.scheduled_at,
                start_to_close_timeout=opts.get("start_to_close"),
                heartbeat_timeout=heartbeat_timeout,
            ),
            on_heartbeat=lambda: None,
            converter=self.converter,
        )
        try:
            if s2c_deadline is not None and now >= s2c_deadline:
                raise TimeoutFailure(
                    f"activity {task.activity_type!r} passed its schedule_to_close_timeout "
                    f"({s2c} s) before attempt {task.attempt} could start",
                    timeout_type="schedule_to_close",
                )
            if defn is None:
                raise ApplicationError(
                    f"activity type {task.activity_type!r} is not registered on worker "
                    f"{self.identity} (task queue {self.task_queue!r})",
                    type="ActivityNotRegistered",
                )
            result = await self._execute(task, defn, ctx, s2c_deadline)
            payload = self.converter.encode(result, f"result of activity {task.activity_type!r}")
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Shutting down mid-attempt: the lease is released and the attempt rerun.
            return
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            self._free_slot_of_current_activity()
            await self._activity_failed(task, e, ctx.details, s2c_deadline)
            return
        self._free_slot_of_current_activity()
        try:
            now = self.clock.now()
            data = {"seq": task.seq, "result": payload}
            if await self._continue_cached(task, data, now):
                self.stats["activities"] += 1
                return
            claim = None
            cached = self._cache.get(task.run_id)
            if (
                cached is not None
                and not self._stopping
                and len(self._workflow_tasks) < self.max_workflow_tasks
            ):
                # The run is cached here: take the workflow task this completion wakes.
                claim = EagerClaim(self.identity, now + self.lease_duration, cached.last_seq)
            woken = await self._persist(
                lambda: self.store.finish_activity(task, ACTIVITY_COMPLETED, data, now, claim)
            )
            self.stats["activities"] += 1
            if woken is not None and claim is not None:
                self._spawn_workflow_task(woken[0], (claim.after_seq, woken[1]))
        except StoreError as e:
            # Stale: someone else owns the task now. Otherwise the lease lapses and the
            # activity runs again (at least once).
            logger.info("activity result not recorded: %s", e)

    async def _continue_cached(self, task: ActivityTask, data: dict[str, Any], now: float) -> bool:
        """Run the workflow task an activity result wakes, if the run is cached here and
        idle, and record result and task in one commit (instead of recording the result,
        leasing the woken task and completing it: three commits). False: not done, record
        the result the usual way."""
        if self._stopping:
            return False
        inst = self._cache.pop(task.run_id, None)
        if inst is None:
            return False
        if inst.poisoned:
            inst.evict()
            return False
        seq = inst.history_length + 1
        workflow_task = WorkflowTask(
            run_id=task.run_id,
            workflow_id=task.workflow_id,
            workflow_type=task.workflow_type,
            task_queue=inst.info.task_queue,
            namespace=inst.info.namespace,
            token="",
            attempt=1,
            task_version=inst.task_version,
            history_length=seq,
        )
        try:
            commands = inst.apply([Event(seq, ACTIVITY_COMPLETED, now, data)], now)
        except Exception:
            inst.evict()  # the usual workflow task replays it and reports the failure
            return False
        completion, reserved = self._completion(workflow_task, inst, commands, now)
        result: WorkflowTaskResult | None = None
        try:
            result = await self._persist(
                lambda: self.store.finish_activity_and_continue(
                    task, data, now, completion, seq, self.identity
                )
            )
        except StoreError:
            # Nothing was recorded (or, if the outcome is unknown, the usual path finds
            # the activity already finished): drop the speculative state, go the usual way.
            inst.evict()
            return False
        finally:
            self._release_reserved(reserved, result)
        if result is None:
            inst.evict()  # the result is recorded; the queued workflow task takes it
            return True
        self.stats["continued_in_place"] += 1
        self._committed(inst, completion, result)
        return True

    async def _execute(
        self,
        task: ActivityTask,
        defn: ActivityDefinition,
        ctx: ActivityContext,
        s2c_deadline: float | None,
    ) -> Any:
        args = self.converter.decode_args(
            task.args, defn.arg_hints, f"activity {task.activity_type!r}"
        )
        opts = task.options
        loop = asyncio.get_running_loop()
        flusher = _HeartbeatFlusher(self, task, ctx, loop)
        ctx._on_heartbeat = flusher.on_heartbeat
        context = contextvars.copy_context()
        context.run(current_activity.set, ctx)
        # ``code`` is done when the activity's code has stopped; ``work`` is done as soon
        # as the attempt is given up on, which a thread's code does not notice.
        code: asyncio.Future[Any] | concurrent.futures.Future[Any]
        if defn.is_async:
            work: asyncio.Future[Any] = loop.create_task(defn.fn(*args), context=context)
            code = work
        else:
            code = self._executor.submit(functools.partial(context.run, defn.fn, *args))
            work = asyncio.wrap_future(code, loop=loop)
        start = time.monotonic()
        start_to_close = opts.get("start_to_close")
        attempt_deadline = start + start_to_close if start_to_close else float("inf")
        timeout_type = "start_to_close"
        if s2c_deadline is not None:
            remaining = s2c_deadline - self.clock.now()
            if start + remaining < attempt_deadline:
                attempt_deadline, timeout_type = start + remaining, "schedule_to_close"
        heartbeat_timeout = opts.get("heartbeat")
        try:
            while True:
                mono = time.monotonic()
                wake = attempt_deadline
                if heartbeat_timeout:
                    wake = min(wake, ctx.last_heartbeat + heartbeat_timeout)
                await asyncio.wait(
                    [work, flusher.cancelled],
                    timeout=max(wake - mono, 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if work.done():
                    return work.result()
                mono = time.monotonic()
                if flusher.cancelled.done():
                    reason = "cancelled by the workflow"
                    ctx.cancel(reason)
                    self._give_up(work, code, task, reason)
                    raise ActivityCancelled(reason)
                if mono >= attempt_deadline:
                    limit = opts.get(timeout_type)
                    reason = (
                        f"activity {task.activity_type!r} exceeded its {timeout_type} "
                        f"timeout ({limit} s)"
                    )
                elif heartbeat_timeout and mono >= ctx.last_heartbeat + heartbeat_timeout:
                    timeout_type = "heartbeat"
                    reason = (
                        f"activity {task.activity_type!r} sent no heartbeat within its "
                        f"heartbeat timeout ({heartbeat_timeout} s)"
                    )
                else:
                    continue
                ctx.cancel(reason)
                self._give_up(work, code, task, reason)
                raise TimeoutFailure(
                    reason, timeout_type=timeout_type, last_heartbeat_details=ctx.details
                )
        except asyncio.CancelledError:
            ctx.cancel("the worker is shutting down")
            work.cancel()
            raise
        finally:
            flusher.close()

    def _give_up(
        self,
        work: asyncio.Future[Any],
        code: asyncio.Future[Any] | concurrent.futures.Future[Any],
        task: ActivityTask,
        reason: str,
    ) -> None:
        """End an attempt whose code is still running. A thread that has not started yet
        is cancelled; one that has keeps its slot until it returns (``_abandoned``)."""
        work.cancel()  # an async activity's task: cancelled at its next await
        if not isinstance(code, concurrent.futures.Future):
            if not code.done():
                self._abandoned.add(code)
                code.add_done_callback(self._abandoned_returned)
            return
        if code.cancel() or code.done():  # (now: cancelling ``work`` tells it later)
            return
        logger.warning(
            "activity %r (run %s, attempt %d): %s, but its code still runs in the "
            "executor (a thread cannot be stopped) and keeps its slot until it returns; "
            "a sync activity learns of the end when activity.heartbeat() raises",
            task.activity_type,
            task.run_id,
            task.attempt,
            reason,
        )
        self.stats["activity_threads_outliving_attempts"] += 1
        self._abandoned.add(code)
        loop = asyncio.get_running_loop()

        def returned(_: object) -> None:  # on the activity's thread
            try:
                loop.call_soon_threadsafe(self._abandoned_returned, code)
            except RuntimeError:
                pass  # the loop has closed: nobody counts slots any more

        code.add_done_callback(returned)

    def _abandoned_returned(
        self, code: asyncio.Future[Any] | concurrent.futures.Future[Any]
    ) -> None:
        self._abandoned.discard(code)
        self._slot_freed(_ACTIVITY_TASK)

    async def _activity_failed(
        self,
        task: ActivityTask,
        error: BaseException,
        details: Any,
        s2c_deadline: float | None,
    ) -> None:
        decision = self._retry_decision(task, error, s2c_deadline)
        try:
            if decision is None:
                logger.info(
                    "activity %s (run %s, attempt %d) failed, will retry: %s",
                    task.activity_type,
                    task.run_id,
                    task.attempt,
                    error,
                )
                retry_at = self._retry_at(task, error)
                await self._persist(
                    lambda: self.store.retry_activity(task, to_failure(error), retry_at, details)
                )
                self.stats["activity_retries"] += 1
                return
            wrapped = ActivityError(
                f"activity {task.activity_type!r} failed (attempt {task.attempt}, "
                f"{decision}): {error}",
                activity_type=task.activity_type,
                activity_seq=task.seq,
                attempt=task.attempt,
                retry_state=decision,
                cause=error,
            )
            failure = {"seq": task.seq, "failure": to_failure(wrapped)}
            await self._persist(
                lambda: self.store.finish_activity(task, ACTIVITY_FAILED, failure, self.clock.now())
            )
        except StoreError as e:
            logger.info("activity failure not recorded: %s", e)

    def _retry_decision(
        self, task: ActivityTask, error: BaseException, s2c_deadline: float | None
    ) -> str | None:
        """None to retry, else why not (the ``retry_state`` of the ``ActivityError``)."""
        policy = RetryPolicy.from_dict(task.options["retry_policy"])
        if isinstance(error, ActivityCancelled):
            return "cancelled"
        if isinstance(error, PayloadError):
            return "non_retryable"  # the same value fails the same way on every attempt
        if isinstance(error, TimeoutFailure) and error.timeout_type == "schedule_to_close":
            return "timeout"
        if isinstance(error, ApplicationError) and error.non_retryable:
            return "non_retryable"
        error_type = error.type if isinstance(error, ApplicationError) else type(error).__name__
        if error_type in policy.non_retryable_error_types:
            return "non_retryable"
        if policy.maximum_attempts and task.attempt >= policy.maximum_attempts:
            return "maximum_attempts_reached"
        if s2c_deadline is not None and self._retry_at(task, error) >= s2c_deadline:
            return "timeout"
        return None

    def _retry_at(self, task: ActivityTask, error: BaseException) -> float:
        if isinstance(error, ApplicationError) and error.next_retry_delay is not None:
            delay = error.next_retry_delay
        elif isinstance(error, TimeoutFailure) and error.timeout_type == "worker_lost":
            delay = 0.0  # the attempt did not fail; its worker did: rerun at once
        else:
            delay = RetryPolicy.from_dict(task.options["retry_policy"]).delay_after(task.attempt)
        return self.clock.now() + delay

    # -- timers and leases ------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        async def step() -> float | None:
            now = self.clock.now()
            fired = await self.store.fire_due_timers(now, 500)
            if fired == 500:
                return None
            if self._next_task_due is not None and self._next_task_due <= now:
                # A delayed task (a retry) is ready: it commits nothing that would wake
                # the claim loops, so kick them. (A timer's firing wakes them by itself;
                # a kick after it would only make them claim again in vain.)
                self._wake(Change.WORKFLOW_TASK | Change.ACTIVITY_TASK)
            # Tasks ready already are the claim loops' business, not a reason to wake here.
            timer_due, self._next_task_due = await self.store.next_due_times(after=now)
            due = earliest(timer_due, self._next_task_due)
            if due is None:
                return _IDLE_POLL
            if due <= now:
                # Due but not fired: another worker's transaction holds that timer (SKIP
                # LOCKED); do not spin on it.
                return _BUSY_RETRY
            return min(due - now, _IDLE_POLL)

        await self._guarded("timer", step, Change.TIMER)

    async def _lease_loop(self) -> None:
        interval = max(self.lease_duration / 3, 0.05)

        async def step() -> float | None:
            now = self.clock.now()
            # Only work actually in flight is renewed: a claim whose handler died with
            # an error must lapse so that the work is picked up again.
            await self.store.renew_leases(
                list(self._workflow_tasks.values()),
                list(self._activity_tasks.values()),
                now + self.lease_duration,
                now,
            )
            await self._register(now)
            failing = []
            for task in await self.store.expired_activity_tasks(now, 500):
                if task.cancel_requested:
                    error: BaseException = ActivityCancelled("cancelled by the workflow")
                else:
                    error = TimeoutFailure(
                        f"worker {task.owner} stopped renewing its lease on activity "
                        f"{task.activity_type!r} attempt {task.attempt} (it likely died)",
                        timeout_type="worker_lost",
                        last_heartbeat_details=task.heartbeat_details,
                    )
                s2c = task.options.get("schedule_to_close")
                deadline = task.scheduled_at + s2c if s2c else None
                failing.append(self._activity_failed(task, error, task.heartbeat_details, deadline))
            # Concurrently, so they share group commits: a worker restarted after a crash
            # hands back hundreds of leases at once, one commit each would take seconds.
            for outcome in await asyncio.gather(*failing, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
            return interval

        # On a timer only: its own writes (renewals, registration) must not wake it.
        await self._guarded("lease", step, None)


class _HeartbeatFlusher:
    """Saves heartbeat details to the store, throttled, and notices cancellation."""

    def __init__(
        self,
        engine: Engine,
        task: ActivityTask,
        ctx: ActivityContext,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.engine = engine
        self.task = task
        self.ctx = ctx
        self.loop = loop
        hb = task.options.get("heartbeat")
        self.interval = min(hb * 0.8 if hb else 10.0, engine.lease_duration / 3)
        self.scheduled = False
        self.last_flush = 0.0
        self.cancelled: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self._flush_task: asyncio.Task[None] | None = None

    def on_heartbeat(self) -> None:
        # May be called from an activity thread: hop onto the loop.
        self.loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self.scheduled or self.closed:
            return
        self.scheduled = True
        delay = max(0.0, self.last_flush + self.interval - time.monotonic())
        self.loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        if not self.closed:
            self._flush_task = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        self.scheduled = False
        self.last_flush = time.monotonic()
        self.ctx.details_dirty = False
        engine = self.engine
        try:
            cancel = await engine.store.heartbeat_activity(
                self.task,
                self.ctx.details,
                engine.clock.now() + engine.lease_duration,
            )
        except StaleTaskError:
            cancel = True
        except StoreError:
            return
        if cancel and not self.cancelled.done():
            self.cancelled.set_result(None)

    def close(self) -> None:
        self.closed = True
        if not self.cancelled.done():
            self.cancelled.cancel()
