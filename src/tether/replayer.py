"""Check new workflow code against recorded histories before deploying it.

Histories come from a store (every run of the workflow types you pass) or from JSON
files written by ``export_history``. Each one is replayed against the current code;
a run that would hit a nondeterminism error (or a bug) on the new code is reported
with the message the worker would give. ``python -m tether.replayer`` (or
``tether replay-check``) exits non-zero when any would break, for use in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import importlib
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tether._runtime.definitions import WORKFLOW_ATTR, workflow_definition
from tether.client import Client, HistoryEvent, WorkflowHandle
from tether.exceptions import InvalidArgumentError
from tether.testing import replay

__all__ = [
    "ReplayResult",
    "export_history",
    "history_from_json",
    "history_to_json",
    "load_history",
    "main",
    "replay_histories",
    "replay_store",
    "save_history",
    "workflows_in_module",
]


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of replaying one run's history."""

    workflow_id: str
    run_id: str
    workflow_type: str
    source: str
    """Where the history came from: ``store`` or a file path."""
    error: str | None
    """None if the history replays cleanly; else what would break."""

    @property
    def ok(self) -> bool:
        return self.error is None


def history_to_json(events: Sequence[HistoryEvent], run_id: str = "") -> dict[str, Any]:
    """A JSON document of a run's history (the format ``load_history`` reads)."""
    started = events[0].data if events else {}
    return {
        "format": "tether-history/1",
        "workflow_id": started.get("workflow_id"),
        "workflow_type": started.get("workflow_type"),
        "run_id": run_id,
        "events": [
            {"seq": e.seq, "type": e.type, "time": e.time.timestamp(), "data": e.data}
            for e in events
        ],
    }


def history_from_json(document: dict[str, Any]) -> list[HistoryEvent]:
    if document.get("format") != "tether-history/1" or "events" not in document:
        raise InvalidArgumentError(
            "not a Tether history document (expected format 'tether-history/1' with events)"
        )
    return [
        HistoryEvent(
            seq=e["seq"],
            type=e["type"],
            time=_dt.datetime.fromtimestamp(e["time"], _dt.UTC),
            data=e["data"],
        )
        for e in document["events"]
    ]


async def export_history(handle: WorkflowHandle) -> dict[str, Any]:
    """Export a run's full history as a JSON-compatible document."""
    run = await handle.describe()
    return history_to_json(await handle.history(), run.run_id)


def save_history(path: str | pathlib.Path, document: dict[str, Any]) -> None:
    pathlib.Path(path).write_text(json.dumps(document, indent=1, sort_keys=True))


def load_history(path: str | pathlib.Path) -> tuple[dict[str, Any], list[HistoryEvent]]:
    """Read a history file: (its document, its events)."""
    try:
        document = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"cannot read history file {path}: {e}") from None
    return document, history_from_json(document)


def _check(workflow: type, events: list[HistoryEvent]) -> str | None:
    try:
        replay(workflow, events)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def replay_histories(
    workflows: Iterable[type], paths: Iterable[str | pathlib.Path]
) -> list[ReplayResult]:
    """Replay history files against the given workflow classes (matched by type name)."""
    by_name = {workflow_definition(w).name: w for w in workflows}
    results = []
    for path in paths:
        document, events = load_history(path)
        name = str(document.get("workflow_type"))
        workflow = by_name.get(name)
        error = (
            _check(workflow, events)
            if workflow is not None
            else f"no workflow class named {name!r} among {sorted(by_name)}"
        )
        results.append(
            ReplayResult(
                workflow_id=str(document.get("workflow_id")),
                run_id=str(document.get("run_id")),
                workflow_type=name,
                source=str(path),
                error=error,
            )
        )
    return results


async def replay_store(
    client: Client, workflows: Iterable[type], *, limit: int = 10_000
) -> list[ReplayResult]:
    """Replay the stored histories of every run of the given workflow types."""
    results = []
    for workflow in workflows:
        name = workflow_definition(workflow).name
        for run in await client.list_workflows(workflow_type=name, limit=limit):
            handle = client.get_workflow_handle(run.workflow_id, run_id=run.run_id)
            events = await handle.history()
            results.append(
                ReplayResult(
                    workflow_id=run.workflow_id,
                    run_id=run.run_id,
                    workflow_type=name,
                    source="store",
                    error=_check(workflow, events),
                )
            )
    return results


def workflows_in_module(module_name: str) -> list[type]:
    """The ``@workflow.defn`` classes a module defines or imports."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidArgumentError(f"cannot import module {module_name!r}: {e}") from None
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and hasattr(value, WORKFLOW_ATTR)
    ]
    if not found:
        raise InvalidArgumentError(f"module {module_name!r} defines no @workflow.defn class")
    return found


async def _check_all(module: str, store: str | None, history_dir: str | None) -> list[ReplayResult]:
    workflows = workflows_in_module(module)
    results: list[ReplayResult] = []
    if history_dir is not None:
        paths = sorted(pathlib.Path(history_dir).glob("*.json"))
        if not paths:
            raise InvalidArgumentError(f"no *.json history files in {history_dir}")
        results += replay_histories(workflows, paths)
    if store is not None:
        client = await Client.connect(store)
        try:
            results += await replay_store(client, workflows)
        finally:
            await client.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: replay histories against a module's workflows; 1 if any would break."""
    parser = argparse.ArgumentParser(
        prog="tether replay-check",
        description="Replay recorded histories against the current workflow code.",
        epilog="example: tether replay-check --module app.workflows --store sqlite:///app.db",
    )
    parser.add_argument("--module", required=True, help="module defining the workflows")
    parser.add_argument("--store", help="store URL whose runs to replay")
    parser.add_argument("--history-dir", help="directory of exported *.json histories")
    args = parser.parse_args(argv)
    if args.store is None and args.history_dir is None:
        parser.error("give --store URL and/or --history-dir DIR")
    sys.path.insert(0, ".")
    try:
        results = asyncio.run(_check_all(args.module, args.store, args.history_dir))
    except InvalidArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    broken = [r for r in results if not r.ok]
    for r in broken:
        print(f"BREAKS {r.workflow_type} {r.workflow_id} (run {r.run_id}, {r.source}):")
        print(f"  {r.error}")
    print(f"{len(results)} histories replayed, {len(broken)} would break")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
