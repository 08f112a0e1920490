"""A live workflow run: a deterministic asyncio event loop driven by history.

The instance *is* an event loop, so plain ``asyncio`` works in workflow code:
``asyncio.sleep`` and every ``call_later`` become durable timers, tasks and futures
run in a fixed order, and time only moves when history says so.

History is read in blocks. Each workflow task left a block of command events ended
by ``WorkflowTaskCompleted {inputs_through}``; replaying it means delivering the
inbound events up to ``inputs_through``, running the loop until it is idle and
checking that the code emitted exactly that block's commands. Inbound events past
the last block are new: running the loop on them yields the commands to commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import inspect
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether._runtime.definitions import HandlerDefinition, WorkflowDefinition
from tether._runtime.failures import from_failure, to_failure
from tether._store.base import (
    ACTIVITY_CANCEL_REQUESTED,
    ACTIVITY_COMPLETED,
    ACTIVITY_FAILED,
    ACTIVITY_SCHEDULED,
    CHILD_CANCEL_REQUESTED,
    CHILD_WORKFLOW_COMPLETED,
    CHILD_WORKFLOW_FAILED,
    CHILD_WORKFLOW_INITIATED,
    COMMAND_EVENTS,
    INBOUND_EVENTS,
    MARKER_RECORDED,
    SEARCH_ATTRIBUTES_UPSERTED,
    SIGNAL_RECEIVED,
    TIMER_CANCELLED,
    TIMER_FIRED,
    TIMER_STARTED,
    UPDATE_ACCEPTED,
    UPDATE_COMPLETED,
    WORKFLOW_CANCEL_REQUESTED,
    WORKFLOW_CANCELLED,
    WORKFLOW_COMPLETED,
    WORKFLOW_CONTINUED_AS_NEW,
    WORKFLOW_FAILED,
    WORKFLOW_STARTED,
    WORKFLOW_TASK_COMPLETED,
    Event,
    UpdateRequest,
)
from tether.converter import PayloadConverter
from tether.exceptions import (
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    InvalidArgumentError,
    NondeterminismError,
    PayloadError,
)

logger = logging.getLogger("tether.workflow")

Command = tuple[str, dict[str, Any]]
"""An event type and its data, as it will be appended to history."""

# Errors that mean the workflow *code* is broken: the workflow task is retried so
# a fixed deploy can continue the run, instead of failing the run for good.
BUG_EXCEPTION_TYPES: tuple[type[BaseException], ...] = (
    NameError,
    AttributeError,
    TypeError,
    ImportError,
    SyntaxError,
    NotImplementedError,
    RecursionError,
    InvalidArgumentError,
    NondeterminismError,
)


STACK_TRACE_QUERY = "__stack_trace"

# Delivered first in an activation (WorkflowStarted creates the workflow object).
_MESSAGE_EVENTS = frozenset({WORKFLOW_STARTED, SIGNAL_RECEIVED, UPDATE_ACCEPTED})


class ContinueAsNew(BaseException):
    """Raised by ``workflow.continue_as_new``: end this run and start it afresh."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        super().__init__("continue as new")
        self.args_ = args


class WorkflowTaskFailure(Exception):
    """The workflow task failed (a bug or nondeterminism); retry it later."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.__cause__ = cause


class _Evicted(BaseException):
    """Thrown into a workflow's coroutines when its instance is dropped from the cache."""


@dataclass(frozen=True)
class WorkflowInfo:
    """Facts about the running workflow, from ``workflow.info()``."""

    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    start_time: float
    """Epoch seconds when the run started."""
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)
    search_attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Current search attributes (``workflow.upsert_search_attributes`` changes them)."""
    parent_run_id: str | None = None

    @classmethod
    def from_started(cls, run_id: str, start_time: float, started: dict[str, Any]) -> WorkflowInfo:
        """Built from a run's ``WorkflowStarted`` event data."""
        # Every replay builds one: filled in directly, as a frozen dataclass's __init__
        # sets each field through object.__setattr__ (2.4 against 1.0 µs).
        info = object.__new__(cls)
        info.__dict__.update(
            namespace=started.get("namespace", "default"),
            workflow_id=started["workflow_id"],
            run_id=run_id,
            workflow_type=started["workflow_type"],
            task_queue=started["task_queue"],
            start_time=start_time,
            memo=dict(started.get("memo") or {}),
            search_attributes=dict(started.get("search_attributes") or {}),
            parent_run_id=started.get("parent_run_id"),
        )
        return info


