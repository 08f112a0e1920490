"""The context an activity runs in: its info, heartbeats and cancellation."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.converter import PayloadConverter
from tether.exceptions import TetherError


@dataclass(frozen=True)
class ActivityInfo:
    """Facts about the running activity attempt, from ``activity.info()``."""

    activity_type: str
    activity_seq: int
    attempt: int
    """1 for the first attempt; a retry, or a rerun after a worker died, counts up."""
    idempotency_key: str
    """Stable across attempts of this activity: pass it to downstream APIs."""
    heartbeat_details: Any
    """Details from the last heartbeat of an earlier attempt, or None."""
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    scheduled_time: float
    start_to_close_timeout: float | None
    heartbeat_timeout: float | None


class ActivityCancelled(TetherError):
    """The workflow no longer wants this activity's result (raised by ``heartbeat``)."""


class ActivityContext:
    """Per-attempt state; thread-safe so sync activities in a pool can heartbeat."""

    def __init__(
        self,
        info: ActivityInfo,
        on_heartbeat: Callable[[], None],
        converter: PayloadConverter | None = None,
    ) -> None:
        self.info = info
        self._on_heartbeat = on_heartbeat
        self._converter = converter or PayloadConverter()
        self._lock = threading.Lock()
        self.last_heartbeat = time.monotonic()
        self.details: Any = info.heartbeat_details
        self.details_dirty = False
        self.cancel_reason: str | None = None

    def heartbeat(self, details: Any) -> None:
        if self.cancel_reason is not None:
            raise ActivityCancelled(self.cancel_reason)
        if details is not None:
            # Stored as JSON: convert now so a bad value fails here, in the caller, with a
            # PayloadError (not later in the worker, where it would strand the attempt).
            details = self._converter.encode(details, "heartbeat details")
        with self._lock:
            self.last_heartbeat = time.monotonic()
            if details is not None:
                self.details = details
                self.details_dirty = True
        self._on_heartbeat()

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason


current: contextvars.ContextVar[ActivityContext] = contextvars.ContextVar("tether_activity")
