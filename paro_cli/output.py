"""One output sink: Rich tables and progress for people, or only JSON on stdout with --json."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

PIPED_WIDTH = 120


class Output:
    """`silent`: prints nothing at all (a worker process other than rank 0, see parallel.py)."""

    def __init__(self, as_json: bool = False, silent: bool = False):
        self.as_json, self.silent = as_json, silent
        # Piped output (CI logs) has no terminal width; Rich would assume 80 columns and cut cells.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        self.console = Console(width=PIPED_WIDTH if piped else None)
        self.errors = Console(stderr=True)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if not (self.as_json or self.silent):  # lines are left whole (soft wrap): logs and greps see them unbroken
            self.console.print(*args, **{"soft_wrap": True, **kwargs})

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.as_json or self.silent:
            return
        table = Table(title=title)
        for i, col in enumerate(columns):
            table.add_column(col, no_wrap=i == 0, overflow="fold")  # wrap a narrow cell, never cut it
        for row in rows:
            table.add_row(*(str(x) for x in row))
        self.console.print(table)

    def json(self, data: Any) -> None:
        if self.as_json and not self.silent:
            sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")

    @contextlib.contextmanager
    def progress(self) -> Iterator[StepProgress]:
        """Progress bars on stderr (none with --json). The display starts with the first task,
        so checks that fail before any work print nothing but their error."""
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.errors,
            disable=self.as_json or self.silent,
        )
        steps = StepProgress(bar)
        try:
            yield steps
        finally:
            if steps.task is not None:
                bar.stop()


class StepProgress:
    """Adapter from (start(name, total), step(i)) callbacks to Rich tasks."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = None

    def start(self, name: str, total: int) -> None:
        if self.task is None:
            self.bar.start()
        self.task = self.bar.add_task(name, total=total)

    def step(self, i: int) -> None:
        self.bar.update(self.task, completed=i + 1)
