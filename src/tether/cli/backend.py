"""Where ``tether workflow ...`` sends its requests: to a ``tether server`` (``--address``)
or straight to a store (``--db``), where the API's app runs in-process. Either way the
command sends the same API requests and reads the same answers, so both modes print the
same output and fail with the same messages and exit codes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import json
import urllib.parse
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from tether.cli.common import EXIT_FAILED, EXIT_USAGE, OUTPUTS, CliError, cli_error
from tether.exceptions import TetherError

F = TypeVar("F", bound=Callable[..., Any])

USAGE_ERRORS = frozenset(
    {
        "invalid_json",
        "invalid_request",
        "invalid_parameter",
        "invalid_argument",
        "invalid_namespace",
        "invalid_payload",
        "unknown_workflow_type",
        "payload_too_large",
        "body_too_large",
    }
)
"""The API's error codes that mean the request itself was wrong: exit code 2."""

HTTP_SLACK = 15.0
"""Seconds an HTTP request may take beyond the wait it asks the server for."""


class Backend(abc.ABC):
    """Sends API requests; ``call`` answers an endpoint's JSON or raises ``CliError``.

    ``path`` is a list of segments after ``/api/v1/namespaces/{namespace}/``; each is
    percent-encoded here, so a workflow id may contain '/'.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    @abc.abstractmethod
    def _send(
        self, method: str, target: str, body: bytes | None, timeout: float | None
    ) -> contextlib.AbstractContextManager[tuple[int, Iterator[bytes]]]:
        """Send one request (``target`` is the path and query); the status and body chunks."""

    def _target(self, path: list[str], params: dict[str, list[str]] | None) -> str:
        segments = "/".join(urllib.parse.quote(p, safe="") for p in path)
        namespace = urllib.parse.quote(self.namespace, safe="")
        target = f"/api/v1/namespaces/{namespace}/{segments}"
        if params:
            target += "?" + urllib.parse.urlencode(params, doseq=True)
        return target

    def call(
        self,
        method: str,
        path: list[str],
        params: dict[str, list[str]] | None = None,
        body: dict[str, Any] | None = None,
        wait: float = 0.0,
    ) -> Any:
        """The answer of ``method path``; ``wait``: seconds the server may hold the request."""
        if method == "POST" and body is None:
            body = {}
        data = None if body is None else json.dumps(body).encode()
        with self._send(method, self._target(path, params), data, wait + HTTP_SLACK) as (
            status,
            chunks,
        ):
            return _answer(status, b"".join(chunks))

    def stream(self, workflow_id: str, run_id: str | None, after_seq: int) -> Iterator[Any]:
        """A history's events as the server streams them (``follow=true``)."""
        params = {"follow": ["true"], "after_seq": [str(after_seq)]}
        if run_id:
            params["run_id"] = [run_id]
        target = self._target(["workflows", workflow_id, "history"], params)
        with self._send("GET", target, None, None) as (status, chunks):
            if status >= 400:
                _answer(status, b"".join(chunks))
            pending = b""
            for chunk in chunks:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        if "error" in event:
                            raise CliError(event.get("message") or "the history stream failed")
                        yield event

    def close(self) -> None:  # noqa: B027 (nothing to release unless a backend holds some)
        """Release what the backend holds (the in-process app's event loop, say)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer(status: int, raw: bytes) -> Any:
    """The JSON of a successful answer; ``CliError`` with the API's message otherwise."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if status < 400 and isinstance(answer, dict | list):
        return answer
    if isinstance(answer, dict) and "error" in answer and "message" in answer:
        code = str(answer["error"])
        raise CliError(str(answer["message"]), EXIT_USAGE if code in USAGE_ERRORS else EXIT_FAILED)
    raise CliError(f"unexpected answer from the server (HTTP {status})")


