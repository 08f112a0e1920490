"""Opening a store from a URL, and migrating its schema."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any
from urllib.parse import parse_qsl, urlparse, urlsplit, urlunsplit

from tether._store import migrations
from tether._store.base import Store
from tether._store.sqlite import SqliteStore
from tether.exceptions import InvalidArgumentError, StoreError

_EXPECTED = "expected sqlite:///path/to/file.db or postgresql://user@host:port/database"


_SQLITE_OPTIONS = {"writer": ("auto", "thread", "process")}
"""Query parameters a SQLite URL may carry, and their values."""


def _sqlite_path(url: str) -> str:
    return _sqlite_target(url)[0]


def _sqlite_target(url: str) -> tuple[str, dict[str, str]]:
    """The file and the store options (``?writer=process``) of a SQLite URL."""
    path, _, query = url[len("sqlite://") :].partition("?")
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise InvalidArgumentError(
            f"store URL {url!r} names no file: use sqlite:///path/to/file.db"
        )
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        allowed = _SQLITE_OPTIONS.get(name)
        if allowed is None:
            raise InvalidArgumentError(
                f"unknown option {name!r} in store URL {url!r}: SQLite URLs take "
                + ", ".join(f"{k}={'|'.join(v)}" for k, v in _SQLITE_OPTIONS.items())
            )
        if value not in allowed:
            raise InvalidArgumentError(
                f"store URL {url!r}: {name}={value!r} is not one of {', '.join(allowed)}"
            )
        options[name] = value
    return path, options


def display_url(url: str) -> str:
    """``url`` without a password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, ""))


def _backend(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgres", "postgresql"):
        return "postgres"
    raise InvalidArgumentError(f"unsupported store URL {url!r}: {_EXPECTED}")


async def open_store(url: str, **options: Any) -> Store:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite:///:memory:`` or
    ``postgresql://user:password@host:port/database`` (``postgres://`` too).
    ``sqlite:///file.db?writer=process`` runs the SQLite store's writer in a process
    of its own from the start, ``?writer=thread`` keeps it in a thread; by default
    (``auto``) it starts in a thread and moves into a process under sustained load
    (see ``SqliteStore``).

    The schema is created or migrated on first use. ``options`` go to the store
    (``PostgresStore``: ``pool_size``, ``committers``, ``reconnect_timeout``, ...).
    """
    if _backend(url) == "sqlite":
        path, url_options = _sqlite_target(url)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: SqliteStore(path, **{**url_options, **options})
        )
    from tether._store.postgres import PostgresStore  # asyncpg only when asked for

    return await PostgresStore.open(url, **options)


async def migrate(url: str, target: int | None = None) -> tuple[list[str], int]:
    """Apply the pending schema migrations of the store at ``url`` (up to ``target``).

    Returns the labels of the migrations applied and the schema version now.
    """
    backend = _backend(url)
    if backend == "sqlite":
        path = _sqlite_path(url)

        def run() -> tuple[list[migrations.Migration], int]:
            try:
                conn = sqlite3.connect(path, isolation_level=None)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open SQLite store {path!r}: {e}", retryable=False)
            try:
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
                return migrations.migrate_sqlite(conn, target)
            finally:
                conn.close()

        applied, version = await asyncio.get_running_loop().run_in_executor(None, run)
    else:
        from tether._store.postgres import PostgresStore

        store = PostgresStore(url)
        conn = await store._connect_patiently()
        try:
            applied, version = await migrations.migrate_postgres(conn, target)
        finally:
            await conn.close()
    return [m.label for m in applied], version
