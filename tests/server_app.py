"""Workflows for the HTTP API and CLI tests (``tests/test_server_http.py``, ``test_cli.py``).

``make_worker`` is the ``tether worker`` factory: ``tether worker server_app:make_worker``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tether import Client, Worker, activity, workflow

TASK_QUEUE = "api-test"


@workflow.defn
class Greeter:
    """Waits for a ``finish`` signal; greets with the latest name set by update."""

    def __init__(self) -> None:
        self.greeting = "Hello"
        self.name = ""
        self.done = False

    @workflow.run
    async def run(self, name: str) -> str:
        self.name = name
        await workflow.wait_condition(lambda: self.done)
        return f"{self.greeting}, {self.name}!"

    @workflow.signal
    def set_greeting(self, greeting: str) -> None:
        self.greeting = greeting

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def current(self) -> str:
        return f"{self.greeting}, {self.name}!"

    @workflow.update
    def rename(self, name: str) -> str:
        old, self.name = self.name, name
        return old

    @rename.validator
    def check_rename(self, name: str) -> None:
        if not name:
            raise ValueError("name must not be empty")


@workflow.defn
class Sleeper:
    """Sleeps for an hour (cancel or terminate it)."""

    @workflow.run
    async def run(self) -> str:
        await asyncio.sleep(3600)
        return "woke"


@workflow.defn
class Quick:
    @workflow.run
    async def run(self, a: int, b: int) -> int:
        if a < 0:
            raise ValueError("a must not be negative")
        return a + b


@activity.defn
async def slow_step(marker: str, seconds: float) -> int:
    """Leaves ``marker.N`` for attempt N; the first attempt then takes ``seconds``."""
    attempt = activity.info().attempt
    Path(f"{marker}.{attempt}").write_text("started")
    if attempt == 1:
        await asyncio.sleep(seconds)
    return attempt


@workflow.defn
class Job:
    """Runs ``slow_step`` once; returns the attempt that finished it."""

    @workflow.run
    async def run(self, marker: str, seconds: float) -> int:
        result: int = await workflow.execute_activity(
            slow_step, marker, seconds, start_to_close_timeout=120
        )
        return result


def make_worker(client: Client) -> Worker:
    return Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[Greeter, Sleeper, Quick, Job],
        activities=[slow_step],
    )
