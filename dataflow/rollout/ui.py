"""Rich progress for a rollout: the preparation stages (prompts, vocabulary), then samples, tokens/s and
time waiting for the trainer."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RolloutView:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> RolloutView:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def message(self, text: str) -> None:
        """Always shown (on stderr), with or without the live progress."""
        self.console.print(text)

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[[int | None], None]]:
        """A bar for one preparation stage; the callback advances it by one, or sets how many are done."""
        task = self.progress.add_task(description, total=total, rate="", status="")

        def advance(completed: int | None = None) -> None:
            if completed is None:
                self.progress.advance(task)
            else:
                self.progress.update(task, completed=completed)

        yield advance

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task("rollout", total=total, completed=done, rate="", status="starting")

    def update(self, done: int, stats, status: str) -> None:
        if self.task is None:
            return
        rate = f"{stats.samples_per_s:.2f} samples/s {stats.tokens_per_s:.0f} tok/s"
        if stats.wait_s >= 1:
            rate += f" waited {stats.wait_s:.0f}s"
        self.progress.update(self.task, completed=done, rate=rate, status=status)
