"""Workload D's side-effect file: one ``workflow-id step time`` line per step execution."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


def append(path: str, workflow_id: str, step: int, when: float) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{workflow_id} {step} {when:.6f}\n".encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Line:
    workflow_id: str
    step: int
    time: float


def read(path: Path) -> list[Line]:
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        parts = raw.split()
        if len(parts) == 3:
            lines.append(Line(parts[0], int(parts[1]), float(parts[2])))
    return lines


def check(lines: list[Line], workflow_ids: list[str], steps: int) -> dict[str, float]:
    """``dup_step_execs`` (executions beyond the first) and ``lost_steps`` (never run)."""
    counts = Counter((line.workflow_id, line.step) for line in lines)
    expected = {(wf, s) for wf in workflow_ids for s in range(steps)}
    return {
        "dup_step_execs": sum(c - 1 for c in counts.values()),
        "lost_steps": len(expected - set(counts)),
    }
