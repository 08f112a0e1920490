"""Tether crash-recovery demo: 40 orders, a worker killed with SIGKILL mid-run.

    make demo                      # or: .venv/bin/python examples/order_demo.py

The demo starts a worker in a child process, starts 40 order workflows (charge the
payment, reserve inventory, wait durably for the pickup window, ship: see
``order_app.py``), kills the worker with SIGKILL once about a third of the steps are
done, starts a new worker at once and waits for every order. Then it checks the
side-effect ledger and the recorded histories: every order completed, no step
lost, each step's result recorded once, and exactly the steps whose side effect
had happened but whose result was not yet recorded at the kill ran twice, with
the same idempotency key. It exits non-zero if any check fails.

Everything lives in one SQLite file in a scratch directory (``--dir``), wiped at
the start of each run and kept afterwards for a look. To run the same demo on
PostgreSQL, set one thing, the store URL:

    TETHER_URL=postgresql://postgres@127.0.0.1/test make demo

(each run then uses a namespace of its own in that database).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from order_app import (
    ACTIVITIES,
    LEDGER_ENV,
    STEPS,
    TASK_QUEUE,
    WORKFLOWS,
    Order,
    ProcessOrder,
    Receipt,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tether import Client, Worker, WorkflowFailureError, WorkflowHandle

N_ORDERS = 40
KILL_AFTER_STEPS = N_ORDERS * len(STEPS) // 3
WORKER_IDENTITY = "demo-worker"
"""Fixed, so the restarted worker takes back the dead one's leases at once."""
DEADLINE_SECONDS = 60.0
DEFAULT_DIR = Path(tempfile.gettempdir()) / "tether-order-demo"
URL_ENV = "TETHER_URL"
"""The store URL; unset, the demo uses a SQLite file in its scratch directory."""


