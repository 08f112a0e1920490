"""Lifecycle acceptance tests: cancellation with compensation, kill -9 between saga steps,
human approval with a 24-hour timeout, continue-as-new, workflow id policies, terminate.

Workflow tests take ``make_worker`` and run twice (cached, and always-replay). The
real-process tests run ``tests/lifecycle_app.py`` workers and kill them with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lifecycle_app import TASK_QUEUE as APP_QUEUE
from lifecycle_app import Approval, Transfer, TransferRequest
from polling import event_types, wait_until
from tether import (
    ActivityError,
    ApplicationError,
    Client,
    NoWorkerResponseError,
    RetryPolicy,
    Worker,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowNotFoundError,
    activity,
    workflow,
)
from tether.activity import ActivityCancelled
from tether.testing import WorkflowEnvironment

MakeWorker = Callable[..., Worker]


# == money transfer saga ==================================================================
@dataclasses.dataclass
class TransferOrder:
    source: str
    target: str
    amount: int


class Bank:
    """Applies each operation once per idempotency key; records what happened, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: list[tuple[str, str, int]] = []
        self.keys: set[tuple[str, str]] = set()
        self.activity_saw_cancel: list[str] = []
        self.withdraw_started = threading.Event()
        self.withdraw_release = threading.Event()
        self.deposit_started = threading.Event()

    def apply(self, kind: str, account: str, amount: int) -> None:
        key = (kind, activity.info().idempotency_key)
        with self.lock:
            if key not in self.keys:
                self.keys.add(key)
                self.applied.append((kind, account, amount))


BANK = Bank()


@pytest.fixture(autouse=True)
def bank() -> Iterator[Bank]:
    global BANK
    BANK = Bank()
    yield BANK
    BANK.withdraw_release.set()  # never leave an activity thread blocked


@activity.defn
def withdraw(order: TransferOrder) -> str:
    if order.source == "slow-source":
        BANK.withdraw_started.set()
        BANK.withdraw_release.wait(20)
    BANK.apply("withdraw", order.source, order.amount)
    return "withdrawn"


@activity.defn
def deposit(order: TransferOrder) -> str:
    if order.target == "closed":
        raise ApplicationError("account closed", type="AccountClosed", non_retryable=True)
    if order.target == "slow-target":
        BANK.deposit_started.set()
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                activity.heartbeat("waiting for the other bank")
                time.sleep(0.01)
        except ActivityCancelled:
            BANK.activity_saw_cancel.append("deposit")
            raise
        raise ApplicationError("the deposit was never cancelled", non_retryable=True)
    BANK.apply("deposit", order.target, order.amount)
    return "deposited"


@activity.defn
def refund(order: TransferOrder) -> str:
    BANK.apply("refund", order.source, order.amount)
    return "refunded"


SAGA_ACTIVITIES = [withdraw, deposit, refund]
FAST_RETRY = RetryPolicy(initial_interval=0.05, maximum_attempts=3)


@workflow.defn
class MoneyTransfer:
    """Withdraw, then deposit; a failed or cancelled deposit is compensated by a refund."""

    @workflow.run
    async def run(self, order: TransferOrder) -> str:
        withdrawal = workflow.start_activity(
            withdraw, order, start_to_close_timeout=30, retry_policy=FAST_RETRY
        )
        try:
            # Shielded: a cancel must not abandon a withdrawal that may already be done.
            await asyncio.shield(withdrawal)
        except asyncio.CancelledError:
            await withdrawal
            await workflow.execute_activity(
                refund, order, start_to_close_timeout=10, retry_policy=FAST_RETRY
            )
            raise
        try:
            await workflow.execute_activity(
                deposit,
                order,
                start_to_close_timeout=30,
                heartbeat_timeout=1,
                retry_policy=FAST_RETRY,
            )
        except (asyncio.CancelledError, ActivityError) as e:
            await workflow.execute_activity(
                refund, order, start_to_close_timeout=10, retry_policy=FAST_RETRY
            )
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApplicationError(
                f"deposit failed ({e.cause}); the withdrawal was refunded", type="TransferFailed"
            ) from None
        return "transferred"


