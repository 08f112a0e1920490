"""``tether workflow ...``: operate workflows directly against the store."""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tether.cli.common import EXIT_FAILED, CliError, dump, parse_json_args, run, store_options
from tether.client import Client, WorkflowDescription
from tether.exceptions import WorkflowFailureError

_console = Console(highlight=False, soft_wrap=True)


def _describe_json(d: WorkflowDescription) -> dict[str, Any]:
    from tether.server.routes import describe_json

    return describe_json(d)


async def _with_client(db: str, namespace: str, action: Callable[[Client], Awaitable[Any]]) -> Any:
    client = await Client.connect(db, namespace=namespace)
    try:
        return await action(client)
    finally:
        await client.close()


def _emit(output: str, data: Any, text: str) -> None:
    if output == "json":
        click.echo(dump(data))
    else:
        click.echo(text)


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


@click.group()
def workflow() -> None:
    """Start, inspect and message workflows (directly against the store).

    Arguments to workflows and handlers are JSON values, one per argument.
    """


@workflow.command()
@click.argument("workflow_type")
@click.argument("args", nargs=-1)
@click.option("--task-queue", "-q", required=True)
@click.option("--id", "workflow_id", default=None, help="Workflow id (default: a new UUID).")
@click.option("--request-id", default=None, help="Makes a retried start idempotent.")
@click.option(
    "--id-conflict-policy",
    type=click.Choice(["fail", "use_existing", "terminate_existing"]),
    default=None,
)
@click.option(
    "--id-reuse-policy",
    default="allow_duplicate",
    type=click.Choice(["allow_duplicate", "allow_duplicate_failed_only", "reject_duplicate"]),
)
@store_options
def start(
    workflow_type: str,
    args: tuple[str, ...],
    task_queue: str,
    workflow_id: str | None,
    request_id: str | None,
    id_conflict_policy: str | None,
    id_reuse_policy: str,
    db: str,
    namespace: str,
    output: str,
) -> None:
    """Start a workflow by type name; ARGS are JSON values (put ``--`` before the type
    name when an argument starts with '-', as in ``-- Add -1 2``).

    \b
    Example:
      tether workflow start Greeter '"Ada"' -q greetings --id greet-ada --db sqlite:///dev.db
    """
    values = parse_json_args(args)
    wid = workflow_id or str(uuid.uuid4())

    async def action(client: Client) -> str | None:
        handle = await client.start_workflow(
            workflow_type,
            *values,
            id=wid,
            task_queue=task_queue,
            request_id=request_id,
            id_conflict_policy=id_conflict_policy,
            id_reuse_policy=id_reuse_policy,
        )
        return handle.run_id

    run_id = run(_with_client(db, namespace, action))
    _emit(
        output,
        {"namespace": namespace, "workflow_id": wid, "run_id": run_id},
        f"started workflow {wid} (run {run_id})",
    )


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None)
@store_options
def describe(workflow_id: str, run_id: str | None, db: str, namespace: str, output: str) -> None:
    """Show a workflow's status.

    \b
    Example:
      tether workflow describe greet-ada --db sqlite:///dev.db -o json
    """
    d: WorkflowDescription = run(
        _with_client(
            db, namespace, lambda c: c.get_workflow_handle(workflow_id, run_id=run_id).describe()
        )
    )
    data = _describe_json(d)
    if output == "json":
        click.echo(dump(data))
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if value not in (None, {}, []):
            table.add_row(key, value if isinstance(value, str) else _short(value, 100))
    _console.print(table)


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@store_options
def result(
    workflow_id: str,
    run_id: str | None,
    timeout: float | None,
    db: str,
    namespace: str,
    output: str,
) -> None:
    """Wait for a workflow to close and print its result (exit 1 if it did not complete).

    \b
    Example:
      tether workflow result greet-ada --timeout 30 --db sqlite:///dev.db
    """

    async def action(client: Client) -> dict[str, Any]:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        try:
            value = await handle.result(timeout=timeout)
        except WorkflowFailureError as e:
            d = await client.get_workflow_handle(workflow_id, run_id=e.run_id).describe()
            return {
                "status": d.status,
                "workflow_id": workflow_id,
                "run_id": e.run_id,
                "failure": d.failure,
                "message": str(e),
            }
        except TimeoutError:
            raise CliError(f"workflow {workflow_id!r} still running after {timeout} s") from None
        return {"status": "completed", "workflow_id": workflow_id, "result": value}

    data = run(_with_client(db, namespace, action))
    if output == "json":
        click.echo(dump(data))
    elif data["status"] == "completed":
        click.echo(json.dumps(data["result"], default=str))
    if data["status"] != "completed":
        if output != "json":
            click.echo(data["message"], err=True)
        raise SystemExit(EXIT_FAILED)


