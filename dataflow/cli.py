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


def open_run(db: Path, allow_network_fs: bool = False):
    from dataflow.control.db import connect

    return connect(db, allow_network_fs=allow_network_fs)


def require_run(db: Path) -> Path:
    """Observer commands never create a run: a missing file is a typo, not a new run."""
    if not db.exists():
        raise DataflowError(f"{db}: no such run database; pass the --db of a run started with `dataflow rollout`")
    return db


@app.command()
@one_line_errors
def status(
    db: Path = DbOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(1.0, help="Seconds between refreshes with --watch."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """Counts by state, rates, lag, dead-letter and live producers/consumers of a run."""
    import json
    import time

    from rich.console import Console
    from rich.live import Live

    from dataflow.control.status import snapshot
    from dataflow.ui import status_view

    conn = open_run(require_run(db), allow_network_fs)
    if as_json and not watch:
        typer.echo(json.dumps(snapshot(conn)))
        return
    console = Console()
    if not watch:
        console.print(status_view(snapshot(conn)))
        return
    with Live(status_view(snapshot(conn)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            snap = snapshot(conn)
            if as_json:
                console.print_json(json.dumps(snap))
            else:
                live.update(status_view(snap), refresh=True)


@app.command()
@one_line_errors
def dead(
    db: Path = DbOption,
    requeue: bool = typer.Option(False, "--requeue", help="Give every dead ref a fresh set of attempts."),
    limit: int = typer.Option(50, help="How many dead refs to list."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """List dead refs (attempts used up) with their last error; --requeue puts them back."""
    from rich.console import Console
    from rich.table import Table

    from dataflow.control.queue import RefQueue

    queue = RefQueue(open_run(require_run(db), allow_network_fs))
    rows = queue.dead(limit)
    table = Table(title=f"dead refs ({queue.counts()['dead']})")
    for col in ("id", "key", "attempts", "last error"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.id), r.key, str(r.attempts), r.last_error or "")
    Console().print(table)
    if requeue:
        typer.echo(f"requeued {queue.requeue_dead()} dead refs")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@one_line_errors
def run(ctx: typer.Context, db: Path = DbOption) -> None:
    """Run `dataflow rollout` and `dataflow train` as two child processes on one DB, with one live view.

    Any other option is passed to whichever of the two commands accepts it (--db to both). Ctrl-C stops
    both cleanly (the run resumes later); exits non-zero if either fails. Logs go to DB-stem.logs/.
    """
    from dataflow.run import ROLES, route_options, run_pair

    group = typer.main.get_command(app)
    routed = route_options(["--db", str(db), *ctx.args], {role: group.commands[role] for role in ROLES})
    run_pair(db, routed, log_dir=db.parent / f"{db.stem}.logs")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
