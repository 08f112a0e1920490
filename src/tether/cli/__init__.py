"""The ``tether`` command line: ``tether db migrate URL`` creates or upgrades a store's
schema; ``tether replay-check ...`` replays stored histories against new workflow code
(see ``tether.replayer``); ``tether server``/``dev``/``worker`` run the HTTP API and
workers (``tether.cli.serve``); ``tether workflow ...`` operates workflows directly
against the store (``tether.cli.workflow``).

Exit codes: 0 success; 1 the workflow failed, was not found, or the operation failed;
2 bad usage (unknown option, malformed JSON argument, invalid argument).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import click

from tether._runtime.connection import display_url, migrate
from tether.exceptions import InvalidArgumentError, StoreError


@click.group()
@click.version_option(package_name="tether")
def cli() -> None:
    """Tether: durable execution for Python."""


@cli.group()
def db() -> None:
    """Manage the store's database."""


@db.command("migrate")
@click.argument("url")
@click.option(
    "--to", "target", type=click.IntRange(min=1), default=None, help="Stop at this version."
)
def db_migrate(url: str, target: int | None) -> None:
    """Apply pending schema migrations to the store at URL.

    URL is sqlite:///path/to/file.db or postgresql://user:password@host:port/database.
    Workers and clients also migrate a store on first use; run this to upgrade the
    schema as a deploy step instead. Safe to run from several places at once.
    """
    try:
        applied, version = asyncio.run(migrate(url, target))
    except (InvalidArgumentError, StoreError) as e:
        raise click.ClickException(str(e)) from None
    for label in applied:
        click.echo(f"applied {label}")
    state = "migrated" if applied else "already up to date"
    click.echo(f"{display_url(url)}: {state}, schema version {version}")


@cli.command(
    "replay-check",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def replay_check(args: Sequence[str]) -> None:
    """Replay stored histories against the current workflow code (--help for options)."""
    from tether.replayer import main as replayer_main

    sys.exit(replayer_main(list(args)))


def _register() -> None:
    from tether.cli.serve import dev, server, worker
    from tether.cli.workflow import workflow

    for command in (server, dev, worker, workflow):
        cli.add_command(command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
