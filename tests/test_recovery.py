"""Crash recovery with real processes: ``kill -9`` a worker and start another one.

The worker runs in a child process (``tests/recovery_app.py``) on a real SQLite file;
the test process is the client. Activities append one line per finished attempt to a
ledger file (fsynced before they return), so after the run the ledger says exactly
which attempts ran. Right after each kill the test snapshots what the store had
recorded (histories, leased activities), then checks the ledger against it:

- nothing whose ``ActivityCompleted`` was recorded before a kill ran again after it;
- everything in flight at a kill ran again, with a higher attempt number and the same
  idempotency key (at-least-once, never lost);
- a step ran more than once only if it was in flight at a kill;
- every workflow completes with the right result.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from recovery_app import TASK_QUEUE, Job, SleepyWorkflow, StepsWorkflow, step_result
from tether import Client, WorkflowHandle

pytestmark = pytest.mark.slow

APP = Path(__file__).with_name("recovery_app.py")
SRC = Path(__file__).resolve().parent.parent / "src"
STEPS = 5


# -- worker processes ---------------------------------------------------------------------
@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    identity: str
    log: Path
    ready_file: Path
    ready_at: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerProcesses:
    """Starts worker processes and makes sure every one of them is dead at teardown."""

    def __init__(self, tmp_path: Path, db: Path) -> None:
        self.tmp_path = tmp_path
        self.db = db
        self.started: list[WorkerProcess] = []

    def spawn(
        self, identity: str, *, lease_duration: float = 2.0, max_activities: int = 100
    ) -> WorkerProcess:
        n = len(self.started)
        log = self.tmp_path / f"worker-{n}.log"
        ready_file = self.tmp_path / f"worker-{n}.ready"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC), str(APP.parent), env.get("PYTHONPATH")) if p
        )
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(APP),
                    str(self.db),
                    "--identity",
                    identity,
                    "--lease-duration",
                    str(lease_duration),
                    "--max-activities",
                    str(max_activities),
                    "--ready-file",
                    str(ready_file),
                ],
                cwd=str(APP.parent.parent),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(proc, identity, log, ready_file)
        self.started.append(worker)
        return worker

    async def start(self, identity: str, **options: Any) -> WorkerProcess:
        """Spawn a worker and wait until it has started polling (and reclaimed its leases)."""
        worker = self.spawn(identity, **options)
        deadline = time.monotonic() + 30
        while not worker.ready_file.exists():
            if worker.proc.poll() is not None:
                pytest.fail(f"worker exited with {worker.proc.returncode}:\n{self.tail(worker)}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not start within 30 s:\n{self.tail(worker)}")
            await asyncio.sleep(0.01)
        worker.ready_at = float(worker.ready_file.read_text())
        return worker

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL: no shutdown code runs, leases are left behind as they are."""
        assert worker.proc.poll() is None, f"worker died early:\n{self.tail(worker)}"
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait()

    def tail(self, worker: WorkerProcess, lines: int = 40) -> str:
        try:
            return "\n".join(worker.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- {w.identity} pid {w.pid}:\n{self.tail(w)}" for w in self.started)

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.proc.kill()
        for worker in self.started:
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "tether.db"


@pytest.fixture
def workers(tmp_path: Path, db: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path, db)
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture
async def client(db: Path) -> Any:
    c = await Client.connect(f"sqlite:///{db}")
    try:
        yield c
    finally:
        await c.close()


async def wait_for(
    condition: Any, timeout: float, what: str, workers: WorkerProcesses | None = None
) -> Any:
    """Poll ``condition()`` (sync or async) until truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout} s waiting for {what}\n{workers and workers.logs()}"
            )
        await asyncio.sleep(0.005)


# -- the ledger and store snapshots -----------------------------------------------------
@dataclass(frozen=True)
class LedgerLine:
    offset: int
    workflow_id: str
    step: int
    attempt: int
    key: str
    time: float


def read_ledger(path: Path) -> list[LedgerLine]:
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = []
    offset = 0
    for raw in data.splitlines(keepends=True):
        assert raw.endswith(b"\n"), f"torn ledger line {raw!r}"
        wid, step, attempt, key, ts = raw.decode().split()
        lines.append(LedgerLine(offset, wid, int(step), int(attempt), key, float(ts)))
        offset += len(raw)
    return lines


def ledger_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


Step = tuple[str, int]


@dataclass
class KillSnapshot:
    """What the store held right after a worker was killed."""

    at: float
    ledger_offset: int
    completed: set[Step] = field(default_factory=set)
    """Steps whose ActivityCompleted event was in history."""
    leased: dict[Step, int] = field(default_factory=dict)
    """Steps whose activity was leased to a worker (in flight), with the attempt number."""
    lease_until: dict[Step, float] = field(default_factory=dict)
    """When those leases run out."""


async def activity_steps(handle: WorkflowHandle) -> tuple[dict[int, int], set[int]]:
    """seq -> step of each scheduled activity, and the seqs recorded as completed."""
    steps: dict[int, int] = {}
    completed: set[int] = set()
    for event in await handle.history():
        if event.type == "ActivityScheduled":
            steps[event.data["seq"]] = event.data["args"][0]["step"]
        elif event.type == "ActivityCompleted":
            completed.add(event.data["seq"])
    return steps, completed


async def snapshot(db: Path, ledger: Path, handles: list[WorkflowHandle]) -> KillSnapshot:
    """Call right after a kill, before any worker runs again."""
    snap = KillSnapshot(
        at=time.time(), ledger_offset=ledger.stat().st_size if ledger.exists() else 0
    )
    by_run: dict[str, tuple[str, dict[int, int]]] = {}
    for handle in handles:
        steps, completed = await activity_steps(handle)
        by_run[str(handle.run_id)] = (handle.id, steps)
        snap.completed |= {(handle.id, steps[seq]) for seq in completed}
    # The store's own table of activity tasks: which were leased (in flight) at the kill.
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        rows = conn.execute(
            "SELECT run_id, seq, attempt, visible_at FROM activity_tasks WHERE owner IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    for run_id, seq, attempt, lease_until in rows:
        workflow_id, steps = by_run[run_id]
        snap.leased[(workflow_id, steps[seq])] = attempt
        snap.lease_until[(workflow_id, steps[seq])] = lease_until
    assert not (snap.completed & set(snap.leased)), "a completed activity is still leased"
    return snap


def check_ledger(
    ledger: Path, workflow_ids: list[str], steps: int, kills: list[KillSnapshot]
) -> dict[str, int]:
    """Check the ledger against the snapshots; return counts for the report."""
    lines = read_ledger(ledger)
    by_step: dict[Step, list[LedgerLine]] = defaultdict(list)
    for line in lines:
        by_step[(line.workflow_id, line.step)].append(line)
    expected = {(wid, s) for wid in workflow_ids for s in range(steps)}
    assert set(by_step) == expected, (
        f"lost steps: {sorted(expected - set(by_step))[:10]}, "
        f"unknown steps: {sorted(set(by_step) - expected)[:10]}"
    )
    bounds = [0, *(k.ledger_offset for k in kills), float("inf")]

    def epoch(line: LedgerLine) -> int:
        return next(i for i in range(len(bounds) - 1) if bounds[i] <= line.offset < bounds[i + 1])

    keys: dict[str, Step] = {}
    duplicated = rerun_in_flight = 0
    for step, runs in by_step.items():
        # One idempotency key per step, stable over attempts, and no two steps share one.
        assert len({r.key for r in runs}) == 1, f"{step}: idempotency key changed: {runs}"
        assert keys.setdefault(runs[0].key, step) == step, f"{step} reuses a key of another step"
        # Every rerun is a new attempt, and a worker process runs each attempt once.
        attempts = [r.attempt for r in runs]
        assert attempts == sorted(set(attempts)), f"{step}: attempts not increasing: {runs}"
        epochs = [epoch(r) for r in runs]
        assert len(epochs) == len(set(epochs)), f"{step} ran twice in one worker process: {runs}"
        if len(runs) > 1:
            duplicated += 1
        for i, kill in enumerate(kills):
            before = [r for r in runs if r.offset < kill.ledger_offset]
            after = [r for r in runs if r.offset >= kill.ledger_offset]
            in_epoch = [r for r in runs if epoch(r) == i]
            if step in kill.completed:
                # Recorded as done: it ran before, and must never run again.
                assert before, f"{step} recorded as completed before kill {i} but not in ledger"
                assert not after, (
                    f"{step} was recorded as completed before kill {i} but ran again: {runs}"
                )
                continue
            # Not done at the kill: it must run (again) after it, since the run completed.
            assert after, f"{step} was not done at kill {i} and never ran after it: {runs}"
            if step in kill.leased:
                # In flight at the kill: the rerun is a new attempt (at-least-once).
                assert after[0].attempt > kill.leased[step], (
                    f"{step} in flight at kill {i} (attempt {kill.leased[step]}) reran as "
                    f"attempt {after[0].attempt}"
                )
                if in_epoch:
                    rerun_in_flight += 1
            else:
                # An attempt that wrote its side effect stays leased until its completion
                # is recorded, so the killed worker cannot have run this step.
                assert not in_epoch, f"{step} ran before kill {i} but was neither done nor leased"
    return {
        "lines": len(lines),
        "duplicated_steps": duplicated,
        "reran_after_side_effect": rerun_in_flight,
    }


async def start_steps_workflows(
    client: Client, ledger: Path, count: int, steps: int, min_sleep: float, max_sleep: float
) -> list[WorkflowHandle]:
    job = Job(str(ledger), steps, min_sleep, max_sleep)
    return list(
        await asyncio.gather(
            *(
                client.start_workflow(StepsWorkflow, job, id=f"wf-{i:04d}", task_queue=TASK_QUEUE)
                for i in range(count)
            )
        )
    )


async def all_results(
    handles: list[WorkflowHandle], timeout: float, workers: WorkerProcesses
) -> list[Any]:
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout))
    except TimeoutError:
        pytest.fail(f"workflows did not all complete within {timeout} s\n{workers.logs()}")


async def check_histories(handles: list[WorkflowHandle], steps: int) -> None:
    for handle in handles:
        scheduled, completed = await activity_steps(handle)
        assert sorted(scheduled.values()) == list(range(steps)), handle.id
        assert completed == set(scheduled), handle.id


# -- 1. activities: exactly once per recorded completion, at least once otherwise ---------
@pytest.mark.parametrize("restart", ["same-identity", "new-identity"])
async def test_kill_worker_mid_run_and_restart(
    restart: str, tmp_path: Path, db: Path, client: Client, workers: WorkerProcesses
) -> None:
    ledger = tmp_path / "ledger.txt"
    count = 100
    total = count * STEPS
    # A long lease for the same-identity case proves the restart reclaims at once; the
    # other case has to wait for the dead worker's leases to lapse, so keep them short.
    lease = 10.0 if restart == "same-identity" else 2.0
    handles = await start_steps_workflows(client, ledger, count, STEPS, 0.05, 0.1)

    first = await workers.start("worker-a", lease_duration=lease, max_activities=25)
    await wait_for(
        lambda: ledger_count(ledger) >= total // 4, 30, "a quarter of the steps", workers
    )
    workers.kill(first)
    kill = await snapshot(db, ledger, handles)
    done_at_kill = ledger_count(ledger)
    assert done_at_kill < total * 3 // 4, "the run was nearly over at the kill; kill earlier"
    assert kill.leased, "nothing was in flight at the kill"
    # Only this worker ever ran, so every lease is one of its activities: running (25
    # at most) or recording an outcome (as many again at most).
    assert len(kill.leased) <= 50, f"{len(kill.leased)} activities leased, limit 25 (+25)"

    identity = "worker-a" if restart == "same-identity" else "worker-b"
    second = await workers.start(identity, lease_duration=lease, max_activities=25)
    results = await all_results(handles, 60, workers)

    for handle, result in zip(handles, results, strict=True):
        assert result == [step_result(handle.id, s) for s in range(STEPS)]
    await check_histories(handles, STEPS)
    stats = check_ledger(ledger, [h.id for h in handles], STEPS, [kill])
    assert stats["lines"] >= total
    # Activities do their side effect halfway through, so some of the ~25 in flight at
    # the kill had done it: those ran twice, the second time as attempt 2, same key.
    assert stats["reran_after_side_effect"] >= 1

    # When did the work left in flight start again?
    reruns = [
        line
        for line in read_ledger(ledger)
        if line.offset >= kill.ledger_offset and (line.workflow_id, line.step) in kill.leased
    ]
    assert reruns
    if restart == "same-identity":
        # Taken back at once, not after the 10 s lease: each rerun is one activity
        # (<= 0.1 s) plus scheduling after the new worker said it was ready.
        assert max(r.time for r in reruns) - second.ready_at < 3.0
    else:
        # Another worker must not take work whose lease has not run out (the holder
        # may be alive, only slow), and takes it soon after it has.
        for r in reruns:
            assert r.time >= kill.lease_until[(r.workflow_id, r.step)], f"lease broken: {r}"
        assert max(r.time for r in reruns) - kill.at < lease + 5.0


# -- 2. durable timers across a restart -----------------------------------------------
async def timer_started(handle: WorkflowHandle) -> dict[str, Any] | None:
    for event in await handle.history():
        if event.type == "TimerStarted":
            return dict(event.data)
    return None


async def timer_fired_at(handle: WorkflowHandle) -> float:
    for event in await handle.history():
        if event.type == "TimerFired":
            return event.time.timestamp()
    raise AssertionError(f"{handle.id}: no TimerFired in history")


SLEEP = 3.0


async def start_sleepers(
    client: Client, workers: WorkerProcesses, count: int
) -> tuple[list[WorkflowHandle], list[float]]:
    handles = [
        await client.start_workflow(SleepyWorkflow, SLEEP, id=f"sleepy-{i}", task_queue=TASK_QUEUE)
        for i in range(count)
    ]
    starts = await wait_for(
        lambda: _all_timers(handles), 30, "every workflow to start its timer", workers
    )
    return handles, [s["fire_at"] for s in starts]


async def _all_timers(handles: list[WorkflowHandle]) -> list[dict[str, Any]] | None:
    starts = [await timer_started(h) for h in handles]
    return None if any(s is None for s in starts) else starts  # type: ignore[return-value]


async def test_timer_falls_due_while_no_worker_runs(
    client: Client, workers: WorkerProcesses
) -> None:
    first = await workers.start("timer-a")
    handles, fire_ats = await start_sleepers(client, workers, 20)
    workers.kill(first)
    # Stay down until every timer is overdue.
    await wait_for(lambda: time.time() > max(fire_ats) + 0.5, 30, "the timers to fall due")
    for handle in handles:
        assert await timer_started(handle) is not None
        assert (await handle.describe()).status == "running"

    second = await workers.start("timer-b")
    results = await all_results(handles, 30, workers)
    for handle, result, fire_at in zip(handles, results, fire_ats, strict=True):
        fired = await timer_fired_at(handle)
        assert fired >= fire_at
        assert fired - second.ready_at < 1.0, (
            f"overdue timer fired {fired - second.ready_at} s late"
        )
        assert result["slept"] >= SLEEP
        closed = (await handle.describe()).close_time
        assert closed is not None and closed.timestamp() - second.ready_at < 1.5


async def test_timer_fires_on_time_after_early_restart(
    client: Client, workers: WorkerProcesses
) -> None:
    first = await workers.start("timer-a")
    handles, fire_ats = await start_sleepers(client, workers, 20)
    workers.kill(first)
    second = await workers.start("timer-b")
    assert second.ready_at < min(fire_ats) - 0.5, "restart took too long to test an early restart"
    results = await all_results(handles, 30, workers)
    for handle, result, fire_at in zip(handles, results, fire_ats, strict=True):
        fired = await timer_fired_at(handle)
        assert fire_at <= fired < fire_at + 0.5, f"timer fired {fired - fire_at:+.3f} s from due"
        assert SLEEP <= result["slept"] < SLEEP + 1.0


# -- 3. repeated kills during a storm of workflow-task commits ---------------------------
async def test_repeated_kills_during_commit_storm(
    tmp_path: Path, db: Path, client: Client, workers: WorkerProcesses
) -> None:
    ledger = tmp_path / "ledger.txt"
    count, steps = 150, 3
    total = count * steps
    handles = await start_steps_workflows(client, ledger, count, steps, 0.01, 0.03)

    kills: list[KillSnapshot] = []
    # Kill early (first workflow tasks still committing), then twice more mid-run; the
    # restarts alternate between reclaiming by identity and waiting out the lease.
    plan = [(10, "storm-a"), (60, "storm-b"), (60, "storm-b")]
    worker = await workers.start("storm-a", lease_duration=2.0, max_activities=40)
    for more, next_identity in plan:
        target = ledger_count(ledger) + more
        await wait_for(
            lambda t=target: ledger_count(ledger) >= t, 30, f"{target} ledger lines", workers
        )
        workers.kill(worker)
        kills.append(await snapshot(db, ledger, handles))
        assert ledger_count(ledger) < total, "the run finished before the kill"
        worker = await workers.start(next_identity, lease_duration=2.0, max_activities=40)

    results = await all_results(handles, 60, workers)
    for handle, result in zip(handles, results, strict=True):
        assert result == [step_result(handle.id, s) for s in range(steps)]
    await check_histories(handles, steps)
    stats = check_ledger(ledger, [h.id for h in handles], steps, kills)
    assert stats["reran_after_side_effect"] >= 1
