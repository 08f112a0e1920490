"""Micro-benchmark: one woken sleeper's replay, as E's worker does it for each wake.

A new ``WorkflowInstance`` of ``Waiter`` applies the four-event history of a run whose
timer fired (started, timer started, task completed, timer fired) and is evicted. Prints
the best of several rounds, in µs per replay::

    .venv/bin/python -m bench.replay            # against the installed tether
    PYTHONPATH=/path/to/other/src .venv/bin/python -m bench.replay   # another tree
"""

from __future__ import annotations

import argparse
import time

from bench.tether_app import Waiter
from tether._runtime.definitions import workflow_definition
from tether._runtime.instance import WorkflowInfo, WorkflowInstance
from tether._store.base import (
    TIMER_FIRED,
    TIMER_STARTED,
    WORKFLOW_STARTED,
    WORKFLOW_TASK_COMPLETED,
    Event,
)
from tether.converter import PayloadConverter

_START = 1000.0
_DUE = _START + 60.0
_STARTED = {
    "workflow_id": "w1",
    "workflow_type": "Waiter",
    "task_queue": "bench",
    "args": [_DUE],
    "seed": 12345,
}


def _history() -> list[Event]:
    return [
        Event(1, WORKFLOW_STARTED, _START, _STARTED),
        Event(2, TIMER_STARTED, _START, {"seq": 1, "duration": 60.0, "fire_at": _DUE}),
        Event(3, WORKFLOW_TASK_COMPLETED, _START, {"inputs_through": 1}),
        Event(4, TIMER_FIRED, _DUE, {"seq": 1}),
    ]


def replay_once(converter: PayloadConverter) -> None:
    info = WorkflowInfo.from_started("r1", _START, _STARTED)
    instance = WorkflowInstance(workflow_definition(Waiter), info, converter)  # type: ignore[abstract]
    commands = instance.apply(_history(), _DUE + 0.01)
    instance.evict()
    assert commands and commands[0][0] == "WorkflowCompleted", commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=10_000, help="per round")
    parser.add_argument("--rounds", type=int, default=9)
    ns = parser.parse_args()
    converter = PayloadConverter()
    replay_once(converter)
    best = float("inf")
    for _ in range(ns.rounds):
        began = time.perf_counter()
        for _ in range(ns.replays):
            replay_once(converter)
        best = min(best, (time.perf_counter() - began) / ns.replays)
    print(f"best of {ns.rounds} x {ns.replays:,}: {best * 1e6:.1f} µs per replay")


if __name__ == "__main__":
    main()
