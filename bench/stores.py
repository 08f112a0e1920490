"""A fresh store per repetition: a new SQLite file or a new PostgreSQL database."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.paths import WORK_DIR

PG_SERVER = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
"""Server URL (no database) for PostgreSQL stores; the role must be able to CREATE DATABASE."""


@dataclass(frozen=True)
class Store:
    kind: str  # "sqlite" | "postgres"
    url: str
    path: Path | None = None  # SQLite: the file; its directory is the store's
    database: str | None = None  # PostgreSQL: the database name


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-t", "-A", "-d", f"{PG_SERVER}/postgres", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
    )


def postgres_available() -> bool:
    try:
        _psql("SELECT 1")
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def create(kind: str, tag: str) -> Store:
    """A new empty store named after ``tag`` (letters, digits, ``-``/``_``)."""
    name = f"bench_{tag.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    if kind == "sqlite":
        directory = WORK_DIR / "stores" / name
        directory.mkdir(parents=True)
        path = directory / "store.db"
        return Store(kind, f"sqlite:///{path}", path=path)
    if kind == "postgres":
        _psql(f'CREATE DATABASE "{name}"')
        return Store(kind, f"{PG_SERVER}/{name}", database=name)
    raise ValueError(f"unknown store kind {kind!r}")


def drop(store: Store) -> None:
    if store.path is not None:
        shutil.rmtree(store.path.parent, ignore_errors=True)
    elif store.database is not None:
        _psql(f'DROP DATABASE IF EXISTS "{store.database}" WITH (FORCE)')