async def test_transfer_withdraws_then_deposits(
    env: WorkflowEnvironment, make_worker: MakeWorker, bank: Bank
) -> None:
    async with make_worker(env.client, workflows=[MoneyTransfer], activities=SAGA_ACTIVITIES):
        result = await env.client.execute_workflow(
            MoneyTransfer, TransferOrder("alice", "bob", 100), id="t-ok", task_queue="test"
        )
    assert result == "transferred"
    assert bank.applied == [("withdraw", "alice", 100), ("deposit", "bob", 100)]


async def test_failed_deposit_is_refunded(
    env: WorkflowEnvironment, make_worker: MakeWorker, bank: Bank
) -> None:
    async with make_worker(env.client, workflows=[MoneyTransfer], activities=SAGA_ACTIVITIES):
        handle = await env.client.start_workflow(
            MoneyTransfer, TransferOrder("alice", "closed", 100), id="t-fail", task_queue="test"
        )
        with pytest.raises(WorkflowFailureError) as raised:
            await handle.result(timeout=10)
    assert bank.applied == [("withdraw", "alice", 100), ("refund", "alice", 100)]
    cause = raised.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "TransferFailed"
    assert "account closed" in str(cause)
    assert (await handle.describe()).status == "failed"


async def test_cancel_during_deposit_reaches_the_activity_and_refunds(
    env: WorkflowEnvironment, make_worker: MakeWorker, bank: Bank
) -> None:
    async with make_worker(env.client, workflows=[MoneyTransfer], activities=SAGA_ACTIVITIES):
        handle = await env.client.start_workflow(
            MoneyTransfer, TransferOrder("alice", "slow-target", 100), id="t-c", task_queue="test"
        )
        await wait_until(bank.deposit_started.is_set, "the deposit to start")
        await handle.cancel("customer changed their mind")
        with pytest.raises(WorkflowFailureError, match="cancelled"):
            await handle.result(timeout=10)
        # The running deposit learned of the cancel through its heartbeat.
        await wait_until(lambda: bank.activity_saw_cancel, "the deposit to see the cancel")
    assert bank.activity_saw_cancel == ["deposit"]
    assert bank.applied == [("withdraw", "alice", 100), ("refund", "alice", 100)]
    assert (await handle.describe()).status == "cancelled"
    history = await handle.history()
    types = [e.type for e in history]
    assert types[-2:] == ["WorkflowCancelled", "WorkflowTaskCompleted"]
    cancel_at = types.index("WorkflowCancelRequested")
    deposit_seq = next(
        e.data["seq"]
        for e in history
        if e.type == "ActivityScheduled" and e.data["activity_type"] == "deposit"
    )
    assert any(
        e.type == "ActivityCancelRequested" and e.data["seq"] == deposit_seq
        for e in history[cancel_at:]
    )
    refunds = [
        e.seq
        for e in history
        if e.type == "ActivityScheduled" and e.data["activity_type"] == "refund"
    ]
    assert len(refunds) == 1 and refunds[0] > history[cancel_at].seq


async def test_cancel_during_shielded_withdrawal_lets_it_finish_then_refunds(
    env: WorkflowEnvironment, make_worker: MakeWorker, bank: Bank
) -> None:
    async with make_worker(env.client, workflows=[MoneyTransfer], activities=SAGA_ACTIVITIES):
        handle = await env.client.start_workflow(
            MoneyTransfer, TransferOrder("slow-source", "bob", 5), id="t-s", task_queue="test"
        )
        await wait_until(bank.withdraw_started.is_set, "the withdrawal to start")
        await handle.cancel()

        async def cancel_seen() -> bool:
            types = await event_types(handle)
            return (
                "WorkflowCancelRequested" in types
                and "WorkflowTaskCompleted" in types[types.index("WorkflowCancelRequested") :]
            )

        await wait_until(cancel_seen, "the workflow to handle the cancel")
        assert bank.applied == [], "the withdrawal is still running"
        bank.withdraw_release.set()
        with pytest.raises(WorkflowFailureError, match="cancelled"):
            await handle.result(timeout=10)
    assert bank.applied == [("withdraw", "slow-source", 5), ("refund", "slow-source", 5)]
    types = await event_types(handle)
    assert "ActivityCancelRequested" not in types, "a shielded activity must not be cancelled"
    assert (await handle.describe()).status == "cancelled"


