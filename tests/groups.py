"""Watching the groups of operations a store runs as one (``together``)."""

from __future__ import annotations

from typing import Any

import pytest

from tether._store import sql


class CountingGroup:
    """A group function that records the size of each group it runs; equal to another
    that wraps the same function (as ``together``'s results must be)."""

    def __init__(self, run_group: Any, sizes: list[int]) -> None:
        self.run_group = run_group
        self.sizes = sizes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountingGroup) and other.run_group == self.run_group

    def __hash__(self) -> int:
        return hash(self.run_group)

    def __call__(self, makes: list[Any]) -> Any:
        self.sizes.append(len(makes))
        return self.run_group(makes)


def count_groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every group the stores run as one (``together``) record its size in the
    list returned."""
    real_together = sql.together
    sizes: list[int] = []

    def spy(make: Any) -> Any:
        run_group = real_together(make)
        return None if run_group is None else CountingGroup(run_group, sizes)

    monkeypatch.setattr(sql, "together", spy)
    return sizes


def run_nothing_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stores run every operation on its own."""
    monkeypatch.setattr(sql, "together", lambda make: None)
