"""Worker processes, ledgers and store snapshots for the PostgreSQL acceptance tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pg_app import TASK_QUEUE, Job, Steps
from tether import Client, StoreError, WorkflowHandle

APP = Path(__file__).with_name("pg_app.py")
SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    identity: str
    log: Path
    ready_file: Path
    stats_file: Path
    ready_at: float = 0.0
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class WorkerProcesses:
    """Starts ``pg_app.py`` workers; every one is dead at teardown."""

    def __init__(self, tmp_path: Path, url: str, env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.env = env or {}
        self.started: list[WorkerProcess] = []

    def spawn(
        self, identity: str, *, lease_duration: float = 5.0, max_activities: int = 100
    ) -> WorkerProcess:
        n = len(self.started)
        log = self.tmp_path / f"worker-{n}-{identity}.log"
        ready_file = self.tmp_path / f"worker-{n}.ready"
        stats_file = self.tmp_path / f"worker-{n}.stats.json"
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC), str(APP.parent), env.get("PYTHONPATH")) if p
        )
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(APP),
                    self.url,
                    "--identity",
                    identity,
                    "--lease-duration",
                    str(lease_duration),
                    "--max-activities",
                    str(max_activities),
                    "--ready-file",
                    str(ready_file),
                    "--stats-file",
                    str(stats_file),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(proc, identity, log, ready_file, stats_file)
        self.started.append(worker)
        return worker

    async def wait_ready(self, worker: WorkerProcess, timeout: float = 60) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while not worker.ready_file.exists():
            if not worker.alive:
                pytest.fail(f"worker exited with {worker.proc.returncode}:\n{self.tail(worker)}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not start within {timeout} s:\n{self.tail(worker)}")
            await asyncio.sleep(0.02)
        worker.ready_at = float(worker.ready_file.read_text())
        return worker

    async def start(self, identity: str, **options: Any) -> WorkerProcess:
        return await self.wait_ready(self.spawn(identity, **options))

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL: no shutdown code runs; its leases stay as they are."""
        assert worker.alive, f"worker died early:\n{self.tail(worker)}"
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait()
        worker.killed = True

    async def stop_all(self, timeout: float = 30) -> list[dict[str, Any]]:
        """SIGTERM every live worker; return the counters each wrote on its way out."""
        live = [w for w in self.started if w.alive]
        for worker in live:
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in live:
            while worker.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not worker.alive, f"{worker.identity} did not stop:\n{self.tail(worker)}"
            assert worker.proc.returncode == 0, f"{worker.identity}:\n{self.tail(worker)}"
        return [json.loads(w.stats_file.read_text()) for w in live]

    def tail(self, worker: WorkerProcess, lines: int = 40) -> str:
        try:
            return "\n".join(worker.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- {w.identity} pid {w.pid}:\n{self.tail(w)}" for w in self.started)

    def grep(self, text: str) -> list[str]:
        found = []
        for worker in self.started:
            with open(worker.log, errors="replace") as f:
                found += [line.rstrip() for line in f if text in line]
        return found

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.alive:
                worker.proc.kill()
        for worker in self.started:
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


# -- the ledger ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerLine:
    offset: int
    workflow_id: str
    step: int
    attempt: int
    key: str
    identity: str
    pid: int
    time: float


def read_ledger(path: Path) -> list[LedgerLine]:
    if not path.exists():
        return []
    lines = []
    offset = 0
    for raw in path.read_bytes().splitlines(keepends=True):
        assert raw.endswith(b"\n"), f"torn ledger line {raw!r}"
        wid, step, attempt, key, identity, pid, ts = raw.decode().split()
        lines.append(
            LedgerLine(offset, wid, int(step), int(attempt), key, identity, int(pid), float(ts))
        )
        offset += len(raw)
    return lines


def ledger_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# -- starting workflows and reading the store ---------------------------------------------
async def start_all(
    client: Client, job: Job, ids: list[str], concurrency: int = 200
) -> list[WorkflowHandle]:
    """Start a workflow per id; a start that fails with a store error is repeated with the
    same request id (idempotent), as a careful client does. Returns acknowledged starts."""
    gate = asyncio.Semaphore(concurrency)

    async def one(workflow_id: str) -> WorkflowHandle:
        async with gate:
            request_id = f"start-{workflow_id}"
            for _ in range(100):
                try:
                    return await client.start_workflow(
                        Steps, job, id=workflow_id, task_queue=TASK_QUEUE, request_id=request_id
                    )
                except StoreError:
                    await asyncio.sleep(0.1)
            raise AssertionError(f"could not start {workflow_id}")

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def patiently(call: Any, *args: Any, attempts: int = 100) -> Any:
    """Repeat a client call that failed with a store error (a database restarting)."""
    for _ in range(attempts - 1):
        try:
            return await call(*args)
        except StoreError:
            await asyncio.sleep(0.1)
    return await call(*args)


async def sql(url: str, query: str, *args: Any) -> list[Any]:
    """One query on a fresh connection, retried while the server restarts."""
    for attempt in range(100):
        try:
            conn = await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError):
            if attempt == 99:
                raise
            await asyncio.sleep(0.1)
            continue
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()
    raise AssertionError("unreachable")


