"""Shared fixtures.

Workflow tests take ``make_worker`` and run twice: with the workflow cache, and in
"always replay" mode (``max_cached_workflows=0``), where every workflow task rebuilds
the workflow from history, to flush out determinism bugs. Store tests take
``store`` and run against every backend (and SQLite with its writer in a process of
its own), and so do workflow tests through ``env``
and ``skipping_env``.

PostgreSQL runs use one database per test session, created with a random name on
the server at ``TETHER_TEST_POSTGRES`` and dropped at the end; each test starts on
empty tables. Without a reachable server the PostgreSQL runs are skipped, except
in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from backends import (
    create_database,
    drop_database,
    empty_tables,
    postgres_reachable,
    run_sync,
)
from tether import Client, Worker
from tether._store.base import Store
from tether._store.postgres import PostgresStore
from tether._store.sqlite import SqliteStore
from tether.testing import WorkflowEnvironment

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """This test session's own database (created now, dropped at the end)."""
    problem = run_sync(postgres_reachable())
    if problem is not None:
        message = f"PostgreSQL test server unreachable: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url = run_sync(create_database())
    try:
        yield url
    finally:
        run_sync(drop_database(url))


@pytest.fixture
def fresh_postgres(postgres_url: str) -> str:
    """The session's database with every table emptied."""
    run_sync(empty_tables(postgres_url))
    return postgres_url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _store_url(request: pytest.FixtureRequest, backend: str, tmp_path: Any) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("fresh_postgres"))
    return "sqlite:///" + os.path.join(tmp_path, "tether.db")


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
async def env(
    request: pytest.FixtureRequest, backend: str, tmp_path: Any
) -> AsyncIterator[WorkflowEnvironment]:
    url = _store_url(request, backend, tmp_path)
    environment = await WorkflowEnvironment.start_local(url=url)
    yield environment
    await environment.shutdown()


@pytest.fixture
async def skipping_env(
    request: pytest.FixtureRequest, backend: str, tmp_path: Any
) -> AsyncIterator[WorkflowEnvironment]:
    url = _store_url(request, backend, tmp_path)
    environment = await WorkflowEnvironment.start_time_skipping(url=url)
    yield environment
    await environment.shutdown()


@pytest.fixture(params=[*BACKENDS, "sqlite-process"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Store]:
    """Every backend, and SQLite with its writer in a process of its own."""
    opened: Store
    if request.param == "postgres":
        opened = await PostgresStore.open(request.getfixturevalue("fresh_postgres"))
    elif request.param == "sqlite-process":
        opened = SqliteStore(os.path.join(tmp_path, "store.db"), writer="process")
    else:
        opened = SqliteStore(os.path.join(tmp_path, "store.db"))
    yield opened
    await opened.close()


@pytest.fixture
async def postgres_store(fresh_postgres: str) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store on a fresh database (the PostgreSQL-only tests)."""
    opened = await PostgresStore.open(fresh_postgres)
    yield opened
    await opened.close()
