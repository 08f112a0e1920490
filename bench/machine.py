"""The machine record: CPU, memory, load, and the versions of everything measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import peers
from bench.paths import TETHER_PYTHON
from bench.stores import PG_SERVER

_VERSIONS = """
import importlib.metadata as m, json, sqlite3, sys
out = {"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def _versions(python: Path, packages: list[str]) -> dict[str, str]:
    if not python.exists():
        return {}
    done = subprocess.run([str(python), "-c", _VERSIONS, *packages], capture_output=True, text=True)
    if done.returncode != 0:
        return {}
    data: dict[str, str] = json.loads(done.stdout)
    return data


def _command_output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def load() -> str:
    """``uptime``'s load averages (1, 5, 15 min)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_probe_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes here now (best of three; lower is
    faster). This VM's speed moves by 2x and more within an hour (other tenants), so
    every run records it, to tell a slower machine from slower code."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sum(range(_PROBE_LOOP))
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


_PROBE_LOOP = 3_000_000
"""About 40 ms on this VM when it is fast."""


def describe() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _mem_gib(),
        "kernel": platform.release(),
        "tether_env": _versions(TETHER_PYTHON, ["tether", "asyncpg", "pydantic"]),
        "dbos_env": _versions(peers.DBOS.python, ["dbos", "sqlalchemy", "psycopg"]),
        "restate_env": _versions(peers.RESTATE.python, ["restate-sdk", "hypercorn", "httpx"]),
        "restate_server": _command_output([str(peers.RESTATE_SERVER_BIN), "--version"]),
        "postgres_server": _command_output(
            ["psql", "-X", "-t", "-A", "-d", f"{PG_SERVER}/postgres", "-c", "SHOW server_version"]
        ),
    }
