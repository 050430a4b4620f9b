"""Errors a user can act on. The CLI prints them in one line and exits with code 2."""

import errno
import os


class CapfiltError(Exception):
    """Bad input or a state the user can fix: what was wrong, with which input, what to do."""

    exit_code = 2


class StageNotRunError(CapfiltError):
    """A command needs the output of a stage that has not run on this dataset."""


# Errors of the place written to, not of capfilt: a full disk, a read-only mount, a quota.
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG")
    if hasattr(errno, name)
)


def write_failure(error: BaseException, where: str | None = None) -> CapfiltError | None:
    """The one-line error of an OSError that the place being written caused, or None for
    any other error. `where`: what was being written, when the error does not name it."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return None
    what = error.filename or where
    target = f" {what}" if what else ""
    reason = error.strerror or os.strerror(error.errno)
    return CapfiltError(
        f"cannot write{target}: {reason}. Free some space or pick a folder you can write to, "
        "then run the same command again: what was finished is kept"
    )
