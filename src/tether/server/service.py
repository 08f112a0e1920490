"""Every operation of the HTTP API as a function of a ``Client``, answering JSON-ready data.

The API's endpoints (``routes.py``) and the CLI's direct mode (``tether workflow ... --db``)
both call these, so a command gives the same answer, and the same errors, whether it
goes through a server or straight to the store. Request bodies are the models of
``models.py``; query parameters are parsed here (``ParameterError`` for bad ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import pydantic

from tether._store.base import RUNNING, Event
from tether.client import Client, TimeBound, WorkflowDescription, WorkflowFilters
from tether.exceptions import InvalidArgumentError, WorkflowFailureError
from tether.server.models import (
    SignalWithStartRequest,
    StartFields,
    StartWorkflowRequest,
    UpdateWithStartRequest,
)

MAX_LIST_LIMIT = 1000
MAX_HISTORY_LIMIT = 1000
FOLLOW_POLL_SECONDS = 0.5
"""How often a history follower looks for new events when no change notice comes."""

Model = TypeVar("Model", bound=pydantic.BaseModel)
T = TypeVar("T")
Params = Mapping[str, Sequence[str]]
"""Query parameters: each name with its values (a name may repeat)."""

_OPEN = ("running", "continued_as_new")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class ParameterError(InvalidArgumentError):
    """A query parameter is malformed or out of range (HTTP 400 ``invalid_parameter``)."""


class RequestError(InvalidArgumentError):
    """A request body does not fit its model (HTTP 422 ``invalid_request``)."""

    def __init__(self, message: str, details: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.details = details


def validate(model: type[Model], data: dict[str, Any]) -> Model:
    """``data`` as a request model; ``RequestError`` says which fields are wrong."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
            for err in e.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        raise RequestError(f"invalid request body: {summary}", details) from None


# -- JSON shapes -------------------------------------------------------------------------


