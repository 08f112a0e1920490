"""Tether: durable execution for Python.

Workflows are ordinary async Python whose every step is recorded in a store; a run
resumes from its last recorded step after a crash. See ``tether.workflow``,
``tether.activity``, ``tether.client`` and ``tether.worker``.
"""

from tether import activity, workflow
from tether.client import Client, HistoryEvent, WorkflowDescription, WorkflowHandle
from tether.common import RetryPolicy
from tether.converter import PayloadConverter
from tether.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    InvalidArgumentError,
    NondeterminismError,
    NoWorkerResponseError,
    PayloadError,
    QueryFailedError,
    StaleTaskError,
    StoreError,
    TetherError,
    TimeoutFailure,
    UnknownWorkflowTypeError,
    UpdateFailedError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
)
from tether.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ActivityError",
    "ApplicationError",
    "ChildWorkflowError",
    "Client",
    "FailureError",
    "HistoryEvent",
    "InvalidArgumentError",
    "NoWorkerResponseError",
    "NondeterminismError",
    "PayloadConverter",
    "PayloadError",
    "QueryFailedError",
    "RetryPolicy",
    "StaleTaskError",
    "StoreError",
    "TetherError",
    "TimeoutFailure",
    "UnknownWorkflowTypeError",
    "UpdateFailedError",
    "Worker",
    "WorkflowAlreadyStartedError",
    "WorkflowDescription",
    "WorkflowFailureError",
    "WorkflowHandle",
    "WorkflowNotFoundError",
    "__version__",
    "activity",
    "workflow",
]
