"""Activity retries, timeouts and heartbeats, and how failures reach workflows.

Retry backoff and activity timeouts are measured on the worker's wall clock, so the
intervals here are short (0.05-0.6 s) and the assertions allow for a loaded machine:
a gap is never shorter than specified and at most ``SLACK`` seconds longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tether import (
    ActivityError,
    ApplicationError,
    PayloadError,
    RetryPolicy,
    TimeoutFailure,
    Worker,
    WorkflowFailureError,
    activity,
    workflow,
)
from tether._runtime import engine as engine_module
from tether.activity import ActivityCancelled
from tether.testing import ActivityEnvironment, WorkflowEnvironment

SLACK = 0.25
"""How much later than specified a retry or timeout may happen on a busy machine."""

# What activities observed, keyed by workflow id (each test uses its own ids and
# clears its keys first: tests run twice, cached and always-replay).
attempt_starts: dict[str, list[float]] = defaultdict(list)
observed: dict[str, list[Any]] = defaultdict(list)


def _reset(*workflow_ids: str) -> None:
    for wf_id in workflow_ids:
        attempt_starts.pop(wf_id, None)
        observed.pop(wf_id, None)


def _record_start() -> activity.ActivityInfo:
    info = activity.info()
    attempt_starts[info.workflow_id].append(time.monotonic())
    return info


def _gaps(wf_id: str) -> list[float]:
    starts = attempt_starts[wf_id]
    return [b - a for a, b in itertools.pairwise(starts)]


def _assert_gap(gap: float, expected: float, slack: float = SLACK) -> None:
    assert expected <= gap < expected + slack, f"gap {gap:.3f} s, expected {expected} s"


def _failure_summary(error: BaseException) -> dict[str, Any]:
    """What workflow code can see of an ActivityError, as a JSON-friendly dict."""
    assert isinstance(error, ActivityError)
    cause = error.cause
    summary: dict[str, Any] = {
        "error": type(error).__name__,
        "retry_state": error.retry_state,
        "attempt": error.attempt,
        "activity_type": error.activity_type,
        "cause": type(cause).__name__,
        "message": getattr(cause, "message", str(cause)),
    }
    if isinstance(cause, ApplicationError):
        summary["type"] = cause.type
        summary["non_retryable"] = cause.non_retryable
    if isinstance(cause, TimeoutFailure):
        summary["timeout_type"] = cause.timeout_type
        summary["last_heartbeat_details"] = cause.last_heartbeat_details
    return summary


# -- retries and backoff ---------------------------------------------------------------


@activity.defn
async def flaky(fail_times: int) -> int:
    info = _record_start()
    if info.attempt <= fail_times:
        raise ValueError(f"flaky failure on attempt {info.attempt}")
    return info.attempt


@activity.defn
async def always_fails() -> None:
    info = _record_start()
    raise ValueError(f"card declined (attempt {info.attempt})")


BACKOFF = RetryPolicy(
    initial_interval=0.1, backoff_coefficient=2, maximum_interval=0.4, maximum_attempts=5
)


@workflow.defn
class Backoff:
    @workflow.run
    async def run(self, fail_times: int) -> int:
        result: int = await workflow.execute_activity(
            flaky, fail_times, start_to_close_timeout=5, retry_policy=BACKOFF
        )
        return result


async def test_exponential_backoff_intervals(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("backoff")
    async with make_worker(env.client, workflows=[Backoff], activities=[flaky]):
        attempt = await env.client.execute_workflow(Backoff, 4, id="backoff", task_queue="test")
    assert attempt == 5
    gaps = _gaps("backoff")
    assert len(gaps) == 4
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        _assert_gap(gap, expected)


@workflow.defn
class GivesUp:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                always_fails,
                start_to_close_timeout=5,
                retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=3),
            )
        except ActivityError as e:
            return _failure_summary(e)
        raise AssertionError("the activity cannot succeed")


async def test_maximum_attempts_stops_retrying(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("gives-up")
    async with make_worker(env.client, workflows=[GivesUp], activities=[always_fails]):
        summary = await env.client.execute_workflow(GivesUp, id="gives-up", task_queue="test")
    assert len(attempt_starts["gives-up"]) == 3
    assert summary == {
        "error": "ActivityError",
        "retry_state": "maximum_attempts_reached",
        "attempt": 3,
        "activity_type": "always_fails",
        "cause": "ApplicationError",
        "message": "card declined (attempt 3)",
        "type": "ValueError",
        "non_retryable": False,
    }


@activity.defn
async def fails_twice() -> int:
    info = activity.info()
    if info.attempt <= 2:
        raise RuntimeError("not yet")
    return info.attempt


@workflow.defn
class HourlyRetries:
    @workflow.run
    async def run(self) -> list[float]:
        before = workflow.time()
        attempt: int = await workflow.execute_activity(
            fails_twice,
            start_to_close_timeout=5,
            retry_policy=RetryPolicy(initial_interval=3600, backoff_coefficient=2),
        )
        return [attempt, workflow.time() - before]


async def test_long_backoff_passes_instantly_when_time_skips(
    skipping_env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    began = time.monotonic()
    async with make_worker(
        skipping_env.client, workflows=[HourlyRetries], activities=[fails_twice]
    ):
        attempt, waited = await skipping_env.client.execute_workflow(
            HourlyRetries, id="hourly", task_queue="test"
        )
    assert attempt == 3
    assert waited >= 3600 + 7200  # workflow time saw both retry delays pass
    assert time.monotonic() - began < 5


# -- non-retryable errors and next_retry_delay -----------------------------------------------


@activity.defn
async def refuses() -> None:
    _record_start()
    raise ApplicationError("account closed", "acct-9", type="AccountClosed", non_retryable=True)


@activity.defn
async def missing_key() -> None:
    _record_start()
    raise KeyError("sku-42")


@workflow.defn
class NonRetryable:
    @workflow.run
    async def run(self, which: str) -> dict[str, Any]:
        fn = refuses if which == "flag" else missing_key
        policy = RetryPolicy(
            initial_interval=0.05, maximum_attempts=10, non_retryable_error_types=("KeyError",)
        )
        try:
            await workflow.execute_activity(fn, start_to_close_timeout=5, retry_policy=policy)
        except ActivityError as e:
            summary = _failure_summary(e)
            if isinstance(e.cause, ApplicationError):
                summary["details"] = list(e.cause.details)
            return summary
        raise AssertionError("the activity cannot succeed")


async def test_non_retryable_errors_stop_after_one_attempt(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("nr-flag", "nr-type")
    async with make_worker(env.client, workflows=[NonRetryable], activities=[refuses, missing_key]):
        flagged = await env.client.execute_workflow(
            NonRetryable, "flag", id="nr-flag", task_queue="test"
        )
        by_type = await env.client.execute_workflow(
            NonRetryable, "type", id="nr-type", task_queue="test"
        )
    assert len(attempt_starts["nr-flag"]) == 1
    assert flagged["retry_state"] == "non_retryable"
    assert flagged["attempt"] == 1
    assert flagged["cause"] == "ApplicationError"
    assert flagged["type"] == "AccountClosed"
    assert flagged["message"] == "account closed"
    assert flagged["non_retryable"] is True
    assert flagged["details"] == ["acct-9"]

    assert len(attempt_starts["nr-type"]) == 1
    assert by_type["retry_state"] == "non_retryable"
    assert by_type["type"] == "KeyError"
    assert "sku-42" in by_type["message"]


@activity.defn
async def rate_limited() -> str:
    info = _record_start()
    if info.attempt == 1:
        raise ApplicationError("rate limited, retry later", next_retry_delay=1.0)
    if info.attempt == 2:
        raise RuntimeError("plain failure: back to the policy's backoff")
    return "ok"


@workflow.defn
class RetryDelay:
    @workflow.run
    async def run(self) -> str:
        result: str = await workflow.execute_activity(
            rate_limited,
            start_to_close_timeout=5,
            retry_policy=RetryPolicy(initial_interval=0.05, backoff_coefficient=2),
        )
        return result


async def test_next_retry_delay_overrides_backoff(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("retry-delay")
    async with make_worker(env.client, workflows=[RetryDelay], activities=[rate_limited]):
        result = await env.client.execute_workflow(RetryDelay, id="retry-delay", task_queue="test")
    assert result == "ok"
    first, second = _gaps("retry-delay")
    # The delays are far apart, so a busy machine's lateness (up to 0.8 s here) cannot
    # make one look like the other.
    _assert_gap(first, 1.0, slack=0.8)  # the error's next_retry_delay, not the policy's 0.05 s
    _assert_gap(second, 0.1, slack=0.8)  # the policy again (0.05 * 2), not the 1 s override


# -- start_to_close and schedule_to_close timeouts -----------------------------------------------


@activity.defn
async def slow_first_attempt_async() -> int:
    info = _record_start()
    if info.attempt == 1:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            observed[info.workflow_id].append("cancelled")
            raise
    return info.attempt


@activity.defn
def slow_first_attempt_sync() -> int:
    info = _record_start()
    if info.attempt == 1:
        # A thread cannot be interrupted: it learns of the timeout from heartbeat().
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                time.sleep(0.02)
                activity.heartbeat()
        except ActivityCancelled as e:
            observed[info.workflow_id].append(f"cancelled: {e}")
            raise
    return info.attempt


@workflow.defn
class StartToClose:
    @workflow.run
    async def run(self, sync: bool) -> int:
        result: int = await workflow.execute_activity(
            slow_first_attempt_sync if sync else slow_first_attempt_async,
            start_to_close_timeout=0.3,
            retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=3),
        )
        return result


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_start_to_close_timeout_is_retried(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker], sync: bool
) -> None:
    wf_id = f"stc-{sync}"
    _reset(wf_id)
    async with make_worker(
        env.client,
        workflows=[StartToClose],
        activities=[slow_first_attempt_async, slow_first_attempt_sync],
    ):
        attempt = await env.client.execute_workflow(StartToClose, sync, id=wf_id, task_queue="test")
    assert attempt == 2
    # Attempt 1 was stopped at its 0.3 s timeout; attempt 2 followed 0.05 s later.
    (gap,) = _gaps(wf_id)
    _assert_gap(gap, 0.35)
    if sync:
        assert len(observed[wf_id]) == 1
        assert observed[wf_id][0].startswith("cancelled: ")
        assert "start_to_close" in observed[wf_id][0]
    else:
        assert observed[wf_id] == ["cancelled"]


@activity.defn
async def hangs() -> None:
    _record_start()
    await asyncio.sleep(10)


@workflow.defn
class ScheduleToClose:
    @workflow.run
    async def run(self, start_to_close: float | None) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                hangs,
                start_to_close_timeout=start_to_close,
                schedule_to_close_timeout=0.6,
                retry_policy=RetryPolicy(initial_interval=0.05, backoff_coefficient=1),
            )
        except ActivityError as e:
            return _failure_summary(e)
        raise AssertionError("the activity cannot succeed")


@pytest.mark.parametrize("start_to_close", [None, 0.3], ids=["alone", "with-start-to-close"])
async def test_schedule_to_close_caps_total_time(
    env: WorkflowEnvironment,
    make_worker: Callable[..., Worker],
    start_to_close: float | None,
) -> None:
    wf_id = f"s2c-{start_to_close}"
    _reset(wf_id)
    async with make_worker(env.client, workflows=[ScheduleToClose], activities=[hangs]):
        began = time.monotonic()
        summary = await env.client.execute_workflow(
            ScheduleToClose, start_to_close, id=wf_id, task_queue="test"
        )
        elapsed = time.monotonic() - began
    assert 0.6 <= elapsed < 0.6 + 2 * SLACK
    assert summary["retry_state"] == "timeout"
    assert summary["cause"] == "TimeoutFailure"
    assert summary["timeout_type"] == "schedule_to_close"
    assert "schedule_to_close" in summary["message"]
    # Alone: one attempt runs into the cap. With a 0.3 s start_to_close: attempt 1 times
    # out at 0.3 s, attempt 2 starts at 0.35 s and is cut short by the cap at 0.6 s.
    assert len(attempt_starts[wf_id]) == (1 if start_to_close is None else 2)
    assert summary["attempt"] == len(attempt_starts[wf_id])


_code_running = 0
_most_code_running = 0
_code_running_lock = threading.Lock()


@contextlib.contextmanager
def _counted() -> Iterator[None]:
    """Count how many activities' code runs at once, this one included."""
    global _code_running, _most_code_running
    with _code_running_lock:
        _code_running += 1
        _most_code_running = max(_most_code_running, _code_running)
    try:
        yield
    finally:
        with _code_running_lock:
            _code_running -= 1