@workflow.defn
class Reminder:
    """Sleeps for a day; a cancel interrupts the sleep and the workflow reports it."""

    @workflow.run
    async def run(self) -> str:
        try:
            await asyncio.sleep(24 * 3600)
        except asyncio.CancelledError:
            assert workflow.is_cancel_requested()
            return "cancelled cleanly"
        return "slept"


async def test_cancel_interrupts_a_durable_timer_and_the_workflow_may_finish(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    async with make_worker(env.client, workflows=[Reminder]):
        handle = await env.client.start_workflow(Reminder, id="reminder", task_queue="test")
        await wait_until(lambda: _has_event(handle, "TimerStarted"), "the timer")
        await handle.cancel("not needed any more")
        assert await handle.result(timeout=10) == "cancelled cleanly"
    types = await event_types(handle)
    assert types.index("WorkflowCancelRequested") < types.index("TimerCancelled")
    assert (await handle.describe()).status == "completed"


async def _has_event(handle: WorkflowHandle, event_type: str) -> bool:
    return event_type in await event_types(handle)


# == real worker processes ==================================================================
APP = Path(__file__).with_name("lifecycle_app.py")
SRC = Path(__file__).resolve().parent.parent / "src"


class WorkerProcesses:
    """Starts ``lifecycle_app.py`` workers; every one of them is killed at teardown."""

    def __init__(self, tmp_path: Path, db: Path) -> None:
        self.tmp_path = tmp_path
        self.db = db
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    async def start(self, identity: str) -> subprocess.Popen[bytes]:
        n = len(self.started)
        log, ready = self.tmp_path / f"worker-{n}.log", self.tmp_path / f"worker-{n}.ready"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SRC), str(APP.parent), env.get("PYTHONPATH")) if p
        )
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    *(sys.executable, str(APP), str(self.db), "--identity", identity),
                    *("--lease-duration", "1.0", "--ready-file", str(ready)),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append((proc, log))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {identity} did not start:\n{self.logs()}")
            await asyncio.sleep(0.01)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.poll() is None, f"worker died early:\n{self.logs()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- pid {p.pid}:\n{log.read_text(errors='replace')[-3000:]}"
            for p, log in self.started
        )

    def kill_all(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path, tmp_path / "tether.db")
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture
async def process_client(tmp_path: Path) -> Any:
    client = await Client.connect(f"sqlite:///{tmp_path / 'tether.db'}")
    try:
        yield client
    finally:
        await client.close()


def ledger_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def test_kill_between_withdraw_and_deposit_leaves_one_withdrawal(
    tmp_path: Path, processes: WorkerProcesses, process_client: Client
) -> None:
    ledger, gate = tmp_path / "ledger.txt", tmp_path / "gate"
    first = await processes.start("worker-a")
    handle = await process_client.start_workflow(
        Transfer,
        TransferRequest(str(ledger), str(gate), 100),
        id="transfer-1",
        task_queue=APP_QUEUE,
    )
    # Withdrawn (and recorded as completed), the deposit under way: kill the worker.
    await wait_until(
        lambda: [kind for kind, *_ in ledger_lines(ledger)] == ["withdraw", "deposit-attempt"],
        "the withdrawal and the start of the deposit",
    )
    processes.kill(first)
    assert "ActivityCompleted" in await event_types(handle)

    await processes.start("worker-b")
    gate.touch()
    try:
        assert await handle.result(timeout=30) == "withdrawn+deposited"
    except TimeoutError:
        pytest.fail(f"the transfer did not finish\n{processes.logs()}")
    lines = ledger_lines(ledger)
    withdrawals = [line for line in lines if line[0] == "withdraw"]
    deposits = [line for line in lines if line[0] == "deposit"]
    attempts = [line for line in lines if line[0] == "deposit-attempt"]
    assert len(withdrawals) == 1, lines
    assert len(deposits) == 1, lines
    # The deposit in flight at the kill ran again: a new attempt with the same key.
    assert [a[2] for a in attempts] == ["1", "2"], lines
    assert len({a[1] for a in attempts} | {deposits[0][1]}) == 1, lines