Step = tuple[str, int]


@dataclass
class KillSnapshot:
    """What the store held right after a worker process was killed."""

    pid: int
    identity: str
    ledger_offset: int
    completed: set[Step] = field(default_factory=set)
    """Steps whose ActivityCompleted event was in history."""
    leased: dict[Step, int] = field(default_factory=dict)
    """Steps whose activity was leased to the killed worker, with the attempt number."""


async def completed_and_leased(url: str) -> tuple[set[Step], dict[Step, tuple[str, int]]]:
    """(completed steps, leased steps -> (owner, attempt)) as the store has them now."""
    scheduled = await sql(
        url,
        "SELECT r.workflow_id, h.run_id, h.type, h.data FROM history h "
        "JOIN runs r ON r.run_id = h.run_id "
        "WHERE h.type IN ('ActivityScheduled', 'ActivityCompleted')",
    )
    steps: dict[tuple[str, int], int] = {}
    completed_seqs: list[tuple[str, int]] = []
    workflow_of: dict[str, str] = {}
    for workflow_id, run_id, type_, data in scheduled:
        event = json.loads(data)
        workflow_of[run_id] = workflow_id
        if type_ == "ActivityScheduled":
            steps[(run_id, event["seq"])] = event["args"][0]["step"]
        else:
            completed_seqs.append((run_id, event["seq"]))
    completed = {(workflow_of[r], steps[(r, s)]) for r, s in completed_seqs}
    leased: dict[Step, tuple[str, int]] = {}
    for run_id, seq, owner, attempt in await sql(
        url, "SELECT run_id, seq, owner, attempt FROM activity_tasks WHERE owner IS NOT NULL"
    ):
        if (run_id, seq) in steps:
            leased[(workflow_of[run_id], steps[(run_id, seq)])] = (owner, attempt)
    return completed, leased


async def snapshot_kill(url: str, ledger: Path, worker: WorkerProcess) -> KillSnapshot:
    """Call right after killing ``worker``, before its work can be taken over.

    The ledger offset is read after the store: a line past it was written after every
    completion in the snapshot was recorded."""
    completed, leased = await completed_and_leased(url)
    offset = ledger.stat().st_size if ledger.exists() else 0
    snap = KillSnapshot(worker.pid, worker.identity, offset, completed)
    snap.leased = {s: a for s, (owner, a) in leased.items() if owner == worker.identity}
    assert not (snap.completed & set(snap.leased)), "a completed activity is still leased"
    return snap


def check_ledger(
    ledger: Path, workflow_ids: list[str], steps: int, kills: list[KillSnapshot]
) -> dict[str, int]:
    """Every step ran; a step ran again only if its earlier attempt was in flight in a
    worker that was killed; nothing recorded as completed at a kill ran after it."""
    lines = read_ledger(ledger)
    by_step: dict[Step, list[LedgerLine]] = defaultdict(list)
    for line in lines:
        by_step[(line.workflow_id, line.step)].append(line)
    expected = {(wid, s) for wid in workflow_ids for s in range(steps)}
    assert set(by_step) == expected, (
        f"lost steps: {sorted(expected - set(by_step))[:10]}, "
        f"unknown steps: {sorted(set(by_step) - expected)[:10]}"
    )
    kill_by_pid = {k.pid: k for k in kills}
    keys: dict[str, Step] = {}
    reran = 0
    for step_key, runs in by_step.items():
        assert len({r.key for r in runs}) == 1, f"{step_key}: idempotency key changed: {runs}"
        assert keys.setdefault(runs[0].key, step_key) == step_key, f"{step_key} shares a key"
        attempts = [r.attempt for r in runs]
        assert attempts == sorted(set(attempts)), f"{step_key}: attempts not increasing: {runs}"
        for earlier in runs[:-1]:
            kill = kill_by_pid.get(earlier.pid)
            assert kill is not None, (
                f"{step_key} ran again although the worker of its attempt {earlier.attempt} "
                f"({earlier.identity}, pid {earlier.pid}) was not killed: {runs}"
            )
            assert kill.leased.get(step_key) == earlier.attempt, (
                f"{step_key} ran again, but attempt {earlier.attempt} was not in flight in "
                f"{kill.identity} when it was killed: {runs}"
            )
            reran += 1
        for kill in kills:
            if step_key in kill.completed:
                after = [r for r in runs if r.offset >= kill.ledger_offset]
                assert not after, f"{step_key} was completed at a kill but ran again: {runs}"
    return {"lines": len(lines), "reran": reran}
