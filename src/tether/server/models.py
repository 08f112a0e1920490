"""Request bodies of the HTTP API (validated strictly; their JSON schemas feed OpenAPI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_WAIT_SECONDS = 60.0
"""The longest a single request may block (result long-poll, query, update)."""


class _Body(BaseModel):
    # defer_build: a model's validator is built when first used, not at import time.
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)


ConflictPolicy = Literal["fail", "use_existing", "terminate_existing"]


class StartFields(_Body):
    workflow_type: str = Field(min_length=1, max_length=1000)
    task_queue: str = Field(min_length=1, max_length=1000)
    workflow_id: str | None = Field(
        default=None, min_length=1, max_length=1000, description="Generated if omitted."
    )
    args: list[Any] = Field(default_factory=list, description="JSON arguments of the run.")
    request_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="Makes a retried start idempotent."
    )
    id_conflict_policy: ConflictPolicy | None = None
    id_reuse_policy: Literal[
        "allow_duplicate", "allow_duplicate_failed_only", "reject_duplicate"
    ] = "allow_duplicate"
    memo: dict[str, Any] | None = None
    search_attributes: dict[str, Any] | None = None
    run_timeout: float | None = Field(default=None, ge=0)
    execution_timeout: float | None = Field(default=None, ge=0)


class StartWorkflowRequest(StartFields):
    start_signal: str | None = Field(
        default=None,
        min_length=1,
        description="Signal-with-start: the signal's name (see also /signal-with-start).",
    )
    start_signal_args: list[Any] = Field(default_factory=list)


class SignalWithStartRequest(StartFields):
    """Start the workflow unless it runs, and signal it, in one transaction (the id
    conflict policy defaults to ``use_existing``)."""

    signal: str = Field(min_length=1, max_length=1000, description="The signal's name.")
    signal_args: list[Any] = Field(default_factory=list)


class UpdateWithStartRequest(_Body):
    """Start the workflow unless it runs (``use_existing``), send it an update in the same
    transaction and wait for the handler's result."""

    workflow_type: str = Field(min_length=1, max_length=1000)
    task_queue: str = Field(min_length=1, max_length=1000)
    workflow_id: str = Field(min_length=1, max_length=1000)
    args: list[Any] = Field(default_factory=list, description="JSON arguments of the run.")
    id_conflict_policy: ConflictPolicy = "use_existing"
    update: str = Field(min_length=1, max_length=1000, description="The update's name.")
    update_args: list[Any] = Field(default_factory=list)
    update_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="Deduplicates retries."
    )
    timeout: float = Field(default=30.0, gt=0, le=MAX_WAIT_SECONDS)


class SignalRequest(_Body):
    args: list[Any] = Field(default_factory=list)


class QueryRequest(_Body):
    args: list[Any] = Field(default_factory=list)
    timeout: float = Field(default=10.0, gt=0, le=MAX_WAIT_SECONDS)


class UpdateRequestBody(_Body):
    args: list[Any] = Field(default_factory=list)
    update_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="Deduplicates retries."
    )
    timeout: float = Field(default=30.0, gt=0, le=MAX_WAIT_SECONDS)


class ReasonRequest(_Body):
    reason: str = Field(default="", max_length=10_000)


BODY_MODELS: list[type[BaseModel]] = [
    StartWorkflowRequest,
    SignalWithStartRequest,
    UpdateWithStartRequest,
    SignalRequest,
    QueryRequest,
    UpdateRequestBody,
    ReasonRequest,
]