async def test_approval_survives_a_killed_worker_process(
    processes: WorkerProcesses, process_client: Client
) -> None:
    first = await processes.start("worker-a")
    handle = await process_client.start_workflow(
        Approval, 3600.0, id="approval-proc", task_queue=APP_QUEUE
    )
    assert await handle.query(Approval.status) == "pending"
    processes.kill(first)
    # No worker runs: a query gets no answer, a signal is kept for the next worker.
    with pytest.raises(NoWorkerResponseError):
        await handle.query(Approval.status, timeout=0.3)
    await handle.signal(Approval.approve, "carol")
    await processes.start("worker-b")
    assert await handle.result(timeout=20) == {"state": "approved", "by": "carol"}
    assert await handle.query(Approval.status) == "approved"


# == approval with a 24-hour timeout (time skipping) ========================================
DAY = timedelta(hours=24)


async def start_approval(env: WorkflowEnvironment, worker: Worker, wid: str) -> WorkflowHandle:
    async with worker:
        handle = await env.client.start_workflow(
            Approval, DAY.total_seconds(), id=wid, task_queue="test"
        )
        await wait_until(
            lambda: handle_has(handle, "TimerStarted"), "the approval to start waiting"
        )
        assert await handle.query(Approval.status) == "pending"
    return handle


async def handle_has(handle: WorkflowHandle, event_type: str) -> bool:
    return event_type in await event_types(handle)


