"""SQLite store specifics: how its writer commits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tether._store.sql import ONE, Op, Stmt
from tether._store.sqlite import SqliteStore

_NORMAL, _FULL = 1, 2


def _synchronous() -> Op[int]:
    row = yield Stmt(ONE, "PRAGMA synchronous", ())
    return int(row[0])


async def test_lease_only_writes_commit_without_waiting_for_the_disk(tmp_path: Path) -> None:
    """A batch of lease-only writes commits with synchronous=NORMAL (no fsync); every
    other write, before and after it, with synchronous=FULL."""
    store = SqliteStore(os.path.join(tmp_path, "store.db"))
    try:
        assert await store._execute(_synchronous, writes=True) == _FULL
        assert await store._execute_lease(_synchronous) == _NORMAL
        assert await store._execute(_synchronous, writes=True) == _FULL
        # Claims take that path, and the writer is back to FULL after them.
        leases = []
        lease = store._execute_lease

        async def counted(make: Any) -> Any:
            leases.append(make)
            return await lease(make)

        store._execute_lease = counted  # type: ignore[method-assign]
        assert await store.claim_workflow_tasks("q", "w1", 10, 20.0, 10.0) == []
        assert await store.claim_activity_tasks("q", "w1", 10, 20.0, 10.0) == []
        assert len(leases) == 2
        assert await store._execute(_synchronous, writes=True) == _FULL
    finally:
        await store.close()
