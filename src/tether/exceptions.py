"""Errors raised by Tether.

The hierarchy, drawn once::

    TetherError
    ├── FailureError                 a failure that is recorded in history and can fail a workflow
    │   ├── ApplicationError         raised by user code; controls retries
    │   ├── TimeoutFailure           an activity ran out of time (start_to_close, heartbeat, ...)
    │   ├── ActivityError            an activity failed for good; ``cause`` says why
    │   ├── ChildWorkflowError       a child workflow did not complete; ``cause`` says why
    │   ├── WorkflowFailureError     client side: the workflow run failed; ``cause`` says why
    │   ├── UpdateFailedError        the update was rejected or its handler raised
    │   └── QueryFailedError         the query handler raised, or there is no such query
    ├── NondeterminismError          replayed workflow code did not match its history
    ├── PayloadError                 a value cannot be serialized, or is too large
    ├── WorkflowAlreadyStartedError  a run with that workflow id is still running
    ├── WorkflowNotFoundError        no run with that id
    ├── UnknownWorkflowTypeError     no worker on the task queue knows that workflow type
    ├── InvalidArgumentError         a call was made with arguments that cannot work
    ├── NoWorkerResponseError        no worker answered a query or update in time
    └── StoreError                   the store could not complete the call
        └── StaleTaskError           the task's lease was lost to another worker

Control flow inside workflows uses ``BaseException`` subclasses (in the runtime)
so that a user's ``except Exception`` cannot swallow them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TetherError(Exception):
    """Base class of every error Tether raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled without calling ``__init__`` again: most subclasses take keyword-only
        # arguments that ``args`` does not hold (errors cross to the SQLite writer process).
        return _restore_error, (type(self), self.args, self.__dict__)


def _restore_error(cls: type[TetherError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class FailureError(TetherError):
    """An error that is recorded in history, survives serialization and can fail a workflow."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stack_trace = ""
        """Where the error was raised, when it was rebuilt from a stored failure."""
        if cause is not None:
            self.__cause__ = cause

    @property
    def cause(self) -> BaseException | None:
        return self.__cause__

    def __str__(self) -> str:
        return self.message


class ApplicationError(FailureError):
    """Raise from activity or workflow code to fail with control over retries.

    ``type`` names the error for ``RetryPolicy.non_retryable_error_types`` (defaults to
    the class name of the original exception when Tether converts one).
    ``non_retryable=True`` stops retries at once; ``next_retry_delay`` overrides the
    retry policy's backoff for the next attempt.
    """

    def __init__(
        self,
        message: str,
        *details: Any,
        type: str | None = None,
        non_retryable: bool = False,
        next_retry_delay: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message, cause=cause)
        self.details: Sequence[Any] = details
        self.type = type or "ApplicationError"
        self.non_retryable = non_retryable
        self.next_retry_delay = next_retry_delay


class TimeoutFailure(FailureError):
    """An activity attempt or an activity as a whole ran out of time.

    ``timeout_type`` is one of ``start_to_close``, ``schedule_to_close``, ``heartbeat``
    or ``worker_lost`` (the worker running it stopped renewing its lease).
    """

    def __init__(
        self, message: str, *, timeout_type: str, last_heartbeat_details: Any = None
    ) -> None:
        super().__init__(message)
        self.timeout_type = timeout_type
        self.last_heartbeat_details = last_heartbeat_details


class ActivityError(FailureError):
    """An activity failed and will not be retried; ``cause`` holds the last attempt's error."""

    def __init__(
        self,
        message: str,
        *,
        activity_type: str,
        activity_seq: int,
        attempt: int,
        retry_state: str,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message, cause=cause)
        self.activity_type = activity_type
        self.activity_seq = activity_seq
        self.attempt = attempt
        self.retry_state = retry_state


class ChildWorkflowError(FailureError):
    """A child workflow failed, was cancelled, terminated, timed out or could not start."""

    def __init__(
        self, message: str, *, workflow_id: str, status: str, cause: BaseException | None = None
    ) -> None:
        super().__init__(message, cause=cause)
        self.workflow_id = workflow_id
        self.status = status


class WorkflowFailureError(FailureError):
    """Raised by ``handle.result()`` when the run failed; ``cause`` is the recorded error."""

    def __init__(self, message: str, *, workflow_id: str, run_id: str, cause: BaseException | None):
        super().__init__(message, cause=cause)
        self.workflow_id = workflow_id
        self.run_id = run_id


class UpdateFailedError(FailureError):
    """An update was rejected (validator, unknown name, bad arguments) or its handler raised."""


class QueryFailedError(FailureError):
    """A query could not be answered: unknown name, bad arguments, or the handler raised."""


class NoWorkerResponseError(TetherError, TimeoutError):
    """No worker for the workflow's task queue answered in time (is one running?)."""


class NondeterminismError(TetherError):
    """Workflow code produced different commands than its history holds.

    The workflow task is retried (the run is not failed), so deploying code that is
    compatible again lets the run continue.
    """


class PayloadError(TetherError, ValueError):
    """A value could not be converted to or from a payload, or exceeds the size limit."""


class WorkflowAlreadyStartedError(TetherError):
    """A run with this workflow id is still running (and the request is not a retry)."""

    def __init__(self, message: str, *, workflow_id: str, run_id: str) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id
        self.run_id = run_id


class WorkflowNotFoundError(TetherError, LookupError):
    """No workflow run matches the given id."""


class UnknownWorkflowTypeError(TetherError, LookupError):
    """Workers serve the task queue but none of them registered this workflow type."""


class InvalidArgumentError(TetherError, ValueError):
    """A call's arguments cannot work (a missing timeout, a bad option value, ...)."""


class StoreError(TetherError):
    """The store could not complete a call. ``retryable`` says whether trying again may work."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StaleTaskError(StoreError):
    """The task was completed or re-leased by someone else; this worker's result is dropped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
