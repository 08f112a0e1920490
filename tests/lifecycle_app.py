"""A worker program for the real-process lifecycle tests (``tests/test_lifecycle.py``).

Run as ``python tests/lifecycle_app.py DB_PATH --identity ID [--lease-duration S]
[--ready-file PATH]``. It runs one worker on task queue ``lifecycle`` until SIGTERM or
SIGINT, or until the test kills it with SIGKILL.

``Transfer`` is a money-transfer saga whose activities append one line per attempt to
a ledger file (one ``O_APPEND`` write, fsynced): ``<kind> <idempotency key> <attempt>``.
The deposit waits (heartbeating) until a gate file exists, so a test can kill the
worker between the withdrawal and the deposit. ``Approval`` waits for an approve or
reject signal, with a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import worker_process
from tether import RetryPolicy, activity, workflow

TASK_QUEUE = "lifecycle"


@dataclasses.dataclass
class TransferRequest:
    ledger: str
    gate: str
    amount: int


def append_line(path: str, line: str) -> None:
    """Append one line atomically (a single O_APPEND write) and make it durable."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(req: TransferRequest, kind: str) -> None:
    info = activity.info()
    append_line(req.ledger, f"{kind} {info.idempotency_key} {info.attempt}")


@activity.defn
async def withdraw(req: TransferRequest) -> str:
    _record(req, "withdraw")
    return "withdrawn"


@activity.defn
async def deposit(req: TransferRequest) -> str:
    _record(req, "deposit-attempt")
    while not os.path.exists(req.gate):
        activity.heartbeat()
        await asyncio.sleep(0.01)
    _record(req, "deposit")
    return "deposited"


@workflow.defn
class Transfer:
    @workflow.run
    async def run(self, req: TransferRequest) -> str:
        fast_retries = RetryPolicy(initial_interval=0.05)
        withdrawn = await workflow.execute_activity(
            withdraw, req, start_to_close_timeout=30, retry_policy=fast_retries
        )
        deposited = await workflow.execute_activity(
            deposit, req, start_to_close_timeout=60, retry_policy=fast_retries
        )
        return f"{withdrawn}+{deposited}"


@workflow.defn
class Approval:
    """Waits for a decision; ``timeout`` seconds without one reject the request."""

    def __init__(self) -> None:
        self.state = "pending"
        self.decided_by = ""

    @workflow.run
    async def run(self, timeout: float) -> dict[str, str]:
        try:
            await workflow.wait_condition(lambda: self.state != "pending", timeout=timeout)
        except TimeoutError:
            self.state, self.decided_by = "rejected", "timeout"
        return {"state": self.state, "by": self.decided_by}

    @workflow.signal
    def approve(self, by: str) -> None:
        if self.state == "pending":
            self.state, self.decided_by = "approved", by

    @workflow.signal
    def reject(self, by: str) -> None:
        if self.state == "pending":
            self.state, self.decided_by = "rejected", by

    @workflow.query
    def status(self) -> str:
        return self.state


def main(argv: list[str] | None = None) -> None:
    worker_process.main(
        task_queue=TASK_QUEUE,
        workflows=[Transfer, Approval],
        activities=[withdraw, deposit],
        lease_duration=1.0,
        description=__doc__,
        argv=argv,
    )


if __name__ == "__main__":
    main()