async def test_approval_times_out_after_24_hours_and_rejects(
    skipping_env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    env = skipping_env
    handle = await start_approval(env, make_worker(env.client, workflows=[Approval]), "ap-t")
    # The first worker is gone; another takes over while the workflow waits.
    async with make_worker(env.client, workflows=[Approval]):
        assert await handle.query(Approval.status) == "pending"
        await env.sleep(timedelta(hours=23))
        assert await handle.query(Approval.status) == "pending"
        assert (await handle.describe()).status == "running"
        started = time.monotonic()
        assert await handle.result(timeout=10) == {"state": "rejected", "by": "timeout"}
        assert time.monotonic() - started < 5, "a 24-hour wait must pass in test time"
        assert await handle.query(Approval.status) == "rejected"
    history = await handle.history()
    types = [e.type for e in history]
    assert "TimerFired" in types and "SignalReceived" not in types
    elapsed = history[-1].time - history[0].time
    assert DAY <= elapsed < DAY + timedelta(minutes=5)


async def test_approval_approved_before_the_timeout(
    skipping_env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    env = skipping_env
    handle = await start_approval(env, make_worker(env.client, workflows=[Approval]), "ap-a")
    async with make_worker(env.client, workflows=[Approval]):
        await env.sleep(timedelta(hours=20))
        assert await handle.query(Approval.status) == "pending"
    # Two decisions arrive while no worker runs: they are handled in order, the first
    # one stands.
    await handle.signal(Approval.approve, "dana")
    await handle.signal(Approval.reject, "too late")
    async with make_worker(env.client, workflows=[Approval]):
        assert await handle.result(timeout=10) == {"state": "approved", "by": "dana"}
        assert await handle.query(Approval.status) == "approved"
    history = await handle.history()
    types = [e.type for e in history]
    assert "TimerCancelled" in types and "TimerFired" not in types
    assert history[-1].time - history[0].time < DAY


# == continue-as-new =========================================================================
TOTAL_ITEMS = 10_000
PAGE = 500
CHUNK = 100


@activity.defn
async def sum_items(start: int, end: int) -> int:
    return sum(range(start, end))


@dataclasses.dataclass
class Progress:
    offset: int = 0
    total: int = 0
    runs: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)
    finish: bool = False


@workflow.defn
class PagedSum:
    """Sums 10,000 items a page per run, continuing as new between pages; collects notes."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.finish = False

    @workflow.run
    async def run(self, progress: Progress) -> Progress:
        self.notes = progress.notes + self.notes
        self.finish = self.finish or progress.finish
        end = min(progress.offset + PAGE, TOTAL_ITEMS)
        total = progress.total
        for start in range(progress.offset, end, CHUNK):
            total += await workflow.execute_activity(
                sum_items, start, min(start + CHUNK, end), start_to_close_timeout=10
            )
        if end < TOTAL_ITEMS:
            workflow.continue_as_new(
                Progress(end, total, progress.runs + 1, self.notes, self.finish)
            )
        await workflow.wait_condition(lambda: self.finish)
        return Progress(end, total, progress.runs, self.notes, True)

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.signal
    def done(self) -> None:
        self.finish = True


async def test_continue_as_new_pages_through_10000_items(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    client = env.client
    async with make_worker(client, workflows=[PagedSum], activities=[sum_items]):
        first = await client.start_workflow(PagedSum, Progress(), id="paged", task_queue="test")
        latest = client.get_workflow_handle("paged", workflow=PagedSum)
        sent = []
        # Signals spread over the loop: after each one, wait for the workflow to move on.
        for i in range(30):
            before = await latest.describe()
            await latest.signal(PagedSum.note, f"n{i}")
            sent.append(f"n{i}")

            async def moved(before: Any = before) -> bool:
                now = await latest.describe()
                return (now.run_id, now.history_length) != (before.run_id, before.history_length)

            await wait_until(moved, "the workflow to make progress")
        await latest.signal(PagedSum.done)
        result = await first.result(timeout=30)
    assert result.total == sum(range(TOTAL_ITEMS))
    assert result.offset == TOTAL_ITEMS
    assert result.runs == TOTAL_ITEMS // PAGE
    assert result.notes == sent, "signals were lost or reordered across continue-as-new"
    runs = await client.list_workflows(workflow_type="PagedSum")
    assert len(runs) == TOTAL_ITEMS // PAGE
    assert {r.workflow_id for r in runs} == {"paged"}
    statuses = sorted(r.status for r in runs)
    assert statuses == ["completed"] + ["continued_as_new"] * (len(runs) - 1)
    # Each run's history is bounded by the page size, not by the 10,000 items (one run
    # doing all 100 activities would hold 300 events): a run holds its start, three
    # events per activity, the continue-as-new, and two per signal it received.
    bound = 3 + 3 * (PAGE // CHUNK) + 2
    for run in runs:
        history = await client.get_workflow_handle("paged", run_id=run.run_id).history()
        signals = sum(1 for e in history if e.type == "SignalReceived")
        assert len(history) == run.history_length
        assert len(history) <= bound + 2 * signals, [e.type for e in history]


@activity.defn
async def page_of_work() -> int:
    return 1


@workflow.defn
class Rollover:
    """Continues as new right after its activity, without waiting for signal handlers."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.run
    async def run(self, notes: list[str], generation: int) -> list[str]:
        self.notes = notes + self.notes
        if generation == 0:
            await workflow.execute_activity(
                page_of_work, task_queue="acts", start_to_close_timeout=10
            )
            workflow.continue_as_new(list(self.notes), 1)
        await workflow.wait_condition(lambda: "stop" in self.notes)
        return self.notes

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)


