"""Versioned schema migrations, one directory of SQL files per backend.

``sqlite/NNNN_name.sql`` and ``postgres/NNNN_name.sql`` hold the same change for
each backend (same tables, columns and indexes; ``tests/test_migrations.py`` checks
that they agree). A store applies pending migrations when it opens, and
``tether db migrate URL`` applies them explicitly. Applied versions are recorded
in ``schema_migrations``; every pending migration is applied together with its
row in one transaction, so a crash mid-way leaves the schema as it was.

To change the schema, add ``NNNN_what.sql`` with the next number to *both*
directories; never edit a migration that has been released.
"""

from __future__ import annotations

import importlib.resources
import re
import time
from dataclasses import dataclass
from typing import Any

from tether.exceptions import StoreError

BACKENDS = ("sqlite", "postgres")

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL)"
)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def statements(self) -> list[str]:
        """The statements of the file (split at a ``;`` that ends a line): for SQLite,
        whose driver runs one at a time. PostgreSQL takes a file whole, dollar-quoted
        function bodies included, which this split would cut apart."""
        if "$$" in self.sql:
            raise ValueError(f"{self.label}: dollar-quoted bodies cannot be split")
        parts = re.split(r";[ \t]*(?:--[^\n]*)?(?:\n|$)", self.sql)
        return [p.strip() for p in parts if _has_code(p)]


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())


def migrations(backend: str) -> list[Migration]:
    """Every migration of ``backend``, oldest first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    found = []
    for entry in importlib.resources.files(__package__).joinpath(backend).iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{backend} migrations are not numbered 1..n: {versions}")
    return found


def pending(backend: str, applied: set[int], target: int | None = None) -> list[Migration]:
    """The migrations still to apply (up to ``target``); refuses a newer database."""
    known = migrations(backend)
    newest = known[-1].version if known else 0
    unknown = sorted(v for v in applied if v > newest)
    if unknown:
        raise StoreError(
            f"the database schema is at version {max(unknown)}, newer than this version of "
            f"Tether knows ({newest}); upgrade Tether to use this database",
            retryable=False,
        )
    return [
        m for m in known if m.version not in applied and (target is None or m.version <= target)
    ]


def migrate_sqlite(conn: Any, target: int | None = None) -> tuple[list[Migration], int]:
    """Apply pending migrations on a ``sqlite3`` connection in autocommit mode.

    Returns the migrations applied and the schema version now."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(CREATE_TABLE.format(real="REAL"))
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        todo = pending("sqlite", applied, target)
        for migration in todo:
            for statement in migration.statements():
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return todo, max(applied | {m.version for m in todo}, default=0)


async def check_postgres(conn: Any) -> None:
    """Refuse a database whose schema lacks migrations this version of Tether needs
    (for a store opened without migrating)."""
    applied: set[int] = set()
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    # (A newer schema is let be: its operator migrates ahead of rolling out the code.)
    missing = [m for m in migrations("postgres") if m.version not in applied]
    if missing:
        raise StoreError(
            f"the database schema lacks migration {missing[0].label}"
            f"{' and later ones' if len(missing) > 1 else ''}, which this version of "
            "Tether needs: run `tether db migrate URL`, or open the store with migrate=True",
            retryable=False,
        )


POSTGRES_LOCK = 7_426_541_002
"""Advisory lock key that serializes migrators (many workers may start at once)."""


async def migrate_postgres(conn: Any, target: int | None = None) -> tuple[list[Migration], int]:
    """Apply pending migrations on an ``asyncpg`` connection (see ``migrate_sqlite``)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", POSTGRES_LOCK)
        await conn.execute(CREATE_TABLE.format(real="DOUBLE PRECISION"))
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        applied = {r[0] for r in rows}
        todo = pending("postgres", applied, target)
        for migration in todo:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                time.time(),
            )
    return todo, max(applied | {m.version for m in todo}, default=0)
