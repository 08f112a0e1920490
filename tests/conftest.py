"""Shared fixtures.

Workflow tests take ``make_worker`` and run twice: with the workflow cache, and in
"always replay" mode (``max_cached_workflows=0``), where every workflow task rebuilds
the workflow from history, to flush out determinism bugs. Store tests take
``store`` and run against every backend.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tether import Client, Worker
from tether._store.base import Store
from tether._store.sqlite import SqliteStore
from tether.testing import WorkflowEnvironment

BACKENDS = ["sqlite"]


@pytest.fixture(params=["cached", "always-replay"])
def replay_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_worker(replay_mode: str) -> Callable[..., Worker]:
    def make(client: Client, **options: Any) -> Worker:
        options.setdefault("task_queue", "test")
        if replay_mode == "always-replay":
            options["max_cached_workflows"] = 0
        return Worker(client, **options)

    return make


@pytest.fixture
async def env(tmp_path: Any) -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_local(os.path.join(tmp_path, "tether.db"))
    yield environment
    await environment.shutdown()


@pytest.fixture
async def skipping_env(tmp_path: Any) -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(os.path.join(tmp_path, "tether.db"))
    yield environment
    await environment.shutdown()


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Store]:
    backend: Store = SqliteStore(os.path.join(tmp_path, "store.db"))
    yield backend
    await backend.close()
