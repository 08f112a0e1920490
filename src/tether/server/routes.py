"""The HTTP API's endpoints: each maps a request onto the ``Client`` API.

Every endpoint goes through ``_endpoint``, which checks the namespace and the API key
and turns Tether's errors into 4xx/5xx JSON answers ``{"error": code, "message": ...}``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether._store.base import STATUSES
from tether.client import Client, WorkflowDescription
from tether.exceptions import (
    InvalidArgumentError,
    NoWorkerResponseError,
    PayloadError,
    QueryFailedError,
    StoreError,
    UnknownWorkflowTypeError,
    UpdateFailedError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
)
from tether.server.models import (
    MAX_WAIT_SECONDS,
    QueryRequest,
    ReasonRequest,
    SignalRequest,
    StartWorkflowRequest,
    UpdateRequestBody,
)
from tether.server.state import ServerState

logger = logging.getLogger("tether.server")

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LIST_LIMIT = 1000
MAX_HISTORY_LIMIT = 1000

Model = TypeVar("Model", bound=pydantic.BaseModel)
Handler = Callable[[Request, Client], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, **self.extra)


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": code, "message": message, **extra}, status, headers=headers)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tether
    return state


def _authorize(request: Request, namespace: str, write: bool) -> None:
    keys = _state(request).api_keys
    if keys is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "unauthenticated",
            "this server needs an API key: send the header 'Authorization: Bearer <key>'",
        )
    key = keys.lookup(secret.strip())
    if key is None:
        raise ApiError(401, "unauthenticated", "the API key is not valid")
    if not key.allows(namespace, write):
        what = "write to" if write and key.allows(namespace, False) else "access"
        raise ApiError(403, "forbidden", f"this API key may not {what} namespace {namespace!r}")


def _endpoint(write: bool) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                namespace = request.path_params["namespace"]
                if not NAMESPACE_RE.match(namespace):
                    raise ApiError(
                        400,
                        "invalid_namespace",
                        "a namespace is 1-128 letters, digits, '.', '_' or '-', starting with "
                        "a letter or digit",
                    )
                _authorize(request, namespace, write)
                return await handler(request, _state(request).client(namespace))
            except ApiError as e:
                return e.response()
            except Exception as e:  # mapped to a status below; unknown ones are 500s
                return _map_error(e)

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return wrap


def _map_error(e: Exception) -> Response:
    if isinstance(e, WorkflowNotFoundError):
        return error_response(404, "not_found", str(e))
    if isinstance(e, WorkflowAlreadyStartedError):
        return error_response(
            409, "already_started", str(e), workflow_id=e.workflow_id, run_id=e.run_id
        )
    if isinstance(e, UnknownWorkflowTypeError):
        return error_response(400, "unknown_workflow_type", str(e))
    if isinstance(e, PayloadError):
        if "over the limit" in str(e):
            return error_response(413, "payload_too_large", str(e))
        return error_response(422, "invalid_payload", str(e))
    if isinstance(e, InvalidArgumentError):
        return error_response(400, "invalid_argument", str(e))
    if isinstance(e, QueryFailedError):
        return error_response(400, "query_failed", str(e))
    if isinstance(e, UpdateFailedError):
        return error_response(400, "update_failed", str(e))
    if isinstance(e, NoWorkerResponseError):
        return error_response(504, "no_worker_response", str(e))
    if isinstance(e, TimeoutError):
        return error_response(504, "timeout", "the store did not answer in time")
    if isinstance(e, StoreError):
        logger.warning("store error: %s", e)
        return error_response(503, "store_unavailable", str(e), retryable=e.retryable)
    logger.exception("internal error")
    return error_response(500, "internal", f"internal error ({type(e).__name__})")


async def _body(request: Request, model: type[Model], required: bool = True) -> Model:
    limit = _state(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, "body_too_large", f"request body is over the limit of {limit} bytes"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_json", "this endpoint needs a JSON object body")
        return model()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
            for err in e.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        raise ApiError(422, "invalid_request", f"invalid request body: {summary}", details=details)


def _query_number(
    request: Request, name: str, default: float, low: float, high: float, integer: bool = False
) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, "invalid_parameter", f"query parameter {name!r} must be {kind}")
    if not (low <= value <= high):
        raise ApiError(
            400,
            "invalid_parameter",
            f"query parameter {name!r} must be between {low:g} and {high:g}",
        )
    return value


def _time(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def describe_json(d: WorkflowDescription) -> dict[str, Any]:
    data = asdict(d)
    data["start_time"] = _time(d.start_time)
    data["close_time"] = _time(d.close_time)
    return data


def _handle(request: Request, client: Client) -> Any:
    run_id = request.query_params.get("run_id") or None
    return client.get_workflow_handle(request.path_params["workflow_id"], run_id=run_id)


# -- endpoints -----------------------------------------------------------------------


@_endpoint(write=True)
async def start_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, StartWorkflowRequest)
    workflow_id = body.workflow_id or str(uuid.uuid4())
    handle = await client.start_workflow(
        body.workflow_type,
        *body.args,
        id=workflow_id,
        task_queue=body.task_queue,
        request_id=body.request_id,
        id_conflict_policy=body.id_conflict_policy,
        id_reuse_policy=body.id_reuse_policy,
        start_signal=body.start_signal,
        start_signal_args=body.start_signal_args,
        memo=body.memo,
        search_attributes=body.search_attributes,
        run_timeout=body.run_timeout,
        execution_timeout=body.execution_timeout,
    )
    return JSONResponse(
        {"namespace": client.namespace, "workflow_id": workflow_id, "run_id": handle.run_id}, 201
    )


@_endpoint(write=False)
async def list_workflows(request: Request, client: Client) -> Response:
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_parameter", f"status must be one of {', '.join(STATUSES)}")
    limit = int(_query_number(request, "limit", 100, 1, MAX_LIST_LIMIT, integer=True))
    runs = await client.list_workflows(
        status=status, workflow_type=request.query_params.get("type") or None, limit=limit
    )
    return JSONResponse({"workflows": [describe_json(r) for r in runs]})


@_endpoint(write=False)
async def describe_workflow(request: Request, client: Client) -> Response:
    return JSONResponse(describe_json(await _handle(request, client).describe()))


@_endpoint(write=False)
async def workflow_result(request: Request, client: Client) -> Response:
    """The result, or ``status: running`` if the run is still open after ``wait`` seconds."""
    wait = _query_number(request, "wait", 0.0, 0.0, MAX_WAIT_SECONDS)
    handle = _handle(request, client)
    description = await handle.describe()  # 404 before any waiting
    if description.status in _OPEN:
        if wait == 0:
            return _running(description)
        try:
            return await _outcome(client, handle, wait)
        except TimeoutError:
            description = await handle.describe()
            if description.status in _OPEN:
                return _running(description)
    return await _outcome(client, handle, 10.0)


_OPEN = ("running", "continued_as_new")


def _running(d: WorkflowDescription) -> Response:
    return JSONResponse({"status": "running", "workflow_id": d.workflow_id, "run_id": d.run_id})


async def _outcome(client: Client, handle: Any, timeout: float) -> Response:
    try:
        result = await handle.result(timeout=timeout)
    except WorkflowFailureError as e:
        d = await client.get_workflow_handle(handle.id, run_id=e.run_id).describe()
        return JSONResponse(
            {
                "status": d.status,
                "workflow_id": handle.id,
                "run_id": e.run_id,
                "failure": d.failure,
            }
        )
    final = await client.get_workflow_handle(handle.id, run_id=handle.run_id).describe()
    return JSONResponse(
        {
            "status": "completed",
            "workflow_id": handle.id,
            "run_id": final.run_id,
            "result": result,
        }
    )


@_endpoint(write=False)
async def workflow_history(request: Request, client: Client) -> Response:
    after = int(_query_number(request, "after_seq", 0, 0, 2**62, integer=True))
    limit = int(_query_number(request, "limit", 100, 1, MAX_HISTORY_LIMIT, integer=True))
    description = await _handle(request, client).describe()
    events = await client.store.read_history(description.run_id, after)
    page = events[:limit]
    more = len(events) > limit
    return JSONResponse(
        {
            "workflow_id": description.workflow_id,
            "run_id": description.run_id,
            "events": [
                {
                    "seq": e.seq,
                    "type": e.type,
                    "time": _dt.datetime.fromtimestamp(e.time, _dt.UTC).isoformat(),
                    "data": e.data,
                }
                for e in page
            ],
            "next_after_seq": page[-1].seq if more and page else None,
        }
    )


@_endpoint(write=True)
async def signal_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, SignalRequest, required=False)
    await _handle(request, client).signal(request.path_params["name"], *body.args)
    return JSONResponse({"ok": True}, 202)


@_endpoint(write=False)
async def query_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, QueryRequest, required=False)
    result = await _handle(request, client).query(
        request.path_params["name"], *body.args, timeout=body.timeout
    )
    return JSONResponse({"result": result})


@_endpoint(write=True)
async def update_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, UpdateRequestBody, required=False)
    result = await _handle(request, client).execute_update(
        request.path_params["name"], *body.args, id=body.update_id, timeout=body.timeout
    )
    return JSONResponse({"result": result})


@_endpoint(write=True)
async def cancel_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, ReasonRequest, required=False)
    await _handle(request, client).cancel(body.reason)
    return JSONResponse({"ok": True}, 202)


@_endpoint(write=True)
async def terminate_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, ReasonRequest, required=False)
    await _handle(request, client).terminate(body.reason)
    return JSONResponse({"ok": True})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await _state(request).check_ready()
    except Exception as e:
        return error_response(503, "not_ready", f"the store is not reachable ({type(e).__name__})")
    return JSONResponse({"status": "ready"})


WF = "/api/v1/namespaces/{namespace}/workflows"

ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route(WF, start_workflow, methods=["POST"]),
    Route(WF, list_workflows, methods=["GET"]),
    Route(WF + "/{workflow_id}", describe_workflow, methods=["GET"]),
    Route(WF + "/{workflow_id}/result", workflow_result, methods=["GET"]),
    Route(WF + "/{workflow_id}/history", workflow_history, methods=["GET"]),
    Route(WF + "/{workflow_id}/signals/{name}", signal_workflow, methods=["POST"]),
    Route(WF + "/{workflow_id}/queries/{name}", query_workflow, methods=["POST"]),
    Route(WF + "/{workflow_id}/updates/{name}", update_workflow, methods=["POST"]),
    Route(WF + "/{workflow_id}/cancel", cancel_workflow, methods=["POST"]),
    Route(WF + "/{workflow_id}/terminate", terminate_workflow, methods=["POST"]),
]
