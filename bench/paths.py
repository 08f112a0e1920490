"""Where the harness keeps its files."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"
"""Peer virtual environments and npm packages (git-ignored)."""
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = PEERS_DIR / "work"
"""Scratch space (git-ignored): ``stores/`` holds the SQLite stores and
``runs/<system>-<workloads>-<rep>/`` each driver run's logs, side-effect file and results."""
TETHER_PYTHON = REPO_DIR / ".venv" / "bin" / "python"