def _message_command(kind: str) -> Callable[..., None]:
    @click.argument("workflow_id")
    @click.argument("name")
    @click.argument("args", nargs=-1)
    @click.option("--run-id", default=None)
    @store_options
    def command(
        workflow_id: str,
        name: str,
        args: tuple[str, ...],
        run_id: str | None,
        db: str,
        namespace: str,
        output: str,
        **extra: Any,
    ) -> None:
        values = parse_json_args(args)

        async def action(client: Client) -> Any:
            handle = client.get_workflow_handle(workflow_id, run_id=run_id)
            if kind == "signal":
                await handle.signal(name, *values)
                return None
            if kind == "query":
                return await handle.query(name, *values, timeout=extra["timeout"])
            return await handle.execute_update(
                name, *values, id=extra["update_id"], timeout=extra["timeout"]
            )

        value = run(_with_client(db, namespace, action))
        if kind == "signal":
            _emit(output, {"ok": True}, f"signalled {workflow_id}: {name}")
        else:
            _emit(output, {"result": value}, json.dumps(value, default=str))

    return command


_signal = _message_command("signal")
_signal.__doc__ = """Send a signal; ARGS are JSON values.

    \b
    Example:
      tether workflow signal greet-ada set_greeting '"Hi"' --db sqlite:///dev.db
    """
workflow.command("signal")(_signal)

_query = _message_command("query")
_query.__doc__ = """Query a workflow (a worker answers); ARGS are JSON values.

    \b
    Example:
      tether workflow query greet-ada greeting --db sqlite:///dev.db -o json
    """
workflow.command("query")(
    click.option("--timeout", type=float, default=10.0, show_default=True)(_query)
)

_update = _message_command("update")
_update.__doc__ = """Send an update and print its result; ARGS are JSON values.

    \b
    Example:
      tether workflow update greet-ada rename '"Grace"' --update-id r1 --db sqlite:///dev.db
    """
workflow.command("update")(
    click.option("--update-id", default=None, help="Deduplicates retries.")(
        click.option("--timeout", type=float, default=30.0, show_default=True)(_update)
    )
)


def _lifecycle_command(kind: str) -> Callable[..., None]:
    @click.argument("workflow_id")
    @click.option("--run-id", default=None)
    @click.option("--reason", default="")
    @store_options
    def command(
        workflow_id: str, run_id: str | None, reason: str, db: str, namespace: str, output: str
    ) -> None:
        async def action(client: Client) -> None:
            handle = client.get_workflow_handle(workflow_id, run_id=run_id)
            await (handle.cancel(reason) if kind == "cancel" else handle.terminate(reason))

        run(_with_client(db, namespace, action))
        verb = "cancellation requested for" if kind == "cancel" else "terminated"
        _emit(output, {"ok": True}, f"{verb} {workflow_id}")

    return command


_cancel = _lifecycle_command("cancel")
_cancel.__doc__ = """Ask a workflow to cancel (its code may clean up).

    \b
    Example:
      tether workflow cancel greet-ada --reason "customer left" --db sqlite:///dev.db
    """
workflow.command("cancel")(_cancel)
_terminate = _lifecycle_command("terminate")
_terminate.__doc__ = """End a workflow at once, running none of its code.

    \b
    Example:
      tether workflow terminate greet-ada --reason stuck --db sqlite:///dev.db
    """
workflow.command("terminate")(_terminate)


@workflow.command("list")
@click.option("--status", default=None, help="running, completed, failed, cancelled, ...")
@click.option("--type", "workflow_type", default=None, help="Workflow type name.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@store_options
def list_(
    status: str | None, workflow_type: str | None, limit: int, db: str, namespace: str, output: str
) -> None:
    """List workflows in the namespace, newest first.

    \b
    Example:
      tether workflow list --status running --type Greeter --db sqlite:///dev.db
    """
    runs: list[WorkflowDescription] = run(
        _with_client(
            db,
            namespace,
            lambda c: c.list_workflows(status=status, workflow_type=workflow_type, limit=limit),
        )
    )
    if output == "json":
        click.echo(dump([_describe_json(r) for r in runs]))
        return
    table = Table("WORKFLOW ID", "TYPE", "STATUS", "TASK QUEUE", "STARTED", "RUN ID")
    for r in runs:
        table.add_row(
            r.workflow_id,
            r.workflow_type,
            r.status,
            r.task_queue,
            r.start_time.strftime("%Y-%m-%d %H:%M:%S"),
            r.run_id,
        )
    _console.print(table)
    click.echo(f"{len(runs)} workflow(s)")


@workflow.command()
@click.argument("workflow_id")
@click.option("--run-id", default=None)
@store_options
def show(workflow_id: str, run_id: str | None, db: str, namespace: str, output: str) -> None:
    """Print a workflow run's history.

    \b
    Example:
      tether workflow show greet-ada --db sqlite:///dev.db
    """
    events = run(
        _with_client(
            db, namespace, lambda c: c.get_workflow_handle(workflow_id, run_id=run_id).history()
        )
    )
    if output == "json":
        click.echo(
            dump(
                [
                    {"seq": e.seq, "type": e.type, "time": e.time.isoformat(), "data": e.data}
                    for e in events
                ]
            )
        )
        return
    table = Table("SEQ", "TIME", "TYPE", "DETAILS")
    for e in events:
        time = e.time.astimezone(_dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        table.add_row(str(e.seq), time, e.type, _short(e.data, 80))
    _console.print(table)
