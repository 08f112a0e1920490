"""Exceptions <-> failure records stored in history (with their cause chain)."""

from __future__ import annotations

import traceback
from typing import Any

import pydantic_core

from tether.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    TimeoutFailure,
)

_MAX_DEPTH = 8
_MAX_STACK_CHARS = 8000


def _jsonable(value: Any) -> Any:
    try:
        return pydantic_core.to_jsonable_python(value)
    except Exception:
        return repr(value)


def to_failure(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """A JSON record of ``exc`` and its causes, enough to rebuild a typed error."""
    failure: dict[str, Any] = {
        "message": str(exc),
        "stack_trace": "".join(traceback.format_exception(exc, chain=False))[-_MAX_STACK_CHARS:],
    }
    if isinstance(exc, ApplicationError):
        failure.update(
            kind="application",
            type=exc.type,
            non_retryable=exc.non_retryable,
            next_retry_delay=exc.next_retry_delay,
            details=[_jsonable(d) for d in exc.details],
        )
    elif isinstance(exc, TimeoutFailure):
        failure.update(
            kind="timeout",
            type="TimeoutFailure",
            timeout_type=exc.timeout_type,
            last_heartbeat_details=_jsonable(exc.last_heartbeat_details),
        )
    elif isinstance(exc, ActivityError):
        failure.update(
            kind="activity",
            type="ActivityError",
            activity_type=exc.activity_type,
            activity_seq=exc.activity_seq,
            attempt=exc.attempt,
            retry_state=exc.retry_state,
        )
    else:
        failure.update(kind="application", type=type(exc).__name__, non_retryable=False)
    cause = exc.__cause__
    if cause is None and not exc.__suppress_context__:
        cause = exc.__context__
    if cause is not None and depth < _MAX_DEPTH:
        failure["cause"] = to_failure(cause, depth + 1)
    return failure


def from_failure(failure: dict[str, Any]) -> FailureError:
    """Rebuild the typed error a failure record describes, cause chain included."""
    kind = failure.get("kind", "application")
    message = failure.get("message", "")
    error: FailureError
    if kind == "timeout":
        error = TimeoutFailure(
            message,
            timeout_type=failure.get("timeout_type", "unknown"),
            last_heartbeat_details=failure.get("last_heartbeat_details"),
        )
    elif kind == "activity":
        error = ActivityError(
            message,
            activity_type=failure.get("activity_type", ""),
            activity_seq=failure.get("activity_seq", 0),
            attempt=failure.get("attempt", 0),
            retry_state=failure.get("retry_state", ""),
        )
    else:
        error = ApplicationError(
            message,
            *failure.get("details", ()),
            type=failure.get("type"),
            non_retryable=failure.get("non_retryable", False),
            next_retry_delay=failure.get("next_retry_delay"),
        )
    error.stack_trace = failure.get("stack_trace", "")
    if "cause" in failure:
        error.__cause__ = from_failure(failure["cause"])
    return error


def failure_type(failure: dict[str, Any]) -> str:
    return str(failure.get("type", ""))