class _DurableTimer(asyncio.TimerHandle):
    """A ``call_later`` handle backed by a durable timer; cancelling it cancels the timer."""

    def __init__(
        self,
        when: float,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
        loop: WorkflowInstance,
        context: contextvars.Context | None,
        seq: int | None,
    ) -> None:
        super().__init__(when, callback, args, loop, context=context)
        self.seq = seq

    def cancel(self) -> None:
        # asyncio.sleep cancels its timer handle even after it fired (then ``seq`` is
        # None): only a pending durable timer needs its cancellation recorded.
        if self._cancelled:  # type: ignore[has-type]
            return
        if self.seq is not None:
            loop = self._loop  # type: ignore[attr-defined]
            assert isinstance(loop, WorkflowInstance)
            loop._cancel_timer(self)
        # What Handle.cancel does with debug off (ours always is), without the calls up
        # the chain (to the loop's no-op _timer_handle_cancelled and get_debug): every
        # asyncio.sleep ends here.
        self._cancelled = True
        self._callback = None
        self._args = None  # type: ignore[assignment]


class WorkflowInstance(asyncio.AbstractEventLoop):
    """One run's workflow object, its event loop and its position in history."""

    def __init__(
        self, defn: WorkflowDefinition, info: WorkflowInfo, converter: PayloadConverter
    ) -> None:
        self.defn = defn
        self.info = info
        self.converter = converter
        self.last_seq = 0
        """Seq of the last history event applied."""
        self.task_version = 0
        """Number of workflow task blocks applied."""
        self.history_length = 0
        """Events in the run's history as of this instance's last committed task."""
        self.closed = False
        self.replaying = False
        self._now = info.start_time
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._next_seq = 0
        self._commands: list[Command] = []
        self._activities: dict[int, tuple[asyncio.Future[Any], Any]] = {}
        self._children: dict[int, tuple[asyncio.Future[Any], Any]] = {}
        self._child_ids: dict[int, str] = {}
        self._timers: dict[int, _DurableTimer] = {}
        self._undelivered: list[Event] = []
        self._block: list[Event] = []
        self._main: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        """The workflow's unfinished tasks (and those that finished in this activation)."""
        self._handlers: set[asyncio.Task[Any]] = set()
        self._handler_error: BaseException | None = None
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[bool]]] = []
        self._block_inputs: list[Event] = []
        self._replay_expected: list[Event] = []
        self._patches: dict[str, bool] = {}
        self.rejected_updates: list[tuple[str, dict[str, Any]]] = []
        self.read_new_inputs = False
        """Whether the last ``apply`` delivered new inbound events to the workflow."""
        self.cancel_requested = False
        self.poisoned = False
        """A query changed state: the instance must not be used for tasks any more."""
        self._seed = 0
        self._random: random.Random | None = None
        """Built on first use from ``_seed``: seeding costs more than most replays."""
        self._evicted = False
        self.workflow_object: Any = None
        self._committed = (0, -1)

    def mark_committed(self, first_seq: int, last_seq: int) -> None:
        """This instance's last activation was committed as events first_seq..last_seq."""
        self._committed = (first_seq, last_seq)

    # -- driving the instance ---------------------------------------------------
    def apply(
        self,
        events: list[Event],
        now: float,
        *,
        activate_new: bool = True,
        updates: list[UpdateRequest] | None = None,
    ) -> list[Command]:
        """Apply history events after ``last_seq``; return the commands of the new activation.

        ``updates`` are update requests to validate in the new activation: accepted ones
        come first in the returned commands (as ``UpdateAccepted``), rejected ones are
        left in ``rejected_updates``. Raises ``WorkflowTaskFailure`` for a bug or a
        nondeterminism; the instance is then unusable and must be dropped.
        """
        self.rejected_updates = []
        self.read_new_inputs = False
        # This instance is the running loop for the whole call (every block it replays
        # and the new activation), switched once rather than per activation.
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            return self._apply(events, now, activate_new, updates)
        finally:
            asyncio.events._set_running_loop(previous)

    def _apply(
        self,
        events: list[Event],
        now: float,
        activate_new: bool,
        updates: list[UpdateRequest] | None,
    ) -> list[Command]:
        skip_from, skip_to = self._committed
        for event in events:
            if event.seq <= self.last_seq:
                continue
            self.last_seq = event.seq
            if skip_from <= event.seq <= skip_to:
                continue  # this worker committed that block itself and is already past it
            if event.type in INBOUND_EVENTS:
                self._undelivered.append(event)
            elif event.type == UPDATE_ACCEPTED:
                self._block_inputs.append(event)
            elif event.type in COMMAND_EVENTS:
                self._block.append(event)
            elif event.type == WORKFLOW_TASK_COMPLETED:
                self._replay_block(event)
        if self._block:
            # Commands after the last completed task cannot happen: each task's block
            # is committed with its WorkflowTaskCompleted in one transaction.
            raise WorkflowTaskFailure(
                "history ends with commands that no workflow task completed",
                NondeterminismError("history has an unterminated block of commands"),
            )
        if not activate_new or (not self._undelivered and not updates):
            return []
        if self.closed:
            self.rejected_updates = [
                (u.update_id, _rejection("the workflow has already closed")) for u in updates or ()
            ]
            return []
        inbound, self._undelivered = self._undelivered, []
        self.read_new_inputs = bool(inbound)
        self.replaying = False
        self._replay_expected = []
        accepted: list[Command] = []
        self._activate(inbound, now, lambda: self._accept_updates(updates or [], accepted))
        commands, self._commands = self._commands, []
        return accepted + commands

    def _replay_block(self, marker: Event) -> None:
        through = marker.data["inputs_through"]
        inbound = [e for e in self._undelivered if e.seq <= through]
        self._undelivered = [e for e in self._undelivered if e.seq > through]
        expected, self._block = self._block, []
        accepted, self._block_inputs = self._block_inputs, []
        self.replaying = True
        self._replay_expected = expected
        self._activate(inbound + accepted, marker.time)
        produced, self._commands = self._commands, []
        self._check_block(expected, produced, marker)
        self.task_version += 1

    def _check_block(self, expected: list[Event], produced: list[Command], marker: Event) -> None:
        for i in range(max(len(expected), len(produced))):
            event = expected[i] if i < len(expected) else None
            command = produced[i] if i < len(produced) else None
            if event is not None and command is not None and _matches(event, command):
                continue
            if event is None:
                assert command is not None
                where = f"history event #{marker.seq} is {WORKFLOW_TASK_COMPLETED}"
                did = f"emitted {_describe(command[0], command[1])}"
            else:
                where = f"history event #{event.seq} is {_describe(event.type, event.data)}"
                did = (
                    f"emitted {_describe(command[0], command[1])}"
                    if command is not None
                    else "emitted no further command"
                )
            error = NondeterminismError(
                f"nondeterminism in workflow {self.info.workflow_type} "
                f"(id {self.info.workflow_id!r}, run {self.info.run_id}): {where}, but the "
                f"code {did}. The workflow code changed incompatibly with runs in flight; "
                "restore the previous code (the task is retried) or branch on a version."
            )
            raise WorkflowTaskFailure(str(error), error)

    def _activate(
        self, inbound: list[Event], now: float, then: Callable[[], None] | None = None
    ) -> None:
        """Deliver ``inbound`` and run the workflow until it waits (called by ``apply``,
        with this instance as the running loop)."""
        self._now = now
        # Messages reach their handlers before code waiting on other events resumes:
        # a run that continues as new (or completes) on an activity result or timer
        # has seen the signals and updates that arrived with it.
        for event in inbound:
            if event.type in _MESSAGE_EVENTS:
                self._deliver(event)
        if then is not None:
            then()
        for event in inbound:
            if event.type not in _MESSAGE_EVENTS:
                self._deliver(event)
        self._run_ready()
        self._drop_finished_tasks()
        self._check_main()

    def _drop_finished_tasks(self) -> None:
        """Let go of the tasks that finished, once per activation rather than by a done
        callback each (a handle run per task: a tenth of a short replay). Still within
        the activation, so that a task whose exception nobody retrieved is reported as
        asyncio does when it is freed, or not while replaying (``call_exception_handler``)."""
        tasks = self._tasks
        if len(tasks) > 1 or (tasks and self._main not in tasks):
            finished = [task for task in tasks if task.done()]
            tasks.difference_update(finished)
            del finished  # (freed here, not at the next activation)

    def _deliver(self, event: Event) -> None:
        data = event.data
        if event.type == WORKFLOW_STARTED:
            self._seed = data["seed"]
            self._start_main(data["args"])
        elif event.type == TIMER_FIRED:
            timer = self._timers.pop(data["seq"], None)
            if timer is not None and not timer.cancelled():
                timer.seq = None  # fired: nothing left to cancel
                self._ready.append(timer)
        elif event.type in (CHILD_WORKFLOW_COMPLETED, CHILD_WORKFLOW_FAILED):
            entry = self._children.pop(data["seq"], None)
            if entry is None or entry[0].done():
                return
            fut, hint = entry
            if event.type == CHILD_WORKFLOW_COMPLETED:
                try:
                    fut.set_result(self.converter.decode(data["result"], hint, "child result"))
                except Exception as e:
                    fut.set_exception(e)
            else:
                child_id = self._child_ids.get(data["seq"], "")
                status = data.get("status", "failed")
                failure = data.get("failure") or {}
                fut.set_exception(
                    ChildWorkflowError(
                        f"child workflow {child_id!r} {status}: {failure.get('message')}",
                        workflow_id=child_id,
                        status=status,
                        cause=from_failure(failure) if failure else None,
                    )
                )
        elif event.type == SIGNAL_RECEIVED:
            self._handle_signal(data["name"], data["args"])
        elif event.type == UPDATE_ACCEPTED:
            handler = self.defn.updates.get(data["name"])
            if handler is not None:
                args = self.converter.decode_args(data["args"], handler.arg_hints, "update")
                self._start_update(data["update_id"], handler, args)
        elif event.type == WORKFLOW_CANCEL_REQUESTED:
            self.cancel_requested = True
            if self._main is not None and not self._main.done():
                self._main.cancel(msg=data.get("reason") or "workflow cancelled")
        elif event.type in (ACTIVITY_COMPLETED, ACTIVITY_FAILED):
            entry = self._activities.pop(data["seq"], None)
            if entry is None:
                return
            fut, hint = entry
            if fut.done():
                return
            if event.type == ACTIVITY_COMPLETED:
                try:
                    fut.set_result(self.converter.decode(data["result"], hint, "activity result"))
                except Exception as e:
                    fut.set_exception(e)
            else:
                fut.set_exception(from_failure(data["failure"]))

    def _start_main(self, args: list[Any]) -> None:
        defn = self.defn
        self.workflow_object = defn.cls()
        run = getattr(self.workflow_object, defn.run_name)

        async def main() -> Any:
            # Decoded inside the task (its context, its errors), as run() would be.
            decoded = self.converter.decode_args(args, defn.arg_hints, "workflow")
            return await run(*decoded)

        self._main = self.create_task(main(), name=f"workflow {defn.name}")

    def _check_main(self) -> None:
        main = self._main
        handler_error = self._handler_error
        if handler_error is not None and not self.closed:
            self._handler_error = None
            if self._is_failure(handler_error):
                self._close(WORKFLOW_FAILED, {"failure": to_failure(handler_error)})
                return
            raise WorkflowTaskFailure(
                f"a signal handler failed with {type(handler_error).__name__}: {handler_error}",
                handler_error,
            )
        if main is None or not main.done() or self.closed:
            return
        if main.cancelled():
            self._close(WORKFLOW_CANCELLED, {"failure": _cancelled_failure()})
            return
        error = main.exception()
        if isinstance(error, ContinueAsNew):
            try:
                args = self.converter.encode_args(error.args_, "continue_as_new")
            except PayloadError as e:
                self._close(WORKFLOW_FAILED, {"failure": to_failure(e)})
                return
            self._close(WORKFLOW_CONTINUED_AS_NEW, {"args": args})
            return
        if error is None:
            try:
                result = self.converter.encode(main.result(), "workflow result")
            except PayloadError as e:
                # The same value fails the same way on every retry: fail the run, clearly.
                self._close(WORKFLOW_FAILED, {"failure": to_failure(e)})
                return
            self._close(WORKFLOW_COMPLETED, {"result": result})
        elif self._is_failure(error):
            self._close(WORKFLOW_FAILED, {"failure": to_failure(error)})
        else:
            raise WorkflowTaskFailure(
                f"workflow task failed with {type(error).__name__}: {error}", error
            )

    def _is_failure(self, error: BaseException) -> bool:
        if isinstance(error, (FailureError, *self.defn.failure_exception_types)):
            return True
        return isinstance(error, Exception) and not isinstance(error, BUG_EXCEPTION_TYPES)

    def _close(self, event_type: str, data: dict[str, Any]) -> None:
        self.closed = True
        self._commands.append((event_type, data))

    def _run_ready(self) -> None:
        """Run ready callbacks until none is left (this instance is the running loop)."""
        while True:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()
            if not self._check_conditions():
                break

    def _check_conditions(self) -> bool:
        """Resolve ``wait_condition`` waiters whose condition holds; True if any did."""
        progressed = False
        for entry in list(self._conditions):
            condition, fut = entry
            if fut.done():
                self._conditions.remove(entry)
            elif condition():
                fut.set_result(True)
                self._conditions.remove(entry)
                progressed = True
        return progressed

    # -- handlers: signals, updates, queries --------------------------------------
    def _handle_signal(self, name: str, args: list[Any]) -> None:
        handler = self.defn.signals.get(name)
        if handler is None:
            if not self.replaying:
                logger.warning(
                    "workflow %s (%s) has no signal handler %r; signal dropped",
                    self.info.workflow_type,
                    self.info.workflow_id,
                    name,
                )
            return
        method = getattr(self.workflow_object, handler.method)
        try:
            decoded = self.converter.decode_args(args, handler.arg_hints, f"signal {name!r}")
            _check_arity(method, decoded, f"signal {name!r}")
        except PayloadError as e:
            if not self.replaying:
                logger.warning("signal %r to %s dropped: %s", name, self.info.workflow_id, e)
            return
        self._track(self.create_task(self._guard_handler(method, decoded), name=f"signal {name}"))

    async def _guard_handler(self, method: Callable[..., Any], args: list[Any]) -> None:
        try:
            result = method(*args)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._handler_error = e

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def all_handlers_finished(self) -> bool:
        return not self._handlers

    def _accept_updates(self, requests: list[UpdateRequest], accepted: list[Command]) -> None:
        for request in requests:
            handler = self.defn.updates.get(request.name)
            try:
                if handler is None:
                    raise ApplicationError(
                        f"workflow {self.defn.name} has no update handler {request.name!r} "
                        f"(it has: {', '.join(sorted(self.defn.updates)) or 'none'})",
                        type="UnknownUpdate",
                    )
                args = self.converter.decode_args(
                    request.args, handler.arg_hints, f"update {request.name!r}"
                )
                method = getattr(self.workflow_object, handler.method)
                _check_arity(method, args, f"update {request.name!r}")
                if handler.validator is not None:
                    getattr(self.workflow_object, handler.validator)(*args)
            except Exception as e:
                self.rejected_updates.append((request.update_id, to_failure(e)))
                continue
            accepted.append(
                (
                    UPDATE_ACCEPTED,
                    {"update_id": request.update_id, "name": request.name, "args": request.args},
                )
            )
            self._start_update(request.update_id, handler, args)

    def _start_update(self, update_id: str, handler: HandlerDefinition, args: list[Any]) -> None:
        method = getattr(self.workflow_object, handler.method)

        async def run() -> None:
            try:
                result = method(*args)
                if inspect.isawaitable(result):
                    result = await result
                data = {"update_id": update_id, "result": self.converter.encode(result, "update")}
            except asyncio.CancelledError:
                raise
            except Exception as e:
                data = {"update_id": update_id, "failure": to_failure(e)}
            self._command(UPDATE_COMPLETED, data)

        self._track(self.create_task(run(), name=f"update {handler.name}"))

    def query(self, name: str, args: list[Any]) -> Any:
        """Run a query handler against the current state; returns the encoded answer."""
        if name == STACK_TRACE_QUERY:
            return self.stack_trace()
        handler = self.defn.queries.get(name)
        if handler is None:
            raise ApplicationError(
                f"workflow {self.defn.name} has no query handler {name!r} "
                f"(it has: {', '.join(sorted(self.defn.queries)) or 'none'})",
                type="UnknownQuery",
            )
        decoded = self.converter.decode_args(args, handler.arg_hints, f"query {name!r}")
        before = len(self._commands)
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            if self.workflow_object is None:
                # No workflow task has run yet: answer from the state the class starts with.
                self.workflow_object = self.defn.cls()
            result = getattr(self.workflow_object, handler.method)(*decoded)
        finally:
            asyncio.events._set_running_loop(previous)
        if len(self._commands) != before or self._ready:
            self.poisoned = True
            raise ApplicationError(
                f"query handler {name!r} tried to change the workflow (schedule work or "
                "wake tasks); queries must only read state",
                type="QueryChangedState",
            )
        return self.converter.encode(result, f"query {name!r} result")

    def stack_trace(self) -> str:
        """Where each coroutine of the workflow is waiting, outermost call first."""
        parts = []
        for task in sorted(self._tasks, key=lambda t: t.get_name()):
            if task.done():
                continue
            lines = [f"{task.get_name()}:"]
            coro: Any = task.get_coro()
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is not None:
                    code = frame.f_code
                    lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
            parts.append("\n".join(lines))
        return "\n\n".join(parts) or "(no coroutine is waiting)"

    def wait_condition(self, condition: Callable[[], bool]) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = self.create_future()
        self._conditions.append((condition, fut))
        return fut

    def patched(self, patch_id: str, deprecated: bool) -> bool:
        """Whether this run takes the code path of patch ``patch_id`` (see workflow.patched)."""
        known = self._patches.get(patch_id)
        if known is not None:
            return known
        marker: Command = (MARKER_RECORDED, {"patch_id": patch_id})
        if self.replaying:
            position = len(self._commands)
            expected = self._replay_expected
            upcoming = expected[position] if position < len(expected) else None
            if (
                upcoming is not None
                and upcoming.type == MARKER_RECORDED
                and upcoming.data.get("patch_id") == patch_id
            ):
                self._commands.append(marker)
                self._patches[patch_id] = True
                return True
            self._patches[patch_id] = deprecated
            return deprecated
        if not deprecated:
            self._command(*marker)
        self._patches[patch_id] = True
        return True

    def evict(self) -> None:
        """Drop the workflow's coroutines without letting them emit anything."""
        self._evicted = True
        pending = [task for task in self._tasks if not task.done()]
        if pending:  # (none once the workflow has closed)
            previous = asyncio.events._get_running_loop()
            asyncio.events._set_running_loop(self)
            try:
                for task in pending:
                    try:
                        task.get_coro().close()  # type: ignore[union-attr]
                    except BaseException:
                        pass
                    # The future it awaits holds its wake-up: cancelled, that goes to
                    # ``_ready`` (cleared below) and no longer keeps the task alive.
                    waiter = getattr(task, "_fut_waiter", None)
                    if waiter is not None:
                        waiter.cancel()
            finally:
                asyncio.events._set_running_loop(previous)
        # Tasks, futures and timer handles point back at this loop: let go of them, so
        # that the instance is freed at once rather than left to the cyclic garbage
        # collector (whose passes grow with every object alive in the worker).
        self._ready.clear()
        self._tasks.clear()
        self._handlers.clear()
        self._main = None
        self._timers.clear()
        self._activities.clear()
        self._children.clear()
        self._conditions.clear()
        self.workflow_object = None

    # -- commands issued by workflow code ----------------------------------------
    def _command(self, event_type: str, data: dict[str, Any]) -> None:
        if self._evicted:
            raise _Evicted()
        if self.closed:
            raise InvalidArgumentError("the workflow has already completed")
        self._commands.append((event_type, data))

    def next_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def schedule_activity(
        self,
        activity_type: str,
        args: list[Any],
        task_queue: str,
        options: dict[str, Any],
        result_hint: Any,
    ) -> asyncio.Future[Any]:
        seq = self.next_seq()
        self._command(
            ACTIVITY_SCHEDULED,
            {
                "seq": seq,
                "activity_type": activity_type,
                "task_queue": task_queue,
                "args": args,
                "options": options,
            },
        )
        fut: asyncio.Future[Any] = self.create_future()
        self._activities[seq] = (fut, result_hint)

        def on_done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() and seq in self._activities and not self._evicted:
                del self._activities[seq]
                self._command(ACTIVITY_CANCEL_REQUESTED, {"seq": seq})

        fut.add_done_callback(on_done)
        return fut

    def start_child(
        self,
        workflow_type: str,
        workflow_id: str | None,
        args: list[Any],
        options: dict[str, Any],
        result_hint: Any,
    ) -> asyncio.Future[Any]:
        seq = self.next_seq()
        child_id = workflow_id or f"{self.info.workflow_id}/child-{seq}"
        self._command(
            CHILD_WORKFLOW_INITIATED,
            {
                "seq": seq,
                "workflow_type": workflow_type,
                "workflow_id": child_id,
                "args": args,
                **options,
            },
        )
        fut: asyncio.Future[Any] = self.create_future()
        self._children[seq] = (fut, result_hint)
        self._child_ids[seq] = child_id

        def on_done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() and seq in self._children and not self._evicted:
                del self._children[seq]
                if not self.closed:
                    self._command(CHILD_CANCEL_REQUESTED, {"seq": seq})

        fut.add_done_callback(on_done)
        return fut

    def upsert_search_attributes(self, attributes: dict[str, Any]) -> None:
        encoded = self.converter.encode(attributes, "search attributes")
        self._command(SEARCH_ATTRIBUTES_UPSERTED, {"attributes": encoded})
        self.info.search_attributes.update(encoded)

    def _cancel_timer(self, timer: _DurableTimer) -> None:
        pending = timer.seq is not None and self._timers.pop(timer.seq, None) is not None
        if pending and not self._evicted and not self.closed:
            self._command(TIMER_CANCELLED, {"seq": timer.seq})

    def now(self) -> float:
        return self._now

    def random(self) -> random.Random:
        if self._random is None:
            self._random = random.Random(self._seed)
        return self._random

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.random().getrandbits(128), version=4)

    # -- the asyncio event loop interface ------------------------------------------
    def time(self) -> float:
        return self._now

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        raise RuntimeError("workflow code must not use threads; use activities instead")

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if delay <= 0:
            timer = _DurableTimer(self._now, callback, args, self, context, None)
            self._ready.append(timer)
            return timer
        seq = self.next_seq()
        self._command(TIMER_STARTED, {"seq": seq, "duration": delay, "fire_at": self._now + delay})
        timer = _DurableTimer(self._now + delay, callback, args, self, context, seq)
        self._timers[seq] = timer
        return timer

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_later(when - self._now, callback, *args, context=context)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None, context: Any = None) -> Any:
        if self._evicted:
            coro.close()
            raise _Evicted()
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=self, name=name, context=context)
        self._tasks.add(task)  # until it finishes: see _drop_finished_tasks
        return task

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def get_exception_handler(self) -> None:
        return None

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if self.replaying or self._evicted:
            return
        exc = context.get("exception")
        logger.error(
            "workflow %s (%s): %s",
            self.info.workflow_id,
            self.info.run_id,
            context.get("message", "unhandled error"),
            exc_info=exc if isinstance(exc, BaseException) else None,
        )

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(
            "workflow code cannot run functions in threads (not deterministic); "
            "call an activity with workflow.execute_activity instead"
        )


