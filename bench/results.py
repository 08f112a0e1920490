"""Samples from the drivers, aggregated into records, compared into ratios, and the
``latest.json`` document that holds them.

The document is ``{"machine": {...}, "run": {...}, "records": [...], "ratios": [...]}``;
each record is ``{"system", "workload", "metric", "value", "unit"}`` (value: the median
over the repetitions) plus ``min``, ``max``, ``reps``, ``values`` and, for a peer
group such as ``dbos-sqlite``, the ``variant`` the value comes from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import metrics, stats
from bench.systems import BY_NAME, PEERS_OF

RATIO_METRICS = {
    "A": ("wf_per_s", "worker_rss_mib"),
    "B": ("p50_ms", "p99_ms"),
    "C": ("start_delay_p99_ms", "late_p99_ms", "all_done_s"),
    "D": ("recover_s", "first_step_after_restart_s", "total_s"),
}
"""The metrics compared with the peers."""


@dataclass(frozen=True)
class Sample:
    system: str
    workload: str
    metric: str
    value: float
    rep: int


@dataclass(frozen=True)
class Record:
    system: str
    workload: str
    metric: str
    value: float
    """Median over the repetitions."""
    unit: str
    min: float
    max: float
    values: list[float] = field(default_factory=list)
    variant: str | None = None
    """For a peer group's record: the variant whose value it is (the best one)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["reps"] = len(self.values)
        if not self.variant:
            del out["variant"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**{k: v for k, v in data.items() if k != "reps"})


@dataclass(frozen=True)
class Ratio:
    system: str
    peer: str
    workload: str
    metric: str
    ratio: float
    """How many times better Tether is (> 1: Tether better, < 1: the peer)."""


def aggregate(samples: Iterable[Sample]) -> list[Record]:
    grouped: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for s in samples:
        grouped[(s.system, s.workload, s.metric)].append(s.value)
    records = []
    for (system, workload, metric), values in grouped.items():
        median, low, high = stats.median_min_max(values)
        unit = metrics.lookup(workload, metric).unit
        records.append(Record(system, workload, metric, median, unit, low, high, values))
    return records + _best_variants(records)


def _best_variants(records: list[Record]) -> list[Record]:
    """Records of each peer group (e.g. ``dbos-sqlite``): per metric, its best variant.

    Taking the better of the async and the sync API metric by metric is the most
    favourable reading for the peer, so ratios against it are conservative.
    """
    candidates: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in records:
        system = BY_NAME.get(r.system)
        if system is not None and system.group:
            candidates[(system.group, r.workload, r.metric)].append(r)
    out = []
    for (group, workload, metric), found in candidates.items():
        higher = metrics.lookup(workload, metric).higher_is_better
        best = (max if higher else min)(found, key=lambda r: r.value)
        out.append(
            Record(
                group,
                workload,
                metric,
                best.value,
                best.unit,
                best.min,
                best.max,
                best.values,
                variant=best.system,
            )
        )
    return out


def ratios(records: list[Record]) -> list[Ratio]:
    index = {(r.system, r.workload, r.metric): r for r in records}
    out = []
    for r in records:
        if not r.system.startswith("tether-") or r.metric not in RATIO_METRICS.get(r.workload, ()):
            continue
        higher = metrics.lookup(r.workload, r.metric).higher_is_better
        for peer in PEERS_OF["postgres" if "postgres" in r.system else "sqlite"]:
            other = index.get((peer, r.workload, r.metric))
            if other is None or r.value <= 0 or other.value <= 0:
                continue
            factor = r.value / other.value if higher else other.value / r.value
            out.append(Ratio(r.system, peer, r.workload, r.metric, round(factor, 3)))
    return out


def document(machine: dict[str, Any], run: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    return {
        "machine": machine,
        "run": run,
        "records": [r.to_json() for r in records],
        "ratios": [asdict(r) for r in ratios(records)],
    }


def records_of(doc: dict[str, Any]) -> list[Record]:
    return [Record.from_json(r) for r in doc["records"]]


def ratios_of(doc: dict[str, Any]) -> list[Ratio]:
    return [Ratio(**r) for r in doc["ratios"]]