async def test_signal_arriving_with_the_last_activity_result_is_not_lost_by_continue_as_new(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    """The activity result and a signal wait in history for the same workflow task.

    The signal came before the run continued as new, so it must be in the next run's
    state: delivered to this run's handler before the code that continues as new runs,
    or carried over to the next run.
    """
    client = env.client
    async with make_worker(client, workflows=[Rollover]):
        handle = await client.start_workflow(Rollover, [], 0, id="roll", task_queue="test")
        await wait_until(lambda: handle_has(handle, "ActivityScheduled"), "the activity")
    # No workflow worker runs now: the activity completes, then the signal arrives.
    async with Worker(client, task_queue="acts", activities=[page_of_work]):
        await wait_until(lambda: handle_has(handle, "ActivityCompleted"), "the activity result")
    await handle.signal(Rollover.note, "during")
    latest = client.get_workflow_handle("roll", workflow=Rollover)
    async with make_worker(client, workflows=[Rollover]):
        await wait_until(
            lambda: _status_is(handle, "continued_as_new"), "the run to continue as new"
        )
        await latest.signal(Rollover.note, "stop")
        assert await handle.result(timeout=10) == ["during", "stop"]


async def _run_count(client: Client, workflow_id: str, count: int) -> bool:
    return len(await runs_of(client, workflow_id)) == count


async def _status_is(handle: WorkflowHandle, status: str) -> bool:
    return (await handle.describe()).status == status


@workflow.defn
class Carrier:
    """Continues as new in its first workflow task; the next run waits for "stop"."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.run
    async def run(self, notes: list[str], generation: int) -> list[str]:
        self.notes = notes + self.notes
        if generation == 0:
            workflow.continue_as_new(list(self.notes), 1)
        await workflow.wait_condition(lambda: self.notes[-1:] in (["stop"], ["roll"]))
        if self.notes[-1] == "roll":
            workflow.continue_as_new(self.notes[:-1], generation + 1)
        return self.notes

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.update
    def add_note(self, text: str) -> int:
        self.notes.append(text)
        return len(self.notes)

    @workflow.query
    def notes_so_far(self) -> list[str]:
        return self.notes


async def test_messages_arriving_during_the_continue_as_new_task_move_to_the_next_run(
    env: WorkflowEnvironment, make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal and an update are recorded after the workflow task that continues as
    new has read its inputs, before it commits: the next run handles both, once."""
    client = env.client
    store = client.store
    latest = client.get_workflow_handle("carry", workflow=Carrier)
    original = store.complete_workflow_task
    original_many = store.complete_workflow_tasks
    update: list[asyncio.Task[Any]] = []

    async def before_commit(completion: Any) -> None:
        if not update and any(t == "WorkflowContinuedAsNew" for t, _ in completion.events):
            await latest.signal(Carrier.note, "late signal")
            update.append(
                asyncio.create_task(latest.execute_update(Carrier.add_note, "late update"))
            )
            run_id = completion.task.run_id
            await wait_until(
                lambda: _has_update_request(store, run_id), "the update request to be stored"
            )

    async def complete(completion: Any, owner: str, now: float) -> Any:
        await before_commit(completion)
        return await original(completion, owner, now)

    async def complete_many(completions: Any, owner: str) -> Any:
        completions = list(completions)
        for completion, _ in completions:
            await before_commit(completion)
        async for outcome in original_many(completions, owner):
            yield outcome

    # Tasks claimed with their history complete together, the others one by one.
    monkeypatch.setattr(store, "complete_workflow_task", complete)
    monkeypatch.setattr(store, "complete_workflow_tasks", complete_many)
    async with make_worker(client, workflows=[Carrier]):
        first = await client.start_workflow(Carrier, [], 0, id="carry", task_queue="test")
        await wait_until(lambda: update, "the workflow task that continues as new")
        assert await asyncio.wait_for(update[0], 10) == 2
        await latest.signal(Carrier.note, "stop")
        assert await first.result(timeout=10) == ["late signal", "late update", "stop"]
    first_history = await first.history()
    assert [e.type for e in first_history][-2:] == [
        "WorkflowContinuedAsNew",
        "WorkflowTaskCompleted",
    ]
    final = await latest.history()
    assert sum(e.type == "UpdateAccepted" for e in final) == 1


async def _has_update_request(store: Any, run_id: str) -> bool:
    return bool(await store.pending_updates(run_id))


async def test_handle_from_start_reaches_the_run_after_continue_as_new(
    env: WorkflowEnvironment, make_worker: MakeWorker
) -> None:
    """The handle start_workflow returned names the first run; messages sent through it
    reach the workflow's current run, and result() is the last run's result."""
    client = env.client
    async with make_worker(client, workflows=[Carrier]):
        first = await client.start_workflow(Carrier, [], 0, id="chain", task_queue="test")
        await wait_until(lambda: _status_is(first, "continued_as_new"), "continue-as-new")
        await first.signal(Carrier.note, "via first")
        assert await first.execute_update(Carrier.add_note, "update via first", id="u1") == 2
        assert await first.query(Carrier.notes_so_far) == ["via first", "update via first"]
        # Continue as new once more, then retry the update: it ran in an earlier run,
        # and runs once.
        await first.signal(Carrier.note, "roll")
        await wait_until(lambda: _run_count(client, "chain", 3), "the third run")
        assert await first.execute_update(Carrier.add_note, "update via first", id="u1") == 2
        latest = client.get_workflow_handle("chain", workflow=Carrier)
        assert await latest.execute_update(Carrier.add_note, "update via first", id="u1") == 2
        assert await first.query(Carrier.notes_so_far) == ["via first", "update via first"]
        await first.signal(Carrier.note, "stop")
        assert await first.result(timeout=10) == ["via first", "update via first", "stop"]
        # The id is reused by an unrelated run: the old handle does not reach it.
        other = await client.start_workflow(Carrier, ["other"], 1, id="chain", task_queue="test")
        with pytest.raises(WorkflowNotFoundError):
            await first.signal(Carrier.note, "stop")
        assert await first.result(timeout=10) == ["via first", "update via first", "stop"]
        await other.signal(Carrier.note, "stop")
        assert await other.result(timeout=10) == ["other", "stop"]


# == workflow id policies, signal-with-start, terminate =========================================
@workflow.defn
class Job:
    def __init__(self) -> None:
        self.outcome = ""
        self.signals: list[str] = []

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: bool(self.outcome))
        if self.outcome == "fail":
            raise ApplicationError("the job failed", non_retryable=True)
        return self.outcome

    @workflow.signal
    def finish(self, outcome: str) -> None:
        self.outcome = outcome

    @workflow.signal
    def poke(self, text: str) -> None:
        self.signals.append(text)

    @workflow.query
    def pokes(self) -> list[str]:
        return self.signals


