"""Writes sent together on PostgreSQL (``tether._store.pg_statements``): the statement
they become, and, on a real server, the same outcome as sending them one by one."""

from __future__ import annotations

import asyncio

from tether._store.pg_statements import DeferredWrites, translate
from tether._store.postgres import PostgresStore
from tether._store.sql_statements import MANY, ONE, WRITE, Op, Stmt
from tether.exceptions import StoreError

WORKER = "INSERT INTO workers (task_queue, identity, workflow_types, activity_types, last_seen) "


def test_placeholders_continue_from_the_given_number() -> None:
    assert translate("UPDATE t SET a = ? WHERE b = '?' AND c = ?", 4) == (
        "UPDATE t SET a = $4 WHERE b = '?' AND c = $5"
    )


def test_writes_to_different_tables_become_one_statement() -> None:
    group = DeferredWrites()
    rows = [("q", "a", "{}", "[]", 1.0), ("q", "b", "{}", "[]", 2.0)]
    insert = Stmt(MANY, WORKER + "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
    delete = Stmt(WRITE, "DELETE FROM timers WHERE run_id = ?", ("r",))
    assert group.accepts(insert)
    group.add(insert)
    assert group.accepts(delete)
    group.add(delete)
    # A second write to a table in the group could touch a row another member touches.
    assert not group.accepts(Stmt(WRITE, "UPDATE workers SET last_seen = ?", (3.0,)))
    # Many UPDATE rows run in order with executemany, not as members.
    assert not group.accepts(Stmt(MANY, "UPDATE timers SET fire_at = ?", [(1.0,), (2.0,)]))
    sql, args = group.take()
    assert sql == (
        "WITH w0 AS (" + WORKER + "VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10) "
        "ON CONFLICT DO NOTHING), w1 AS (DELETE FROM timers WHERE run_id = $11) SELECT 1"
    )
    assert args == [*rows[0], *rows[1], "r"]
    assert not group  # taken: empty again


async def test_deferred_writes_keep_the_order_of_the_operation(
    postgres_store: PostgresStore,
) -> None:
    def op() -> Op[list[tuple[str, float]]]:
        yield Stmt(WRITE, WORKER + "VALUES ('q', 'a', '{}', '[]', 1)", ())
        yield Stmt(WRITE, "UPDATE workers SET last_seen = 2 WHERE identity = 'a'", ())
        yield Stmt(MANY, WORKER + "VALUES (?, ?, '{}', '[]', ?)", [("q", "b", 5.0)])
        yield Stmt(WRITE, "DELETE FROM workers WHERE identity = 'b'", ())
        rows = yield Stmt(ONE, "SELECT count(*), max(last_seen) FROM workers", ())
        return [("count", rows[0]), ("max", rows[1])]

    assert await postgres_store._execute(op, writes=True) == [("count", 1), ("max", 2.0)]


async def test_a_failing_deferred_write_fails_its_operation_only(
    postgres_store: PostgresStore,
) -> None:
    def insert(identity: str) -> Op[str]:
        yield Stmt(WRITE, WORKER + f"VALUES ('q', '{identity}', '{{}}', '[]', 1)", ())
        return identity

    await postgres_store._execute(lambda: insert("a"), writes=True)
    # Queued together, so likely in one transaction: the one whose deferred write hits
    # the taken primary key fails, its neighbours commit.
    results = await asyncio.gather(
        *(postgres_store._execute(lambda i=i: insert(i), writes=True) for i in ("b", "a", "c")),
        return_exceptions=True,
    )
    assert results[0] == "b" and results[2] == "c"
    assert isinstance(results[1], StoreError)

    def count() -> Op[int]:
        row = yield Stmt(ONE, "SELECT count(*) FROM workers", ())
        return int(row[0])

    assert await postgres_store._execute(count, writes=False) == 3