def shown(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


# -- the worker process -------------------------------------------------------------------
async def run_worker(url: str) -> None:
    """Serve the order workflows and activities until SIGTERM (or SIGKILL...)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    client = await Client.connect(url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=WORKFLOWS,
        activities=ACTIVITIES,
        identity=WORKER_IDENTITY,
        max_concurrent_activities=8,
    )
    async with worker:
        await stop.wait()
    await client.close()


# -- the demo driver ------------------------------------------------------------------------
@dataclass(frozen=True)
class Effect:
    """One ledger line: a side effect an activity attempt performed."""

    order_id: str
    step: str
    key: str
    attempt: int
    pid: int


def read_ledger(path: Path) -> list[Effect]:
    if not path.exists():
        return []
    effects = []
    for line in path.read_text().splitlines():
        order_id, step, *fields = line.split()
        values = dict(f.split("=", 1) for f in fields)
        effects.append(
            Effect(order_id, step, values["key"], int(values["attempt"]), int(values["pid"]))
        )
    return effects


class WorkerProcess:
    def __init__(self, number: int, url: str, ledger: Path, workdir: Path) -> None:
        self.number = number
        self.log_path = workdir / f"worker-{number}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", url],
            env={**os.environ, LEDGER_ENV: str(ledger)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def snapshot(handles: list[WorkflowHandle]) -> tuple[set[str], set[str]]:
    """From the recorded histories: the idempotency keys (``run_id/seq``) of activities
    scheduled but without a recorded result, and the orders waiting on a timer."""
    keys: set[str] = set()
    sleeping: set[str] = set()
    for handle in handles:
        open_activities: set[int] = set()
        open_timers: set[int] = set()
        for event in await handle.history():
            seq = int(event.data.get("seq", 0))
            if event.type == "ActivityScheduled":
                open_activities.add(seq)
            elif event.type in ("ActivityCompleted", "ActivityFailed"):
                open_activities.discard(seq)
            elif event.type == "TimerStarted":
                open_timers.add(seq)
            elif event.type in ("TimerFired", "TimerCancelled"):
                open_timers.discard(seq)
        keys.update(f"{handle.run_id}/{seq}" for seq in open_activities)
        if open_timers:
            sleeping.add(handle.id)
    return keys, sleeping


@dataclass
class Crash:
    """What the store and the ledger held at the moment worker 1 was killed."""

    pid: int = 0
    steps_done: int = 0
    unfinished: frozenset[str] = frozenset()
    """Scheduled steps without a recorded result (running, queued or awaiting a retry)."""
    effect_unrecorded: frozenset[str] = frozenset()
    """Unfinished steps whose side effect had already happened: these must run again."""
    sleeping: frozenset[str] = frozenset()
    """Orders waiting on their durable pickup-window timer."""


async def drive(workdir: Path, console: Console) -> bool:
    ledger = workdir / "ledger.txt"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    url = os.environ.get(URL_ENV) or f"sqlite:///{workdir / 'orders.db'}"
    # A shared database keeps earlier runs' orders: this run gets a namespace of its own.
    namespace = f"demo-{int(time.time())}" if os.environ.get(URL_ENV) else "default"
    total_steps = N_ORDERS * len(STEPS)
    console.print(
        f"[bold]Tether order demo[/]: {N_ORDERS} orders, each {' -> '.join(STEPS)} "
        "with a durable 1 s wait for the pickup window before shipping.\n"
        f"Store: [cyan]{shown(url)}[/]   side-effect ledger: [cyan]{ledger}[/]"
    )
    start = time.monotonic()

    def say(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - start:5.2f}s[/]  {message}")

    workers = [WorkerProcess(1, url, ledger, workdir)]
    say(f"worker 1 started in a child process (pid {workers[0].pid}, identity {WORKER_IDENTITY!r})")
    client = await Client.connect(url, namespace=namespace)
    orders = [
        Order(f"order-{i:03d}", 1000 + (i * 1237) % 9000, flaky_inventory=i % 4 == 1)
        for i in range(1, N_ORDERS + 1)
    ]
    handles: list[WorkflowHandle] = []

    async def place_orders() -> None:
        # Orders arrive over about two seconds, so the crash finds them at every stage.
        for order in orders:
            handles.append(
                await client.start_workflow(
                    ProcessOrder, order, id=order.order_id, task_queue=TASK_QUEUE
                )
            )
            await asyncio.sleep(0.05)

    crash = Crash()
    placing = asyncio.create_task(place_orders())
    say(
        f"placing {N_ORDERS} orders; {sum(o.flaky_inventory for o in orders)} of them hit a "
        "transient inventory failure and are retried"
    )
    try:
        with Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            steps_bar = progress.add_task("steps done", total=total_steps)
            orders_bar = progress.add_task("orders completed", total=N_ORDERS)
            while True:
                steps_done = len({e.key for e in read_ledger(ledger)})
                runs = await client.list_workflows(workflow_type=ProcessOrder.__name__)
                progress.update(steps_bar, completed=steps_done)
                progress.update(orders_bar, completed=sum(r.status == "completed" for r in runs))
                if not crash.pid and steps_done >= KILL_AFTER_STEPS:
                    crash = await kill_worker(workers[-1], handles, ledger)
                    say(
                        f"[bold red]kill -9 worker 1[/] (pid {crash.pid}) at {crash.steps_done}/"
                        f"{total_steps} steps: {len(crash.unfinished)} scheduled steps "
                        f"unfinished, {len(crash.effect_unrecorded)} of them with their side "
                        f"effect done but no recorded result; {len(crash.sleeping)} orders asleep "
                        "on a durable timer"
                    )
                    workers.append(WorkerProcess(2, url, ledger, workdir))
                    say(
                        f"[bold green]worker 2 started[/] (pid {workers[-1].pid}) with the same "
                        "identity: it takes back worker 1's leases at once"
                    )
                if placing.done() and sum(r.status != "running" for r in runs) == N_ORDERS:
                    say(f"all orders closed in {time.monotonic() - start:.1f} s")
                    break
                if workers[-1].proc.poll() is not None and workers[-1].pid != crash.pid:
                    say(f"[bold red]worker {workers[-1].number} exited on its own[/]")
                    break
                if time.monotonic() - start > DEADLINE_SECONDS:
                    say(f"[bold red]gave up after {DEADLINE_SECONDS:.0f} s[/]")
                    break
                await asyncio.sleep(0.1)
        await placing
        return await report(console, orders, handles, read_ledger(ledger), crash)
    finally:
        placing.cancel()
        for w in workers:
            w.stop()
        await client.close()
        console.print(f"[dim]worker logs, store and ledger kept in {workdir}[/]")


async def kill_worker(victim: WorkerProcess, handles: list[WorkflowHandle], ledger: Path) -> Crash:
    victim.kill()  # SIGKILL: no shutdown, no lease release, no last words
    effects = read_ledger(ledger)
    unfinished, sleeping = await snapshot(handles)
    return Crash(
        pid=victim.pid,
        steps_done=len({e.key for e in effects}),
        unfinished=frozenset(unfinished),
        effect_unrecorded=frozenset(e.key for e in effects if e.key in unfinished),
        sleeping=frozenset(sleeping),
    )


async def report(
    console: Console,
    orders: list[Order],
    handles: list[WorkflowHandle],
    effects: list[Effect],
    crash: Crash,
) -> bool:
    # What the workflows returned.
    receipts: dict[str, Receipt] = {}
    failed: list[str] = []
    for order, handle in zip(orders, handles, strict=False):
        try:
            receipts[order.order_id] = await handle.result(timeout=0.5)
        except WorkflowFailureError as e:
            failed.append(f"{order.order_id} failed: {e}")
        except TimeoutError:
            failed.append(f"{order.order_id} did not finish")
    failed += [f"{o.order_id} was never started" for o in orders[len(handles) :]]
    # What the histories recorded: results per (order, step).
    recorded: Counter[tuple[str, str]] = Counter()
    for order, handle in zip(orders, handles, strict=False):
        types: dict[int, str] = {}
        for event in await handle.history():
            if event.type == "ActivityScheduled":
                types[event.data["seq"]] = event.data["activity_type"]
            elif event.type == "ActivityCompleted":
                recorded[order.order_id, types[event.data["seq"]]] += 1
    # What the ledger saw: side effects per idempotency key.
    by_key: dict[str, list[Effect]] = defaultdict(list)
    keys_by_step: dict[tuple[str, str], set[str]] = defaultdict(set)
    for effect in effects:
        by_key[effect.key].append(effect)
        keys_by_step[effect.order_id, effect.step].add(effect.key)
    expected = [(o.order_id, step) for o in orders for step in STEPS]
    lost = [s for s in expected if not keys_by_step.get(s) or recorded[s] == 0]
    twice = {k for k, es in by_key.items() if len(es) > 1}
    recorded_twice = [s for s in expected if recorded[s] > 1]
    one_charge = sum(
        len(keys_by_step[o.order_id, "charge_payment"]) == 1
        and recorded[o.order_id, "charge_payment"] == 1
        for o in orders
    )
    charge_calls = sum(e.step == "charge_payment" for e in effects)
    flaky = [o for o in orders if o.flaky_inventory]
    retried = sum(
        o.order_id in receipts and receipts[o.order_id].attempts["reserve_inventory"] >= 2
        for o in flaky
    )

    checks: list[tuple[str, str, bool, str]] = [
        (
            "orders completed",
            f"{len(receipts)}/{len(orders)}",
            not failed,
            "all ran to completion across the crash",
        ),
        (
            "steps executed",
            f"{len(by_key)}/{len(expected)}",
            len(by_key) == len(expected),
            f"distinct idempotency keys among {len(effects)} ledger lines",
        ),
        (
            "steps that ran twice",
            str(len(twice)),
            bool(crash.pid) and twice == crash.effect_unrecorded,
            "exactly those with effect done, result unrecorded at the kill",
        ),
        ("steps lost", str(len(lost)), not lost, "must be 0"),
        (
            "results recorded twice",
            str(len(recorded_twice)),
            not recorded_twice,
            "each step's result is in history once",
        ),
        (
            "charges per order",
            f"{one_charge}/{len(orders)} once",
            one_charge == len(orders),
            f"{charge_calls} charge calls, one idempotency key per order",
        ),
        (
            "transient failures retried",
            f"{retried}/{len(flaky)}",
            retried == len(flaky),
            "reserve_inventory failed on attempt 1, then succeeded",
        ),
        (
            "durable timers",
            f"{len(crash.sleeping & receipts.keys())}/{len(crash.sleeping)}",
            bool(crash.pid) and crash.sleeping <= receipts.keys(),
            "orders asleep at the kill woke up on worker 2 and shipped",
        ),
    ]
    table = Table(title="Result")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("", no_wrap=False)
    for check, value, good, note in checks:
        mark = "[green]ok[/]  " if good else "[bold red]FAIL[/]"
        table.add_row(check, value, f"{mark} {note}")
    console.print(table)
    for key in sorted(twice, key=lambda k: by_key[k][0].order_id):
        first = by_key[key][0]
        runs = ", ".join(
            f"worker {1 if e.pid == crash.pid else 2} attempt {e.attempt}" for e in by_key[key]
        )
        console.print(f"  [dim]ran twice:[/] {first.order_id} {first.step} ({runs})")
    console.print(
        "\nActivities run [bold]at least once[/]: a step whose side effect had happened when "
        "its worker died, but whose result was not yet recorded, runs again. The rerun "
        "carries the same [bold]idempotency key[/] (activity.info().idempotency_key, "
        "run id/step), so a payment API that deduplicates by it charges once. Workflow "
        "code is effectively exactly-once: it is replayed from its recorded history, so "
        "no step's result is recorded or acted on twice.\n"
    )
    problems = failed + [f"lost step: {o} {s}" for o, s in lost]
    problems += [f"unexpected rerun: {k}" for k in sorted(twice - crash.effect_unrecorded)]
    problems += [f"expected a rerun: {k}" for k in sorted(crash.effect_unrecorded - twice)]
    for problem in problems:
        console.print(f"  [bold red]{problem}[/]")
    ok = all(good for _, _, good, _ in checks)
    console.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--worker", metavar="URL", help="run as the worker process on URL")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="scratch directory")
    args = parser.parse_args()
    if args.worker:
        asyncio.run(run_worker(args.worker))
        return 0
    console = Console()
    ok = asyncio.run(drive(args.dir.resolve(), console))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
