"""Thin Typer commands: parse options, call one stage function, print a summary.

Heavy imports (torch, transformers, img2dataset) live inside the stage modules' functions so
that `capfilt --help` answers at once.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.errors import CapfiltError

app = typer.Typer(
    name="capfilt",
    help="Curate web image-text datasets with BLIP's CapFilt (caption + filter), and train on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def command(*args, **kwargs):
    """`app.command`, printing CapfiltErrors in one line with exit code 2 instead of a traceback."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*a, **kw):
            try:
                return func(*a, **kw)
            except CapfiltError as e:
                console(stderr=True).print(f"[bold red]error:[/] {e}", soft_wrap=True)
                raise typer.Exit(e.exit_code) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        from capfilt import __version__

        print(f"capfilt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Curate web image-text datasets with BLIP's CapFilt, and train on them.

    Example: capfilt fetch urls.csv ds && capfilt caption ds && capfilt filter ds --threshold 0.5
    """


DatasetArg = Annotated[
    str, typer.Argument(help="Dataset folder (local path or fsspec URL such as s3://bucket/ds).")
]


# --- fetch, ingest (capfilt/fetch.py, capfilt/ingest.py) -------------------------------------

# --- caption, filter (capfilt/caption.py, capfilt/filter.py) ---------------------------------

# --- report, export-data (capfilt/report.py, capfilt/export_data.py) -------------------------

# --- pretrain, finetune, export, run (capfilt/train.py, capfilt/pipeline.py) -----------------

# --- bench (capfilt/bench.py) ------------------------------------------------------------------

# --- query ---------------------------------------------------------------------------------
class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@command()
def query(
    dataset: DatasetArg,
    sql: Annotated[str, typer.Argument(help="SQL over the views images, captions, scores, curated.")],
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Output as a table, CSV or JSON lines.")
    ] = OutputFormat.table,
    with_images: Annotated[
        bool, typer.Option(help="Keep the `jpg` bytes column in the `images` view.")
    ] = False,
):
    """Run DuckDB SQL over the dataset's Parquet shards.

    Views: `images` (without the image bytes unless --with-images), `captions`, `scores`,
    `curated` — one for each stage that has run.

    Example: capfilt query ds "select status, count(*) from images group by 1"
    """
    from capfilt.layout import Dataset
    from capfilt.query import run_query

    columns, rows = run_query(Dataset(dataset), sql, with_images=with_images)
    print_rows(columns, rows, format.value)


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        import json

        for row in rows:
            print(json.dumps(dict(zip(columns, row)), default=str, ensure_ascii=False))
    else:
        from rich.table import Table

        table = Table(*columns, show_lines=False)
        for row in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
