"""The metrics each workload reports: unit, and which direction is better."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    headline: bool = True
    """Shown in the printed table (all metrics go to the JSON)."""


def _m(name: str, unit: str, higher: bool = False, headline: bool = True) -> Metric:
    return Metric(name, unit, higher, headline)


WORKLOADS: dict[str, str] = {
    "A": "throughput: workflows started at once, 3 no-op activities each",
    "B": "latency: sequential one-activity workflows, client start -> result",
    "C": "timers: workflows started at once, each sleeping 2 s durably",
    "D": "crash recovery: 5 x 200 ms activities per workflow, SIGKILL the worker at 2 s",
    "E": "waiting at scale: workflows asleep on timers that all fall due in the same second",
}

METRICS: dict[str, list[Metric]] = {
    "A": [
        _m("wf_per_s", "wf/s", higher=True),
        _m("steps_per_s", "steps/s", higher=True),
        _m("worker_rss_mib", "MiB"),
        _m("wall_s", "s", headline=False),
        _m("worker_cpu_s", "s", headline=False),
        _m("driver_cpu_s", "s", headline=False),
        _m("server_rss_mib", "MiB", headline=False),
    ],
    "B": [_m("p50_ms", "ms"), _m("p99_ms", "ms"), _m("max_ms", "ms", headline=False)],
    "C": [
        _m("start_delay_p99_ms", "ms"),
        _m("late_p50_ms", "ms"),
        _m("late_p99_ms", "ms"),
        _m("all_done_s", "s"),
        _m("start_delay_p50_ms", "ms", headline=False),
        _m("late_max_ms", "ms", headline=False),
    ],
    "D": [
        _m("recover_s", "s"),
        _m("first_step_after_restart_s", "s"),
        _m("dup_step_execs", "steps"),
        _m("lost_steps", "steps"),
        _m("total_s", "s"),
        _m("steps_done_at_kill", "steps", headline=False),
        _m("kill_after_start_s", "s", headline=False),
        _m("start_all_s", "s", headline=False),
        _m("results_ok", "wf", higher=True, headline=False),
        _m("worker_rss_mib", "MiB", headline=False),
        _m("server_rss_mib", "MiB", headline=False),
    ],
    "E": [
        _m("workflows", "wf", higher=True),
        _m("worker_rss_mib", "MiB"),
        _m("store_mib", "MiB"),
        _m("wake_all_s", "s"),
        _m("late_p99_ms", "ms"),
        _m("late_p50_ms", "ms", headline=False),
        _m("start_all_s", "s", headline=False),
        _m("asleep_all_s", "s", headline=False),
        _m("slack_s", "s", headline=False),
        _m("worker_rss_peak_mib", "MiB", headline=False),
        _m("results_ok", "wf", higher=True, headline=False),
        _m("wake_cpu_s", "s", headline=False),
        _m("wake_cpu_us_per_wf", "us", headline=False),
    ],
}


def lookup(workload: str, name: str) -> Metric:
    for metric in METRICS.get(workload, []):
        if metric.name == name:
            return metric
    return Metric(name, "", higher_is_better=False, headline=False)
