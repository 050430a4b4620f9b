"""Progress bars of the long-running stages."""

from __future__ import annotations


def image_progress(total: int, description: str, enabled: bool = True, unit: str = "images"):
    """A rich progress bar over `unit`s (images, shards), with the rate and the time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    def fixed():
        return Column(no_wrap=True)

    return _Progress(
        Progress(
            TextColumn("[bold]{task.description}", table_column=fixed()),
            BarColumn(table_column=Column(min_width=5)),
            MofNCompleteColumn(table_column=fixed()),
            TaskProgressColumn(table_column=fixed()),
            TextColumn(
                "{task.fields[rate]} " + ("img" if unit == "images" else unit) + "/s",
                table_column=fixed(),
            ),
            TimeElapsedColumn(table_column=fixed()),
            TextColumn("ETA", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed()),
            disable=not enabled,
            transient=False,
        ),
        total,
        description,
    )


def step_progress(console, enabled: bool = True):
    """A rich progress bar over training steps with the latest losses (`stats`) at its end.

    On a narrow terminal the stats give way first (cut with an ellipsis), then the bar; the
    step count and the time left are never cut.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=5)),
        MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=9)),
        TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
        TextColumn(
            "{task.fields[stats]}",
            table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis"),
        ),
        console=console,
        disable=not enabled,
        transient=False,
        expand=True,
    )


class _Progress:
    def __init__(self, progress, total: int, description: str):
        self.progress = progress
        self.task = progress.add_task(description, total=total, rate="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, done: int) -> None:
        self.progress.advance(self.task, done)
        speed = self.progress.tasks[self.task].speed
        self.progress.update(self.task, rate=f"{speed:,.1f}" if speed else "-")
