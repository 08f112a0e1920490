"""Test helpers for running against every store backend.

PostgreSQL tests use the server at ``TETHER_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``, the CI setup): each test run creates
its own database there, with a random name, and drops it at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import sqlite3
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tether._store.base import Store

T = TypeVar("T")

ADMIN_URL = os.environ.get("TETHER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def database_url(name: str, base: str = ADMIN_URL) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


async def postgres_reachable() -> str | None:
    """None if the test server answers, else why not."""
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=3)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return None


async def create_database(prefix: str = "tether_test") -> str:
    """A new empty database; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(name)


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def empty_tables(url: str) -> None:
    """Delete every row Tether stored (the schema and its version stay)."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename != 'schema_migrations'"
        )
        if tables:
            await conn.execute("; ".join(f'DELETE FROM "{t[0]}"' for t in tables))
    finally:
        await conn.close()


async def pg_fetch(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def store_url(store: Store) -> str:
    """The URL that opens ``store`` again (from another client or process)."""
    url = getattr(store, "url", None)
    if url is not None:
        return str(url)
    return "sqlite:///" + os.path.abspath(store.path)  # type: ignore[attr-defined]


def table_counts(store: Store, tables: Sequence[str]) -> dict[str, int]:
    """Rows per table, read through a separate connection (what is durably committed)."""
    url = getattr(store, "url", None)
    if url is not None:
        rows = run_sync(
            pg_fetch(url, " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables))
        )
        return {r[0]: r[1] for r in rows}
    path = store.path  # type: ignore[attr-defined]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        conn.close()
