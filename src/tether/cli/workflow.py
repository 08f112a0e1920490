"""``tether workflow ...``: operate workflows through the HTTP API (``--address``) or
directly on a store (``--db``, the same API run in-process). See ``tether.cli.backend``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from tether._runtime.instance import STACK_TRACE_QUERY
from tether._store.base import STATUSES
from tether.cli.backend import Backend, Target, connection_options
from tether.cli.common import EXIT_FAILED, CliError, emit, emit_items, parse_json_args
from tether.server.models import MAX_WAIT_SECONDS

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES = """\b
Exit codes (every command):
  0  success
  1  the operation failed: the workflow failed, was cancelled, terminated or timed
     out, is still running after --timeout, was not found, or no worker answered,
     or the server could not be reached or refused the API key
  2  bad usage: unknown option, malformed JSON, an invalid argument or filter"""


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _run_params(run_id: str | None, **extra: Any) -> dict[str, list[str]]:
    params = {name: [str(value)] for name, value in extra.items() if value is not None}
    if run_id:
        params["run_id"] = [run_id]
    return params


def _print_table(columns: list[str], rows: list[list[str]], header: bool = True) -> None:
    """A table on stdout (Rich is imported only when a table is printed)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns) if header else Table(*columns, show_header=False, box=None)
    for row in rows:
        table.add_row(*row)
    Console(highlight=False, soft_wrap=True).print(table)


