"""Profile Tether's worker during workload A: ``python -m bench.profile`` (``make bench-profile``).

Runs A (N from the full run) once against a worker process that py-spy samples
(``py-spy record -f raw --threads``), then summarizes the collapsed stacks per thread:
how busy each thread was, and the top functions by self and by inclusive samples.
``--idle`` also samples threads while they wait (to see where the writer thread's
wall time goes: statements, commit/fsync, or waiting for work).
``python -m bench.profile --summarize FILE`` summarizes an existing raw file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import run
from bench.paths import RESULTS_DIR
from bench.profiling import RATE_HZ

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


@dataclass
class ThreadProfile:
    name: str
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)
    self_lines: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def _frame_name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (file.py)``, so lines of one function merge."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['func']} ({Path(match['file']).name})"


def _short_line(frame: str) -> str:
    """``func (a/b/file.py:12)`` -> ``func (file.py:12)``."""
    func, _, where = frame.rpartition(" (")
    return f"{func} ({Path(where.rstrip(')')).name})" if func else frame


def parse(path: Path) -> dict[str, ThreadProfile]:
    threads: dict[str, ThreadProfile] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        head, *frames = stack.split(";")
        name = head.split(": ", 1)[-1]
        thread = threads.setdefault(name, ThreadProfile(name))
        thread.samples += count
        names = [_frame_name(f) for f in frames]
        if names:
            thread.self_counts[names[-1]] += count
            thread.self_lines[_short_line(frames[-1])] += count
        for frame in set(names):
            thread.inclusive[frame] += count
    return threads


def summarize(path: Path, wall_s: float | None, top: int = 12) -> str:
    threads = parse(path)
    total = sum(t.samples for t in threads.values())
    lines = [f"py-spy samples: {total} at {RATE_HZ} Hz ({path})"]
    by_name: dict[str, list[ThreadProfile]] = defaultdict(list)
    for t in threads.values():
        by_name[t.name].append(t)
    for thread in sorted(threads.values(), key=lambda t: -t.samples):
        seconds = thread.samples / RATE_HZ
        busy = f", {100 * seconds / wall_s:.0f}% of A's wall time" if wall_s else ""
        lines += ["", f"## {thread.name}: {thread.samples} samples ({seconds:.2f} s{busy})"]
        if thread.samples < total * 0.02:
            continue
        lines.append("self:")
        for frame, count in thread.self_counts.most_common(top):
            lines.append(f"  {100 * count / thread.samples:5.1f}%  {frame}")
        lines.append("self, by line (time in C code, e.g. sqlite3, shows on the calling line):")
        for frame, count in thread.self_lines.most_common(top):
            lines.append(f"  {100 * count / thread.samples:5.1f}%  {frame}")
        lines.append("inclusive:")
        for frame, count in thread.inclusive.most_common(top + 10):
            lines.append(f"  {100 * count / thread.samples:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--system", default="tether-sqlite")
    parser.add_argument("--idle", action="store_true", help="sample waiting threads too")
    parser.add_argument("--summarize", type=Path, help="only summarize this raw file")
    parser.add_argument("--top", type=int, default=12)
    ns = parser.parse_args()
    if ns.summarize:
        print(summarize(ns.summarize, None, ns.top))
        return
    suffix = "-idle" if ns.idle else ""
    raw = RESULTS_DIR / f"profile-a-{ns.system}{suffix}.txt"
    doc_path = RESULTS_DIR / f"profile-a-{ns.system}{suffix}.json"
    args = ["--systems", ns.system, "--workloads", "A", "--reps", "1"]
    args += ["--profile-a", str(raw), "--out", str(doc_path)]
    if ns.idle:
        args.append("--profile-idle")
    run.main(args)
    doc = json.loads(doc_path.read_text())
    wall = next(r["value"] for r in doc["records"] if r["metric"] == "wall_s")
    summary = summarize(raw, wall, ns.top)
    (RESULTS_DIR / f"profile-a-{ns.system}{suffix}.summary.txt").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