def _matches(event: Event, command: Command) -> bool:
    event_type, data = command
    if event.type != event_type:
        return False
    for key in ("update_id", "patch_id"):
        if key in data:
            return bool(event.data.get(key) == data[key])
    if event_type == ACTIVITY_SCHEDULED:
        return bool(
            event.data["seq"] == data["seq"]
            and event.data["activity_type"] == data["activity_type"]
        )
    if "seq" in data:
        return bool(event.data.get("seq") == data["seq"])
    return True


def _describe(event_type: str, data: dict[str, Any]) -> str:
    if event_type == ACTIVITY_SCHEDULED:
        return f"{event_type}(activity {data['activity_type']!r}, seq {data['seq']})"
    if event_type == TIMER_STARTED:
        return f"{event_type}({data['duration']} s, seq {data['seq']})"
    if "seq" in data:
        return f"{event_type}(seq {data['seq']})"
    return event_type


def _check_arity(method: Callable[..., Any], args: list[Any], what: str) -> None:
    """Raise ``PayloadError`` if ``method`` cannot be called with ``args``."""
    try:
        inspect.signature(method).bind(*args)
    except TypeError as e:
        raise PayloadError(f"{what}: {e} (got {len(args)})") from None


def _cancelled_failure() -> dict[str, Any]:
    return {"kind": "cancelled", "type": "CancelledError", "message": "the workflow was cancelled"}


def _rejection(message: str) -> dict[str, Any]:
    return {"kind": "application", "type": "UpdateRejected", "message": message}


__all__ = [
    "BUG_EXCEPTION_TYPES",
    "Command",
    "WorkflowInfo",
    "WorkflowInstance",
    "WorkflowTaskFailure",
]
