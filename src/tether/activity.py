"""Writing activities: functions that talk to the outside world.

Activities run outside the deterministic workflow loop, may fail and are retried
per the caller's ``RetryPolicy``. They run at least once: make their effects
idempotent with ``activity.info().idempotency_key``. ``async def`` activities run
on the worker's event loop; plain functions run in its thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from tether._runtime import activity_context
from tether._runtime.activity_context import ActivityCancelled, ActivityInfo
from tether._runtime.definitions import ACTIVITY_ATTR, make_activity_definition

__all__ = ["ActivityCancelled", "ActivityInfo", "defn", "heartbeat", "in_activity", "info"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def defn(fn: F) -> F: ...
@overload
def defn(*, name: str | None = None) -> Callable[[F], F]: ...
def defn(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a function (async or sync) as an activity; ``name`` defaults to its name."""

    def decorate(f: F) -> F:
        setattr(f, ACTIVITY_ATTR, make_activity_definition(f, name))
        return f

    return decorate(fn) if fn is not None else decorate


def _context() -> activity_context.ActivityContext:
    try:
        return activity_context.current.get()
    except LookupError:
        raise RuntimeError("this function can only be called from activity code") from None


def in_activity() -> bool:
    """Whether the caller runs inside an activity."""
    return activity_context.current.get(None) is not None


def info() -> ActivityInfo:
    """Facts about the running attempt: attempt number, idempotency key, last details."""
    return _context().info


def heartbeat(details: Any = None) -> None:
    """Report liveness, optionally with progress ``details`` that a retry will see.

    Raises ``ActivityCancelled`` once the activity has been cancelled or timed out, so
    a long loop that heartbeats stops promptly.
    """
    _context().heartbeat(details)
