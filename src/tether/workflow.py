"""Writing workflows: ``@workflow.defn`` classes and the API available inside them.

Workflow code is ordinary async Python run on a deterministic event loop:
``asyncio.sleep`` is a durable timer, ``asyncio.gather``/``wait``/``wait_for`` work,
and time, randomness and UUIDs come from this module so that a replay sees the
same values. Talk to the outside world only through activities.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NoReturn, TypeVar, overload

from tether._runtime.definitions import (
    HANDLER_ATTR,
    RUN_ATTR,
    VALIDATOR_ATTR,
    WORKFLOW_ATTR,
    activity_definition,
    make_workflow_definition,
    workflow_definition,
)
from tether._runtime.instance import (
    BUG_EXCEPTION_TYPES,
    ContinueAsNew,
    WorkflowInfo,
    WorkflowInstance,
)
from tether.common import Duration, RetryPolicy, to_seconds
from tether.exceptions import InvalidArgumentError

__all__ = [
    "BUG_EXCEPTION_TYPES",
    "WorkflowInfo",
    "all_handlers_finished",
    "continue_as_new",
    "defn",
    "deprecate_patch",
    "execute_activity",
    "execute_child_workflow",
    "in_workflow",
    "info",
    "is_cancel_requested",
    "logger",
    "now",
    "patched",
    "query",
    "random",
    "run",
    "signal",
    "sleep",
    "start_activity",
    "start_child_workflow",
    "time",
    "update",
    "upsert_search_attributes",
    "uuid4",
    "wait_condition",
]

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


@overload
def defn(cls: C) -> C: ...
@overload
def defn(
    *, name: str | None = None, failure_exception_types: tuple[type[BaseException], ...] = ()
) -> Callable[[C], C]: ...
def defn(
    cls: C | None = None,
    *,
    name: str | None = None,
    failure_exception_types: tuple[type[BaseException], ...] = (),
) -> C | Callable[[C], C]:
    """Mark a class as a workflow. Its ``@workflow.run`` method is the entry point.

    ``name`` defaults to the class name. An exception escaping the run method fails
    the run, except code defects (``workflow.BUG_EXCEPTION_TYPES``: ``NameError``,
    ``TypeError`` ...), which retry the workflow task so a fixed deploy can continue;
    ``failure_exception_types`` makes listed defect types fail the run instead.
    """

    def decorate(c: C) -> C:
        definition = make_workflow_definition(c, name, tuple(failure_exception_types))
        setattr(c, WORKFLOW_ATTR, definition)
        getattr(c, definition.run_name).__tether_owner__ = c
        return c

    return decorate(cls) if cls is not None else decorate


def run(fn: F) -> F:
    """Mark the ``async def`` method that runs the workflow."""
    setattr(fn, RUN_ATTR, True)
    return fn


def _handler_decorator(kind: str, fn: F | None, name: str | None) -> Any:
    def decorate(f: F) -> F:
        setattr(f, HANDLER_ATTR, (kind, name or f.__name__))
        if kind == "update":

            def validator(check: Callable[..., None]) -> Callable[..., None]:
                setattr(f, VALIDATOR_ATTR, check)
                return check

            f.validator = validator  # type: ignore[attr-defined]
        return f

    return decorate(fn) if fn is not None else decorate


def signal(fn: F | None = None, *, name: str | None = None) -> Any:
    """Mark a method (``def`` or ``async def``) as the handler of signal ``name``.

    Signals are recorded in history and delivered in the order received, even if the
    workflow was not running on any worker when they were sent.
    """
    return _handler_decorator("signal", fn, name)


def query(fn: F | None = None, *, name: str | None = None) -> Any:
    """Mark a plain ``def`` method as the handler of query ``name``: it reads state only."""
    return _handler_decorator("query", fn, name)


def update(fn: F | None = None, *, name: str | None = None) -> Any:
    """Mark a method as the handler of update ``name``; the caller gets its return value.

    Decorate a method with ``@<handler>.validator`` to check the arguments first: if it
    raises, the update is rejected and leaves no trace in history.
    """
    return _handler_decorator("update", fn, name)


def _instance() -> WorkflowInstance:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if not isinstance(loop, WorkflowInstance):
        raise RuntimeError("this function can only be called from workflow code")
    return loop


def in_workflow() -> bool:
    """Whether the caller runs inside workflow code."""
    try:
        return isinstance(asyncio.get_running_loop(), WorkflowInstance)
    except RuntimeError:
        return False


def info() -> WorkflowInfo:
    """Ids, type and task queue of the running workflow."""
    return _instance().info


def time() -> float:
    """Workflow time as epoch seconds: deterministic, the same on every replay."""
    return _instance().now()


def now() -> _dt.datetime:
    """Workflow time as an aware UTC datetime (see ``time``)."""
    return _dt.datetime.fromtimestamp(_instance().now(), _dt.UTC)


def random() -> _random.Random:
    """A random generator seeded per run, replaying the same sequence."""
    return _instance().random()


def uuid4() -> _uuid.UUID:
    """A random UUID from the workflow's deterministic generator."""
    return _instance().uuid4()


