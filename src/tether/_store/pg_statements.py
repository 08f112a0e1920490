"""The store's statements as PostgreSQL text, and writes sent together.

Every statement is a round trip to the server, and in a busy worker most of the time
went into them (sending and receiving, not the server's work). An operation's
writes whose outcome it does not read (``WRITE`` and ``MANY``) are therefore held
back and sent as one statement of data-modifying CTEs
(``WITH w0 AS (INSERT ...), w1 AS (DELETE ...) SELECT 1``), with a multi-row
``VALUES`` for an ``INSERT`` of many rows.

The members of one such statement share a snapshot and do not see each other's
changes, so a group holds at most one write per table (two on one table could touch
the same row), and it goes before any other statement of the operation and before
the operation returns.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from tether._store.sql_statements import WRITE, Stmt

_translations: dict[tuple[str, int], str] = {}
_MAX_TRANSLATIONS = 4096  # statement shapes are few; this only bounds the unexpected


def translate(sql: str, first: int = 1) -> str:
    """``?`` placeholders to ``$first..`` (quoted literals left alone); cached."""
    key = (sql, first)
    done = _translations.get(key)
    if done is not None:
        return done
    out: list[str] = []
    n = first - 1
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    if len(_translations) >= _MAX_TRANSLATIONS:
        _translations.clear()
    done = _translations[key] = "".join(out)
    return done


_TARGET = re.compile(r"\s*(?:INSERT\s+INTO|DELETE\s+FROM|UPDATE)\s+(\w+)", re.IGNORECASE)
_ROW = re.compile(r"(.*\bVALUES\s*)(\([^()]*\))(.*)", re.IGNORECASE | re.DOTALL)
MAX_ARGS = 30_000
"""Parameters in one statement (the protocol allows 32,767)."""
MAX_ROWS = 16
"""Rows of one INSERT sent as a multi-row ``VALUES``: each row count is another
statement text (and prepared statement), so larger ones go by ``executemany``."""


@functools.lru_cache(maxsize=1024)
def target_table(sql: str) -> str:
    match = _TARGET.match(sql)
    if match is None:
        raise ValueError(f"not an INSERT, UPDATE or DELETE: {sql[:60]!r}")
    return match.group(1).lower()


@functools.lru_cache(maxsize=1024)
def _values_row(sql: str) -> tuple[str, str, str] | None:
    """An INSERT's text before, at and after its ``VALUES`` row; None if it has none."""
    match = _ROW.match(sql)
    return None if match is None else (match[1], match[2], match[3])


class DeferredWrites:
    """The writes of one operation not sent yet; ``take`` gives the statement to send."""

    __slots__ = ("_args", "_members", "_tables")

    def __init__(self) -> None:
        self._members: list[str] = []
        self._args: list[Any] = []
        self._tables: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._members)

    def accepts(self, stmt: Stmt) -> bool:
        """Whether ``stmt`` can join the pending ones (else: flush first, or run it alone)."""
        rows = len(stmt.params)
        if stmt.kind != WRITE and rows > 1 and (rows > MAX_ROWS or _values_row(stmt.sql) is None):
            return False  # many rows, or an UPDATE/DELETE of many: executemany
        size = len(stmt.params) if stmt.kind == WRITE else sum(map(len, stmt.params))
        if size > MAX_ARGS:
            return False
        return target_table(stmt.sql) not in self._tables and len(self._args) + size <= MAX_ARGS

    def add(self, stmt: Stmt) -> None:
        self._tables.add(target_table(stmt.sql))
        if stmt.kind == WRITE:
            self._member(stmt.sql, stmt.params)
            return
        rows = stmt.params
        if len(rows) == 1:
            self._member(stmt.sql, rows[0])
            return
        parts = _values_row(stmt.sql)
        assert parts is not None  # accepts() said so
        head, row, tail = parts
        self._member(head + ", ".join([row] * len(rows)) + tail, [v for r in rows for v in r])

    def _member(self, sql: str, args: Any) -> None:
        self._members.append(translate(sql, len(self._args) + 1))
        self._args.extend(args)

    def take(self) -> tuple[str, list[Any]]:
        """The statement and its arguments; the group is empty afterwards."""
        members, args = self._members, self._args
        self._members, self._args, self._tables = [], [], set()
        if len(members) == 1:
            return members[0], args
        ctes = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(members))
        return f"WITH {ctes} SELECT 1", args