def _time(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def describe_json(d: WorkflowDescription) -> dict[str, Any]:
    data = asdict(d)
    data["start_time"] = _time(d.start_time)
    data["close_time"] = _time(d.close_time)
    return data


def event_json(e: Event) -> dict[str, Any]:
    time = _dt.datetime.fromtimestamp(e.time, _dt.UTC).isoformat()
    return {"seq": e.seq, "type": e.type, "time": time, "data": e.data}


# -- query parameters -------------------------------------------------------------------


def param(params: Params, name: str) -> str | None:
    """The parameter's last value, or None when absent or empty."""
    values = params.get(name) or []
    return values[-1] if values and values[-1] != "" else None


def number_param(
    params: Params, name: str, default: float, low: float, high: float, integer: bool = False
) -> float:
    raw = param(params, name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ParameterError(f"query parameter {name!r} must be {kind}") from None
    if not (low <= value <= high):
        raise ParameterError(f"query parameter {name!r} must be between {low:g} and {high:g}")
    return value


def bool_param(params: Params, name: str) -> bool:
    raw = (param(params, name) or "").lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ParameterError(f"query parameter {name!r} must be true or false")


def _time_param(params: Params, name: str) -> TimeBound | None:
    raw = param(params, name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ParameterError(
            f"query parameter {name!r} must be an ISO 8601 time (2024-05-01T12:00:00Z) "
            "or epoch seconds"
        ) from None


def filter_params(params: Params) -> WorkflowFilters:
    """The list/count filters in ``params``: ``status`` (repeated or comma-separated),
    ``type``, ``id_prefix``, ``started_after``/``started_before``/``closed_after``/
    ``closed_before`` (ISO 8601 or epoch seconds) and ``search_attributes`` (a JSON
    object of name -> string, number or boolean)."""
    statuses = [s.strip() for raw in params.get("status") or [] for s in raw.split(",")]
    filters: WorkflowFilters = {
        "status": [s for s in statuses if s],
        "workflow_type": param(params, "type"),
        "workflow_id_prefix": param(params, "id_prefix"),
        "started_after": _time_param(params, "started_after"),
        "started_before": _time_param(params, "started_before"),
        "closed_after": _time_param(params, "closed_after"),
        "closed_before": _time_param(params, "closed_before"),
    }
    raw = param(params, "search_attributes")
    if raw is not None:
        try:
            attributes = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ParameterError(
                f"query parameter 'search_attributes' is not valid JSON ({e.msg}); "
                'send an object such as {"customer": "acme"}'
            ) from None
        if not isinstance(attributes, dict):
            raise ParameterError(
                "query parameter 'search_attributes' must be a JSON object of name -> value"
            )
        filters["search_attributes"] = attributes
    return filters


async def _checked(call: Awaitable[T]) -> T:
    """Await a filtered client call; its argument errors are bad query parameters."""
    try:
        return await call
    except ParameterError:
        raise
    except InvalidArgumentError as e:
        raise ParameterError(str(e)) from None


# -- operations ----------------------------------------------------------------------------


async def start(
    client: Client, body: StartFields, signal: tuple[str, list[Any]] | None
) -> dict[str, Any]:
    workflow_id = body.workflow_id or str(uuid.uuid4())
    handle = await client.start_workflow(
        body.workflow_type,
        *body.args,
        id=workflow_id,
        task_queue=body.task_queue,
        request_id=body.request_id,
        id_conflict_policy=body.id_conflict_policy,
        id_reuse_policy=body.id_reuse_policy,
        start_signal=None if signal is None else signal[0],
        start_signal_args=() if signal is None else signal[1],
        memo=body.memo,
        search_attributes=body.search_attributes,
        run_timeout=body.run_timeout,
        execution_timeout=body.execution_timeout,
    )
    return {"namespace": client.namespace, "workflow_id": workflow_id, "run_id": handle.run_id}


async def start_workflow(client: Client, body: StartWorkflowRequest) -> dict[str, Any]:
    signal = None if body.start_signal is None else (body.start_signal, body.start_signal_args)
    return await start(client, body, signal)


async def signal_with_start(client: Client, body: SignalWithStartRequest) -> dict[str, Any]:
    return await start(client, body, (body.signal, body.signal_args))


async def update_with_start(client: Client, body: UpdateWithStartRequest) -> dict[str, Any]:
    update_id = body.update_id or str(uuid.uuid4())
    result = await client.execute_update_with_start(
        body.workflow_type,
        *body.args,
        id=body.workflow_id,
        task_queue=body.task_queue,
        update=body.update,
        update_args=body.update_args,
        update_id=update_id,
        id_conflict_policy=body.id_conflict_policy,
        timeout=body.timeout,
    )
    return {
        "namespace": client.namespace,
        "workflow_id": body.workflow_id,
        "update_id": update_id,
        "result": result,
    }


async def describe(client: Client, workflow_id: str, run_id: str | None) -> dict[str, Any]:
    return describe_json(await client.get_workflow_handle(workflow_id, run_id=run_id).describe())


async def result(
    client: Client, workflow_id: str, run_id: str | None, wait: float | None
) -> dict[str, Any]:
    """The outcome once the workflow closes (following continue-as-new), or
    ``status: running`` if it is still open after ``wait`` seconds (None: no limit)."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    description = await handle.describe()  # not found: before any waiting
    is_open = description.status in _OPEN
    if is_open and wait == 0:
        return _running(description)
    try:
        value = await handle.result(timeout=wait if is_open else None)
    except TimeoutError:
        return _running(await handle.describe())
    except WorkflowFailureError as e:
        failed = await client.get_workflow_handle(workflow_id, run_id=e.run_id).describe()
        return {
            "status": failed.status,
            "workflow_id": workflow_id,
            "run_id": e.run_id,
            "failure": failed.failure,
            "message": str(e),
        }
    final = await handle.describe()
    return {
        "status": "completed",
        "workflow_id": workflow_id,
        "run_id": final.run_id,
        "result": value,
    }


def _running(d: WorkflowDescription) -> dict[str, Any]:
    return {"status": "running", "workflow_id": d.workflow_id, "run_id": d.run_id}


async def history_page(
    client: Client, workflow_id: str, run_id: str | None, params: Params
) -> dict[str, Any]:
    after = int(number_param(params, "after_seq", 0, 0, 2**62, integer=True))
    limit = int(number_param(params, "limit", 100, 1, MAX_HISTORY_LIMIT, integer=True))
    description = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    events = await client.store.read_history(description.run_id, after)
    page = events[:limit]
    return {
        "workflow_id": description.workflow_id,
        "run_id": description.run_id,
        "events": [event_json(e) for e in page],
        "next_after_seq": page[-1].seq if len(events) > limit and page else None,
    }


async def follow_history(
    client: Client, workflow_id: str, run_id: str | None, after_seq: int = 0
) -> AsyncIterator[dict[str, Any]]:
    """The run's events after ``after_seq``, then each new one as it is recorded, until
    the run closes. Finds the run first (``WorkflowNotFoundError`` before any event)."""
    description = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    return _follow(client, description, after_seq)


async def _follow(
    client: Client, d: WorkflowDescription, after: int
) -> AsyncIterator[dict[str, Any]]:
    store = client.store
    while True:
        change = store.change_waiter()  # any kind: inbound events do not touch HISTORY
        try:
            # The status first: if the run had closed, the events read next are all of them.
            run = await store.get_run(client.namespace, d.workflow_id, d.run_id)
            for event in await store.read_history(d.run_id, after):
                after = event.seq
                yield event_json(event)
            if run.status != RUNNING:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change, FOLLOW_POLL_SECONDS)
        finally:
            change.cancel()  # (else it stays registered with the store)


async def signal(
    client: Client, workflow_id: str, run_id: str | None, name: str, args: list[Any]
) -> dict[str, Any]:
    await client.get_workflow_handle(workflow_id, run_id=run_id).signal(name, *args)
    return {"ok": True}


async def query(
    client: Client,
    workflow_id: str,
    run_id: str | None,
    name: str,
    args: list[Any],
    timeout: float,
) -> dict[str, Any]:
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    return {"result": await handle.query(name, *args, timeout=timeout)}


async def update(
    client: Client,
    workflow_id: str,
    run_id: str | None,
    name: str,
    args: list[Any],
    update_id: str | None,
    timeout: float,
) -> dict[str, Any]:
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    return {"result": await handle.execute_update(name, *args, id=update_id, timeout=timeout)}


async def cancel(
    client: Client, workflow_id: str, run_id: str | None, reason: str
) -> dict[str, Any]:
    await client.get_workflow_handle(workflow_id, run_id=run_id).cancel(reason)
    return {"ok": True}


async def terminate(
    client: Client, workflow_id: str, run_id: str | None, reason: str
) -> dict[str, Any]:
    await client.get_workflow_handle(workflow_id, run_id=run_id).terminate(reason)
    return {"ok": True}


async def list_workflows(client: Client, params: Params) -> dict[str, Any]:
    """One page: ``limit`` (1-1000, default 100) runs, newest first, and the
    ``next_page_token`` to pass as ``page_token`` for the next (None: no more)."""
    limit = int(number_param(params, "limit", 100, 1, MAX_LIST_LIMIT, integer=True))
    page = await _checked(
        client.list_workflows(
            limit=limit, page_token=param(params, "page_token"), **filter_params(params)
        )
    )
    return {
        "workflows": [describe_json(d) for d in page],
        "next_page_token": page.next_page_token,
    }


async def count_workflows(client: Client, params: Params) -> dict[str, Any]:
    return {"count": await _checked(client.count_workflows(**filter_params(params)))}
