"""Schema migrations: step by step equals a fresh install, and both backends agree.

Every change to the schema is a new numbered file in ``src/tether/_store/migrations/``
for *both* backends. These tests catch a migration that leaves the schema different
from a fresh install, and a change made to one backend's schema but not the other's.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from backends import create_database, drop_database, pg_fetch
from tether import Client, StoreError
from tether._runtime.connection import migrate
from tether._store import migrations

pytestmark = pytest.mark.usefixtures("postgres_url")  # skip all without a server

Catalog = dict[str, Any]


def sqlite_catalog(path: str) -> Catalog:
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        catalog: Catalog = {}
        for table in tables:
            columns = {
                name: (type_.upper(), bool(notnull), default, pk)
                for _, name, type_, notnull, default, pk in conn.execute(
                    f"PRAGMA table_info({table})"
                )
            }
            indexes = {}
            for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
                if origin == "pk":
                    continue
                cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({name})"))
                sql = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE name = ?", (name,)
                ).fetchone()[0]
                where = re.sub(r"\s+", " ", sql.split(" WHERE ", 1)[1]) if partial else None
                indexes[name] = (bool(unique), cols, where)
            catalog[table] = {"columns": columns, "indexes": indexes}
        return catalog
    finally:
        conn.close()


async def postgres_catalog(url: str) -> Catalog:
    catalog: Catalog = {}
    for row in await pg_fetch(
        url,
        "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, c.column_default, "
        "coalesce((SELECT k.ordinal_position FROM information_schema.key_column_usage k "
        "JOIN information_schema.table_constraints t ON t.constraint_name = k.constraint_name "
        "AND t.table_schema = k.table_schema WHERE t.constraint_type = 'PRIMARY KEY' "
        "AND k.table_schema = c.table_schema AND k.table_name = c.table_name "
        "AND k.column_name = c.column_name), 0) "
        "FROM information_schema.columns c WHERE c.table_schema = current_schema() "
        "ORDER BY c.table_name, c.ordinal_position",
    ):
        table, column, type_, nullable, default, pk = row
        entry = catalog.setdefault(table, {"columns": {}, "indexes": {}})
        entry["columns"][column] = (type_.upper(), nullable == "NO", default, pk)
    for table, name, definition in await pg_fetch(
        url,
        "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = current_schema() ORDER BY 1, 2",
    ):
        if name.endswith("_pkey"):
            continue
        match = re.match(
            r"CREATE (UNIQUE )?INDEX \S+ ON \S+ USING btree \(([^)]*)\)(?: WHERE (.*))?", definition
        )
        assert match, definition
        cols = tuple(c.strip() for c in match[2].split(","))
        catalog[table]["indexes"][name] = (bool(match[1]), cols, match[3])
    catalog[FUNCTIONS] = {
        name: definition
        for name, definition in await pg_fetch(
            url,
            "SELECT proname, pg_get_functiondef(oid) FROM pg_proc "
            "WHERE pronamespace = current_schema()::regnamespace ORDER BY 1",
        )
    }
    return catalog


FUNCTIONS = "(functions)"
"""The catalog's entry for PostgreSQL's functions (SQLite has none)."""


_TYPE_CLASS = {
    "TEXT": "text",
    "REAL": "real",
    "DOUBLE PRECISION": "real",
    "INTEGER": "integer",
    "BIGINT": "integer",
}


def portable(catalog: Catalog) -> Catalog:
    """What both backends must agree on: tables, columns with type class, nullability,
    default and primary key, and indexes with their columns and uniqueness."""
    out: Catalog = {}
    for table, entry in catalog.items():
        if table == FUNCTIONS:
            continue
        columns = {
            name: (
                _TYPE_CLASS[type_],
                notnull or pk > 0,
                None if default is None else str(default).strip("'").split("::")[0],
                pk,
            )
            for name, (type_, notnull, default, pk) in entry["columns"].items()
        }
        indexes = {
            name: (unique, cols, where is not None)
            for name, (unique, cols, where) in entry["indexes"].items()
        }
        out[table] = {"columns": columns, "indexes": indexes}
    return out


async def test_sqlite_migrations_step_by_step_equal_a_fresh_install(tmp_path: Path) -> None:
    known = migrations.migrations("sqlite")
    assert known, "no migrations"
    fresh = str(tmp_path / "fresh.db")
    applied, version = await migrate(f"sqlite:///{fresh}")
    assert applied == [m.label for m in known] and version == known[-1].version
    stepwise = str(tmp_path / "stepwise.db")
    for m in known:
        applied, version = await migrate(f"sqlite:///{stepwise}", target=m.version)
        assert (applied, version) == ([m.label], m.version)
    assert sqlite_catalog(stepwise) == sqlite_catalog(fresh)
    # Opening the store applies nothing more; a store opened on an empty file migrates it.
    assert await migrate(f"sqlite:///{fresh}") == ([], known[-1].version)
    client = await Client.connect(f"sqlite:///{tmp_path / 'opened.db'}")
    await client.close()
    assert sqlite_catalog(str(tmp_path / "opened.db")) == sqlite_catalog(fresh)


async def test_postgres_migrations_step_by_step_equal_a_fresh_install() -> None:
    known = migrations.migrations("postgres")
    fresh, stepwise, opened = [await create_database("tether_migrate") for _ in range(3)]
    try:
        applied, version = await migrate(fresh)
        assert applied == [m.label for m in known] and version == known[-1].version
        for m in known:
            assert await migrate(stepwise, target=m.version) == ([m.label], m.version)
        assert await postgres_catalog(stepwise) == await postgres_catalog(fresh)
        assert sorted((await postgres_catalog(fresh))[FUNCTIONS]) == [
            "tether_claim_activity_tasks",
            "tether_claim_workflow_tasks",
            "tether_close_runs",
            "tether_complete_waiting_tasks",
        ]
        assert await migrate(fresh) == ([], known[-1].version)
        client = await Client.connect(opened)
        await client.close()
        assert await postgres_catalog(opened) == await postgres_catalog(fresh)
        rows = await pg_fetch(opened, "SELECT version, name FROM schema_migrations ORDER BY 1")
        assert [(r[0], r[1]) for r in rows] == [(m.version, m.name) for m in known]
    finally:
        for url in (fresh, stepwise, opened):
            await drop_database(url)


async def test_both_backends_have_the_same_schema(tmp_path: Path) -> None:
    assert [m.label for m in migrations.migrations("sqlite")] == [
        m.label for m in migrations.migrations("postgres")
    ], "every migration needs a file for both backends"
    path = str(tmp_path / "s.db")
    await migrate(f"sqlite:///{path}")
    url = await create_database("tether_migrate")
    try:
        await migrate(url)
        assert portable(await postgres_catalog(url)) == portable(sqlite_catalog(path))
    finally:
        await drop_database(url)


async def test_concurrent_first_opens_migrate_once() -> None:
    """Several workers starting at once on an empty database: one migrates, all open."""
    import asyncio

    url = await create_database("tether_migrate")
    try:
        clients = await asyncio.gather(*(Client.connect(url) for _ in range(6)))
        for client in clients:
            await client.close()
        rows = await pg_fetch(url, "SELECT count(*) FROM schema_migrations")
        assert rows[0][0] == len(migrations.migrations("postgres"))
    finally:
        await drop_database(url)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    await migrate(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema is at version 999, newer than"):
        await Client.connect(f"sqlite:///{path}")
    url = await create_database("tether_migrate")
    try:
        await migrate(url)
        conn2 = await asyncpg.connect(url)
        await conn2.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 0)")
        await conn2.close()
        with pytest.raises(StoreError, match="schema is at version 999, newer than"):
            await Client.connect(url)
    finally:
        await drop_database(url)


async def test_a_store_opened_without_migrating_refuses_an_older_schema() -> None:
    """Opened with ``migrate=False`` on a schema that lacks a migration this version
    needs (the claim functions, say), the store says which and how to migrate, rather
    than failing later at the first claim; once migrated, it opens."""
    from tether._store.postgres import PostgresStore

    url = await create_database("tether_migrate")
    try:
        with pytest.raises(StoreError, match="lacks migration 0001_initial and later ones"):
            await PostgresStore.open(url, migrate=False)
        await migrate(url, target=2)
        with pytest.raises(StoreError, match=r"lacks migration 0003_claim_functions.*tether db"):
            await PostgresStore.open(url, migrate=False)
        await migrate(url)
        store = await PostgresStore.open(url, migrate=False)
        await store.close()
        # A newer schema is let be: its operator migrated ahead of rolling out the code.
        conn = await asyncpg.connect(url)
        await conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 0)")
        await conn.close()
        store = await PostgresStore.open(url, migrate=False)
        await store.close()
    finally:
        await drop_database(url)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from tether.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
    )


async def test_tether_db_migrate_command(tmp_path: Path) -> None:
    url = await create_database("tether_migrate")
    try:
        for target in (f"sqlite:///{tmp_path / 'cli.db'}", url):
            first = run_cli("db", "migrate", target)
            assert first.returncode == 0, first.stderr
            assert "applied 0001_initial" in first.stdout
            assert "migrated, schema version" in first.stdout
            again = run_cli("db", "migrate", target)
            assert again.returncode == 0, again.stderr
            assert "already up to date" in again.stdout
        bad = run_cli("db", "migrate", "mysql://localhost/x")
        assert bad.returncode != 0
        assert "unsupported store URL" in bad.stderr
    finally:
        await drop_database(url)


OPEN_STORE = """
import asyncio, sys
from tether._store.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.close()

asyncio.run(main())
"""


def test_processes_creating_one_sqlite_store_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new database to WAL can fail at once, without the busy timeout, while
    another process does the same: opening retries. (A race: about 1 open in 200 failed
    without the retry, so the test opens many.)"""
    for attempt in range(6):
        db = tmp_path / f"new-{attempt}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_STORE, str(db)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(10)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