async def runs_of(client: Client, wid: str) -> list[Any]:
    return [r for r in await client.list_workflows() if r.workflow_id == wid]


async def test_id_conflict_policies(env: WorkflowEnvironment) -> None:
    client = env.client
    async with Worker(client, task_queue="test", workflows=[Job]):
        first = await client.start_workflow(Job, id="job", task_queue="test")
        with pytest.raises(WorkflowAlreadyStartedError, match="already running"):
            await client.start_workflow(Job, id="job", task_queue="test")
        with pytest.raises(WorkflowAlreadyStartedError):
            await client.start_workflow(Job, id="job", task_queue="test", id_conflict_policy="fail")
        assert len(await runs_of(client, "job")) == 1

        same = await client.start_workflow(
            Job, id="job", task_queue="test", id_conflict_policy="use_existing"
        )
        assert same.run_id == first.run_id
        assert len(await runs_of(client, "job")) == 1

        replacement = await client.start_workflow(
            Job, id="job", task_queue="test", id_conflict_policy="terminate_existing"
        )
        assert replacement.run_id != first.run_id
        old = await first.describe()
        assert old.status == "terminated"
        assert (await first.history())[-1].type == "WorkflowTerminated"
        with pytest.raises(WorkflowFailureError, match="terminated"):
            await first.result(timeout=5)
        assert (await replacement.describe()).status == "running"
        await replacement.signal(Job.finish, "second")
        assert await replacement.result(timeout=10) == "second"
        assert len(await runs_of(client, "job")) == 2


