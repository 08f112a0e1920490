"""The ``tether`` command line: ``tether db migrate URL`` creates or upgrades a store's
schema; ``tether replay-check ...`` (also ``tether workflow replay-check``) replays stored
histories against new workflow code (see ``tether.replayer``); ``tether server``/``dev``/
``worker`` run the HTTP API and workers (``tether.cli.serve``); ``tether workflow ...``
operates workflows through the API or directly on a store (``tether.cli.workflow``).

Exit codes: 0 success; 1 the workflow failed, was not found, or the operation failed;
2 bad usage (unknown option, malformed JSON argument, invalid argument).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

import click

from tether._runtime.connection import display_url, migrate
from tether.cli.common import OUTPUTS, cli_error, emit
from tether.cli.workflow import EXIT_CODES
from tether.exceptions import TetherError


@click.group(epilog=EXIT_CODES)
@click.version_option(package_name="tether")
def cli() -> None:
    """Tether: durable execution for Python.

    \b
    Examples:
      tether dev --db dev.db                                # API server on a local file
      tether worker myapp.workers:make_worker --db sqlite:///dev.db
      tether workflow execute Greeter '"Ada"' -q greetings --address http://localhost:7233
      tether workflow list --status running -o json --db sqlite:///dev.db
    """


@cli.group()
def db() -> None:
    """Manage the store's database."""


@db.command("migrate")
@click.argument("url")
@click.option(
    "--to", "target", type=click.IntRange(min=1), default=None, help="Stop at this version."
)
@click.option("--output", "-o", type=click.Choice(OUTPUTS), default="text", show_default=True)
def db_migrate(url: str, target: int | None, output: str) -> None:
    """Apply pending schema migrations to the store at URL.

    URL is sqlite:///path/to/file.db or postgresql://user:password@host:port/database.
    Workers and clients also migrate a store on first use; run this to upgrade the
    schema as a deploy step instead. Safe to run from several places at once.

    \b
    Example:
      tether db migrate postgresql://app@db/tether -o json
    """
    try:
        applied, version = asyncio.run(migrate(url, target))
    except TetherError as e:
        raise cli_error(e) from None
    state = "migrated" if applied else "already up to date"
    lines = [f"applied {label}" for label in applied]
    lines.append(f"{display_url(url)}: {state}, schema version {version}")
    emit(output, {"applied": applied, "version": version}, "\n".join(lines))


@cli.command(
    "replay-check",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def replay_check(args: Sequence[str]) -> None:
    """Replay stored histories against the current workflow code (--help for options).

    --db URL is accepted for --store URL (and TETHER_DB is used when neither is given).
    """
    from tether.replayer import main as replayer_main

    argv = ["--store" if a == "--db" else a for a in args]
    argv = [f"--store={a[5:]}" if a.startswith("--db=") else a for a in argv]
    sources = ("--store", "--history-dir", "-h", "--help")
    env_db = os.environ.get("TETHER_DB")
    if env_db and not any(a.split("=")[0] in sources for a in argv):
        argv += ["--store", env_db]
    sys.exit(replayer_main(argv))


def _register() -> None:
    from tether.cli.serve import dev, server, worker
    from tether.cli.workflow import workflow

    for command in (server, dev, worker, workflow):
        cli.add_command(command)
    workflow.add_command(replay_check)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
