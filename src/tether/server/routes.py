"""The HTTP API's endpoints: each maps a request onto the ``Client`` API.

Every endpoint goes through ``_endpoint``, which checks the namespace and the API key
and turns Tether's errors into 4xx/5xx JSON answers ``{"error": code, "message": ...}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import Scope

from tether.client import Client
from tether.exceptions import (
    InvalidArgumentError,
    NoWorkerResponseError,
    PayloadError,
    QueryFailedError,
    StoreError,
    UnknownWorkflowTypeError,
    UpdateFailedError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)
from tether.server import service
from tether.server.models import (
    MAX_WAIT_SECONDS,
    QueryRequest,
    ReasonRequest,
    SignalRequest,
    SignalWithStartRequest,
    StartWorkflowRequest,
    UpdateRequestBody,
    UpdateWithStartRequest,
)
from tether.server.state import ServerState

logger = logging.getLogger("tether.server")

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAMESPACE_RULE = (
    "a namespace is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
)

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
                    raise ApiError(400, "invalid_namespace", NAMESPACE_RULE)
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
    if isinstance(e, service.ParameterError):
        return error_response(400, "invalid_parameter", str(e))
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
        return service.validate(model, data)
    except service.RequestError as e:
        raise ApiError(422, "invalid_request", str(e), details=e.details)


def _params(request: Request) -> service.Params:
    query = request.query_params
    return {name: query.getlist(name) for name in query}


def _path(request: Request) -> tuple[str, str | None]:
    """The workflow id of the path and the ``run_id`` query parameter."""
    return request.path_params["workflow_id"], request.query_params.get("run_id") or None


# -- endpoints -----------------------------------------------------------------------


@_endpoint(write=True)
async def start_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, StartWorkflowRequest)
    return JSONResponse(await service.start_workflow(client, body), 201)


@_endpoint(write=True)
async def signal_with_start(request: Request, client: Client) -> Response:
    """Start the workflow unless it runs, and signal it, in one transaction."""
    body = await _body(request, SignalWithStartRequest)
    return JSONResponse(await service.signal_with_start(client, body))


@_endpoint(write=True)
async def update_with_start(request: Request, client: Client) -> Response:
    """Start the workflow unless it runs, update it and wait for the update's result."""
    body = await _body(request, UpdateWithStartRequest)
    return JSONResponse(await service.update_with_start(client, body))


@_endpoint(write=False)
async def list_workflows(request: Request, client: Client) -> Response:
    return JSONResponse(await service.list_workflows(client, _params(request)))


@_endpoint(write=False)
async def count_workflows(request: Request, client: Client) -> Response:
    return JSONResponse(await service.count_workflows(client, _params(request)))


@_endpoint(write=False)
async def describe_workflow(request: Request, client: Client) -> Response:
    return JSONResponse(await service.describe(client, *_path(request)))


@_endpoint(write=False)
async def workflow_result(request: Request, client: Client) -> Response:
    """The result, or ``status: running`` if the run is still open after ``wait`` seconds."""
    wait = service.number_param(_params(request), "wait", 0.0, 0.0, MAX_WAIT_SECONDS)
    return JSONResponse(await service.result(client, *_path(request), wait))


@_endpoint(write=False)
async def workflow_history(request: Request, client: Client) -> Response:
    """A page of history; with ``follow=true`` a stream of events until the run closes:
    newline-delimited JSON, or Server-Sent Events if the client accepts
    ``text/event-stream``."""
    params = _params(request)
    if not service.bool_param(params, "follow"):
        return JSONResponse(await service.history_page(client, *_path(request), params))
    sse = "text/event-stream" in request.headers.get("accept", "")
    if sse and "after_seq" not in params and request.headers.get("last-event-id"):
        params = {**params, "after_seq": [request.headers["last-event-id"]]}  # a reconnect
    after = int(service.number_param(params, "after_seq", 0, 0, 2**62, integer=True))
    events = await service.follow_history(client, *_path(request), after)
    return StreamingResponse(
        _stream(events, sse),
        media_type="text/event-stream" if sse else NDJSON,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


NDJSON = "application/x-ndjson"


async def _stream(events: AsyncIterator[dict[str, Any]], sse: bool) -> AsyncIterator[bytes]:
    """NDJSON: one event per line. SSE: each event a message with its seq as id, then an
    ``end`` event (an ``error`` event if the stream fails)."""

    def frame(data: dict[str, Any], event: str | None = None) -> bytes:
        text = json.dumps(data, separators=(",", ":"), default=str)
        if not sse:
            return text.encode() + b"\n"
        head = f"event: {event}" if event else f"id: {data['seq']}"
        return f"{head}\ndata: {text}\n\n".encode()

    try:
        async for event in events:
            yield frame(event)
    except Exception as e:  # the status line is sent: report in the stream and end it
        logger.warning("history stream ended by %s: %s", type(e).__name__, e)
        yield frame({"error": "stream_failed", "message": str(e)}, "error")
        return
    if sse:
        yield frame({}, "end")


@_endpoint(write=True)
async def signal_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, SignalRequest, required=False)
    name = request.path_params["name"]
    return JSONResponse(await service.signal(client, *_path(request), name, body.args), 202)


