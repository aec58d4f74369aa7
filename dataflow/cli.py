"""The `dataflow` command. Thin: parse options, build objects, call into the packages.

Commands that need torch import it inside their body so `dataflow status` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer

from dataflow.errors import DataflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

DbOption = typer.Option(Path("run.sqlite"), "--db", help="The run's SQLite file (created on first use).")
AllowNetworkFs = typer.Option(
    False, "--allow-network-fs", help="Use a database on a network filesystem anyway (WAL may corrupt it)."
)


def one_line_errors(fn):
    """Map DataflowError to one line on stderr and a non-zero exit (traceback with DATAFLOW_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataflowError as e:
            if os.environ.get("DATAFLOW_DEBUG") == "1":
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted; the run is resumable", err=True)
            raise typer.Exit(130)

    return wrapper


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
