"""Thin Typer commands: parse options, make one library call, print what it did.

Heavy imports (torch, transformers, img2dataset) live inside the library functions, so that
`capfilt --help` answers at once.
"""

import sys

from capfilt.cli import data, tools, training  # noqa: F401 - registers the commands
from capfilt.cli.app import app, reader_went_away


def main() -> None:
    try:
        app()
    except SystemExit as e:
        # click answers a closed output pipe (`capfilt fetch --help | grep -q x`) with exit 1
        # after swapping stdout for its PacifyFlushWrapper; the reader simply had enough.
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            reader_went_away()
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":
    main()
