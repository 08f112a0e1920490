"""The application factory of ``tether server``: ``create_app(url)`` is an ASGI app.

The server is stateless: everything lives in the store, so any number of servers
(and workers) can share one PostgreSQL database. It runs no user code: queries and
updates are written to the store and answered by a worker that has the workflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether._runtime.connection import open_store
from tether.converter import DEFAULT_MAX_PAYLOAD_BYTES
from tether.server.auth import ApiKeys
from tether.server.openapi import build_openapi
from tether.server.routes import ROUTES, error_response
from tether.server.state import ServerState

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def _version() -> str:
    try:
        return version("tether")
    except PackageNotFoundError:
        return "0"


def create_app(
    url: str,
    *,
    api_keys: ApiKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Starlette:
    """An ASGI app serving the HTTP API over the store at ``url``.

    ``api_keys``: when given, every API request needs ``Authorization: Bearer <key>``
    (``/healthz``, ``/readyz`` and ``/openapi.json`` stay open). Bodies over
    ``max_body_bytes`` and arguments over ``max_payload_bytes`` (each) get 413.
    """
    openapi: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await open_store(url)
        app.state.tether = ServerState(store, api_keys, max_body_bytes, max_payload_bytes)
        try:
            yield
        finally:
            await app.state.tether.close()

    async def openapi_json(request: Request) -> Response:
        if not openapi:  # built on first use: a CLI running the app in-process never asks
            openapi.update(build_openapi(_version()))
        return JSONResponse(openapi)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.url.path}"
        return error_response(exc.status_code, code, str(message))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal", f"internal error ({type(exc).__name__})")

    handlers: dict[Any, Any] = {HTTPException: http_error, Exception: server_error}
    return Starlette(
        routes=[Route("/openapi.json", openapi_json, methods=["GET"]), *ROUTES],
        lifespan=lifespan,
        exception_handlers=handlers,
    )