async def sleep(duration: Duration) -> None:
    """Wait durably; the same as ``asyncio.sleep`` inside a workflow."""
    seconds = to_seconds(duration, "sleep duration")
    await asyncio.sleep(seconds or 0)


def start_activity(
    activity: Callable[..., Any] | str,
    *args: Any,
    task_queue: str | None = None,
    start_to_close_timeout: Duration | None = None,
    schedule_to_close_timeout: Duration | None = None,
    heartbeat_timeout: Duration | None = None,
    retry_policy: RetryPolicy | None = None,
    result_type: Any = None,
) -> asyncio.Future[Any]:
    """Schedule an activity and return a future of its result (see ``execute_activity``)."""
    inst = _instance()
    if isinstance(activity, str):
        activity_type, hints, result_hint = activity, None, result_type
    else:
        definition = activity_definition(activity)
        activity_type, hints = definition.name, definition.arg_hints
        result_hint = result_type if result_type is not None else definition.return_hint
    start_to_close = to_seconds(start_to_close_timeout, "start_to_close_timeout")
    schedule_to_close = to_seconds(schedule_to_close_timeout, "schedule_to_close_timeout")
    heartbeat = to_seconds(heartbeat_timeout, "heartbeat_timeout")
    if not start_to_close and not schedule_to_close:
        raise InvalidArgumentError(
            f"activity {activity_type!r} needs start_to_close_timeout or "
            "schedule_to_close_timeout (how long one attempt, or all of them, may take)"
        )
    if hints is not None and len(args) > len(hints):
        raise InvalidArgumentError(
            f"activity {activity_type!r} takes {len(hints)} positional arguments, {len(args)} given"
        )
    options = {
        "start_to_close": start_to_close,
        "schedule_to_close": schedule_to_close,
        "heartbeat": heartbeat,
        "retry_policy": (retry_policy or RetryPolicy()).to_dict(),
    }
    payload = inst.converter.encode_args(args, f"activity {activity_type!r}")
    return inst.schedule_activity(
        activity_type, payload, task_queue or inst.info.task_queue, options, result_hint
    )


async def execute_activity(
    activity: Callable[..., Any] | str,
    *args: Any,
    task_queue: str | None = None,
    start_to_close_timeout: Duration | None = None,
    schedule_to_close_timeout: Duration | None = None,
    heartbeat_timeout: Duration | None = None,
    retry_policy: RetryPolicy | None = None,
    result_type: Any = None,
) -> Any:
    """Run an activity (retried per ``retry_policy``) and return its result.

    One of ``start_to_close_timeout`` (per attempt) or ``schedule_to_close_timeout``
    (all attempts together) is required. A failure that is not retried raises
    ``ActivityError`` whose ``cause`` is the last attempt's error.
    """
    fut: Awaitable[Any] = start_activity(
        activity,
        *args,
        task_queue=task_queue,
        start_to_close_timeout=start_to_close_timeout,
        schedule_to_close_timeout=schedule_to_close_timeout,
        heartbeat_timeout=heartbeat_timeout,
        retry_policy=retry_policy,
        result_type=result_type,
    )
    return await fut


_PARENT_CLOSE_POLICIES = ("terminate", "request_cancel", "abandon")


