"""What the decorators record about workflow classes and activity functions."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.converter import signature_hints
from tether.exceptions import InvalidArgumentError

WORKFLOW_ATTR = "__tether_workflow__"
ACTIVITY_ATTR = "__tether_activity__"
RUN_ATTR = "__tether_run__"
HANDLER_ATTR = "__tether_handler__"
"""Set on signal/query/update methods: (kind, name)."""
VALIDATOR_ATTR = "__tether_validator__"


@dataclass(frozen=True)
class HandlerDefinition:
    kind: str
    """``signal``, ``query`` or ``update``."""
    name: str
    method: str
    arg_hints: list[Any]
    return_hint: Any
    is_async: bool
    validator: str | None = None


@dataclass(frozen=True)
class WorkflowDefinition:
    name: str
    cls: type
    run_name: str
    arg_hints: list[Any]
    return_hint: Any
    failure_exception_types: tuple[type[BaseException], ...]
    signals: dict[str, HandlerDefinition]
    queries: dict[str, HandlerDefinition]
    updates: dict[str, HandlerDefinition]

    def handler_names(self) -> dict[str, list[str]]:
        return {
            "signals": sorted(self.signals),
            "queries": sorted(self.queries),
            "updates": sorted(self.updates),
        }


@dataclass(frozen=True)
class ActivityDefinition:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    arg_hints: list[Any]
    return_hint: Any


def make_workflow_definition(
    cls: type, name: str | None, failure_exception_types: tuple[type[BaseException], ...]
) -> WorkflowDefinition:
    runs = [
        attr
        for attr, value in inspect.getmembers(cls)
        if callable(value) and getattr(value, RUN_ATTR, False)
    ]
    if len(runs) != 1:
        raise InvalidArgumentError(
            f"workflow class {cls.__qualname__} must have exactly one method decorated with "
            f"@workflow.run (found {len(runs)})"
        )
    run = getattr(cls, runs[0])
    if not inspect.iscoroutinefunction(run):
        raise InvalidArgumentError(
            f"{cls.__qualname__}.{runs[0]} must be 'async def' to be a workflow run method"
        )
    arg_hints, return_hint = signature_hints(run, skip_self=True)
    handlers: dict[str, dict[str, HandlerDefinition]] = {"signal": {}, "query": {}, "update": {}}
    for attr in dir(cls):
        value = getattr(cls, attr, None)
        marker = getattr(value, HANDLER_ATTR, None)
        if marker is None or not callable(value):
            continue
        kind, handler_name = marker
        if handler_name in handlers[kind]:
            raise InvalidArgumentError(
                f"workflow class {cls.__qualname__} has two {kind} handlers named {handler_name!r}"
            )
        if kind == "query" and inspect.iscoroutinefunction(value):
            raise InvalidArgumentError(
                f"query handler {cls.__qualname__}.{attr} must be a plain 'def': queries "
                "read state and cannot wait"
            )
        validator = getattr(value, VALIDATOR_ATTR, None)
        hints, ret = signature_hints(value, skip_self=True)
        handlers[kind][handler_name] = HandlerDefinition(
            kind=kind,
            name=handler_name,
            method=attr,
            arg_hints=hints,
            return_hint=ret,
            is_async=inspect.iscoroutinefunction(value),
            validator=validator.__name__ if validator is not None else None,
        )
    return WorkflowDefinition(
        name=name or cls.__name__,
        cls=cls,
        run_name=runs[0],
        arg_hints=arg_hints,
        return_hint=return_hint,
        failure_exception_types=failure_exception_types,
        signals=handlers["signal"],
        queries=handlers["query"],
        updates=handlers["update"],
    )


def make_activity_definition(fn: Callable[..., Any], name: str | None) -> ActivityDefinition:
    if not callable(fn):
        raise InvalidArgumentError(f"@activity.defn needs a function, got {fn!r}")
    arg_hints, return_hint = signature_hints(fn)
    return ActivityDefinition(
        name=name or str(getattr(fn, "__name__", repr(fn))),
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        arg_hints=arg_hints,
        return_hint=return_hint,
    )


def workflow_definition(obj: Any) -> WorkflowDefinition:
    """The definition of a ``@workflow.defn`` class, or of its run method."""
    defn = getattr(obj, WORKFLOW_ATTR, None)
    if defn is None and getattr(obj, RUN_ATTR, False):
        owner = getattr(obj, "__tether_owner__", None)
        defn = getattr(owner, WORKFLOW_ATTR, None)
    if not isinstance(defn, WorkflowDefinition):
        raise InvalidArgumentError(
            f"{obj!r} is not a workflow: decorate the class with @workflow.defn"
        )
    return defn


def activity_definition(obj: Any) -> ActivityDefinition:
    defn = getattr(obj, ACTIVITY_ATTR, None)
    if not isinstance(defn, ActivityDefinition):
        raise InvalidArgumentError(
            f"{obj!r} is not an activity: decorate the function with @activity.defn"
        )
    return defn