async def test_id_reuse_policies(env: WorkflowEnvironment) -> None:
    client = env.client

    async def run_to(wid: str, outcome: str, **options: Any) -> WorkflowHandle:
        handle = await client.start_workflow(Job, id=wid, task_queue="test", **options)
        await handle.signal(Job.finish, outcome)
        with contextlib.suppress(WorkflowFailureError):
            await handle.result(timeout=10)
        return handle

    async with Worker(client, task_queue="test", workflows=[Job]):
        # allow_duplicate (the default): a closed id can run again, whatever its outcome.
        await run_to("dup", "ok")
        await run_to("dup", "ok", id_reuse_policy="allow_duplicate")
        assert len(await runs_of(client, "dup")) == 2

        # reject_duplicate: never again, even after a failure.
        await run_to("rej", "fail")
        with pytest.raises(WorkflowAlreadyStartedError, match="reject_duplicate"):
            await client.start_workflow(
                Job, id="rej", task_queue="test", id_reuse_policy="reject_duplicate"
            )
        assert len(await runs_of(client, "rej")) == 1

        # allow_duplicate_failed_only: again only if the last run did not complete.
        await run_to("fo", "ok")
        with pytest.raises(WorkflowAlreadyStartedError, match="allow_duplicate_failed_only"):
            await client.start_workflow(
                Job, id="fo", task_queue="test", id_reuse_policy="allow_duplicate_failed_only"
            )
        assert len(await runs_of(client, "fo")) == 1
        await run_to("fo2", "fail")
        again = await run_to("fo2", "ok", id_reuse_policy="allow_duplicate_failed_only")
        assert (await again.describe()).status == "completed"
        terminated = await client.start_workflow(Job, id="fo3", task_queue="test")
        await terminated.terminate("operator")
        again = await run_to("fo3", "ok", id_reuse_policy="allow_duplicate_failed_only")
        assert (await again.describe()).status == "completed"
        # A reuse policy does not apply while the id runs: that is the conflict policy.
        running = await client.start_workflow(Job, id="live", task_queue="test")
        with pytest.raises(WorkflowAlreadyStartedError, match="already running"):
            await client.start_workflow(
                Job, id="live", task_queue="test", id_reuse_policy="allow_duplicate"
            )
        await running.terminate()


async def test_signal_with_start(env: WorkflowEnvironment, make_worker: MakeWorker) -> None:
    client = env.client
    async with make_worker(client, workflows=[Job]):
        # A new id: the run starts with the signal already delivered.
        handle = await client.start_workflow(
            Job, id="sws", task_queue="test", start_signal="poke", start_signal_args=["first"]
        )
        await wait_until(lambda: _pokes_equal(handle, ["first"]), "the start signal")
        types = await event_types(handle)
        assert types[0] == "WorkflowStarted" and types[1] == "SignalReceived"
        # The id runs: the signal goes to that run, no new run is started.
        again = await client.start_workflow(
            Job, id="sws", task_queue="test", start_signal="poke", start_signal_args=["second"]
        )
        assert again.run_id == handle.run_id
        await wait_until(
            lambda: _pokes_equal(handle, ["first", "second"]), "the second signal to arrive"
        )
        assert len(await runs_of(client, "sws")) == 1
        await handle.signal(Job.finish, "ok")
        assert await handle.result(timeout=10) == "ok"


async def _pokes_equal(handle: WorkflowHandle, expected: list[str]) -> bool:
    return bool(await handle.query(Job.pokes) == expected)


async def test_terminate_with_reason(env: WorkflowEnvironment, make_worker: MakeWorker) -> None:
    client = env.client
    async with make_worker(client, workflows=[Job]):
        handle = await client.start_workflow(Job, id="term", task_queue="test")
        await handle.signal(Job.poke, "hello")
        await wait_until(lambda: _pokes_equal(handle, ["hello"]), "the signal to be handled")
        await handle.terminate("stuck order, stopped by the operator")
        description = await handle.describe()
        assert description.status == "terminated"
        with pytest.raises(WorkflowFailureError, match="stuck order, stopped by the operator"):
            await handle.result(timeout=5)
        last = (await handle.history())[-1]
        assert last.type == "WorkflowTerminated"
        assert last.data["reason"] == "stuck order, stopped by the operator"
        length = description.history_length
        # A terminated workflow takes no more messages, and nothing is recorded.
        with pytest.raises(WorkflowNotFoundError, match="not running"):
            await handle.signal(Job.finish, "ok")
        with pytest.raises(WorkflowNotFoundError, match="not running"):
            await handle.terminate("again")
        with pytest.raises(WorkflowNotFoundError, match="not running"):
            await handle.cancel()
        # Its final state is still readable.
        assert await handle.query(Job.pokes) == ["hello"]
        assert (await handle.describe()).history_length == length