@_endpoint(write=False)
async def query_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, QueryRequest, required=False)
    name = request.path_params["name"]
    return JSONResponse(await service.query(client, *_path(request), name, body.args, body.timeout))


@_endpoint(write=True)
async def update_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, UpdateRequestBody, required=False)
    name = request.path_params["name"]
    return JSONResponse(
        await service.update(client, *_path(request), name, body.args, body.update_id, body.timeout)
    )


@_endpoint(write=True)
async def cancel_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, ReasonRequest, required=False)
    return JSONResponse(await service.cancel(client, *_path(request), body.reason), 202)


@_endpoint(write=True)
async def terminate_workflow(request: Request, client: Client) -> Response:
    body = await _body(request, ReasonRequest, required=False)
    return JSONResponse(await service.terminate(client, *_path(request), body.reason))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await _state(request).check_ready()
    except Exception as e:
        return error_response(503, "not_ready", f"the store is not reachable ({type(e).__name__})")
    return JSONResponse({"status": "ready"})


class WorkflowRoute(Route):
    """A route whose path parameters are matched on the raw, still percent-encoded path
    and decoded afterwards, so a workflow id may contain '/': sent as ``%2F`` it is
    always one path parameter; sent as is, the id is everything up to the sub-resource
    (``.../workflows/a/b/result`` is the result of ``a/b``)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        raw = scope.get("raw_path")
        if scope["type"] != "http" or not isinstance(raw, bytes):
            return super().matches(scope)
        path = raw.decode("latin-1")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        match, child = super().matches({**scope, "path": path, "root_path": ""})
        if match is not Match.NONE:
            child["path_params"] = {
                name: unquote_to_bytes(value.encode("latin-1")).decode("utf-8", "replace")
                for name, value in child["path_params"].items()
            }
        return match, child


WF = "/api/v1/namespaces/{namespace}/workflows"
ITEM = WF + "/{workflow_id:path}"

ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    WorkflowRoute(WF, start_workflow, methods=["POST"]),
    WorkflowRoute(WF, list_workflows, methods=["GET"]),
    WorkflowRoute(
        "/api/v1/namespaces/{namespace}/workflow-count", count_workflows, methods=["GET"]
    ),
    WorkflowRoute(WF + "/signal-with-start", signal_with_start, methods=["POST"]),
    WorkflowRoute(WF + "/update-with-start", update_with_start, methods=["POST"]),
    # Sub-resources before the item itself: '{workflow_id:path}' would swallow them.
    WorkflowRoute(ITEM + "/result", workflow_result, methods=["GET"]),
    WorkflowRoute(ITEM + "/history", workflow_history, methods=["GET"]),
    WorkflowRoute(ITEM + "/signals/{name}", signal_workflow, methods=["POST"]),
    WorkflowRoute(ITEM + "/queries/{name}", query_workflow, methods=["POST"]),
    WorkflowRoute(ITEM + "/updates/{name}", update_workflow, methods=["POST"]),
    WorkflowRoute(ITEM + "/cancel", cancel_workflow, methods=["POST"]),
    WorkflowRoute(ITEM + "/terminate", terminate_workflow, methods=["POST"]),
    WorkflowRoute(ITEM, describe_workflow, methods=["GET"]),
]
