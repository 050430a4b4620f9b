"""Terminal output shared by the commands."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def library_output_to(log_path: str | os.PathLike) -> Iterator[object]:
    """Send everything written to file descriptors 1 and 2 (img2dataset, its worker processes,
    Spark) to `log_path`; yield a text stream that still reaches the user's terminal.
    """
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fileno = None  # stdout is not a file (a test runner's buffer): it stays reachable
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    terminal = None
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        if fileno == 1:
            terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
            yield terminal
        else:
            yield sys.stdout
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if terminal is not None:
            terminal.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def new_log_path(stage: str) -> str:
    """A local file for the output of the libraries a stage runs."""
    handle, path = tempfile.mkstemp(prefix=f"capfilt-{stage}-", suffix=".log")
    os.close(handle)
    return path
