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
                from rich.markup import escape

                console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
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

# --- run (capfilt/pipeline.py) ----------------------------------------------------------------
@command()
def run(
    pipeline_file: Annotated[Path, typer.Argument(help="A pipeline TOML, e.g. pipelines/demo.toml.")],
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a [pipeline] variable: --set dataset=/data/ds."),
    ] = None,
    only: Annotated[
        Optional[list[str]], typer.Option(help="Run only these stages (by command name).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the commands without running them.")] = False,
):
    """Run a whole pipeline file: its stages in order, each as the capfilt command it names.

    Finished shards are skipped by every stage, so re-running a pipeline resumes it.

    Example: capfilt run pipelines/blip_base_cc3m.toml --set dataset=/data/cc3m
    """
    import shlex

    from capfilt.pipeline import load_pipeline

    overrides = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise CapfiltError(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value
    pipeline = load_pipeline(pipeline_file, overrides)
    out = console()
    for i, stage in enumerate(pipeline.stages, 1):
        if only and stage.command not in only:
            continue
        argv = stage.argv()
        out.print(f"[bold]▶ {pipeline.name} {i}/{len(pipeline.stages)}:[/] capfilt {shlex.join(argv)}")
        if dry_run:
            continue
        import click

        try:
            # Without standalone mode click returns a command's exit code instead of exiting.
            exit_code = app(argv, standalone_mode=False)
        except click.ClickException as e:  # usage errors: unknown option, bad value
            raise CapfiltError(f"stage {i} ({stage.command}): {e.format_message()}") from None
        if isinstance(exit_code, int) and exit_code != 0:
            console(stderr=True).print(f"[bold red]stage {i} ({stage.command}) failed[/]")
            raise typer.Exit(exit_code)


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
