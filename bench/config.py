"""Workload sizes for the full and the quick run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sizes:
    a_workflows: int = 1000
    """A: workflows started at once, 3 no-op activities each."""
    b_workflows: int = 200
    """B: sequential one-activity workflows."""
    c_workflows: int = 500
    """C: workflows started at once, each sleeping ``c_sleep_s`` durably."""
    c_sleep_s: float = 2.0
    d_workflows: int = 200
    """D: workflows of ``d_steps`` activities, each sleeping ``d_step_s`` then writing a line."""
    d_steps: int = 5
    d_step_s: float = 0.2
    d_concurrency: int = 50
    """D: activities running at once per worker process."""
    d_kill_after_s: float = 2.0
    """D: SIGKILL the worker this long after the first start."""
    e_workflows: int = 100_000
    """E: workflows asleep on a timer at once, all falling due within the same second."""
    e_workflows_postgres: int = 10_000
    """E on PostgreSQL (waking is about 5x slower there than on SQLite for now)."""
    warmup_workflows: int = 5

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Sizes:
        return cls(**json.loads(text))


FULL = Sizes()
QUICK = Sizes(
    a_workflows=300,
    b_workflows=60,
    c_workflows=200,
    e_workflows=10_000,
    e_workflows_postgres=1_000,
)