@contextlib.contextmanager
def _spinner(output: str, message: str) -> Iterator[None]:
    """A spinner on stderr while waiting, in text mode on a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    if output != "text" or not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def _attribute(raw: str) -> tuple[str, Any]:
    """KEY=VALUE; VALUE is JSON if it is a number, true/false or a quoted string, else text."""
    key, sep, text = raw.partition("=")
    if not sep or not key:
        raise click.BadParameter(
            f"expected KEY=VALUE, got {raw!r}", param_hint="--search-attribute"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if not isinstance(value, str | int | float | bool):
        value = text
    return key, value


def _attributes(values: tuple[str, ...]) -> dict[str, Any] | None:
    return dict(_attribute(v) for v in values) or None


_SEARCH_ATTRIBUTE_HELP = (
    'KEY=VALUE (repeatable); VALUE is a number, true/false or a "quoted" string as '
    "JSON, else plain text."
)


@click.group(epilog=EXIT_CODES)
def workflow() -> None:
    """Start, inspect and message workflows.

    Every command works through a tether server (--address URL, with --api-key) or
    directly on a store (--db URL): both give the same answers, messages and exit
    codes. Arguments of workflows and handlers are JSON values, one per argument.

    \b
    Examples:
      export TETHER_ADDRESS=http://localhost:7233
      tether workflow execute Greeter '"Ada"' -q greetings --id greet-ada
      tether workflow list --status running --started-after 1h
      tether workflow show greet-ada --follow
    """


# -- start / execute -----------------------------------------------------------------


def _start_options(fn: F) -> F:
    options = [
        click.argument("workflow_type"),
        click.argument("args", nargs=-1),
        click.option("--task-queue", "-q", required=True, help="Task queue of its workers."),
        click.option("--id", "workflow_id", default=None, help="Workflow id (default: a UUID)."),
        click.option("--request-id", default=None, help="Makes a retried start idempotent."),
        click.option(
            "--id-conflict-policy",
            type=click.Choice(["fail", "use_existing", "terminate_existing"]),
            default=None,
            help="If the id is running: fail (default), use_existing or terminate_existing.",
        ),
        click.option(
            "--id-reuse-policy",
            default="allow_duplicate",
            show_default=True,
            type=click.Choice(
                ["allow_duplicate", "allow_duplicate_failed_only", "reject_duplicate"]
            ),
        ),
        click.option("--memo", default=None, metavar="JSON", help="A JSON object kept with it."),
        click.option(
            "--search-attribute", "search_attributes", multiple=True, help=_SEARCH_ATTRIBUTE_HELP
        ),
        click.option("--run-timeout", type=click.FloatRange(min=0), default=None, help="Seconds."),
        click.option(
            "--execution-timeout",
            type=click.FloatRange(min=0),
            default=None,
            help="Seconds, across continue-as-new.",
        ),
        click.option(
            "--signal",
            default=None,
            metavar="NAME",
            help="Signal-with-start: start unless running, and send this signal.",
        ),
        click.option(
            "--signal-arg", "signal_args", multiple=True, metavar="JSON", help="Signal argument."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _start(backend: Backend, options: dict[str, Any]) -> dict[str, Any]:
    memo = options["memo"]
    if memo is not None:
        memo = parse_json_args((memo,))[0]
        if not isinstance(memo, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--memo")
    body: dict[str, Any] = {
        "workflow_type": options["workflow_type"],
        "task_queue": options["task_queue"],
        "workflow_id": options["workflow_id"] or str(uuid.uuid4()),
        "args": parse_json_args(options["args"]),
        "request_id": options["request_id"],
        "id_conflict_policy": options["id_conflict_policy"],
        "id_reuse_policy": options["id_reuse_policy"],
        "memo": memo,
        "search_attributes": _attributes(options["search_attributes"]),
        "run_timeout": options["run_timeout"],
        "execution_timeout": options["execution_timeout"],
    }
    body = {k: v for k, v in body.items() if v is not None}
    if options["signal"] is None:
        if options["signal_args"]:
            raise click.UsageError("--signal-arg goes with --signal")
        return dict(backend.call("POST", ["workflows"], body=body))
    body["signal"] = options["signal"]
    body["signal_args"] = parse_json_args(options["signal_args"])
    return dict(backend.call("POST", ["workflows", "signal-with-start"], body=body))


def _started_text(answer: dict[str, Any], signal: str | None) -> str:
    wid, run_id = answer["workflow_id"], answer["run_id"]
    if signal is None:
        return f"started workflow {wid} (run {run_id})"
    return f"signalled {signal} to workflow {wid} (run {run_id}), started unless it was running"


@workflow.command()
@_start_options
@connection_options
def start(target: Target, **options: Any) -> None:
    """Start a workflow by type name; ARGS are JSON values (put ``--`` before the type
    name when an argument starts with '-', as in ``-- Add -1 2``).

    \b
    Examples:
      tether workflow start Greeter '"Ada"' -q greetings --id greet-ada --db sqlite:///dev.db
      tether workflow start Cart -q shop --id cart-7 --signal add --signal-arg '"apple"' \\
        --address http://localhost:7233
    """
    with target.open() as backend:
        answer = _start(backend, options)
    emit(target.output, answer, _started_text(answer, options["signal"]))


@workflow.command()
@_start_options
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Give up after.")
@connection_options
def execute(target: Target, timeout: float | None, **options: Any) -> None:
    """Start a workflow and wait for its result (exit 1 if it does not complete).

    \b
    Example:
      tether workflow execute Quick 2 3 -q api-test --db sqlite:///dev.db
    """
    with target.open() as backend:
        started = _start(backend, options)
        if target.output == "text":
            click.echo(_started_text(started, options["signal"]), err=True)
        answer = _wait_result(backend, started["workflow_id"], None, timeout, target.output)
    _print_result(target.output, answer, started["workflow_id"], timeout)


# -- inspect --------------------------------------------------------------------------


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None, help="A run of the workflow (default: the latest).")
@connection_options
def describe(target: Target, workflow_id: str, run_id: str | None) -> None:
    """Show a workflow's status.

    \b
    Example:
      tether workflow describe greet-ada --db sqlite:///dev.db -o json
    """
    with target.open() as backend:
        data = backend.call("GET", ["workflows", workflow_id], _run_params(run_id))
    if target.output != "text":
        emit(target.output, data)
        return
    rows = [
        [key, value if isinstance(value, str) else _short(value, 100)]
        for key, value in data.items()
        if value not in (None, {}, [])
    ]
    _print_table(["", ""], rows, header=False)


def _wait_result(
    backend: Backend, workflow_id: str, run_id: str | None, timeout: float | None, output: str
) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    with _spinner(output, f"waiting for workflow {workflow_id} to close..."):
        while True:
            left = MAX_WAIT_SECONDS if deadline is None else deadline - time.monotonic()
            wait = round(max(0.0, min(MAX_WAIT_SECONDS, left)), 3)
            answer = backend.call(
                "GET",
                ["workflows", workflow_id, "result"],
                _run_params(run_id, wait=wait),
                wait=wait,
            )
            if answer["status"] != "running" or (deadline is not None and left <= 0):
                return dict(answer)


def _print_result(output: str, answer: dict[str, Any], workflow_id: str, timeout: Any) -> None:
    if answer["status"] == "running":
        raise CliError(f"workflow {workflow_id!r} still running after {timeout} s")
    completed = answer["status"] == "completed"
    emit(output, answer, json.dumps(answer.get("result"), default=str) if completed else None)
    if not completed:
        if output == "text":
            click.echo(answer.get("message") or f"workflow {answer['status']}", err=True)
        raise SystemExit(EXIT_FAILED)


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None, help="A run of the workflow (default: the latest).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Give up after.")
@connection_options
def result(target: Target, workflow_id: str, run_id: str | None, timeout: float | None) -> None:
    """Wait for a workflow to close and print its result (exit 1 if it did not complete).

    \b
    Example:
      tether workflow result greet-ada --timeout 30 --db sqlite:///dev.db
    """
    with target.open() as backend:
        answer = _wait_result(backend, workflow_id, run_id, timeout, target.output)
    _print_result(target.output, answer, workflow_id, timeout)


_EVENT_COLUMNS = ("SEQ", "TIME", "TYPE", "DETAILS")


def _event_cells(event: dict[str, Any]) -> tuple[str, str, str, str]:
    at = _dt.datetime.fromisoformat(event["time"]).astimezone(_dt.UTC)
    return (
        str(event["seq"]),
        at.strftime("%H:%M:%S.%f")[:-3],
        event["type"],
        _short(event["data"], 80),
    )


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None, help="A run of the workflow (default: the latest).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the run closes.")
@connection_options
def show(target: Target, workflow_id: str, run_id: str | None, follow: bool) -> None:
    """Print a workflow run's history.

    With --follow, print each new event as it is recorded and exit when the run
    closes (-o jsonl streams one event per line).

    \b
    Examples:
      tether workflow show greet-ada --db sqlite:///dev.db
      tether workflow show greet-ada --follow -o jsonl --address http://localhost:7233
    """
    with target.open() as backend:
        if follow:
            _follow(backend, target.output, workflow_id, run_id)
            return
        events: list[dict[str, Any]] = []
        after: int | None = 0
        while after is not None:
            page = backend.call(
                "GET",
                ["workflows", workflow_id, "history"],
                _run_params(run_id, after_seq=after, limit=1000),
            )
            events += page["events"]
            after = page["next_after_seq"]

    def table(items: list[dict[str, Any]]) -> None:
        _print_table(list(_EVENT_COLUMNS), [list(_event_cells(e)) for e in items])

    emit_items(target.output, events, table)


def _follow(backend: Backend, output: str, workflow_id: str, run_id: str | None) -> None:
    collected: list[dict[str, Any]] = []
    line = "{:>5}  {:<12}  {:<28}  {}".format
    for event in backend.stream(workflow_id, run_id, 0):
        if output == "json":
            collected.append(event)
        elif output == "jsonl":
            emit("jsonl", event)
        else:
            if event["seq"] == 1:
                click.echo(line(*_EVENT_COLUMNS))
            click.echo(line(*_event_cells(event)))
    if output == "json":
        emit("json", collected)


# -- messages ---------------------------------------------------------------------------


_RUN_ID = click.option(
    "--run-id", default=None, help="A run of the workflow (default: the latest)."
)
_WAIT = click.FloatRange(0, MAX_WAIT_SECONDS, min_open=True)


@workflow.command("signal")
@click.argument("workflow_id")
@click.argument("name")
@click.argument("args", nargs=-1)
@_RUN_ID
@connection_options
def signal_(
    target: Target, workflow_id: str, name: str, args: tuple[str, ...], run_id: str | None
) -> None:
    """Send a signal; ARGS are JSON values.

    \b
    Example:
      tether workflow signal greet-ada set_greeting '"Hi"' --db sqlite:///dev.db
    """
    body = {"args": parse_json_args(args)}
    with target.open() as backend:
        answer = backend.call(
            "POST", ["workflows", workflow_id, "signals", name], _run_params(run_id), body
        )
    emit(target.output, answer, f"signalled {workflow_id}: {name}")


def _query(
    target: Target, workflow_id: str, name: str, args: list[Any], run_id: str | None, timeout: float
) -> Any:
    with target.open() as backend:
        return backend.call(
            "POST",
            ["workflows", workflow_id, "queries", name],
            _run_params(run_id),
            {"args": args, "timeout": timeout},
            wait=timeout,
        )


@workflow.command()
@click.argument("workflow_id")
@click.argument("name")
@click.argument("args", nargs=-1)
@_RUN_ID
@click.option("--timeout", type=_WAIT, default=10.0, show_default=True, help="Seconds.")
@connection_options
def query(
    target: Target,
    workflow_id: str,
    name: str,
    args: tuple[str, ...],
    run_id: str | None,
    timeout: float,
) -> None:
    """Query a workflow (a worker answers); ARGS are JSON values.

    \b
    Example:
      tether workflow query greet-ada greeting --db sqlite:///dev.db -o json
    """
    answer = _query(target, workflow_id, name, parse_json_args(args), run_id, timeout)
    emit(target.output, answer, json.dumps(answer["result"], default=str))


@workflow.command()
@click.argument("workflow_id")
@_RUN_ID
@click.option("--timeout", type=_WAIT, default=10.0, show_default=True, help="Seconds.")
@connection_options
def stack(target: Target, workflow_id: str, run_id: str | None, timeout: float) -> None:
    """Show where the workflow's code is waiting (its coroutines' stacks; a worker answers).

    \b
    Example:
      tether workflow stack greet-ada --db sqlite:///dev.db
    """
    answer = _query(target, workflow_id, STACK_TRACE_QUERY, [], run_id, timeout)
    emit(target.output, answer, str(answer["result"]))


@workflow.command()
@click.argument("workflow_id")
@click.argument("name")
@click.argument("args", nargs=-1)
@_RUN_ID
@click.option("--update-id", default=None, help="Deduplicates retries.")
@click.option("--timeout", type=_WAIT, default=30.0, show_default=True, help="Seconds.")
@connection_options
def update(
    target: Target,
    workflow_id: str,
    name: str,
    args: tuple[str, ...],
    run_id: str | None,
    update_id: str | None,
    timeout: float,
) -> None:
    """Send an update and print its result; ARGS are JSON values.

    \b
    Example:
      tether workflow update greet-ada rename '"Grace"' --update-id r1 --db sqlite:///dev.db
    """
    body = {"args": parse_json_args(args), "update_id": update_id, "timeout": timeout}
    with target.open() as backend:
        answer = backend.call(
            "POST",
            ["workflows", workflow_id, "updates", name],
            _run_params(run_id),
            {k: v for k, v in body.items() if v is not None},
            wait=timeout,
        )
    emit(target.output, answer, json.dumps(answer["result"], default=str))


def _close(target: Target, verb: str, workflow_id: str, run_id: str | None, reason: str) -> None:
    with target.open() as backend:
        answer = backend.call(
            "POST", ["workflows", workflow_id, verb], _run_params(run_id), {"reason": reason}
        )
    done = "cancellation requested for" if verb == "cancel" else "terminated"
    emit(target.output, answer, f"{done} {workflow_id}")


@workflow.command()
@click.argument("workflow_id")
@_RUN_ID
@click.option("--reason", default="")
@connection_options
def cancel(target: Target, workflow_id: str, run_id: str | None, reason: str) -> None:
    """Ask a workflow to cancel (its code may clean up).

    \b
    Example:
      tether workflow cancel greet-ada --reason "customer left" --db sqlite:///dev.db
    """
    _close(target, "cancel", workflow_id, run_id, reason)


@workflow.command()
@click.argument("workflow_id")
@_RUN_ID
@click.option("--reason", default="")
@connection_options
def terminate(target: Target, workflow_id: str, run_id: str | None, reason: str) -> None:
    """End a workflow at once, running none of its code.

    \b
    Example:
      tether workflow terminate greet-ada --reason stuck --db sqlite:///dev.db
    """
    _close(target, "terminate", workflow_id, run_id, reason)


# -- list / count -------------------------------------------------------------------------

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _time(value: str | None) -> str | None:
    """``15m``, ``2h``, ``7d``... (that long ago) as an ISO time; anything else as given
    (ISO 8601 or epoch seconds, checked by the API)."""
    if value is None:
        return None
    match = _AGO.match(value.strip())
    if match is None:
        return value
    ago = float(match[1]) * _UNITS[match[2]]
    return (_dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=ago)).isoformat()


def _filter_options(fn: F) -> F:
    """The list/count filters, given to the command as ``filters``: API query parameters."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        status: tuple[str, ...],
        workflow_type: str | None,
        id_prefix: str | None,
        started_after: str | None,
        started_before: str | None,
        closed_after: str | None,
        closed_before: str | None,
        search_attributes: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        attributes = _attributes(search_attributes)
        filters = {
            "status": list(status) or None,
            "type": workflow_type,
            "id_prefix": id_prefix,
            "started_after": _time(started_after),
            "started_before": _time(started_before),
            "closed_after": _time(closed_after),
            "closed_before": _time(closed_before),
            "search_attributes": None if attributes is None else json.dumps(attributes),
        }
        params = {
            name: value if isinstance(value, list) else [value]
            for name, value in filters.items()
            if value is not None
        }
        return fn(*args, filters=params, **kwargs)

    time_help = "ISO 8601 time, epoch seconds, or an age such as 15m, 2h, 7d."
    options = [
        click.option(
            "--status",
            multiple=True,
            type=click.Choice(STATUSES),
            help="Repeat for any of several statuses.",
        ),
        click.option("--type", "workflow_type", default=None, help="Workflow type name."),
        click.option("--id-prefix", default=None, help="Workflow ids starting with this."),
        click.option("--started-after", default=None, metavar="TIME", help=time_help),
        click.option("--started-before", default=None, metavar="TIME", help=time_help),
        click.option("--closed-after", default=None, metavar="TIME", help=time_help),
        click.option("--closed-before", default=None, metavar="TIME", help=time_help),
        click.option(
            "--search-attribute", "search_attributes", multiple=True, help=_SEARCH_ATTRIBUTE_HELP
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command  # type: ignore[return-value]


@workflow.command("list")
@_filter_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@connection_options
def list_(target: Target, filters: dict[str, list[str]], limit: int) -> None:
    """List workflows in the namespace, newest first, that match every filter.

    \b
    Examples:
      tether workflow list --status running --type Greeter --db sqlite:///dev.db
      tether workflow list --id-prefix order- --started-after 2h -o jsonl
      tether workflow list --search-attribute customer=acme --address http://localhost:7233
    """
    runs: list[dict[str, Any]] = []
    token: str | None = None
    with target.open() as backend:
        while len(runs) < limit:
            params = {**filters, "limit": [str(min(1000, limit - len(runs)))]}
            if token:
                params["page_token"] = [token]
            page = backend.call("GET", ["workflows"], params)
            runs += page["workflows"]
            token = page["next_page_token"]
            if not token:
                break

    def table(items: list[dict[str, Any]]) -> None:
        rows = []
        for r in items:
            started = _dt.datetime.fromisoformat(r["start_time"]).astimezone(_dt.UTC)
            rows.append(
                [
                    r["workflow_id"],
                    r["workflow_type"],
                    r["status"],
                    r["task_queue"],
                    started.strftime("%Y-%m-%d %H:%M:%S"),
                    r["run_id"],
                ]
            )
        _print_table(["WORKFLOW ID", "TYPE", "STATUS", "TASK QUEUE", "STARTED", "RUN ID"], rows)
        more = " (more match: raise --limit)" if token else ""
        click.echo(f"{len(items)} workflow(s){more}")

    emit_items(target.output, runs, table)


@workflow.command()
@_filter_options
@connection_options
def count(target: Target, filters: dict[str, list[str]]) -> None:
    """Count workflows in the namespace that match every filter (as for list).

    \b
    Examples:
      tether workflow count --status failed --closed-after 1d --db sqlite:///dev.db
      tether workflow count --type Order -o json --address http://localhost:7233
    """
    with target.open() as backend:
        answer = backend.call("GET", ["workflow-count"], filters)
    emit(target.output, answer, str(answer["count"]))
