"""The Typer application, its console and the `command` decorator every command uses."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from capfilt.core.errors import CapfiltError, write_failure
from capfilt.core.text import printable

if TYPE_CHECKING:
    from rich.text import Text

# Third-party libraries stay quiet unless the user's environment says otherwise: no update
# check over the network at import (albumentations, imported by img2dataset, also in its worker
# processes), no loading bars or advisory warnings from transformers and the hub.
QUIET_LIBRARIES = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _name, _value in QUIET_LIBRARIES.items():
    os.environ.setdefault(_name, _value)

# Rich's help tables cut long option names ("--allow-private-…") to fit 80 columns; where the
# help is piped or the terminal is narrow, click's plain help wraps instead of cutting.
WIDE_HELP = 100


def _help_mode():
    if sys.stdout.isatty() and shutil.get_terminal_size().columns >= WIDE_HELP:
        return "markdown"
    return None


app = typer.Typer(
    name="capfilt",
    help="Curate web image-text datasets with BLIP's CapFilt, and train on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=_help_mode(),
)


def console(stderr: bool = False):
    """The console commands print to. Markup is capfilt's own; data goes in as `literal(...)`,
    and `:name:` is never turned into an emoji."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, emoji=False)


def command(*args, **kwargs):
    """`app.command`, printing CapfiltErrors in one line with exit code 2 instead of a traceback."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*a, **kw):
            try:
                return func(*a, **kw)
            except CapfiltError as e:
                _fail(e)
            except BrokenPipeError:
                reader_went_away()
                raise typer.Exit(0) from None
            except OSError as e:  # a full disk or a read-only folder met while writing
                failure = write_failure(e)
                if failure is None:
                    raise
                _fail(failure)

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _fail(error: CapfiltError):
    """Print `error` in one line and exit with its code, without a traceback."""
    console(stderr=True).print("[bold red]error:[/] ", literal(error), sep="", soft_wrap=True)
    raise typer.Exit(error.exit_code) from None


def literal(value) -> Text:
    """User data (a caption, a URL, a server's message, a path) as rich text that prints as
    written: no markup, no emoji codes, and control characters (terminal escapes) shown as
    \\xNN rather than sent to the terminal."""
    from rich.text import Text

    return Text(printable(value))


def markup(template: str, **data) -> Text:
    """capfilt's own markup `template` with its `{name}` fields filled by literal data, each in
    the style around its field: markup("[yellow]warning:[/] key {key} has no image", key=key)."""
    import re

    from rich.text import Text

    values = list(data.values())
    styled = Text.from_markup(
        template.format(**{name: f"\0{i}\0" for i, name in enumerate(data)}), emoji=False
    )
    out, start = Text(), 0
    for field in re.finditer("\0(\\d+)\0", styled.plain):
        out.append_text(styled[start : field.start()])
        value = literal(values[int(field.group(1))])
        for span in styled[field.start() : field.end()].spans:
            value.stylize(span.style)
        out.append_text(value)
        start = field.end()
    out.append_text(styled[start:])
    return out


def reader_went_away() -> None:
    """The pipe capfilt writes to was closed (`capfilt query … | head`): stop writing, quietly.
    Python would otherwise complain again when it flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


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
