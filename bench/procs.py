"""Child processes: start in their own process group, kill, and read their memory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.paths import REPO_DIR

_started: list[subprocess.Popen[bytes]] = []


def spawn(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (its own process group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    _started.append(proc)
    return proc


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a process started with :func:`spawn`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group; SIGKILL it if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(proc)
    except ProcessLookupError:
        pass


def cleanup() -> None:
    """Kill every process started here that is still running."""
    for proc in _started:
        if proc.poll() is None:
            kill9(proc)


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                found += kids
                todo += kids
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def peak_rss_mib(pid: int) -> float:
    """Peak RSS (VmHWM) summed over ``pid`` and its descendants, in MiB."""
    kib = sum(_status_kib(p, "VmHWM") for p in [pid, *_descendants(pid)])
    return round(kib / 1024.0, 1)


def rss_mib(pid: int) -> float:
    """Current RSS (VmRSS) summed over ``pid`` and its descendants, in MiB."""
    kib = sum(_status_kib(p, "VmRSS") for p in [pid, *_descendants(pid)])
    return round(kib / 1024.0, 1)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    """Wait until ``path`` exists (written atomically by ``proc``) and return its text."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written after {timeout:.0f}s")
        time.sleep(0.01)
    return path.read_text()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so that ``finally`` blocks (cleanup) run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants so far."""
    ticks = 0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
