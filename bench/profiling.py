"""Attach py-spy to a running process for the length of a block."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.paths import REPO_DIR

PY_SPY = REPO_DIR / ".venv" / "bin" / "py-spy"
RATE_HZ = 250


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, idle: bool = False) -> Iterator[None]:
    """Record ``pid`` (all threads, raw collapsed stacks) into ``out``; no-op if None.

    ``idle`` also records threads that are waiting (off CPU)."""
    if out is None:
        yield
        return
    options = ["-f", "raw", "--threads", "--subprocesses", "-r", str(RATE_HZ), "-o", str(out)]
    if idle:
        options.append("--idle")
    proc = subprocess.Popen(
        [str(PY_SPY), "record", *options, "--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it attach before the measured work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        proc.wait(timeout=30)
