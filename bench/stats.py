"""Percentiles and summaries of repeated measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, ``p`` in 0..100 (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = math.ceil(p / 100.0 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def median_min_max(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def latency_metrics(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies_ms, 50), 3),
        "p99_ms": round(percentile(latencies_ms, 99), 3),
        "max_ms": round(max(latencies_ms), 3),
    }


def timer_metrics(
    batch_start: float, samples: Sequence[tuple[float, float]], all_done_s: float
) -> dict[str, float]:
    """Workload C from ``(code_start, lateness_s)`` pairs taken inside the workflows."""
    delays_ms = [(start - batch_start) * 1000 for start, _ in samples]
    late_ms = [late * 1000 for _, late in samples]
    return {
        "start_delay_p50_ms": round(percentile(delays_ms, 50), 1),
        "start_delay_p99_ms": round(percentile(delays_ms, 99), 1),
        "late_p50_ms": round(percentile(late_ms, 50), 1),
        "late_p99_ms": round(percentile(late_ms, 99), 1),
        "late_max_ms": round(max(late_ms), 1),
        "all_done_s": round(all_done_s, 3),
    }
