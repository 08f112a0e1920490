"""The systems the harness can run, each a driver module in some virtual environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.paths import TETHER_PYTHON


@dataclass(frozen=True)
class System:
    name: str
    python: Path
    module: str
    """The driver module (``python -m``)."""
    store: str
    """``sqlite``, ``postgres`` or ``own`` (the system brings its own server and storage)."""
    workloads: str
    variant: str = ""
    group: str | None = None
    """Variants of one peer share a group; the report names the faster one per workload."""
    peer_env: peers.PeerEnv | None = None
    batches: tuple[str, ...] = ("ABC", "D", "E")
    """Workloads run by one driver process (each batch gets a fresh store)."""

    @property
    def reported_as(self) -> str:
        return self.group or self.name


def _tether(name: str, store: str, workloads: str, variant: str = "") -> System:
    return System(name, TETHER_PYTHON, "bench.tether_driver", store, workloads, variant)


def _dbos(store: str, api: str, workloads: str) -> System:
    return System(
        f"dbos-{store}-{api}",
        peers.DBOS.python,
        "bench.dbos_driver",
        store,
        workloads,
        variant=api,
        group=f"dbos-{store}",
        peer_env=peers.DBOS,
    )


SYSTEMS: list[System] = [
    _tether("tether-sqlite", "sqlite", "ABCDE"),
    _tether("tether-postgres", "postgres", "ABCDE"),
    # The setting for a worker with many runs: its SQLite writer in a process of its own.
    _tether("tether-sqlite-process", "sqlite", "ABDE", variant="writer-process"),
    _tether("tether-sqlite-embedded", "sqlite", "AB", variant="embedded"),
    _tether("tether-postgres-embedded", "postgres", "AB", variant="embedded"),
    _dbos("sqlite", "async", "ABCD"),
    _dbos("sqlite", "sync", "ABC"),
    _dbos("postgres", "async", "ABCD"),
    _dbos("postgres", "sync", "ABC"),
    System(
        "restate",
        peers.RESTATE.python,
        "bench.restate_driver",
        "own",
        "ABCD",
        peer_env=peers.RESTATE,
        batches=("ABCD",),  # one server per repetition; D restarts only the service
    ),
]
BY_NAME = {s.name: s for s in SYSTEMS}

PEERS_OF: dict[str, list[str]] = {
    "sqlite": ["dbos-sqlite", "restate"],
    "postgres": ["dbos-postgres", "restate"],
}
"""Which peers a Tether system on each store is compared with."""
