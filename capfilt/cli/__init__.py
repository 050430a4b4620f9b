"""Thin Typer commands: parse options, make one library call, print what it did.

Heavy imports (torch, transformers, img2dataset) live inside the library functions, so that
`capfilt --help` answers at once.
"""

from capfilt.cli import data, tools, training  # noqa: F401 - registers the commands
from capfilt.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