@activity.defn
def ignores_its_timeout(seconds: float) -> str:
    _record_start()
    with _counted():
        time.sleep(seconds)  # never calls heartbeat(): nothing can stop it early
    return "finished late"


@activity.defn
async def ignores_its_timeout_async(seconds: float) -> str:
    _record_start()
    with _counted():
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                await asyncio.sleep(until - time.monotonic())
            except asyncio.CancelledError:
                pass  # swallowed: it carries on
    return "finished late"


@activity.defn
def quick_sync(label: str) -> str:
    _record_start()
    with _counted():
        time.sleep(0.01)
    return label


@workflow.defn
class AfterAnAttemptGivenUpOn:
    @workflow.run
    async def run(self, sync: bool) -> list[str]:
        once = RetryPolicy(maximum_attempts=1)
        try:
            await workflow.execute_activity(
                ignores_its_timeout if sync else ignores_its_timeout_async,
                1.0,
                start_to_close_timeout=0.2,
                retry_policy=once,
            )
            first = "no timeout"
        except ActivityError as e:
            first = _failure_summary(e)["timeout_type"]
        second: str = await workflow.execute_activity(
            quick_sync, "second", start_to_close_timeout=0.5, retry_policy=once
        )
        return [first, second]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_code_that_outlives_its_timeout_keeps_its_slot_until_it_returns(
    env: WorkflowEnvironment,
    make_worker: Callable[..., Worker],
    sync: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An activity that ignores its timeout goes on: a thread cannot be stopped, and an
    async activity may swallow its cancellation. Its slot stays taken until it returns:
    the next activity waits for the slot and then runs, never more code runs at once
    than the limit allows, and a sync activity does not wait for a thread of the pool
    (sized by the limit) while its own 0.5 s timeout runs out. The slot's return wakes
    the claim at once (the idle poll is made too long to stand in for it)."""
    global _most_code_running
    monkeypatch.setattr(engine_module, "_IDLE_POLL", 30.0)
    wf_id = f"outlives-timeout-{sync}"
    _reset(wf_id)
    _most_code_running = 0
    async with make_worker(
        env.client,
        workflows=[AfterAnAttemptGivenUpOn],
        activities=[ignores_its_timeout, ignores_its_timeout_async, quick_sync],
        max_concurrent_activities=1,
    ) as worker:
        began = time.monotonic()
        result = await env.client.execute_workflow(
            AfterAnAttemptGivenUpOn, sync, id=wf_id, task_queue="test"
        )
    assert result == ["start_to_close", "second"]
    assert _most_code_running == 1
    first, second = attempt_starts[wf_id]
    assert second - first >= 1.0  # only once the first one's code returned
    assert second - began < 1.0 + 2 * SLACK
    assert worker.stats.get("activity_threads_outliving_attempts", 0) == (1 if sync else 0)


# -- heartbeats ----------------------------------------------------------------------------


@activity.defn
async def heartbeats_then_stalls() -> dict[str, Any]:
    info = _record_start()
    if info.attempt == 1:
        for i in range(1, 4):
            activity.heartbeat({"done": i, "cursor": f"page-{i}"})
            await asyncio.sleep(0.05)
        await asyncio.sleep(10)  # stalls: no more heartbeats
    return {"attempt": info.attempt, "details": info.heartbeat_details}


@activity.defn
def heartbeats_then_stalls_sync() -> dict[str, Any]:
    info = _record_start()
    if info.attempt == 1:
        for i in range(1, 4):
            activity.heartbeat({"done": i, "cursor": f"page-{i}"})
            time.sleep(0.05)
        time.sleep(0.8)  # stalls past the 0.3 s heartbeat timeout
        try:
            activity.heartbeat({"done": 99})
        except ActivityCancelled as e:
            observed[info.workflow_id].append(f"cancelled: {e}")
            raise
        observed[info.workflow_id].append("heartbeat after the timeout did not raise")
    return {"attempt": info.attempt, "details": info.heartbeat_details}


@workflow.defn
class Heartbeats:
    @workflow.run
    async def run(self, sync: bool) -> dict[str, Any]:
        result: dict[str, Any] = await workflow.execute_activity(
            heartbeats_then_stalls_sync if sync else heartbeats_then_stalls,
            start_to_close_timeout=5,
            heartbeat_timeout=0.3,
            retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=2),
        )
        return result


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_heartbeat_timeout_and_details_survive_retry(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker], sync: bool
) -> None:
    wf_id = f"hb-{sync}"
    _reset(wf_id)
    async with make_worker(
        env.client,
        workflows=[Heartbeats],
        activities=[heartbeats_then_stalls, heartbeats_then_stalls_sync],
    ):
        result = await env.client.execute_workflow(Heartbeats, sync, id=wf_id, task_queue="test")
    assert result == {"attempt": 2, "details": {"done": 3, "cursor": "page-3"}}
    # The last heartbeat was at ~0.1 s; the attempt timed out 0.3 s later, retried 0.05 s on.
    (gap,) = _gaps(wf_id)
    _assert_gap(gap, 0.1 + 0.3 + 0.05)
    if sync:
        # The stalled thread's next heartbeat told it to stop.
        await _eventually(lambda: len(observed[wf_id]) == 1)
        assert observed[wf_id][0].startswith("cancelled: ")
        assert "heartbeat timeout" in observed[wf_id][0]


async def _eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclasses.dataclass
class Progress:
    page: int
    at: datetime.datetime


@activity.defn
async def fails_after_progress() -> Any:
    info = _record_start()
    if info.attempt == 1:
        activity.heartbeat(Progress(1, datetime.datetime(2030, 1, 2, 3, 4, 5)))
        activity.heartbeat(Progress(2, datetime.datetime(2030, 1, 2, 3, 4, 6)))
        raise ConnectionError("lost the upstream connection")
    return info.heartbeat_details


@workflow.defn
class ProgressSurvivesFailure:
    @workflow.run
    async def run(self) -> Any:
        return await workflow.execute_activity(
            fails_after_progress,
            start_to_close_timeout=5,
            retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=2),
        )


async def test_heartbeat_details_survive_a_failed_attempt(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    """Details are stored as JSON: a dataclass with a datetime comes back in its JSON form."""
    _reset("progress")
    async with make_worker(
        env.client, workflows=[ProgressSurvivesFailure], activities=[fails_after_progress]
    ):
        handle = await env.client.start_workflow(
            ProgressSurvivesFailure, id="progress", task_queue="test"
        )
        details = await handle.result(timeout=10)
    assert details == {"page": 2, "at": "2030-01-02T03:04:06"}
    assert len(attempt_starts["progress"]) == 2


@activity.defn
async def heartbeats_garbage() -> None:
    with socket.socket() as sock:
        try:
            activity.heartbeat({"socket": sock})
        except PayloadError as e:
            observed[activity.info().workflow_id].append(str(e))
            raise


@workflow.defn
class GarbageHeartbeat:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                heartbeats_garbage,
                start_to_close_timeout=5,
                retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=3),
            )
        except ActivityError as e:
            return _failure_summary(e)
        raise AssertionError("the activity cannot succeed")


async def test_unserializable_heartbeat_details_fail_in_the_activity(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("garbage-hb")
    async with make_worker(
        env.client, workflows=[GarbageHeartbeat], activities=[heartbeats_garbage]
    ):
        handle = await env.client.start_workflow(
            GarbageHeartbeat, id="garbage-hb", task_queue="test"
        )
        summary = await handle.result(timeout=10)
    (message,) = observed["garbage-hb"]  # raised by heartbeat(), in the activity
    assert "heartbeat details" in message and "socket" in message
    assert summary["cause"] == "ApplicationError" and summary["type"] == "PayloadError"
    assert summary["retry_state"] == "non_retryable"  # the same value would fail again


@activity.defn
async def stalls_every_time() -> None:
    info = _record_start()
    activity.heartbeat({"attempt": info.attempt, "seen": info.heartbeat_details})
    await asyncio.sleep(10)


@workflow.defn
class HeartbeatGivesUp:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                stalls_every_time,
                start_to_close_timeout=5,
                heartbeat_timeout=0.2,
                retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=2),
            )
        except ActivityError as e:
            return _failure_summary(e)
        raise AssertionError("the activity cannot succeed")


async def test_heartbeat_timeout_reaches_workflow_as_timeout_failure(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    _reset("hb-gives-up")
    async with make_worker(
        env.client, workflows=[HeartbeatGivesUp], activities=[stalls_every_time]
    ):
        summary = await env.client.execute_workflow(
            HeartbeatGivesUp, id="hb-gives-up", task_queue="test"
        )
    assert summary["retry_state"] == "maximum_attempts_reached"
    assert summary["attempt"] == 2
    assert summary["cause"] == "TimeoutFailure"
    assert summary["timeout_type"] == "heartbeat"
    assert "heartbeat timeout (0.2 s)" in summary["message"]
    # The last details, which attempt 2 reported after seeing attempt 1's.
    assert summary["last_heartbeat_details"] == {
        "attempt": 2,
        "seen": {"attempt": 1, "seen": None},
    }


# -- failures as typed errors, caught and uncaught ---------------------------------------------


@activity.defn
async def charge_card(amount: int) -> None:
    try:
        raise ConnectionResetError("gateway hung up")
    except ConnectionResetError as e:
        raise ValueError(f"card declined for {amount} cents") from e


@workflow.defn
class CatchesFailure:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                charge_card,
                100,
                start_to_close_timeout=5,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as e:
            cause = e.cause
            assert isinstance(cause, ApplicationError)
            assert not isinstance(e, ValueError)  # typed failure, not the raw exception
            root = cause.cause
            return {
                "root": [type(root).__name__, getattr(root, "type", None), str(root)],
                "retry_state": e.retry_state,
                "type": cause.type,
                "message": cause.message,
                "has_stack": "ValueError" in cause.stack_trace,
                "str": str(e),
            }
        raise AssertionError("the activity cannot succeed")


@workflow.defn
class LetsFailureEscape:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(
            charge_card, 250, start_to_close_timeout=5, retry_policy=RetryPolicy(maximum_attempts=1)
        )


async def test_activity_failure_caught_in_workflow(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[CatchesFailure], activities=[charge_card]):
        seen = await env.client.execute_workflow(CatchesFailure, id="catches", task_queue="test")
    assert seen["retry_state"] == "maximum_attempts_reached"
    assert seen["type"] == "ValueError"
    assert seen["message"] == "card declined for 100 cents"
    assert seen["has_stack"] is True
    assert seen["root"] == ["ApplicationError", "ConnectionResetError", "gateway hung up"]
    assert "charge_card" in seen["str"] and "card declined for 100 cents" in seen["str"]


async def test_uncaught_activity_failure_fails_the_run(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    async with make_worker(env.client, workflows=[LetsFailureEscape], activities=[charge_card]):
        handle = await env.client.start_workflow(LetsFailureEscape, id="escapes", task_queue="test")
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result(timeout=10)
    error = caught.value
    assert error.workflow_id == "escapes" and error.run_id == handle.run_id
    activity_error = error.cause
    assert isinstance(activity_error, ActivityError)
    assert activity_error.activity_type == "charge_card"
    assert activity_error.retry_state == "maximum_attempts_reached"
    application_error = activity_error.cause
    assert isinstance(application_error, ApplicationError)
    assert application_error.type == "ValueError"
    assert application_error.message == "card declined for 250 cents"
    root = application_error.cause  # the activity's own ``raise ... from`` chain
    assert isinstance(root, ApplicationError)
    assert root.type == "ConnectionResetError" and root.message == "gateway hung up"
    assert "card declined for 250 cents" in str(error)

    description = await handle.describe()
    assert description.status == "failed"
    assert description.close_time is not None
    assert description.failure is not None
    assert description.failure["type"] == "ActivityError"
    assert description.failure["cause"]["type"] == "ValueError"
    assert [e.type for e in await handle.history()][-2:] == [
        "WorkflowFailed",
        "WorkflowTaskCompleted",
    ]


# -- ActivityEnvironment -----------------------------------------------------------------------


@activity.defn
async def copy_pages(pages: int) -> str:
    info = activity.info()
    start = info.heartbeat_details["next"] if info.heartbeat_details else 0
    for page in range(start, pages):
        activity.heartbeat({"next": page + 1})
    return f"{info.activity_type}: copied {pages - start} pages (attempt {info.attempt})"


@activity.defn
def copy_pages_sync(pages: int) -> int:
    for page in range(pages):
        activity.heartbeat(page)
    return threading.get_ident()


@activity.defn
async def copy_forever() -> int:
    copied = 0
    while True:
        activity.heartbeat(copied)
        copied += 1
        await asyncio.sleep(0.01)


async def test_activity_environment_runs_and_records_heartbeats() -> None:
    env = ActivityEnvironment()
    assert await env.run(copy_pages, 3) == "test: copied 3 pages (attempt 1)"
    assert env.heartbeats == [{"next": 1}, {"next": 2}, {"next": 3}]

    resumed = ActivityEnvironment(
        dataclasses.replace(env.info, attempt=2, heartbeat_details={"next": 2})
    )
    assert await resumed.run(copy_pages, 3) == "test: copied 1 pages (attempt 2)"
    assert resumed.heartbeats == [{"next": 3}]

    sync_env = ActivityEnvironment()
    thread = await sync_env.run(copy_pages_sync, 2)
    assert thread != threading.get_ident()  # ran in a worker thread
    assert sync_env.heartbeats == [0, 1]

    with pytest.raises(RuntimeError, match="only be called from activity code"):
        activity.heartbeat()


async def test_activity_environment_cancel_makes_heartbeat_raise() -> None:
    env = ActivityEnvironment()
    running = asyncio.create_task(env.run(copy_forever))
    await _eventually(lambda: len(env.heartbeats) >= 3)
    env.cancel("stop copying")
    with pytest.raises(ActivityCancelled, match="stop copying"):
        await asyncio.wait_for(running, 2)
    count = len(env.heartbeats)
    assert env.heartbeats == list(range(count))

    # Cancelled before it starts: the first heartbeat raises.
    early = ActivityEnvironment()
    early.cancel()
    with pytest.raises(ActivityCancelled):
        await early.run(copy_pages_sync, 2)
    assert early.heartbeats == []


# -- several workers in one process ------------------------------------------------------------


@activity.defn
async def takes_a_while() -> int:
    info = _record_start()
    await asyncio.sleep(0.5)
    return info.attempt


@workflow.defn
class OneSlowStep:
    @workflow.run
    async def run(self) -> int:
        result: int = await workflow.execute_activity(
            takes_a_while, start_to_close_timeout=5, retry_policy=RetryPolicy(initial_interval=0.05)
        )
        return result


async def test_starting_another_worker_does_not_steal_running_activities(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker]
) -> None:
    """A worker starting up takes back leases held under its own identity; a sibling
    worker in the same process (default identities) must not lose its running attempt."""
    _reset("no-steal")
    async with make_worker(env.client, workflows=[OneSlowStep], activities=[takes_a_while]):
        handle = await env.client.start_workflow(OneSlowStep, id="no-steal", task_queue="test")
        await _eventually(lambda: len(attempt_starts["no-steal"]) == 1)
        async with make_worker(env.client, activities=[takes_a_while]):
            attempt = await handle.result(timeout=10)
    assert attempt == 1
    assert len(attempt_starts["no-steal"]) == 1


@workflow.defn
class SignalsThenCalls:
    def __init__(self) -> None:
        self.pokes = 0

    @workflow.signal
    def poke(self) -> None:
        self.pokes += 1

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.pokes >= 70)
        return await workflow.execute_activity(flaky, 0, start_to_close_timeout=10)


async def test_a_completion_failing_unexpectedly_gives_back_its_activity_slots(
    env: WorkflowEnvironment, make_worker: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """A workflow task whose completion fails with an error that is not the store's
    (a bug) is reported, and the activity slots it held for its eager activities are
    given back: the worker does not lose capacity for good. The task runs again once
    its lease lapses."""
    _reset("slots")
    handle = await env.client.start_workflow(SignalsThenCalls, id="slots", task_queue="test")
    for _ in range(70):  # a history too long to come with the claim: the task reads it
        await handle.signal(SignalsThenCalls.poke)
    async with make_worker(
        env.client, workflows=[SignalsThenCalls], activities=[flaky], lease_duration=1.0
    ) as worker:
        store = env.client.store
        complete = store.complete_workflow_task
        failed: list[bool] = []

        async def fails_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RuntimeError("a bug in recording the task")
            return await complete(*args, **kwargs)

        store.complete_workflow_task = fails_once  # type: ignore[method-assign]
        try:
            assert await handle.result(timeout=30) == 1
        finally:
            store.complete_workflow_task = complete  # type: ignore[method-assign]
        assert failed
        assert worker._engine._activity_slots_reserved == 0
        assert "a bug in recording the task" in caplog.text