class LocalBackend(Backend):
    """The HTTP API's app run in-process on the store (``--db``): no server, no sockets,
    and the same answers a ``tether server`` on that store would give."""

    def __init__(self, url: str, namespace: str) -> None:
        from tether.server import create_app

        super().__init__(namespace)
        self._app = create_app(url)
        self._runner = asyncio.Runner()
        self._lifespan = self._app.router.lifespan_context(self._app)
        try:
            self._runner.run(self._lifespan.__aenter__())
        except BaseException as e:
            self._runner.close()
            if isinstance(e, TetherError):
                raise cli_error(e) from None
            raise

    def close(self) -> None:
        try:
            self._runner.run(self._lifespan.__aexit__(None, None, None))
        finally:
            self._runner.close()

    @contextlib.contextmanager
    def _send(
        self, method: str, target: str, body: bytes | None, timeout: float | None
    ) -> Iterator[tuple[int, Iterator[bytes]]]:
        path, _, query = target.partition("?")
        messages: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        done = asyncio.Event()
        request: dict[str, Any] | None = {
            "type": "http.request",
            "body": body or b"",
            "more_body": False,
        }

        async def receive() -> dict[str, Any]:
            nonlocal request
            if request is not None:
                message, request = request, None
                return message
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await messages.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": urllib.parse.unquote(path),
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(b"host", b"local"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 0),
            "server": ("local", 0),
        }
        app = self._runner.get_loop().create_task(self._app(scope, receive, send))

        async def next_message() -> MutableMapping[str, Any] | None:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait([getter, app], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()
            app.result()  # the app failed: raise its error
            return None

        def chunks() -> Iterator[bytes]:
            while True:
                message = self._runner.run(next_message())
                if message is None:
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        try:
            start = self._runner.run(next_message())
            if start is None:
                raise CliError("the API answered nothing")
            yield int(start["status"]), chunks()
        finally:
            done.set()
            if not app.done():
                app.cancel()
            with contextlib.suppress(BaseException):
                self._runner.run(asyncio.wait([app]))


class HttpBackend(Backend):
    """Calls a ``tether server``'s HTTP API (API key from ``--api-key``/``TETHER_API_KEY``)."""

    def __init__(self, address: str, namespace: str, api_key: str | None) -> None:
        parts = urllib.parse.urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(
                f"--address must be an http:// or https:// URL (got {address!r})", EXIT_USAGE
            )
        super().__init__(namespace)
        self.address = address.rstrip("/")
        self._api_key = api_key

    @contextlib.contextmanager
    def _send(
        self, method: str, target: str, body: bytes | None, timeout: float | None
    ) -> Iterator[tuple[int, Iterator[bytes]]]:
        import urllib.error
        import urllib.request

        headers = {"Accept": "application/json", "User-Agent": "tether-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.address + target, data=body, method=method, headers=headers
        )
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            response = e  # an error answer: its status and JSON body
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach the Tether server at {self.address}: {reason}") from None
        with response:
            try:
                yield response.status, iter(lambda: response.read1(65536), b"")
            except OSError as e:  # the connection broke or timed out while reading
                raise CliError(f"lost the Tether server at {self.address}: {e}") from None


@dataclass
class Target:
    """Where a command goes and how it prints (the options of ``connection_options``)."""

    db: str | None
    address: str | None
    api_key: str | None
    namespace: str
    output: str

    def open(self) -> Backend:
        if self.address:
            return HttpBackend(self.address, self.namespace, self.api_key)
        assert self.db is not None
        return LocalBackend(self.db, self.namespace)


def _namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from tether.server.routes import NAMESPACE_RE, NAMESPACE_RULE

    if not NAMESPACE_RE.match(value):
        raise click.BadParameter(NAMESPACE_RULE)
    return value


def connection_options(fn: F) -> F:
    """``--db``/``--address``/``--api-key``/``--namespace``/``-o``, given to the command as
    one ``target: Target`` argument."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        db: str | None,
        address: str | None,
        api_key: str | None,
        namespace: str,
        output: str,
        **kwargs: Any,
    ) -> Any:
        ctx = click.get_current_context()
        if db and address:
            given = {
                name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
                for name in ("db", "address")
            }
            if given["db"] == given["address"]:
                raise click.UsageError("give --db (a store) or --address (a server), not both")
            db, address = (db, None) if given["db"] else (None, address)
        if not db and not address:
            raise click.UsageError(
                "say where the workflows are: --db URL (a store) or --address URL "
                "(a tether server), or set TETHER_DB or TETHER_ADDRESS"
            )
        target = Target(db, address, api_key, namespace, output)
        return fn(*args, target=target, **kwargs)

    for option in reversed(
        [
            click.option(
                "--db",
                metavar="URL",
                envvar="TETHER_DB",
                help="Work on this store directly: sqlite:///file.db or postgresql://... "
                "(env TETHER_DB).",
            ),
            click.option(
                "--address",
                metavar="URL",
                envvar="TETHER_ADDRESS",
                help="Go through this tether server instead: http://host:7233 "
                "(env TETHER_ADDRESS).",
            ),
            click.option(
                "--api-key",
                envvar="TETHER_API_KEY",
                metavar="KEY",
                help="API key for --address (env TETHER_API_KEY).",
            ),
            click.option(
                "--namespace",
                "-n",
                envvar="TETHER_NAMESPACE",
                default="default",
                show_default=True,
                callback=_namespace,
                help="Namespace (env TETHER_NAMESPACE).",
            ),
            click.option(
                "--output",
                "-o",
                type=click.Choice(OUTPUTS),
                default="text",
                show_default=True,
                help="text: tables for people; json: one document; jsonl: one JSON value "
                "per line (a list's items each on its own line).",
            ),
        ]
    ):
        command = option(command)
    return command  # type: ignore[return-value]
