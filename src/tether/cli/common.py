"""Shared CLI pieces: store options, output format, JSON arguments, error -> exit code."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from tether.exceptions import (
    InvalidArgumentError,
    PayloadError,
    TetherError,
    UnknownWorkflowTypeError,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(click.ClickException):
    """An error message; exit code 1 (failed/not found), or 2 (bad usage) via ``CliError(m, 2)``."""

    def __new__(cls, message: str, exit_code: int = EXIT_FAILED) -> CliError:
        target = _UsageError if exit_code == EXIT_USAGE else cls
        return super().__new__(target)

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)


class _UsageError(CliError):
    exit_code = EXIT_USAGE


def cli_error(e: TetherError) -> CliError:
    """A Tether error as a message and exit code: 2 for bad input, else 1."""
    usage = isinstance(e, InvalidArgumentError | PayloadError | UnknownWorkflowTypeError)
    return CliError(str(e), EXIT_USAGE if usage else EXIT_FAILED)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning Tether errors into messages and exit codes."""
    try:
        return asyncio.run(coro)
    except TetherError as e:
        raise cli_error(e) from None


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db",
        envvar="TETHER_DB",
        required=True,
        metavar="URL",
        help="Store URL: sqlite:///file.db or postgresql://... (env TETHER_DB).",
    )(fn)


OUTPUTS = ("text", "json", "jsonl")


def emit(output: str, data: Any, text: str | None = None) -> None:
    """Print one answer: ``text`` (or nothing if None) in text mode, else ``data`` as JSON."""
    if output == "json":
        click.echo(dump(data))
    elif output == "jsonl":
        click.echo(json.dumps(data, default=str, separators=(",", ":")))
    elif text is not None:
        click.echo(text)


def emit_items(output: str, items: list[Any], show_text: Callable[[list[Any]], None]) -> None:
    """Print a list: a JSON array (json), one item per line (jsonl) or ``show_text(items)``."""
    if output == "json":
        click.echo(dump(items))
    elif output == "jsonl":
        for item in items:
            emit("jsonl", item)
    else:
        show_text(items)


def parse_json_args(values: tuple[str, ...]) -> list[Any]:
    """Each argument is one JSON value: '"text"', '42', '{"a": 1}'."""
    out = []
    for i, raw in enumerate(values, 1):
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"argument {i} is not valid JSON ({e.msg}): {raw!r}; quote strings as '\"text\"'",
                param_hint="ARGS",
            ) from None
    return out


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