def start_child_workflow(
    workflow: type | Callable[..., Any] | str,
    *args: Any,
    id: str | None = None,
    task_queue: str | None = None,
    parent_close_policy: str = "terminate",
    run_timeout: Duration | None = None,
    execution_timeout: Duration | None = None,
    memo: dict[str, Any] | None = None,
    search_attributes: dict[str, Any] | None = None,
    result_type: Any = None,
) -> asyncio.Future[Any]:
    """Start a child workflow; the future resolves to its result (see execute_child_workflow)."""
    inst = _instance()
    if isinstance(workflow, str):
        workflow_type, result_hint = workflow, result_type
    else:
        defn = workflow_definition(workflow)
        workflow_type = defn.name
        result_hint = result_type if result_type is not None else defn.return_hint
    if parent_close_policy not in _PARENT_CLOSE_POLICIES:
        raise InvalidArgumentError(
            f"parent_close_policy must be one of {', '.join(_PARENT_CLOSE_POLICIES)} "
            f"(got {parent_close_policy!r})"
        )
    options = {
        "task_queue": task_queue or inst.info.task_queue,
        "parent_close_policy": parent_close_policy,
        "run_timeout": to_seconds(run_timeout, "run_timeout"),
        "execution_timeout": to_seconds(execution_timeout, "execution_timeout"),
        "memo": inst.converter.encode(memo, "memo") if memo else None,
        "search_attributes": (
            inst.converter.encode(search_attributes, "search attributes")
            if search_attributes
            else None
        ),
    }
    payload = inst.converter.encode_args(args, f"child workflow {workflow_type!r}")
    return inst.start_child(workflow_type, id, payload, options, result_hint)


async def execute_child_workflow(
    workflow: type | Callable[..., Any] | str,
    *args: Any,
    id: str | None = None,
    task_queue: str | None = None,
    parent_close_policy: str = "terminate",
    run_timeout: Duration | None = None,
    execution_timeout: Duration | None = None,
    memo: dict[str, Any] | None = None,
    search_attributes: dict[str, Any] | None = None,
    result_type: Any = None,
) -> Any:
    """Run a child workflow and return its result.

    ``id`` defaults to ``<parent id>/child-<n>``. When the parent closes first,
    ``parent_close_policy`` decides the child's fate: ``terminate`` (the default),
    ``request_cancel`` or ``abandon``. Cancelling the awaiting task asks the child to
    cancel. A child that does not complete raises ``ChildWorkflowError``.
    """
    return await start_child_workflow(
        workflow,
        *args,
        id=id,
        task_queue=task_queue,
        parent_close_policy=parent_close_policy,
        run_timeout=run_timeout,
        execution_timeout=execution_timeout,
        memo=memo,
        search_attributes=search_attributes,
        result_type=result_type,
    )


def upsert_search_attributes(attributes: dict[str, Any]) -> None:
    """Merge ``attributes`` into this workflow's search attributes (recorded in history)."""
    _instance().upsert_search_attributes(attributes)


async def wait_condition(condition: Callable[[], bool], *, timeout: Duration | None = None) -> None:
    """Wait until ``condition()`` is true (checked whenever the workflow has run).

    With ``timeout``, raises ``TimeoutError`` when it passes first (a durable timer).
    """
    fut = _instance().wait_condition(condition)
    seconds = to_seconds(timeout, "timeout")
    if seconds is None:
        await fut
    else:
        await asyncio.wait_for(fut, seconds)


def all_handlers_finished() -> bool:
    """Whether no signal or update handler is still running (wait for it before returning)."""
    return _instance().all_handlers_finished()


def continue_as_new(*args: Any) -> NoReturn:
    """End this run and start the workflow afresh with ``args``: same id, empty history.

    Signals and updates this run has not handled yet move to the new run.
    """
    _instance()
    raise ContinueAsNew(args)


def patched(patch_id: str) -> bool:
    """Branch new code from old without breaking runs in flight.

    Returns True for runs that reach this point on new code (recording a marker in
    history) and False when replaying a run that passed this point on old code.
    """
    return _instance().patched(patch_id, deprecated=False)


def deprecate_patch(patch_id: str) -> None:
    """Once no run on the old path remains: keep replaying runs that recorded the patch."""
    _instance().patched(patch_id, deprecated=True)


def is_cancel_requested() -> bool:
    """Whether someone asked this workflow to cancel."""
    return _instance().cancel_requested


class _ReplayQuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Logs with the workflow's ids, and stays quiet while history is being replayed."""

    def isEnabledFor(self, level: int) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if isinstance(loop, WorkflowInstance) and loop.replaying:
            return False
        return bool(self.logger.isEnabledFor(level))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        if in_workflow():
            wf = info()
            extra = {"workflow_id": wf.workflow_id, "run_id": wf.run_id}
            kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
            msg = f"{msg} [workflow {wf.workflow_type} id={wf.workflow_id}]"
        return msg, kwargs


logger = _ReplayQuietLogger(logging.getLogger("tether.workflow"), {})
"""A logger for workflow code that does not repeat itself during replay."""
