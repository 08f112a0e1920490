"""Waiting helpers for tests: poll with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tether import WorkflowHandle


async def wait_until(
    condition: Callable[[], Any | Awaitable[Any]], what: str, timeout: float = 10.0
) -> Any:
    """Poll ``condition`` (sync or async) until it is truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def event_types(handle: WorkflowHandle) -> list[str]:
    return [e.type for e in await handle.history()]
