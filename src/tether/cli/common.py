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


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning Tether errors into messages and exit codes."""
    try:
        return asyncio.run(coro)
    except (InvalidArgumentError, PayloadError, UnknownWorkflowTypeError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except TetherError as e:
        raise CliError(str(e), EXIT_FAILED) from None


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db",
        envvar="TETHER_DB",
        required=True,
        metavar="URL",
        help="Store URL: sqlite:///file.db or postgresql://... (env TETHER_DB).",
    )(fn)


def store_options(fn: F) -> F:
    fn = click.option(
        "--output",
        "-o",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Output format.",
    )(fn)
    fn = click.option(
        "--namespace",
        "-n",
        envvar="TETHER_NAMESPACE",
        default="default",
        show_default=True,
        help="Namespace (env TETHER_NAMESPACE).",
    )(fn)
    return db_option(fn)


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
