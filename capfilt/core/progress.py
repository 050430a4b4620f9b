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

    return _Progress(
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} " + ("img" if unit == "images" else unit) + "/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=False,
        ),
        total,
        description,
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
