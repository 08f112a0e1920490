"""Golden histories: recorded runs must keep replaying against the current code."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from golden_app import Order, OrderFlow, charge, ship
from golden_app_v3 import OrderFlowV3
from tether import NondeterminismError, Worker
from tether.replayer import history_from_json, load_history, replay_histories
from tether.testing import WorkflowEnvironment, replay

ROOT = pathlib.Path(__file__).parent.parent
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.json"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.replayer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )


def test_golden_histories_exist() -> None:
    assert len(GOLDEN) >= 2


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_history_replays_on_current_code(path: pathlib.Path) -> None:
    _, events = load_history(path)
    types = [e.type for e in events]
    assert {"UpdateAccepted", "SignalReceived", "TimerFired", "WorkflowCompleted"} <= set(types)
    replay(OrderFlow, events)
    with pytest.raises(NondeterminismError, match="history event #2 is ActivityScheduled"):
        replay(OrderFlowV3, events)


def test_replayer_reports_each_broken_history() -> None:
    assert all(r.ok for r in replay_histories([OrderFlow], GOLDEN))
    broken = replay_histories([OrderFlowV3], GOLDEN)
    assert [r.ok for r in broken] == [False] * len(GOLDEN)
    assert all("NondeterminismError" in (r.error or "") for r in broken)


def test_cli_passes_compatible_code_and_fails_incompatible_code() -> None:
    ok = run_cli("--module", "golden_app", "--history-dir", "tests/golden")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(GOLDEN)} histories replayed, 0 would break" in ok.stdout
    bad = run_cli("--module", "golden_app_v3", "--history-dir", "tests/golden")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "BREAKS OrderFlow golden-0" in bad.stdout
    assert "nondeterminism" in bad.stdout


def test_cli_rejects_bad_input() -> None:
    missing = run_cli("--module", "no_such_module_xyz", "--history-dir", "tests/golden")
    assert missing.returncode == 2 and "cannot import module" in missing.stderr
    nothing = run_cli("--module", "golden_app")
    assert nothing.returncode == 2 and "--store URL and/or --history-dir" in nothing.stderr


def test_history_document_is_validated() -> None:
    with pytest.raises(ValueError, match="not a Tether history document"):
        history_from_json({"events": []})


async def test_cli_checks_runs_in_a_store(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "app.db"
    env = await WorkflowEnvironment.start_local(str(path))
    try:
        async with Worker(
            env.client, task_queue="golden", workflows=[OrderFlow], activities=[charge, ship]
        ):
            handle = await env.client.start_workflow(
                OrderFlow, Order("s-1", 5), id="stored", task_queue="golden"
            )
            await handle.signal(OrderFlow.approve)
            await handle.result(timeout=30)
    finally:
        await env.shutdown()
    url = f"sqlite:///{path}"
    assert run_cli("--module", "golden_app", "--store", url).returncode == 0
    bad = run_cli("--module", "golden_app_v3", "--store", url)
    assert bad.returncode == 1 and "BREAKS OrderFlow stored" in bad.stdout


def test_tether_console_command_exits_non_zero_for_breaking_code() -> None:
    tether = pathlib.Path(sys.executable).parent / "tether"
    command = [str(tether)] if tether.exists() else [sys.executable, "-m", "tether.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    args = ["replay-check", "--history-dir", "tests/golden", "--module"]
    ok = subprocess.run([*command, *args, "golden_app"], cwd=ROOT, env=env, timeout=60)
    assert ok.returncode == 0
    bad = subprocess.run(
        [*command, *args, "golden_app_v3"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert bad.returncode == 1
