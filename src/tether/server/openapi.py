"""The OpenAPI 3.1 document served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from tether._store.base import STATUSES
from tether.server.models import (
    BODY_MODELS,
    MAX_WAIT_SECONDS,
    QueryRequest,
    ReasonRequest,
    SignalRequest,
    SignalWithStartRequest,
    StartWorkflowRequest,
    UpdateRequestBody,
    UpdateWithStartRequest,
)

_ERROR = {"$ref": "#/components/schemas/Error"}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path" or required, "schema": schema}


_NS = _param(
    "namespace", "path", {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}
)
_ID = {
    **_param("workflow_id", "path", {"type": "string", "minLength": 1}),
    "description": "Percent-encode '/' in an id as %2F (an unencoded '/' works too, unless "
    "the id ends like a sub-resource path).",
}
_TIME: dict[str, Any] = {
    "type": "string",
    "description": "ISO 8601 (naive means UTC) or epoch seconds",
}
_FILTERS = [
    {
        **_param("status", "query", {"type": "string", "enum": list(STATUSES)}),
        "description": "Repeat or comma-separate for any of several statuses.",
    },
    _param("type", "query", {"type": "string"}),
    _param("id_prefix", "query", {"type": "string"}),
    _param("started_after", "query", _TIME),
    _param("started_before", "query", _TIME),
    _param("closed_after", "query", _TIME),
    _param("closed_before", "query", _TIME),
    {
        **_param("search_attributes", "query", {"type": "string"}),
        "description": 'A JSON object, e.g. {"customer": "acme"}: each attribute must equal '
        "its string, number or boolean value.",
    },
]
_NAME = _param("name", "path", {"type": "string", "minLength": 1})
_RUN = _param("run_id", "query", {"type": "string"})


def _responses(ok: int, *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        str(ok): {"description": "OK", "content": {"application/json": {"schema": _ANY_OBJECT}}}
    }
    for code in (*errors, 401, 403):
        out[str(code)] = {
            "description": "Error",
            "content": {"application/json": {"schema": _ERROR}},
        }
    return out


def _body(model: type, required: bool = False) -> dict[str, Any]:
    return {
        "required": required,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        },
    }


def _op(
    summary: str,
    op_id: str,
    params: list[dict[str, Any]],
    responses: dict[str, Any],
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "parameters": params,
        "responses": responses,
    }
    if body is not None:
        op["requestBody"] = body
    return op


def build_openapi(version: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        }
    }
    for model in BODY_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    wf = "/api/v1/namespaces/{namespace}/workflows"
    item = wf + "/{workflow_id}"
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("Liveness", "healthz", [], {"200": {"description": "alive"}})},
        "/readyz": {
            "get": _op(
                "Readiness (the store answers)",
                "readyz",
                [],
                {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            )
        },
        wf: {
            "post": _op(
                "Start a workflow",
                "startWorkflow",
                [_NS],
                _responses(201, 400, 409, 413, 422),
                _body(StartWorkflowRequest, True),
            ),
            "get": _op(
                "List workflows matching the filters, newest first, a page at a time",
                "listWorkflows",
                [
                    _NS,
                    *_FILTERS,
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    _param("page_token", "query", {"type": "string"}),
                ],
                _responses(200, 400),
            ),
        },
        "/api/v1/namespaces/{namespace}/workflow-count": {
            "get": _op(
                "Count workflows matching the filters",
                "countWorkflows",
                [_NS, *_FILTERS],
                _responses(200, 400),
            )
        },
        wf + "/signal-with-start": {
            "post": _op(
                "Start a workflow unless it runs, and signal it (one transaction)",
                "signalWithStart",
                [_NS],
                _responses(200, 400, 409, 413, 422),
                _body(SignalWithStartRequest, True),
            )
        },
        wf + "/update-with-start": {
            "post": _op(
                "Start a workflow unless it runs, update it and wait for the result",
                "updateWithStart",
                [_NS],
                _responses(200, 400, 409, 413, 422, 504),
                _body(UpdateWithStartRequest, True),
            )
        },
        item: {
            "get": _op(
                "Describe a workflow",
                "describeWorkflow",
                [_NS, _ID, _RUN],
                _responses(200, 400, 404),
            )
        },
        item + "/result": {
            "get": _op(
                "A workflow's result (long-poll with wait)",
                "workflowResult",
                [
                    _NS,
                    _ID,
                    _RUN,
                    _param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                    ),
                ],
                _responses(200, 400, 404),
            )
        },
        item + "/history": {
            "get": _op(
                "A page of the run's history, or a stream of it (follow)",
                "workflowHistory",
                [
                    _NS,
                    _ID,
                    _RUN,
                    _param("after_seq", "query", {"type": "integer", "minimum": 0}),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    {
                        **_param("follow", "query", {"type": "boolean"}),
                        "description": "Stream the events (newline-delimited JSON, or "
                        "Server-Sent Events with Accept: text/event-stream) until the run "
                        "closes, instead of one page.",
                    },
                ],
                _responses(200, 400, 404),
            )
        },
        item + "/signals/{name}": {
            "post": _op(
                "Signal a workflow",
                "signalWorkflow",
                [_NS, _ID, _NAME, _RUN],
                _responses(202, 400, 404, 413, 422),
                _body(SignalRequest),
            )
        },
        item + "/queries/{name}": {
            "post": _op(
                "Query a workflow (answered by a worker)",
                "queryWorkflow",
                [_NS, _ID, _NAME, _RUN],
                _responses(200, 400, 404, 413, 422, 504),
                _body(QueryRequest),
            )
        },
        item + "/updates/{name}": {
            "post": _op(
                "Update a workflow and wait for the handler's result",
                "updateWorkflow",
                [_NS, _ID, _NAME, _RUN],
                _responses(200, 400, 404, 413, 422, 504),
                _body(UpdateRequestBody),
            )
        },
        item + "/cancel": {
            "post": _op(
                "Request cancellation",
                "cancelWorkflow",
                [_NS, _ID, _RUN],
                _responses(202, 400, 404, 422),
                _body(ReasonRequest),
            )
        },
        item + "/terminate": {
            "post": _op(
                "Terminate at once",
                "terminateWorkflow",
                [_NS, _ID, _RUN],
                _responses(200, 400, 404, 422),
                _body(ReasonRequest),
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tether API", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
