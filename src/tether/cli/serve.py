"""``tether server``, ``tether dev`` and ``tether worker``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import click

from tether.cli.common import EXIT_USAGE, CliError, db_option
from tether.converter import DEFAULT_MAX_PAYLOAD_BYTES
from tether.exceptions import InvalidArgumentError, StoreError
from tether.server.app import DEFAULT_MAX_BODY_BYTES

DEFAULT_PORT = 7233


def _serve(
    url: str,
    host: str,
    port: int,
    api_keys_file: str | None,
    log_level: str,
    max_body_bytes: int,
    max_payload_bytes: int,
) -> None:
    import uvicorn

    from tether.server import create_app, load_api_keys

    try:
        keys = load_api_keys(api_keys_file)
    except InvalidArgumentError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    app = create_app(
        url, api_keys=keys, max_body_bytes=max_body_bytes, max_payload_bytes=max_payload_bytes
    )
    auth = f"API keys required ({len(keys)} configured)" if keys else "no API keys (open)"
    click.echo(f"Tether API on http://{host}:{port}  ({auth}; OpenAPI at /openapi.json)", err=True)
    # Followed histories stream until their run closes: on shutdown, cut them after a while.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=5,
    )


def _server_options(fn: Any) -> Any:
    fn = click.option(
        "--log-level",
        default="info",
        show_default=True,
        type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    )(fn)
    fn = click.option(
        "--max-payload-bytes",
        type=click.IntRange(min=1),
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        show_default=True,
        help="Larger workflow, signal, query or update arguments (each) get 413.",
    )(fn)
    fn = click.option(
        "--max-body-bytes",
        type=click.IntRange(min=1024),
        default=DEFAULT_MAX_BODY_BYTES,
        show_default=True,
        help="Larger request bodies get 413.",
    )(fn)
    fn = click.option(
        "--api-keys-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="API keys (see tether.server.auth); else env TETHER_API_KEYS_FILE "
        "or TETHER_API_KEYS; none configured = open server.",
    )(fn)
    return fn


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@_server_options
def server(
    db: str,
    host: str,
    port: int,
    api_keys_file: str | None,
    log_level: str,
    max_body_bytes: int,
    max_payload_bytes: int,
) -> None:
    """Run the HTTP/JSON API server over a store (SQLite or PostgreSQL).

    Stateless: run as many as you like against one PostgreSQL database.

    \b
    Example:
      TETHER_API_KEYS='s3cret=default:write' \\
        tether server --db postgresql://app@db/tether --host 0.0.0.0 --port 7233
    """
    _serve(db, host, port, api_keys_file, log_level, max_body_bytes, max_payload_bytes)


@click.command()
@click.option(
    "--db",
    "db_file",
    default="tether-dev.db",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="SQLite file (created if missing).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@_server_options
def dev(
    db_file: str,
    host: str,
    port: int,
    api_keys_file: str | None,
    log_level: str,
    max_body_bytes: int,
    max_payload_bytes: int,
) -> None:
    """Start a local development server on a SQLite file: one command, nothing else to run.

    \b
    Example:
      tether dev --db dev.db --port 7233
      tether worker myapp.workers:make_worker --db sqlite:///dev.db
    """
    path = os.path.abspath(db_file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    url = "sqlite:///" + path
    click.echo(f"Tether dev server: store {url}", err=True)
    click.echo(f"  listening on http://{host}:{port}  (run workers with --db {url})", err=True)
    _serve(url, host, port, api_keys_file, log_level, max_body_bytes, max_payload_bytes)


def _load_factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        attr = "make_worker"
    if not module_name or not attr:
        raise CliError(
            f"expected module:attr (or a module with make_worker), got {spec!r}", EXIT_USAGE
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"cannot import {module_name!r}: {e}", EXIT_USAGE) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(
                f"module {module_name!r} has no attribute {attr!r} (expected module:attr)",
                EXIT_USAGE,
            ) from None
    if not callable(target):
        raise CliError(
            f"{spec} must be a function taking a Client and returning a Worker "
            "(or a list of Workers)",
            EXIT_USAGE,
        )
    return target


async def _make_workers(factory: Any, client: Any, overrides: dict[str, Any]) -> list[Any]:
    from tether import Worker

    made = factory(client)
    if inspect.isawaitable(made):
        made = await made
    workers = [made] if isinstance(made, Worker) else list(_iterable(made))
    if not workers or not all(isinstance(w, Worker) for w in workers):
        raise CliError("the worker factory must return a Worker or a list of Workers", EXIT_USAGE)
    if "task_queue" in overrides and len(workers) > 1:
        raise CliError(
            f"--task-queue needs a single worker; the factory made {len(workers)}", EXIT_USAGE
        )
    try:
        return [w.with_options(**overrides) if overrides else w for w in workers]
    except InvalidArgumentError as e:
        raise CliError(str(e), EXIT_USAGE) from None


async def _until_idle(client: Any, workers: list[Any], seconds: float) -> None:
    """Return once the workers' task queues have had no work for ``seconds``: nothing
    ready or leased in the store, and nothing run here in between."""
    queues = sorted({w.task_queue for w in workers})
    poll = min(0.25, seconds / 4)
    idle_since: float | None = None
    last: list[dict[str, int]] | None = None
    while True:
        stats = [w.stats for w in workers]
        try:
            now = client.clock.now()
            backlog = sum([await client.store.task_queue_backlog(q, now) for q in queues])
        except StoreError:
            backlog = -1  # unknown: not idle
        busy = backlog != 0 or stats != last
        last = stats
        if busy:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= seconds:
            return
        await asyncio.sleep(poll)


async def _run_workers(
    factory: Any,
    url: str,
    namespace: str,
    overrides: dict[str, Any],
    until_idle: float | None,
) -> None:
    from tether import Client

    client = await Client.connect(url, namespace=namespace)
    try:
        workers = await _make_workers(factory, client, overrides)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for w in workers:
            await w.start()
            click.echo(f"worker {w.identity} polling task queue {w.task_queue!r}", err=True)
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
        if until_idle is not None:
            waiters.append(asyncio.ensure_future(_until_idle(client, workers, until_idle)))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not stop.is_set():
            click.echo(f"no work for {until_idle:g} s: shutting down", err=True)
        click.echo("shutting down: finishing in-flight work, handing back the rest...", err=True)
        await asyncio.gather(*(w.shutdown() for w in workers))
        click.echo("worker stopped", err=True)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def _iterable(value: Any) -> Iterable[Any]:
    if isinstance(value, (list, tuple)):
        return value
    raise CliError("the worker factory must return a Worker or a list of Workers", EXIT_USAGE)


@click.command()
@click.argument("factory", metavar="MODULE[:ATTR]")
@db_option
@click.option("--namespace", "-n", envvar="TETHER_NAMESPACE", default="default", show_default=True)
@click.option(
    "--task-queue",
    "-q",
    default=None,
    help="Poll this task queue instead of the factory's (a single worker only).",
)
@click.option("--max-concurrent-activities", type=click.IntRange(min=1), default=None)
@click.option("--max-concurrent-workflow-tasks", type=click.IntRange(min=1), default=None)
@click.option(
    "--max-cached-workflows",
    type=click.IntRange(min=0),
    default=None,
    help="Workflows kept in memory between tasks (0: replay every task).",
)
@click.option(
    "--graceful-shutdown-timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="On SIGTERM, how long running work may take to finish before it is handed back.",
)
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Exit (code 0) once the task queues have had no work for this long.",
)
def worker(
    factory: str,
    db: str,
    namespace: str,
    until_idle: float | None,
    **options: Any,
) -> None:
    """Run workers until SIGTERM or SIGINT (Ctrl-C), then shut down gracefully.

    MODULE:ATTR names a function that takes a connected Client and returns a Worker
    (or a list of Workers, or an awaitable of either); MODULE alone means
    MODULE:make_worker. The options override what the factory chose.

    On SIGTERM the workers stop taking work, let what runs finish (up to the graceful
    shutdown timeout) and hand the rest back to the store, where another worker takes
    it: nothing is lost. With --until-idle the worker also exits, with code 0, once
    its task queues have had nothing ready or running for that many seconds (for
    workers started on demand).

    \b
    Example (myapp/workers.py):
      def make_worker(client):
          return Worker(client, task_queue="orders", workflows=[Order], activities=[charge])
    \b
      tether worker myapp.workers:make_worker --db sqlite:///dev.db
      tether worker myapp.workers --db postgresql://app@db/tether \\
        --task-queue orders-eu --max-concurrent-activities 20 --until-idle 60
    """
    from tether.cli.common import run

    target = _load_factory(factory)
    overrides = {name: value for name, value in options.items() if value is not None}
    run(_run_workers(target, db, namespace, overrides, until_idle))
