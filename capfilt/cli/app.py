"""The Typer application, its console and the `command` decorator every command uses."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from capfilt.core.errors import CapfiltError

app = typer.Typer(
    name="capfilt",
    help="Curate web image-text datasets with BLIP's CapFilt, and train on them.",
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
