"""Markdown tables of a results document (``python -m bench.tables [latest.json]``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import metrics
from bench.paths import RESULTS_DIR
from bench.results import Ratio, Record, ratios_of, records_of
from bench.systems import BY_NAME, SYSTEMS


def number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(r: Record | None) -> str:
    """``median [min-max]`` (just the median for one repetition or equal values)."""
    if r is None:
        return "-"
    text = number(r.value)
    if len(r.values) > 1 and r.min != r.max:
        text += f" [{number(r.min)}-{number(r.max)}]"
    if r.variant:
        text += f" ({r.variant.rsplit('-', 1)[-1]})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(header), rule, *(line(r) for r in rows)]


def _order(name: str) -> tuple[int, str, int, str]:
    """Tether first; then each peer: its best-API row followed by its variants."""
    if name.startswith("tether-"):
        return 0, name, 0, name
    system = BY_NAME.get(name)
    if system is not None and system.group:
        return 1, system.group, 1, name
    return 1, name, 0, name


def _label(name: str) -> str:
    if any(s.group == name for s in SYSTEMS):
        return f"{name} (best API)"
    if name in BY_NAME and BY_NAME[name].group:
        return f". {name}"
    return name


def workload_tables(records: list[Record], sizes: dict[str, str]) -> list[str]:
    lines = []
    index = {(r.system, r.workload, r.metric): r for r in records}
    for workload, title in metrics.WORKLOADS.items():
        shown = [m for m in metrics.METRICS[workload] if m.headline]
        systems = sorted({r.system for r in records if r.workload == workload}, key=_order)
        if not systems:
            continue
        lines += ["", f"### {workload} {title} ({sizes.get(workload, '')})", ""]
        header = ["system"] + [f"{m.name} ({m.unit})" for m in shown]
        rows = [
            [_label(s)] + [cell(index.get((s, workload, m.name))) for m in shown] for s in systems
        ]
        lines += _table(header, rows)
    return lines


def ratio_table(found: list[Ratio]) -> list[str]:
    if not found:
        return []
    columns = sorted({(r.workload, r.metric) for r in found}, key=_column_order)
    index = {(r.system, r.peer, r.workload, r.metric): r.ratio for r in found}
    rows = []
    for system, peer in sorted({(r.system, r.peer) for r in found}):
        values = [index.get((system, peer, w, m)) for w, m in columns]
        rows.append([f"{system} vs {peer}"] + ["-" if v is None else f"{v:.2f}x" for v in values])
    header = ["Tether vs peer"] + [f"{w} {m}" for w, m in columns]
    title = "### Ratios: how many times better Tether is (< 1x: the peer is better)"
    return ["", title, "", *_table(header, rows)]


def _column_order(column: tuple[str, str]) -> tuple[str, int]:
    workload, metric = column
    names = [m.name for m in metrics.METRICS[workload]]
    return workload, names.index(metric) if metric in names else len(names)


def render(doc: dict[str, Any]) -> str:
    run, machine = doc["run"], doc["machine"]
    lines = [
        f"## Tether benchmark: {run['mode']} run, {run['repetitions']} repetition(s), "
        f"{run['seconds']:.0f} s, started {run['started']}",
        "",
        f"`{run['command']}` on {machine['cores']} cores ({machine['cpu']}), "
        f"Python {machine['tether_env'].get('python', '?')}; load average (1/5/15 min) "
        f"{run['load_before']} before, {run['load_after']} after; CPU probe (a fixed "
        f"Python loop, lower is faster) {run.get('cpu_probe_ms_before', '?')} ms before, "
        f"{run.get('cpu_probe_ms_after', '?')} ms after.",
        "Cells: median [min-max] over the repetitions.",
        *workload_tables(records_of(doc), run["size_labels"]),
        *ratio_table(ratios_of(doc)),
    ]
    failures = [r for r in run["driver_runs"] if r["error"]]
    if run["notes"] or failures:
        lines += ["", "### Not measured", ""]
        lines += [f"- {note}" for note in run["notes"]]
        lines += [
            f"- {r['system']} {r['workloads']} rep {r['rep']}: {r['error']}" for r in failures
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tables", description="Print the tables of a results file."
    )
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR / "latest.json")
    path = parser.parse_args().results
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"cannot read results from {path}: {e} (run `make bench` first?)")
    print(render(document))


if __name__ == "__main__":
    main()
