"""What the orchestrator passes to a driver process, and how a driver hands back results.

A driver runs some workloads against one fresh store and writes
``{"A": {"wf_per_s": 812.3, ...}, "B": {...}}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.config import Sizes
from bench.procs import write_atomically

Results = dict[str, dict[str, float]]


@dataclass(frozen=True)
class DriverArgs:
    workloads: str
    url: str
    sizes: Sizes
    out: Path
    work_dir: Path
    """Scratch directory of this run (side-effect files, marker files)."""
    variant: str
    """Driver-specific: ``embedded`` for Tether, ``sync``/``async`` for DBOS."""


def driver_command(
    python: str, module: str, args: DriverArgs, extra: Sequence[str] = ()
) -> list[str]:
    return [
        python,
        "-m",
        module,
        "--workloads",
        args.workloads,
        "--url",
        args.url,
        "--sizes",
        args.sizes.to_json(),
        "--out",
        str(args.out),
        "--work-dir",
        str(args.work_dir),
        "--variant",
        args.variant,
        *extra,
    ]


def parse(argv: Sequence[str] | None = None) -> DriverArgs:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--variant", default="")
    ns = parser.parse_args(argv)
    return DriverArgs(
        ns.workloads, ns.url, Sizes.from_json(ns.sizes), ns.out, ns.work_dir, ns.variant
    )


def write(path: Path, results: Results) -> None:
    write_atomically(path, json.dumps(results, indent=1))


def read(path: Path) -> Results:
    data: Results = json.loads(path.read_text())
    return data
